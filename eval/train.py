"""`vtok train METHOD`: train a method's own modules (projector-stage methods: M3, TokenFLEX) on the offline
VLM and easy-VQA, on cached vision features, saving only the method's parameters (safetensors)."""

from __future__ import annotations

import argparse
import json
import math
import signal
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["add_parser", "main", "train", "variant_loss", "distill_loss"]


def _override(method, settings: dict):
    """Set ``settings`` on ``method`` (validated); returns the old values."""
    old = {k: getattr(method, k) for k in settings}
    for k, v in settings.items():
        setattr(method, k, v)
    return old


def _stage_tokens(handle, method, feats: torch.Tensor, grid):
    """The method's projector stage on cached features [B, N, Dv] (one image per sample)."""
    from vtok.tokens import VisualTokens

    project = handle.adapter.parts()["projector"]
    tokens = VisualTokens.from_features(feats, torch.arange(feats.shape[0]), grid=grid)
    return method.projector(tokens, project)


def variant_loss(model, handle, method, helper, feats, questions, answers, grid, by_count: dict | None = None) -> torch.Tensor:
    """Answer cross-entropy (answer tokens + EOS, mean over every answer token of the batch) at the method's
    current settings: its tokens spliced into prompts with one placeholder per token, as the attached model
    would run them. Samples are run in one LLM forward per token count, so a batch whose samples keep different
    counts (a scale or n drawn per sample) is not padded to its longest prompt; the loss is the same.
    ``by_count``: adds each count's [summed loss, answer tokens] to it (the log's loss per token count)."""
    from . import offline as O

    out = _stage_tokens(handle, method, feats, grid)
    counts = out.counts().tolist()
    tok = helper.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    total, n_tokens = None, 0
    for k in sorted(set(counts)):
        members = [i for i, c in enumerate(counts) if c == k]
        seqs, n_ans = [], []
        for i in members:
            ids, na = O.build_prompt_ids(tok, questions[i], k, helper.image_token_id, answers[i])
            seqs.append(ids)
            n_ans.append(na)
        ids, mask = O.left_pad(seqs, pad)
        ids, mask = ids.to(feats.device), mask.to(feats.device)
        emb = model.get_input_embeddings()(ids)
        sel = ids == helper.image_token_id
        emb = emb.masked_scatter(sel.unsqueeze(-1), out.features[members][out.mask[members]].to(emb.dtype))
        keep = max(n_ans) + 1
        logits = model(inputs_embeds=emb, attention_mask=mask, position_ids=O.position_ids_from_mask(mask),
                       logits_to_keep=keep, use_cache=False).logits[:, :-1].float()
        labels = torch.full((len(seqs), keep - 1), -100, dtype=torch.long, device=ids.device)
        for j, na in enumerate(n_ans):
            labels[j, keep - 1 - na:] = ids[j, ids.shape[1] - na:]
        part = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total = part if total is None else total + part
        n_tokens += sum(n_ans)
        if by_count is not None:
            acc = by_count.setdefault(int(k), [0.0, 0])
            acc[0] += part.item()
            acc[1] += sum(n_ans)
    return total / n_tokens


def distill_loss(handle, method, feats, grid) -> torch.Tensor:
    """Warm start of a method that brings its own projector: mean squared error between its tokens and the
    model's projector output average-pooled to the same grid (what training-free pooling would give)."""
    from vtok.methods.grid_pool import pool_to_sides
    from vtok.tokens import VisualTokens

    out = _stage_tokens(handle, method, feats, grid)
    sides = [math.isqrt(int(c)) for c in out.counts().tolist()]
    with torch.no_grad():
        proj = handle.adapter.parts()["projector"](feats)
        target = pool_to_sides(VisualTokens.from_features(proj, torch.arange(feats.shape[0]), grid=grid), sides)
    diff = (out.features.float() - target.features.float())[out.mask]
    return diff.pow(2).mean() / target.features.float()[target.mask].pow(2).mean()


def _log(path: Path | None, rec: dict) -> None:
    print(json.dumps(rec), flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def step_loop(handle, opt, loss_of, *, steps: int, lr: float, out, log: Path | None = None, log_every: int = 10,
              save_every: int = 0, desc: str = "train") -> dict:
    """The training loop of a method's own modules: ``loss_of(step)`` gives the step's loss (1-based); AdamW
    steps under a one-cycle LR, a progress bar, the mean loss logged every ``log_every`` steps, the modules saved
    every ``save_every`` steps and at the end (also on an error), then put in eval mode and taken off the model.
    Returns the last log record."""
    from tqdm import tqdm

    from .train_projector import one_cycle_lr

    t0, run = time.time(), []
    bar = tqdm(total=steps, desc=desc, unit="step")
    try:
        for step in range(1, steps + 1):
            for g in opt.param_groups:
                g["lr"] = one_cycle_lr((step - 1) / steps, lr)
            loss = loss_of(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{run[-1]:.3f}")
            if step % log_every == 0 or step == steps:
                _log(log, {"step": step, "loss": round(sum(run) / len(run), 4), "elapsed_s": round(time.time() - t0, 1)})
                run = []
            if save_every and step % save_every == 0:
                handle.save(out)
    finally:
        bar.close()
        handle.eval()
        handle.save(out)
        handle.remove()
    rec = {"event": "end", "steps": steps, "elapsed_s": round(time.time() - t0, 1), "saved": Path(out).name}
    _log(log, rec)
    return rec


def train(a) -> dict:
    """The loop (see ``main`` for the command line). Returns the last log record."""
    from tqdm import tqdm

    import vtok

    from . import offline as O
    from .runner import parse_method
    from .train_projector import cached_features, one_cycle_lr

    name, hp = parse_method(a.method)
    if name == "tempme":  # a vision-tower method: its own proxy task on real clips (vtok.eval.train_tempme)
        from . import train_tempme

        args = argparse.Namespace(out=a.out, resume=a.resume, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                                  seed=a.seed, log=a.log, log_every=a.log_every, frames=int(hp.get("frames", 12)),
                                  scale=50.0)  # fmt: skip
        return train_tempme.train(args)
    if name == "vqtoken":  # a before_llm module trained on the video-needle task (vtok.eval.train_vqtoken)
        from . import train_vqtoken

        return train_vqtoken.train(a, dict(hp))
    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    model, _, helper = O.load_vlm(a.cache_dir, device=device)
    model.requires_grad_(False)
    handle = vtok.apply(model, name, weights=a.resume if a.resume else None, **hp)
    method = handle.methods[0]
    if "projector" not in method.stages or not len(handle.modules):
        handle.remove()
        raise ValueError(f"vtok train runs methods with a trainable projector stage (matryoshka, tokenflex); {name} is not one")
    handle.train()
    params = list(handle.parameters())
    qs, ans, img_ids, paths = O.easy_vqa_split("train")
    ids = sorted(paths)[: a.max_train_images] if a.max_train_images else sorted(paths)
    fc = cached_features(model, a.cache_dir, "train", ids, paths, device)
    row = {int(i): k for k, i in enumerate(fc["ids"].tolist())}
    keep = [k for k, i in enumerate(img_ids) if int(i) in row]
    grid = handle.adapter.grid(fc["feats"].shape[1])
    log = Path(a.log) if a.log else None
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    start = {"event": "start", "time": time.strftime("%Y-%m-%d %H:%M:%S"), "method": a.method, "device": str(device),
             "threads": torch.get_num_threads(), "batch_size": a.batch_size, "lr": a.lr, "steps": a.steps,
             "distill_steps": a.distill_steps, "max_minutes": a.max_minutes, "seed": a.seed, "bf16": a.bf16,
             "trainable_parameters": sum(p.numel() for p in params), "n_questions": len(keep), "n_images": len(ids),
             "resume": Path(a.resume).name if a.resume else None}
    _log(log, start)
    t0, step, seen, run = time.time(), 0, 0, []
    by_count: dict = {}
    total = a.distill_steps + a.steps
    bar = tqdm(total=total, desc=f"train {name}", unit="step")
    stop = {"now": False}

    def _term(signum, frame):
        stop["now"] = True

    old = signal.signal(signal.SIGTERM, _term)
    rec = start
    # the loop runs the method's stage itself and splices its tokens: the model runs without vtok's hooks
    stash = handle.adapter.hooks_stashed()
    stash.__enter__()
    try:
        while step < total and not stop["now"]:
            elapsed = time.time() - t0
            if a.max_minutes and elapsed >= a.max_minutes * 60:
                break
            progress = max(step / total, elapsed / (a.max_minutes * 60) if a.max_minutes else 0.0)
            for g in opt.param_groups:
                g["lr"] = one_cycle_lr(progress, a.lr)
            idx = rng.choice(keep, size=a.batch_size, replace=False)
            feats = fc["feats"][[row[int(img_ids[i])] for i in idx]].to(device, next(model.parameters()).dtype)
            variants = method.train_variants(len(idx), rng)
            losses = []
            for v in variants:
                old_settings = _override(method, v)
                try:
                    if step < a.distill_steps:
                        losses.append(distill_loss(handle, method, feats, grid))
                    else:
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16):
                            losses.append(variant_loss(model, handle, method, helper, feats, [qs[i] for i in idx],
                                                       [ans[i] for i in idx], grid, by_count).float())
                finally:
                    _override(method, old_settings)
            loss = torch.stack(losses).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += len(idx)
            run.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{run[-1]:.3f}", phase="distill" if step <= a.distill_steps else "lm")
            if step % a.log_every == 0 or step == total:
                rec = {"step": step, "phase": "distill" if step <= a.distill_steps else "lm",
                       "loss": sum(run) / len(run), "elapsed_s": round(time.time() - t0, 1), "samples": seen}
                if by_count:  # answer loss per visual-token count (M3's scales, TokenFLEX's n x n) in this window
                    rec["loss_by_tokens"] = {str(k): round(v[0] / v[1], 4) for k, v in sorted(by_count.items())}
                by_count.clear()
                _log(log, rec)
                run = []
            if a.save_every and step % a.save_every == 0:
                handle.save(a.out)
    finally:
        stash.__exit__(None, None, None)
        signal.signal(signal.SIGTERM, old)
        bar.close()
        handle.eval()
        handle.save(a.out)
        handle.remove()
    rec = {"event": "interrupted" if stop["now"] else "end", "step": step, "samples": seen,
           "elapsed_s": round(time.time() - t0, 1), "saved": Path(a.out).name}
    _log(log, rec)
    return rec


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a method's own modules (M3, TokenFLEX) on the offline VLM",
                              description=main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(p)
    p.set_defaults(func=lambda args: (train(args), 0)[1])
    return p


def _arguments(p) -> None:
    p.add_argument("method", help="NAME[:K=V,...], e.g. tokenflex:train_n=(2,4,8,16)")
    p.add_argument("--model", default="offline-vlm", choices=["offline-vlm"], help="the model (the offline VLM)")
    p.add_argument("--dataset", default="easy-vqa", choices=["easy-vqa"], help="training questions")
    p.add_argument("--out", required=True, help="safetensors file for the method's parameters")
    p.add_argument("--resume", default=None, help="start from these saved parameters")
    p.add_argument("--steps", type=int, default=300, help="steps with the answer loss")
    p.add_argument("--distill-steps", type=int, default=0,
                   help="warm-up steps matching the model's projector output pooled to the same grid (own projectors)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-minutes", type=float, default=None, help="time cap; the LR schedule follows it")
    p.add_argument("--max-train-images", type=int, default=None, help="use the first N train images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="compute the LLM in fp32 (default: bf16 autocast, ~3x faster matmuls on a CPU with AVX512-BF16)")
    p.add_argument("--log", default=None, help="append JSON records here")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=50, help="save every N steps (and at the end)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache-dir", default=None, help="default $VTOK_CACHE or ~/.cache/vtok")


def main(argv=None) -> int:
    """Train a method's own modules on the offline VLM (DINOv2 + SmolLM2, both frozen) with easy-VQA.

        vtok train matryoshka --out m3.safetensors --steps 300            # the projector copy, all nested scales
        vtok train tokenflex:train_n=(2,4,8,16) --distill-steps 200 --steps 300 --out tokenflex.safetensors
        vtok train tempme --steps 60 --batch-size 8 --lr 3e-3 --out tempme.safetensors   # DINOv2, real clips
        vtok train vqtoken:k=16 --steps 150 --batch-size 4 --out vqtoken.safetensors  # VQ-attention, video-needle

    TempMe trains on a retrieval proxy built from real clips on the offline DINOv2 (``vtok.eval.train_tempme``),
    VQToken's VQ-attention module on the video-needle task (``vtok.eval.train_vqtoken``).

    The vision tower runs once per train image (features cached under <cache>/offline/features); each step
    draws a batch of questions, asks the method for its training variants (M3: every nested scale; TokenFLEX:
    a grid size per sample), runs its projector stage and the frozen LLM on prompts with one placeholder per
    token, and averages the answer losses (answer tokens + EOS). AdamW, one-cycle LR (the larger of the step
    and time fractions when --max-minutes is set). Ctrl-C / SIGTERM save and stop; --resume continues from a
    saved file (with a fresh schedule). Load the result with vtok.apply(model, NAME, weights=OUT).
    """
    p = argparse.ArgumentParser(prog="vtok train", description=main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(p)
    train(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train the offline VLM's projector on easy-VQA, DINOv2 and SmolLM2 frozen:
``python -m vtok.eval.train_projector``.

``main`` documents the command line and the recipe; the shipped projector and its training log are in
``eval/assets`` (README, "What vtok demo printed").
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch

from . import offline as O

DEFAULT_LOG = O.ASSETS_DIR / "train_log.jsonl"


def parse_pool_mix(spec: str) -> tuple[list[int], list[float]]:
    """``"4:0.5,2:0.4,1:0.1"`` -> ([4, 2, 1], [0.5, 0.4, 0.1]) (weights normalised); ``"2"`` -> ([2], [1.0])."""
    factors, weights = [], []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        f, _, w = part.partition(":")
        factors.append(int(f))
        weights.append(float(w) if w else 1.0)
    if not factors or any(f not in (1, 2, 4, 8, 16) for f in factors) or any(w < 0 for w in weights) \
            or sum(weights) <= 0:
        raise ValueError(f"bad --pool-mix {spec!r}: expected e.g. '1' or '4:0.5,2:0.4,1:0.1' with factors "
                         "dividing the 16x16 grid")
    s = sum(weights)
    return factors, [w / s for w in weights]


def one_cycle_lr(progress: float, max_lr: float, warmup: float = 0.05, div: float = 25.0,
                 final_div: float = 1e4) -> float:
    """One-cycle schedule (linear warm-up from max_lr/div, cosine down to max_lr/final_div) at progress in [0, 1]."""
    p = min(max(progress, 0.0), 1.0)
    lo, end = max_lr / div, max_lr / final_div
    if p < warmup:
        return lo + (max_lr - lo) * p / warmup
    q = (p - warmup) / max(1e-12, 1 - warmup)
    return end + (max_lr - end) * 0.5 * (1 + math.cos(math.pi * q))


def feature_cache_path(cache_dir, split: str, n_images: int) -> Path:
    return O.cache_root(cache_dir) / "features" / f"easyvqa-{split}-dinov2s-last-noCLS-224-n{n_images}.pt"


@torch.no_grad()
def cached_features(model, cache_dir, split: str, image_ids: list[int], paths: dict, device,
                    batch_size: int = 32) -> dict:
    """``{"ids": LongTensor[N], "feats": HalfTensor[N, 256, 384]}`` for ``image_ids`` (sorted), cached on disk."""
    from PIL import Image
    from tqdm import tqdm

    path = feature_cache_path(cache_dir, split, len(image_ids))
    if path.exists():
        d = torch.load(path)
        if d["ids"].tolist() == list(image_ids):
            return d
    path.parent.mkdir(parents=True, exist_ok=True)
    feats = []
    for s in tqdm(range(0, len(image_ids), batch_size), desc=f"DINOv2 features ({split})", unit="batch"):
        ims = [Image.open(paths[i]) for i in image_ids[s:s + batch_size]]
        pv = O.preprocess_images(ims).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=pv.is_cuda):
            f = O.vision_features(model, pv)
        feats.append(f.to(torch.float16).cpu())
    d = {"ids": torch.tensor(image_ids, dtype=torch.long), "feats": torch.cat(feats)}
    torch.save(d, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    return d


def path_for_log(path, log_path: Path) -> str:
    """``path`` as a log record names it: relative to the log's folder when it lies inside it, else
    its file name. The log ships with the package, so it records no machine's folders."""
    p, base = Path(path).resolve(), Path(log_path).resolve().parent
    return str(p.relative_to(base)) if p.is_relative_to(base) else p.name


def append_log(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def answer_loss(model, helper, batch_q, batch_a, feats, pool: int, device) -> torch.Tensor:
    """Cross-entropy over the answer tokens (+ EOS) only; logits are computed only for the last positions."""
    b = O.build_inputs(helper.tokenizer, None, batch_q, batch_a, image_token_id=helper.image_token_id, pool=pool)
    b = {k: v.to(device) for k, v in b.items()}
    n_ans = int((b["labels"] != -100).sum(1).max())
    keep = n_ans + 1
    out = O.forward_with_features(model, b["input_ids"], b["attention_mask"], feats, pool=pool,
                                  logits_to_keep=keep, position_ids=b["position_ids"])
    logits = out.logits[:, :-1].float()
    labels = b["labels"][:, -(keep - 1):]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100)


def train(a) -> None:
    from tqdm import tqdm

    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    t_start = time.time()
    model, tok, helper = O.load_vlm(a.cache_dir, projector=a.init_projector, device=device)
    model.requires_grad_(False)
    proj = model.model.multi_modal_projector
    proj.requires_grad_(True)
    proj.float()

    qs, ans, img_ids, paths = O.easy_vqa_split("train")
    ids = sorted(paths)
    if a.max_train_images:
        ids = ids[:a.max_train_images]
    fc = cached_features(model, a.cache_dir, "train", ids, paths, device)
    row = {int(i): k for k, i in enumerate(fc["ids"].tolist())}
    keep = [k for k, i in enumerate(img_ids) if int(i) in row]
    feats_all = fc["feats"]
    print(f"train questions {len(keep)} over {len(ids)} images; features {tuple(feats_all.shape)} "
          f"(ready after {time.time() - t_start:.0f} s)", flush=True)

    factors, weights = parse_pool_mix(a.pool_mix)
    steps_per_epoch = math.ceil(len(keep) / a.batch_size)
    total_steps = a.epochs * steps_per_epoch
    if a.max_steps:
        total_steps = min(total_steps, a.max_steps)
    opt = torch.optim.AdamW(proj.parameters(), lr=a.lr, weight_decay=0.0)
    max_s = a.max_minutes * 60 if a.max_minutes else None
    log_path = Path(a.log)
    append_log(log_path, {"event": "start", "time": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(device),
                          "threads": torch.get_num_threads(), "batch_size": a.batch_size, "lr": a.lr,
                          "pool_mix": a.pool_mix, "total_steps": total_steps, "max_minutes": a.max_minutes,
                          "n_questions": len(keep), "n_images": len(ids)})
    t0 = time.time()
    last_save = t0
    seen = 0
    step = 0
    run_loss, run_n, pool_counts = 0.0, 0, {f: 0 for f in factors}
    bar = tqdm(total=total_steps, desc="train projector", unit="step")

    def _train_loop():
        nonlocal step, seen, run_loss, run_n, last_save, done
        for epoch in range(a.epochs):
            order = rng.permutation(keep)
            for s in range(0, len(order), a.batch_size):
                idx = order[s:s + a.batch_size]
                elapsed = time.time() - t0
                progress = step / total_steps
                if max_s:
                    progress = max(progress, elapsed / max_s)
                if step >= total_steps or (max_s and elapsed >= max_s):
                    done = True
                    break
                lr = one_cycle_lr(progress, a.lr)
                for g in opt.param_groups:
                    g["lr"] = lr
                pool = int(rng.choice(factors, p=weights))
                pool_counts[pool] += 1
                feats = feats_all[[row[int(img_ids[i])] for i in idx]].to(device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss = answer_loss(model, helper, [qs[i] for i in idx], [ans[i] for i in idx], feats, pool,
                                       device)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                seen += len(idx)
                run_loss += float(loss) * len(idx)
                run_n += len(idx)
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.3f}", pool=pool, lr=f"{lr:.1e}")
                now = time.time()
                if step % a.log_every == 0:
                    append_log(log_path, {"step": step, "epoch": epoch, "loss": run_loss / run_n, "lr": lr,
                                          "elapsed_s": round(now - t0, 1), "samples": seen,
                                          "samples_per_s": round(seen / (now - t0), 3),
                                          "pool_counts": {str(k): v for k, v in pool_counts.items()}})
                    run_loss, run_n = 0.0, 0
                if now - last_save >= a.save_every_minutes * 60:
                    O.save_projector(model, a.out, {"step": step, "samples": seen, "pool_mix": a.pool_mix})
                    last_save = now
            if done:
                break

    done = False
    model.train(False)
    interrupted = False

    def _on_term(signum, frame):  # SIGTERM behaves like Ctrl-C: save the projector, log, exit cleanly
        raise KeyboardInterrupt

    old_handler = signal.signal(signal.SIGTERM, _on_term)
    try:
        _train_loop()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    bar.close()
    O.save_projector(model, a.out, {"step": step, "samples": seen, "pool_mix": a.pool_mix})
    rec = {"event": "interrupted" if interrupted else "end", "step": step, "samples": seen,
           "elapsed_s": round(time.time() - t0, 1),
           "samples_per_s": round(seen / max(1e-9, time.time() - t0), 3),
           "pool_counts": {str(k): v for k, v in pool_counts.items()}, "saved": path_for_log(a.out, log_path)}
    if run_n:
        rec["loss"] = run_loss / run_n
    append_log(log_path, rec)
    print(json.dumps(rec), flush=True)


def evaluate(a) -> None:
    device = torch.device(a.device)
    model, tok, helper = O.load_vlm(a.cache_dir, projector=a.out, device=device)
    for pool in [int(p) for p in a.eval_pool.split(",")]:
        t = time.time()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            r = O.evaluate_easy_vqa(model, helper, n=a.eval, batch_size=a.eval_batch_size, pool=pool,
                                    seed=a.seed)
        r.update({"event": "eval", "tokens": O.num_image_tokens(pool=pool),
                  "projector": path_for_log(a.out, Path(a.log)) if a.log else str(a.out),
                  "seconds": round(time.time() - t, 1)})
        print(json.dumps(r), flush=True)
        if a.log:
            append_log(Path(a.log), r)


def main(argv=None) -> None:
    """Train the offline VLM's projector on easy-VQA, or evaluate it.

        python -m vtok.eval.train_projector                       # GPU recipe: batch 64, 2 epochs, full 256 tokens
        nice -n 19 python -m vtok.eval.train_projector --device cpu --threads 2 --batch-size 16 \\
            --pool-mix 4:0.5,2:0.4,1:0.1 --max-minutes 60          # CPU: mostly pooled visual tokens
        python -m vtok.eval.train_projector --eval 300 --eval-pool 1,2   # accuracy, full and 2x2-pooled tokens

    Only the LLaVA projector (384 -> 576 -> 576) is trained; DINOv2 and SmolLM2 are frozen. The DINOv2
    features (the exact pre-projector features HF LLaVA uses: last hidden state before the final layernorm,
    CLS dropped) are computed once and cached in ``<cache>/offline/features/``. Loss is on the answer tokens
    (+ EOS) only. AdamW, no weight decay, one-cycle LR (5% warm-up, cosine decay); when ``--max-minutes`` is
    set, the schedule's progress is the larger of the step fraction and the time fraction, so a time-capped
    run still anneals.

    ``--pool-mix`` (TokenFLEX-style) draws an average-pooling factor per batch (1 = 16x16 = 256 tokens,
    2 = 8x8 = 64, 4 = 4x4 = 16), pooling the features before the projector; this is what makes CPU training
    feasible. Evaluation uses the full 256 tokens through the stock HF LLaVA forward.
    """
    p = argparse.ArgumentParser(
        description=inspect.cleandoc(main.__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cache-dir", default=None, help="default $VTOK_CACHE or ~/.cache/vtok")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="time cap (training loop); saves and stops")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pool-mix", default="1", help="pool factors with weights, e.g. '1' or '4:0.5,2:0.4,1:0.1'")
    p.add_argument("--max-train-images", type=int, default=None, help="use the first N train images (features)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-projector", default=None, help="start from this projector (default: random, seed 0)")
    p.add_argument("--out", default=str(O.DEFAULT_PROJECTOR))
    p.add_argument("--log", default=str(DEFAULT_LOG))
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every-minutes", type=float, default=5.0)
    p.add_argument("--eval", type=int, default=0, metavar="N", help="evaluate --out on N test questions instead")
    p.add_argument("--eval-pool", default="1", help="pool factors to evaluate, e.g. '1,2'")
    p.add_argument("--eval-batch-size", type=int, default=16)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.eval:
        evaluate(a)
    else:
        train(a)


if __name__ == "__main__":
    main()

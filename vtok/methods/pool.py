"""`pool`: 2-D average downsampling of each image's token grid (before the LLM)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..method import POSITION_POLICIES, Method, hparam, register
from ..tokens import VisualTokens
from .clips import pack_rows


@register
@dataclass
class Pool(Method):
    """2-D average pooling of each image's token grid (factor, or an output budget)."""

    name = "pool"
    stages = ("before_llm",)
    noop = {"factor": 1}
    example = {"factor": 2}
    paper = "2x2 average pooling of the patch grid (the M3 / LLaVA-OneVision video convention)"
    kept_meaningful = False  # pooled tokens are new tokens
    needs_full_grids = True

    factor: int = hparam(
        2, "pooling window and stride along each grid axis (ceil mode at the borders); 1 = no pooling",
        type=int, range="[1, inf)",
    )
    retain: float | None = hparam(
        None, "instead of factor: target fraction of tokens; the grid is adaptively pooled to ~H*sqrt(r) x W*sqrt(r)",
        type=float, range="(0, 1]",
    )
    position_policy: str = hparam(
        "compact", "'compact' renumbers RoPE positions, 'keep' keeps the window's first index", choices=POSITION_POLICIES
    )

    def output_grid(self, h: int, w: int) -> tuple[int, int]:
        if h == 0 or w == 0:  # an AnyRes grid with nothing left after unpadding
            return 0, 0
        if self.retain is not None:
            s = math.sqrt(float(self.retain))
            return max(1, min(h, round(h * s))), max(1, min(w, round(w * s)))
        return math.ceil(h / self.factor), math.ceil(w / self.factor)

    def _windows(self, n: int, out: int) -> list[tuple[int, int]]:
        """[start, stop) of the ``out`` windows along an axis of ``n`` tokens: ``factor``-wide windows
        (ceil mode: the last may be shorter), or adaptive pooling's windows for a ``retain`` budget."""
        if self.retain is None:
            f = self.factor
            return [(i * f, min(n, (i + 1) * f)) for i in range(out)]
        return [(math.floor(i * n / out), math.ceil((i + 1) * n / out)) for i in range(out)]

    def _pool_grid(self, x: torch.Tensor, h: int, w: int):
        """x [M, h*w, D] (raster) -> pooled [M, k, D] (fp32), sizes [k], first [k] (window's first raster index)."""
        oh, ow = self.output_grid(h, w)
        m, _, d = x.shape
        if oh * ow == 0:
            return x.new_zeros(m, 0, d, dtype=torch.float32), torch.zeros(0), torch.zeros(0, dtype=torch.long)
        x = x.float().transpose(1, 2).reshape(m, d, h, w)
        ys, xs = self._windows(h, oh), self._windows(w, ow)
        pooled = torch.stack(
            [torch.stack([x[:, :, a:b, c:e].mean((2, 3)) for (c, e) in xs], -1) for (a, b) in ys], -2
        )  # [M, D, oh, ow]
        sizes = torch.tensor([(b - a) * (e - c) for (a, b) in ys for (c, e) in xs], dtype=torch.float32)
        first = torch.tensor([a * w + c for (a, _) in ys for (c, _) in xs])
        return pooled.reshape(m, d, oh * ow).transpose(1, 2), sizes, first

    def token_schedule(self, visual_tokens: int, units: list[int]) -> list:
        """Square grids per unit are pooled to ``output_grid``; other units are left as they are."""
        from ..stats import Reduction

        out = 0
        for u in units:
            r = math.isqrt(u)
            oh, ow = self.output_grid(r, r) if r * r == u else (u, 1)
            out += oh * ow if r * r == u else u
        return [Reduction(self.name, "before_llm", None, [visual_tokens], [out], None)]

    def before_llm(self, tokens: VisualTokens, probes: dict) -> VisualTokens:
        """Pool every grid of every unit on its own: an image's grid, each video frame, an AnyRes
        image's base grid and its unpadded high-resolution grid (``VisualTokens.unit_grids``)."""
        if tokens.grid is None and tokens.grids is None:
            raise ValueError("pool needs the 2-D token grid, which this adapter did not provide")
        grids = tokens.unit_grids()
        u = tokens.features.shape[0]
        counts = tokens.counts().tolist()
        for i, gs in enumerate(grids):
            full = sum(h * w for h, w in gs)
            if counts[i] != full or not bool(tokens.mask[i, :full].all()):
                shape = " + ".join(f"{h}x{w}" for h, w in gs)
                raise ValueError(f"pool expects full {shape} grids per image, got {counts[i]} tokens in unit {i}")
        if all(self.output_grid(h, w) == (h, w) for gs in grids for h, w in gs):
            return tokens
        # pool all grids of one shape together (one batch per shape), then reassemble each unit
        by_shape: dict = {}
        for i, gs in enumerate(grids):
            off = 0
            for j, (h, w) in enumerate(gs):
                by_shape.setdefault((h, w), []).append((i, j, off))
                off += h * w
        parts: list[dict] = [{} for _ in range(u)]
        for (h, w), items in by_shape.items():
            x = torch.stack([tokens.features[i, off : off + h * w] for i, _, off in items])
            feats, sizes, first = self._pool_grid(x, h, w)
            for r, (i, j, off) in enumerate(items):
                parts[i][j] = (feats[r], sizes, first + off)
        rows = [[(parts[i][j][2], parts[i][j][0], parts[i][j][1]) for j in range(len(grids[i]))] for i in range(u)]
        return pack_rows(tokens, rows, keep_order=[True] * u)  # each grid's windows in raster order, grid after grid

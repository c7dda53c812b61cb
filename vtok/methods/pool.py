"""`pool`: 2-D average downsampling of each image's token grid (before the LLM)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..method import Method, hparam, register
from ..tokens import VisualTokens


@register
@dataclass
class Pool(Method):
    """2-D average pooling of each image's token grid (factor, or an output budget)."""

    name = "pool"
    stages = ("before_llm",)
    noop = {"factor": 1}
    example = {"factor": 2}
    kept_meaningful = False  # pooled tokens are new tokens

    factor: int = hparam(2, "pooling window and stride along each grid axis (ceil mode at the borders)")
    retain: float | None = hparam(
        None, "instead of factor: target fraction of tokens; the grid is adaptively pooled to ~H*sqrt(r) x W*sqrt(r)"
    )
    position_policy: str = hparam("compact", "'compact' renumbers RoPE positions, 'keep' keeps the window's first index")

    def validate(self):
        if self.retain is not None:
            if not isinstance(self.retain, (int, float)) or not (0.0 < float(self.retain) <= 1.0):
                raise ValueError(f"pool: retain={self.retain!r} is out of range; give a fraction in (0, 1]")
        elif not isinstance(self.factor, int) or isinstance(self.factor, bool) or self.factor < 1:
            raise ValueError(f"pool: factor={self.factor!r} must be an int >= 1 (1 = no pooling)")

    def output_grid(self, h: int, w: int) -> tuple[int, int]:
        if self.retain is not None:
            s = math.sqrt(float(self.retain))
            return max(1, min(h, round(h * s))), max(1, min(w, round(w * s)))
        return math.ceil(h / self.factor), math.ceil(w / self.factor)

    def before_llm(self, tokens: VisualTokens, probes: dict) -> VisualTokens:
        if tokens.grid is None:
            raise ValueError("pool needs the 2-D token grid, which this adapter did not provide")
        h, w = tokens.grid
        u, n, d = tokens.features.shape
        if n != h * w or not bool(tokens.mask.all()):
            raise ValueError(f"pool expects full {h}x{w} grids per image, got {n} token slots")
        oh, ow = self.output_grid(h, w)
        if (oh, ow) == (h, w):
            return tokens
        x = tokens.features.float().transpose(1, 2).reshape(u, d, h, w)
        # window boundaries of adaptive pooling (covers the ceil-mode factor case exactly)
        ys = [(math.floor(i * h / oh), math.ceil((i + 1) * h / oh)) for i in range(oh)]
        xs = [(math.floor(j * w / ow), math.ceil((j + 1) * w / ow)) for j in range(ow)]
        if self.retain is None:
            f = self.factor
            ys = [(i * f, min(h, (i + 1) * f)) for i in range(oh)]
            xs = [(j * f, min(w, (j + 1) * f)) for j in range(ow)]
        pooled = torch.stack(
            [torch.stack([x[:, :, a:b, c:e].mean((2, 3)) for (c, e) in xs], -1) for (a, b) in ys], -2
        )  # [U, D, oh, ow]
        feats = pooled.reshape(u, d, oh * ow).transpose(1, 2).to(tokens.features.dtype)
        sizes = torch.tensor([(b - a) * (e - c) for (a, b) in ys for (c, e) in xs], dtype=torch.float32)
        first = torch.tensor([a * w + c for (a, _) in ys for (c, _) in xs])
        dev = feats.device
        out = VisualTokens.from_features(feats, tokens.owner, grid=tokens.grid)
        out.positions = first.to(dev).expand(u, -1).clone()
        out.sizes = sizes.to(dev).expand(u, -1).clone()
        return out

"""`tokenflex`: a token-adaptive projector (adaptive average pooling to n x n, then a SwiGLU block)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from torch import nn

from ..method import Method, hparam, register
from ..tokens import VisualTokens
from .grid_pool import as_list, per_unit, pool_to_sides, square_side


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``: vision width -> ``hidden`` -> LLM width."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.gate = nn.Linear(d_in, hidden)
        self.up = nn.Linear(d_in, hidden)
        self.down = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


@register
@dataclass
class TokenFlex(Method):
    """TokenFLEX (Li Auto, arXiv 2504.03154): the projector pools each image's vision-tower grid to n x n
    (``F.adaptive_avg_pool2d``: PyTorch's overlapping windows on a non-divisible grid) and maps every pooled
    token to the LLM's width with one SwiGLU block; n is a per-call argument (per sample if a list). In
    training n is drawn per sample from ``train_n`` with ``train_weights``.

    Where the paper is silent (no official code), vtok chooses: pooling before the SwiGLU, no normalisation
    layer, one projector shared by every n, the SwiGLU's hidden width = the LLM's width, n drawn per sample.
    The projector replaces the model's (it is the method's own module), so the method needs trained
    weights (``vtok train tokenflex``; ``weights=``); an n outside the set it was trained on warns.
    """

    name = "tokenflex"
    stages = ("projector",)
    example = {"n": 2, "train_n": (2, 4)}
    paper = "n x n tokens per image, n in {8, 12, 16} (64/144/256) chosen per request; n drawn per sample in training"
    kept_meaningful = False
    nearest_budget = True
    needs_weights = True
    replaces_projector = True
    trained_settings = ("train_n", "train_weights")

    n: object = hparam(
        None, "pooled grid side (n*n tokens per image; at most the tower's grid side), or a list per sample; None: "
        "8 (the paper's smallest, 64 tokens), or the grid side on a smaller grid",
    )
    train_n: tuple = hparam((8, 12, 16), "the sides training draws n from (each at most the tower's grid side)")
    train_weights: tuple | None = hparam(None, "probabilities of train_n (None: uniform)")

    def validate(self) -> None:
        for v in [x for x in as_list(self.n) if x is not None] + list(self.train_n):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"tokenflex: n={v!r} must be a positive int (the pooled grid side)")
        if not as_list(self.n) or not self.train_n:
            raise ValueError("tokenflex: n and train_n need at least one value")
        if self.train_weights is not None and (
            len(self.train_weights) != len(self.train_n) or any(w < 0 for w in self.train_weights) or sum(self.train_weights) <= 0
        ):
            raise ValueError(f"tokenflex: train_weights={self.train_weights!r} must give one weight >= 0 per train_n")

    def build(self, dims: dict, parts: dict) -> dict:
        return {"projector": SwiGLU(dims["vision_hidden"], dims["llm_hidden"], dims["llm_hidden"])}

    def trained_sides(self, side: int) -> list[int]:
        return sorted({min(v, side) for v in self.train_n})

    def projector(self, tokens: VisualTokens, project) -> VisualTokens:
        full = square_side(self.name, tokens.grid)
        sides = [min(8, full) if v is None else v for v in per_unit(self.name, "n", self.n, tokens.owner)]
        if max(sides) > full:
            raise ValueError(f"tokenflex: n={max(sides)} is larger than the tower's {full}x{full} grid")
        off = sorted(set(sides) - set(self.trained_sides(full)))
        if off and not self.modules.training:
            warnings.warn(f"tokenflex: n={off} is outside the set it was trained on ({self.trained_sides(full)})", stacklevel=2)
        pooled = pool_to_sides(tokens, sides)
        proj = self.modules["projector"]
        feats = proj(pooled.features.to(proj.down.weight.dtype)) * pooled.mask.unsqueeze(-1)
        return VisualTokens(
            features=feats, mask=pooled.mask, positions=pooled.positions, sizes=pooled.sizes, owner=tokens.owner,
            grid=tokens.grid,
        )

    def train_variants(self, batch: int, rng) -> list[dict]:
        sides = list(self.train_n)  # the stage refuses a side above the grid
        w = None if self.train_weights is None else [float(x) / sum(self.train_weights) for x in self.train_weights]
        return [{"n": [int(v) for v in rng.choice(sides, size=batch, p=w)]}]

    def overhead_flops(self, event, spec, units=None) -> int:
        """The SwiGLU projector on the pooled tokens (3 matmuls), the pooling itself (one add per input value)."""
        d_in, h = self.dims.get("vision_hidden", 0), self.dims.get("llm_hidden", 0)
        tokens_out = sum(event.tokens_out)
        return 2 * tokens_out * (2 * d_in * h + h * h) + sum(event.tokens_in) * d_in

    def token_schedule(self, visual_tokens: int, units: list[int]) -> list:
        from ..stats import Reduction

        per = as_list(self.n)
        if len(per) > 1:
            raise ValueError("tokenflex: per-sample n has no single schedule; pass reductions=")
        out = sum(min(u, (per[0] or 8) ** 2) for u in units)
        return [Reduction(self.name, "projector", None, [visual_tokens], [out], None)]

    @classmethod
    def _nearest(cls, budget: float, context) -> int:
        side = math.isqrt(context.visual_tokens)
        return max(1, min(side, round(side * math.sqrt(budget))))

    @classmethod
    def settings_for_budget(cls, budget: float, context) -> dict:
        return {"n": cls._nearest(budget, context)}

    @classmethod
    def snap_budget(cls, budget: float, context) -> float:
        return cls._nearest(budget, context) ** 2 / context.visual_tokens

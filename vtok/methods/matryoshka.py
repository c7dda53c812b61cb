"""`matryoshka` (M3): nested visual-token scales by 2-D average pooling of each image's projected grid."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from ..method import Method, hparam, register
from ..tokens import VisualTokens
from .grid_pool import as_list, per_unit, pool_to_sides, square_side


def nested_sides(side: int) -> list[int]:
    """The nested grid sides of a ``side x side`` grid, largest first: halve while the side is even, then 1
    (24 -> 24, 12, 6, 3, 1; 16 -> 16, 8, 4, 2, 1). Each coarse token is the mean of the finer ones it covers."""
    out = [side]
    while out[-1] % 2 == 0 and out[-1] > 2:
        out.append(out[-1] // 2)
    if out[-1] != 1:
        out.append(1)
    return out


@register
@dataclass
class Matryoshka(Method):
    """Matryoshka Multimodal Models (Cai et al., ICLR 2025): the projected tokens of each image's s x s grid
    are average-pooled to one of the nested scales (576, 144, 36, 9, 1 tokens for a 24 x 24 grid, derived
    from the model's grid: see ``nested_sides``), chosen per call, per sample if ``scale`` is a list.

    As the official code (not the paper's wording): pooling after the projector. The method owns a copy
    of the model's projector (trainable, ``vtok train matryoshka``); untrained it equals the model's own,
    so ``scale="full"`` is the untouched model bit for bit. M3 fine-tunes the whole VLM; vtok trains the
    projector copy only (the model stays frozen and untouched) and averages the answer loss over the
    scales of ``train_scales`` (all nested scales, as the paper, or a subset) from one vision pass, or, with
    ``train_draw``, draws one scale per sample (one LLM forward per step: what a CPU can afford).
    Pooling runs in fp32 (``F.adaptive_avg_pool2d``, exact windows on these grids) and is cast back.
    """

    name = "matryoshka"
    stages = ("projector",)
    noop = {"scale": "full"}
    example = {"scale": 1}  # a nested scale of every tiny grid (4x4: 16/4/1, OneVision's 6x6: 36/9/1)
    paper = "scales 576/144/36/9/1 tokens per 24x24 grid, chosen per request; all five losses averaged in training"
    kept_meaningful = False
    nearest_budget = True  # pooled tokens are new tokens
    trained_settings = ("train_scales", "train_draw")

    scale: object = hparam(
        None, "tokens per image: one of the nested counts of the model's grid (e.g. 576/144/36/9/1), 'full', "
        "or a list with one per sample; None: the third scale, a quarter of the grid side squared (36 of 576)",
    )
    train_scales: object = hparam(None, "the scales whose losses training averages, e.g. [576, 144, 36, 9, 1]")
    train_draw: bool = hparam(
        False, "train on one scale per sample drawn from train_scales (one forward per step, cheaper) instead of "
        "averaging every scale's loss (the paper; its ablation found averaging better)", type=bool,
    )

    def validate(self) -> None:
        for v in as_list(self.scale) + as_list(self.train_scales or []):
            if v is None and self.scale is None:
                continue
            if v != "full" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"matryoshka: scale {v!r} must be 'full' or a positive token count (a square number)")
        if isinstance(self.scale, (list, tuple)) and not self.scale:
            raise ValueError("matryoshka: scale=[] gives no scale; pass one count or one per sample")

    # the grid (from the tokens: a tower's config may describe another input size than the one it runs at)
    @staticmethod
    def scales(side: int) -> list[int]:
        """The nested token counts of a ``side x side`` grid, largest first."""
        return [s * s for s in nested_sides(side)]

    @staticmethod
    def _side_of(count, full: int) -> int:
        sides = nested_sides(full)
        if count == "full":
            return full
        if count is None:
            return sides[min(2, len(sides) - 1)]
        if count not in [s * s for s in sides]:
            raise ValueError(
                f"matryoshka: scale={count} is not one of the nested scales {[s * s for s in sides]} of this "
                f"{full}x{full} grid"
            )
        return math.isqrt(count)

    # the stage -------------------------------------------------------------------------------
    def build(self, dims: dict, parts: dict) -> dict:
        if "projector" not in parts:
            raise ValueError("matryoshka trains a copy of the model's projector; this adapter names none")
        return {"projector": copy.deepcopy(parts["projector"]).requires_grad_(True)}

    def projector(self, tokens: VisualTokens, project) -> VisualTokens:
        full = square_side(self.name, tokens.grid)
        sides = [self._side_of(c, full) for c in per_unit(self.name, "scale", self.scale, tokens.owner)]
        proj = self.modules["projector"] if getattr(self, "modules", None) is not None else project
        y = proj(tokens.features)
        out = VisualTokens.from_features(y, tokens.owner, grid=tokens.grid)
        if all(s == full for s in sides):
            return out
        return pool_to_sides(out, sides)

    def overhead_flops(self, event, spec, units=None) -> int:
        """The pooling: one add per projected value that enters a pooled token."""
        pooled = sum(i for i, o in (event.units or []) if o < i)
        return pooled * self.dims.get("llm_hidden", 0)

    def train_variants(self, batch: int, rng) -> list[dict]:
        if self.train_scales is None:
            raise ValueError("matryoshka: training needs train_scales (the nested counts of the grid it trains on)")
        scales = list(self.train_scales)
        if self.train_draw:
            return [{"scale": [int(s) for s in rng.choice(scales, size=batch)]}]
        return [{"scale": s} for s in scales]

    # budgets ---------------------------------------------------------------------------------
    def token_schedule(self, visual_tokens: int, units: list[int]) -> list:
        from ..stats import Reduction

        per = as_list(self.scale)
        if len(per) > 1:
            raise ValueError("matryoshka: per-sample scales have no single schedule; pass reductions=")
        out = 0
        for u in units:
            r = math.isqrt(u)
            out += u if r * r != u else self._side_of(per[0], r) ** 2
        return [Reduction(self.name, "projector", None, [visual_tokens], [out], None)]

    @classmethod
    def _nearest(cls, budget: float, context) -> int:
        side = math.isqrt(context.visual_tokens)
        counts = [s * s for s in nested_sides(side)]
        return min(counts, key=lambda c: (abs(c / context.visual_tokens - budget), c))

    @classmethod
    def settings_for_budget(cls, budget: float, context) -> dict:
        return {"scale": cls._nearest(budget, context)}

    @classmethod
    def snap_budget(cls, budget: float, context) -> float:
        return cls._nearest(budget, context) / context.visual_tokens

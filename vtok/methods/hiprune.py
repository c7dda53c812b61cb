"""`hiprune`: HiPrune (arXiv 2508.00553) -- anchor, buffer and register tokens from two ViT layers (before the LLM).

Pure functions over one image's tokens (``object_layer_default``, ``split_budget``, ``grid_coords``,
``neighbours``, ``select_group``: each says what it computes) and the method (``HiPrune``), which wires them
to ``VisualTokens`` and the ViT attention probes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..method import POSITION_POLICIES, Method, ViTAttention, allocate, hparam, keep_count, register
from ..tokens import VisualTokens

__all__ = ["HiPrune", "grid_coords", "neighbours", "object_layer_default", "select_group", "split_budget"]

#: the paper's object layer: 1-based block 9 of CLIP-L's 24
PAPER_OBJECT_LAYER, PAPER_DEPTH = 9, 24


def object_layer_default(vit_blocks: int) -> int:
    """0-based object layer for a tower of ``vit_blocks`` blocks: the paper's 1-based 9 of 24 scaled to the
    depth, ``floor(9 * blocks / 24 + 0.5)`` (round half up), at least block 1 (1-based), minus one.
    24 blocks -> 8 (the paper's 9th), 27 (SigLIP-so400m) -> 9, 32 -> 11, 12 -> 4, 2 -> 0."""
    one_based = max(1, int(PAPER_OBJECT_LAYER * vit_blocks / PAPER_DEPTH + 0.5))
    return min(one_based, vit_blocks) - 1


def split_budget(budget: int, counts: list[int]) -> list[int]:
    """``budget`` tokens over groups of ``counts`` tokens, in proportion to the counts (largest remainder,
    ties to the lower group; no floor). Sums to ``budget`` (<= sum(counts))."""
    return allocate(budget, counts, counts, floor=0)


def grid_coords(positions: torch.Tensor, grids: list, crop: torch.Tensor | None = None):
    """(group, row, col) of each token from its ``positions`` (index in the unit's original layout: the
    ``grids`` one after another, raster order inside each). ``group`` separates the grids (an AnyRes
    image's base grid and high-resolution grid, video frames) and, with ``crop`` (the AnyRes crop each
    token comes from), the crops inside the stitched high-resolution grid."""
    dev = positions.device
    sizes = torch.tensor([h * w for h, w in grids], device=dev)
    widths = torch.tensor([w for _, w in grids], device=dev)
    ends = sizes.cumsum(0)
    block = torch.searchsorted(ends, positions, right=True).clamp_max(len(grids) - 1)
    within = positions - (ends - sizes)[block]
    w = widths[block]
    group = block
    if crop is not None:
        group = block * (int(crop.max()) + 2) + (crop + 1)  # video tokens carry crop -1
    return group, within // w, within % w


def neighbours(rows: torch.Tensor, cols: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """[A, 4] the up, left, right, down neighbours of tokens ``anchors`` (indices into ``rows``/``cols`` of
    one group's tokens) among those tokens, -1 where there is none. Grid-aware: a token at the end of a
    row has no right neighbour (never the next row's first token), a token missing from the grid (unpadded
    away, removed earlier) is no neighbour."""
    if anchors.numel() == 0:
        return anchors.new_zeros(0, 4)
    stride = int(cols.max()) + 3  # cols -1 .. max+1 never collide across rows
    keys = (rows + 1) * stride + (cols + 1)
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    r, c = rows[anchors].unsqueeze(1), cols[anchors].unsqueeze(1)
    dr = torch.tensor([-1, 0, 0, 1], device=rows.device)
    dc = torch.tensor([0, -1, 1, 0], device=rows.device)
    want = (r + dr + 1) * stride + (c + dc + 1)
    at = torch.searchsorted(sorted_keys, want).clamp_max(keys.numel() - 1)
    found = sorted_keys[at] == want
    return torch.where(found, order[at], torch.full_like(at, -1))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, ties to the lower index (stable sort)."""
    return torch.sort(-scores, stable=True).indices[:k]


def select_group(obj: torch.Tensor, deep: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, budget: int,
                 alpha: float) -> torch.Tensor:  # fmt: skip
    """HiPrune on one crop (or grid, or frame) of ``n`` tokens: the kept token indices, ascending.

    obj / deep [n]: attention received at the object and the deep layer; rows / cols [n]: grid coordinates.
    Anchors: the ``floor(budget * alpha / 5 + 0.5)`` tokens with the highest object-layer score. Buffers:
    their grid 4-neighbours (``neighbours``). Anchors and buffers are taken anchor by anchor (an anchor, then
    its up/left/right/down neighbours) until the budget is full. Registers: the rest of the budget, the
    highest deep-layer scores among the tokens not chosen yet (chosen ones masked with -inf). Exactly
    ``min(budget, n)`` tokens."""
    n = obj.numel()
    budget = min(budget, n)
    if budget <= 0:
        return torch.zeros(0, dtype=torch.long, device=obj.device)
    n_a = min(budget, int(budget * alpha / 5 + 0.5))
    anchors = _top(obj.float(), n_a)
    cand = torch.cat([anchors.unsqueeze(1), neighbours(rows, cols, anchors)], 1).reshape(-1).tolist()
    chosen = list(dict.fromkeys(i for i in cand if i >= 0))[:budget]
    picked = torch.tensor(chosen, dtype=torch.long, device=obj.device)
    rest = budget - len(chosen)
    if rest:
        masked = deep.float().clone()
        masked[picked] = float("-inf")
        picked = torch.cat([picked, _top(masked, rest)])
    return picked.sort().values


@register
@dataclass
class HiPrune(Method):
    """HiPrune: keep object-layer anchors, their grid neighbours and deep-layer registers of every image.

    Training-free, before the LLM, from the vision tower's attention received per token (column mean over
    every query row and head, ``ViTAttention(kind="colmean")``; CLS row included as queries, CLS column
    dropped when the model drops the CLS token; a tower without CLS, e.g. SigLIP, works the same).

    Per image, ``keep_count(N, retain)`` of its N visual tokens are kept (newline tokens of LLaVA-NeXT /
    OneVision are layout, not counted: the adapter puts a row's newline back when one of its tokens
    survives). An AnyRes image's budget is split over its base image and its crops (video: its frames) in
    proportion to their token counts (largest remainder; the paper: budget / crops, equal for its unpadding-
    free layout); each part is selected on its own (``select_group``), with that tower call's scores.

    Paper defaults: object layer 9 (1-based) of CLIP-L's 24; deep layer the feature layer (23 of 24,
    LLaVA's ``-2``); alpha = 0.1; budgets 192/128/64 of 576 (retain 1/3, 2/9, 1/9).

    Choices where the paper or its code is silent or buggy:

    - object layer on other depths: ``object_layer_default`` (9/24 of the depth, round half up), never deeper
      than the deep layer;
    - anchors ``floor(N' * alpha / 5 + 0.5)`` with no minimum (the paper's round; budgets under 25 tokens at
      alpha 0.1 get no anchors: pure deep-layer top-k); ties by the lower index everywhere;
    - buffers are grid-aware 4-neighbours inside the anchor's own grid and crop (the code's ±1 wraps across
      rows); when anchors + buffers exceed the budget, they are taken anchor by anchor until it is full;
    - registers exclude chosen tokens with -inf (the code subtracts 1, which can re-select them);
    - the budget is per image, never divided by the batch size (the LLaVA code divides it);
    - LLaVA-NeXT keeps the checkpoint's unpadding and newlines (the code forces the ``spatial`` layout).
    """

    name = "hiprune"
    stages = ("before_llm",)
    noop = {"retain": 1.0}
    example = {"retain": 0.5, "alpha": 0.5}
    needs_scores = True
    paper = "LLaVA-1.5: 192 / 128 / 64 of 576 tokens (retain 1/3), alpha 0.1, object layer 9 of 24, deep layer = the feature layer"
    needs_full_grids = True  # grid neighbours and the ViT probes need every token's original place

    retain: float = hparam(
        1 / 3, "fraction of each image's visual tokens kept (paper: 192/576 -> 1/3; 128 -> 2/9; 64 -> 1/9)",
        type=float, range="(0, 1]",
    )
    alpha: float = hparam(
        0.1, "share of the budget for anchors + buffers: floor(budget*alpha/5 + 0.5) anchors (paper 0.1); 0 = none",
        type=float, range="[0, 1]",
    )
    object_layer: int | None = hparam(
        None, "0-based ViT block of the anchors' attention; None: the paper's 9 (1-based) of 24 scaled to the "
        "tower's depth, floor(9*blocks/24 + 0.5) - 1 (CLIP-L: 8), never deeper than deep_layer",
        type=int, range="[0, inf)",
    )
    deep_layer: int | None = hparam(
        None, "0-based ViT block of the registers' attention; None: the block whose output feeds the LLM "
        "(paper: LLaVA's vision_feature_layer -2)", type=int, range="[0, inf)",
    )
    position_policy: str = hparam(
        "compact", "'compact' renumbers RoPE positions (paper, LLaVA), 'keep' keeps the original ones",
        choices=POSITION_POLICIES,
    )

    # the model --------------------------------------------------------------------------
    def bind(self, dims: dict) -> None:
        super().bind(dims)
        self.layers()  # a bad layer for this tower raises now, before any hook is installed

    def layers(self) -> tuple[int, int]:
        """(object layer, deep layer), 0-based blocks of the tower this method is applied to; before it is
        applied (``vtok.eval.flops.estimate`` of a config), those of the paper's CLIP-L: 24 blocks, features
        from block 22 (LLaVA's -2)."""
        d = self.dims
        n = d.get("vit_blocks")
        if not n:
            d, n = {"vit_feature_block": PAPER_DEPTH - 2}, PAPER_DEPTH
        deep = self.deep_layer
        if deep is None:
            deep = d.get("vit_feature_block")
            if deep is None:
                raise ValueError(
                    "hiprune: this model feeds the LLM the patch embeddings, before any vision block, so there is "
                    "no ViT attention to rank tokens by; set deep_layer= (and object_layer=) explicitly"
                )
        obj = self.object_layer if self.object_layer is not None else min(object_layer_default(n), deep)
        for what, layer in (("object_layer", obj), ("deep_layer", deep)):
            if not 0 <= layer < n:
                raise ValueError(f"hiprune: {what}={layer} is outside the vision tower's blocks 0..{n - 1}")
        return obj, deep

    def probes(self):
        obj, deep = self.layers()
        return list(dict.fromkeys([ViTAttention(layer=obj, kind="colmean"), ViTAttention(layer=deep, kind="colmean")]))

    # the stage ------------------------------------------------------------------------------
    def before_llm(self, tokens: VisualTokens, probes: dict) -> VisualTokens:
        obj_layer, deep_layer = self.layers()
        obj_all = probes[ViTAttention(layer=obj_layer, kind="colmean")]
        deep_all = probes[ViTAttention(layer=deep_layer, kind="colmean")]
        if tokens.grid is None and tokens.grids is None:
            raise ValueError("hiprune needs the 2-D token grid of every image, which this adapter did not provide")
        grids = tokens.unit_grids()
        crop = tokens.extra.get("crop")
        counts = tokens.counts().tolist()
        keep = torch.zeros_like(tokens.mask)
        for u in range(tokens.num_units):
            n = counts[u]
            if n == 0:
                continue
            slots = tokens.mask[u].nonzero().squeeze(1)
            pos = tokens.positions[u, slots]
            if int(pos.max()) >= obj_all.shape[1] or int(pos.max()) >= deep_all.shape[1]:
                raise ValueError(
                    f"hiprune: unit {u} has tokens at positions up to {int(pos.max())}, but the ViT attention covers "
                    f"{obj_all.shape[1]} tokens; run hiprune on the vision tower's full token grids"
                )
            obj = obj_all[u].to(pos.device)[pos]
            deep = deep_all[u].to(pos.device)[pos]
            group, rows, cols = grid_coords(pos, grids[u], None if crop is None else crop[u, slots])
            ids = torch.unique(group)  # ascending: base image first, then crops / frames in order
            members = [(group == g).nonzero().squeeze(1) for g in ids.tolist()]
            budgets = split_budget(keep_count(n, self.retain), [m.numel() for m in members])
            for m, b in zip(members, budgets):
                picked = select_group(obj[m], deep[m], rows[m], cols[m], b, self.alpha)
                keep[u, slots[m[picked]]] = True
        return tokens.select(keep)

"""`tome`: Token Merging (Bolya et al., ICLR 2023) -- bipartite soft matching inside every ViT block.

``ToMe`` (the method; how a block is merged), its schedule (``parse_r``), the matching
(``bipartite_soft_matching``) and ToMe's token order (``tome_order``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..method import POSITION_POLICIES, BudgetContext, Method, hparam, register
from ..vit import ViTMerge, ViTView

__all__ = ["ToMe", "parse_r", "bipartite_soft_matching", "tome_order"]


def parse_r(num_blocks: int, r) -> list[int]:
    """Tokens removed per block: an int (constant), ``(r, inflection)`` or an explicit list.

    ``(r, inflection)``, inflection in [-1, 1]: a linear ramp from ``r * (1 - inflection)`` to
    ``2r - r * (1 - inflection)`` (so the mean stays about r; -1 decreases, +1 increases).
    A list shorter than the encoder is padded with zeros.
    """
    if num_blocks <= 0:
        return []
    if isinstance(r, list):
        if len(r) > num_blocks:
            raise ValueError(
                f"tome: r lists {len(r)} values but only {num_blocks} encoder blocks reach the output; "
                f"give at most {num_blocks} values"
            )
        return [int(v) for v in r] + [0] * (num_blocks - len(r))
    if isinstance(r, tuple):
        base, inflect = r
    else:
        base, inflect = r, 0.0
    lo = int(base * (1.0 - inflect))
    hi = 2 * base - lo
    if num_blocks == 1:
        return [int(base)]
    step = (hi - lo) / (num_blocks - 1)
    return [int(lo + step * i) for i in range(num_blocks)]


@torch.no_grad()
def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 0):
    """ToMe's matching. metric [B, N, d] -> ``src``, ``dst`` [B, r'] and ``unm`` [B, |A| - r'].

    A = even positions, B = odd positions; the first ``protected`` tokens are neither sources
    (A) nor destinations (B). ``r`` is clamped to ``(N - protected) // 2``. Pairs are ordered by
    decreasing cosine similarity; ties go to the lower token index (stable sort, first argmax).
    ``unm``: the unmerged A tokens (protected ones excluded) -- in index order when tokens are
    protected (ToMe sorts them to keep the class token first), else by decreasing similarity (as
    ToMe). The matching itself is :func:`vtok.kernels.bipartite_match` (Triton on CUDA, the
    torch reference elsewhere), asked to rank *all* mergeable A tokens; the first ``r'`` are
    merged, the rest are ``unm``.
    """
    b, n, _ = metric.shape
    dev = metric.device
    r = max(0, min(int(r), (n - protected) // 2))
    empty = torch.zeros(b, 0, dtype=torch.long, device=dev)
    if r == 0:
        return empty, empty, empty
    r_all = len(range(protected + protected % 2, n, 2))  # mergeable A tokens: even, >= protected
    src_all, dst_all, _ = kernels.bipartite_match(metric, r=r_all, protected=protected)
    src, dst, unm = src_all[:, :r], dst_all[:, :r], src_all[:, r:]
    if protected:
        unm = unm.sort(dim=-1).values
    return src, dst, unm


def tome_order(unm: torch.Tensor, n: int, protected: int) -> torch.Tensor:
    """ToMe's output order: [protected tokens, unmerged A tokens, B tokens] (B in index order)."""
    b = unm.shape[0]
    dev = unm.device
    head = torch.arange(protected, device=dev).expand(b, -1)
    b_idx = torch.arange(protected + 1 - protected % 2, n, 2, device=dev).expand(b, -1)
    return torch.cat([head, unm, b_idx], dim=1)


@register
@dataclass
class ToMe(Method):
    """ToMe (ICLR 2023): merge similar tokens in every ViT block by bipartite soft matching.

    Written from the paper (arXiv 2210.09461), not from the reference code. Per block, after the
    attention residual and before the MLP: the keys averaged over heads are the similarity metric;
    tokens alternate into sets A (even positions) and B (odd positions); every A token finds its most
    similar B token (cosine); the ``r`` A tokens with the best matches are merged into their partners
    by a size-weighted average. Prefix tokens (CLS, registers) are protected. Sizes travel to the next
    blocks, where ``log(size)`` is added to the attention logits (proportional attention). The output
    order is ToMe's -- [prefix, unmerged A, B] -- because the next block's alternating split depends
    on it; ``source`` maps tokens back to their patches.
    """

    name = "tome"
    stages = ("in_vit",)
    noop = {"r": 0}
    example = {"r": 2}
    paper = "ViT-L/16 r = 8 per block (ViT-B r = 16 at 224 px), CLS protected, proportional attention"

    r: int | tuple | list = hparam(
        8, "tokens merged per block: an int, (r, inflection) with inflection in [-1, 1], or a per-block list"
    )
    retain: float | None = hparam(
        None, "instead of r: fraction of each image's patches left after the tower; resolved, once applied, to the "
        "r settings_for_budget gives: r = max(1, min((N-1)//blocks, round(N*(1-retain)/blocks))) for the tower's N "
        "patches per image at its configured size and the blocks that reach the output (retain=1: r=0)",
        type=float, range="(0, 1]",
    )
    prop_attn: bool = hparam(
        True, "proportional attention: add log(size) of every key to the attention logits", type=bool
    )
    protect_cls: bool = hparam(
        True, "never merge the prefix tokens (class token, registers, distillation token)", type=bool
    )
    trace_source: bool = hparam(
        True, "keep the map from original patches to merged tokens (handle.adapter.source)", type=bool
    )
    position_policy: str = hparam(
        "compact", "inside a VLM: 'compact' renumbers RoPE positions, 'keep' gives each token its first patch's",
        choices=POSITION_POLICIES,
    )

    def validate(self):
        if self.retain is not None and self.r != type(self).__dataclass_fields__["r"].default:
            raise ValueError(f"tome: give r={self.r!r} or retain={self.retain!r}, not both (retain sets r)")
        r = self.r
        if isinstance(r, bool):
            raise TypeError("tome: r must be an int, an (r, inflection) tuple or a list of ints, not a bool")
        if isinstance(r, int):
            if r < 0:
                raise ValueError(f"tome: r={r} must be >= 0 (tokens merged per block; 0 = off)")
        elif isinstance(r, tuple):
            if len(r) != 2 or isinstance(r[0], bool) or not isinstance(r[0], int) or r[0] < 0:
                raise ValueError(f"tome: r={r!r}: give (r, inflection) with an int r >= 0, e.g. (8, -0.5)")
            if isinstance(r[1], bool) or not isinstance(r[1], (int, float)) or not -1.0 <= float(r[1]) <= 1.0:
                raise ValueError(f"tome: r={r!r}: the inflection must be a number in [-1, 1]")
        elif isinstance(r, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in r):
                raise ValueError(f"tome: r={r!r}: a per-block list must hold ints >= 0")
        else:
            raise TypeError(
                f"tome: r must be an int, an (r, inflection) tuple or a per-block list of ints, not {type(r).__name__}"
            )

    def overhead_flops(self, event, spec, units=None) -> int:
        """The bipartite matching (scores of set A x set B on head-averaged keys) per image, plus the key
        projection the adapter computes for ``nn.MultiheadAttention`` blocks."""
        v = spec.vision
        p = v.prefix if self.protect_cls else 0
        t = 0
        for n, _ in units or []:
            a = len(range(p + p % 2, n, 2))
            b = len(range(p + 1 - p % 2, n, 2))
            t += 2 * a * b * v.stack.head_dim
            if v.mha_keys:
                t += 2 * n * v.stack.hidden * v.stack.hidden
        return t

    def token_schedule(self, visual_tokens: int, units: list[int]) -> list:
        raise ValueError("cannot simulate 'tome' without running the vision tower; pass reductions=")

    @staticmethod
    def r_for_budget(budget: float, context) -> int:
        """Per-block r that leaves about ``budget`` of ``context.visual_tokens`` after every block."""
        n, blocks = context.visual_tokens, context.vit_blocks
        return max(1, min((n - 1) // blocks, round(n * (1 - budget) / blocks)))

    @classmethod
    def settings_for_budget(cls, budget: float, context) -> dict:
        return {"r": cls.r_for_budget(budget, context)}

    @classmethod
    def snap_budget(cls, budget: float, context) -> float:
        """ToMe reaches n - blocks * r tokens exactly (rounded as the eval runner rounds budgets)."""
        n = context.visual_tokens
        return round((n - context.vit_blocks * cls.r_for_budget(budget, context)) / n, 4)

    def resolved_r(self, num_blocks: int, num_tokens: int | None = None):
        """``r``, or the constant r that ``retain`` asks for on a tower of ``num_blocks`` merging blocks and
        ``num_tokens`` patches per image (the run's own count; before a run ``dims["vit_tokens"]``, the
        tower config's size) -- ``r_for_budget``: the same r as ``settings_for_budget``."""
        if self.retain is None:
            return self.r
        if self.retain >= 1.0 or num_blocks <= 0:
            return 0
        n = num_tokens or self.dims.get("vit_tokens")
        if not n:
            raise ValueError(
                "tome: retain= is turned into tokens merged per block from the number of patches per image, which "
                "is known once the method is applied to a model whose adapter gives it (dims['vit_tokens']); "
                "apply it with vtok.apply, or give r= instead"
            )
        return self.r_for_budget(self.retain, BudgetContext(int(n), num_blocks))

    def vit_schedule(self, num_blocks: int, num_tokens: int | None = None) -> list[int]:
        """Tokens removed per block; with ``retain``, from the patches the tower really gets
        (``num_tokens``, given by the adapter at each run: a tower configured for 518 px may run at 224)."""
        return parse_r(num_blocks, self.resolved_r(num_blocks, num_tokens))

    def in_vit(self, view: ViTView) -> ViTMerge | None:
        src, dst, unm = bipartite_soft_matching(view.metric, view.budget, view.protected)
        if not src.shape[1]:
            return None
        return ViTMerge(src, dst, tome_order(unm, view.x.shape[1], view.protected))

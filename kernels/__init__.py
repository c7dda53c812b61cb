"""vtok.kernels: the merging and selection core, as Triton kernels beside torch references.

Public functions dispatch (``backend_for``): :func:`bipartite_match`, :func:`merge_weighted`, :func:`nearest_merge`,
:func:`greedy_select`, :func:`attention_rows`, :func:`attention_colmean`; each ``*_torch`` reference and
``*_triton`` implementation (same signature) is exported too, for comparisons.
"""

from __future__ import annotations

import os

import torch

from ._common import HAS_TRITON
from .attn_probe import (
    attention_colmean_torch,
    attention_colmean_triton,
    attention_rows_torch,
    attention_rows_triton,
)
from .greedy import greedy_select_torch, greedy_select_triton
from .match import bipartite_match_torch, bipartite_match_triton
from .merge import merge_weighted_torch, merge_weighted_triton, nearest_merge_torch, nearest_merge_triton

__all__ = [
    "ENV_VAR",
    "backend_for",
    "bipartite_match",
    "merge_weighted",
    "nearest_merge",
    "greedy_select",
    "attention_rows",
    "attention_colmean",
    "bipartite_match_torch",
    "bipartite_match_triton",
    "merge_weighted_torch",
    "merge_weighted_triton",
    "nearest_merge_torch",
    "nearest_merge_triton",
    "greedy_select_torch",
    "greedy_select_triton",
    "attention_rows_torch",
    "attention_rows_triton",
    "attention_colmean_torch",
    "attention_colmean_triton",
]

ENV_VAR = "VTOK_KERNELS"
_CHOICES = ("auto", "torch", "triton")


def backend_for(t: torch.Tensor, *, needs_grad: bool = False) -> str:
    """The backend (``"torch"`` or ``"triton"``) a call on tensor ``t`` will use.

    Triton when ``t`` is on CUDA and Triton is importable, torch otherwise. The environment variable
    ``VTOK_KERNELS`` forces a backend (``torch`` or ``triton``; ``auto`` or unset = the rule above). It
    exists for tests and A/B comparisons, not as configuration. Forcing ``triton`` for CPU tensors works
    only under the Triton interpreter (``TRITON_INTERPRET=1``); otherwise a ``RuntimeError`` says so.
    ``needs_grad``: the call must be differentiable. The Triton merges are forward-only, so the
    automatic choice is then torch, and forcing Triton is an error rather than silently dropping
    the gradient.
    """
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r} is not one of {', '.join(_CHOICES)}")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{ENV_VAR}=triton but the `triton` package is not importable (pip install triton)")
        if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                f"{ENV_VAR}=triton on a {t.device.type} tensor needs a CUDA device, or TRITON_INTERPRET=1 "
                "to run the kernels under the Triton interpreter (slow; for tests)."
            )
        if needs_grad:
            raise RuntimeError(
                f"{ENV_VAR}=triton, but this merge needs gradients and the Triton merge is forward-only; "
                "unset the variable (or use VTOK_KERNELS=torch), or call it under torch.no_grad()."
            )
        return "triton"
    return "triton" if (HAS_TRITON and t.device.type == "cuda" and not needs_grad) else "torch"


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def bipartite_match(metric, *, r, protected=None, a_idx=None, b_idx=None):
    """Best B partner of every A token by cosine similarity; the r most similar A tokens.

    ``metric [B, N, C]``; default split A = even, B = odd positions (ToMe). ``protected``: int
    count of leading tokens, or bool mask ``[B, N]`` / ``[N]``; protected tokens are neither
    sources nor destinations. Returns ``(src_idx [B, r], dst_idx [B, r], scores [B, r])``,
    most similar first, ties to the lowest token index; r is clamped to the mergeable A count.
    See :func:`vtok.kernels.match.bipartite_match_torch`.
    """
    impl = bipartite_match_triton if backend_for(metric) == "triton" else bipartite_match_torch
    return impl(metric, r=r, protected=protected, a_idx=a_idx, b_idx=b_idx)


def merge_weighted(x, sizes, src_idx, dst_idx, *, order=None):
    """Size-weighted merge of sources into destinations -> ``(x_kept, sizes_kept, kept_idx)``.

    Survivors keep their original order, or the order of ``order`` (a permutation of their indices
    ``[B, N - r]``; then ``kept_idx = order``); fp32 accumulation; outputs in the input dtypes.
    Differentiable through the torch path, which is chosen when ``x`` or ``sizes`` needs grad.
    See :func:`vtok.kernels.merge.merge_weighted_torch`.
    """
    impl = merge_weighted_triton if backend_for(x, needs_grad=_needs_grad(x, sizes)) == "triton" else merge_weighted_torch
    return impl(x, sizes, src_idx, dst_idx, order)


def nearest_merge(x, sizes, keep_idx, *, metric=None):
    """Merge every token outside ``keep_idx [B, K]`` into its most cosine-similar kept token.

    Returns ``(x_kept [B, K, C], sizes_kept [B, K])`` in ``keep_idx`` (sorted) order.
    See :func:`vtok.kernels.merge.nearest_merge_torch`. Used by: no method yet (planned: HoliTom).
    """
    impl = nearest_merge_triton if backend_for(x, needs_grad=_needs_grad(x, sizes)) == "triton" else nearest_merge_torch
    return impl(x, sizes, keep_idx, metric=metric)


def greedy_select(x, k, *, mode="kcenter", pivot=None, mask=None):
    """Greedy diverse selection (``mode="kcenter"`` or ``"maxsum"``) of k tokens from a pivot.

    Returns ``idx [B, k]`` int64 in selection order (``idx[:, 0]`` is the pivot), ``-1`` where a
    sample has fewer than k valid tokens. Used by: ToDRE (stage 1).

    Tokens are compared by cosine similarity ``sim(i, c) = (x_i . x_c) / (|x_i| |x_c|)``, computed
    as ``(dot * inv_i) * inv_c`` in fp32 by both backends. The selection starts from the pivot and
    runs ``k - 1`` greedy steps.

    * ``mode="kcenter"`` (ToDRE v1, DivPrune, Gonzalez farthest point): next = the unselected token
      whose distance ``1 - cos`` to the selected set (its minimum over the set) is largest. It is
      computed as the token with the smallest *maximum similarity* to the set, which is the same
      choice and avoids the rounding of ``1 - cos``.
    * ``mode="maxsum"`` (ToDRE v2, Algorithm 1): next = the unselected token with the smallest
      cumulative similarity ``sum_{c in set} cos(x_i, x_c)``, i.e. the largest summed distance.

    Ties go to the lowest token index. ``pivot``: ``[B]`` int64 (or an int for all samples); default
    the first valid token (index 0 when there is no mask). ``mask [B, N]`` bool marks valid tokens;
    invalid (padding) tokens are never selected, nor are tokens with a NaN or infinite feature (both
    backends treat them as masked; an explicit pivot on one is refused). When a sample has fewer than
    ``k`` valid tokens the selection stops there and the remaining slots of its row hold ``-1``. ``k`` is clamped to N.
    """
    impl = greedy_select_triton if backend_for(x) == "triton" else greedy_select_torch
    return impl(x, k, mode=mode, pivot=pivot, mask=mask)


def attention_rows(q, k, *, scale=None, key_mask=None, causal_offset=None):
    """Head-averaged softmax rows ``[B, R, Nk]`` (fp32) for query rows ``q [B, Hq, R, d]`` (GQA-aware).

    ``softmax(q_i . K^T * scale)`` averaged over heads for R query rows (FastV's last token, ToDRE's CLS
    row or text rows, TransPrune's instruction rows), without the attention map (two passes, see
    :mod:`vtok.kernels.attn_probe`). ``k [B, Hkv, Nk, d]``; GQA when ``Hq`` is a multiple of ``Hkv``
    (query head h reads key head ``h // (Hq / Hkv)``, the ``repeat_kv`` convention). ``key_mask [B, Nk]``
    bool: False keys get probability 0. ``causal_offset``: the position of each query row in the key
    sequence; row i sees keys ``j <= pos_i``. An int means consecutive rows ``pos_i = causal_offset + i``
    (the last R tokens of a prompt of length Nk: ``causal_offset = Nk - R``); a tensor gives ``[R]`` or
    ``[B, R]`` positions. A row that sees no key gets all zeros.
    """
    impl = attention_rows_triton if backend_for(q) == "triton" else attention_rows_torch
    return impl(q, k, scale=scale, key_mask=key_mask, causal_offset=causal_offset)


def attention_colmean(q, k, *, scale=None, key_mask=None, query_mask=None, causal=False):
    """Attention received per key ``[B, Nk]`` (fp32), mean over valid queries and heads, no N x N map.

    ``c_j = mean_{h, i valid} softmax_i(q_i . K^T * scale)_j`` (HiPrune, HoliTom, VisionZip-style
    "global attention"); shapes and GQA as :func:`attention_rows`. ``query_mask [B, Nq]`` drops queries
    (padding) from the mean; ``causal=True`` aligns the queries to the end of the keys (query i sits at
    position ``i + Nk - Nq``, as FlashAttention). A sample with no valid query gets zeros.
    """
    impl = attention_colmean_triton if backend_for(q) == "triton" else attention_colmean_torch
    return impl(q, k, scale=scale, key_mask=key_mask, query_mask=query_mask, causal=causal)

"""Index bookkeeping of bipartite matching and merging, shared by the torch and Triton backends.

Argument checks, the A/B split, protection masks, clamping r, set complements, the top r of the
reference, and the pairs of a nearest merge: small host-side steps that must be the same in both
backends, so each lives once.
"""

from __future__ import annotations

import torch

from ._common import NAN_SCORE


def _check_protected_count(protected: int) -> None:
    if protected < 0:
        raise ValueError(f"protected count must be >= 0, got {protected}")


def _protected_mask(protected, B: int, N: int, device) -> torch.Tensor | None:
    if protected is None:
        return None
    if isinstance(protected, bool):
        raise TypeError("protected must be an int count, a bool mask [B, N] or [N], or None (got a bool)")
    if isinstance(protected, int):
        _check_protected_count(protected)
        m = torch.zeros(B, N, dtype=torch.bool, device=device)
        m[:, : min(protected, N)] = True
        return m
    if not torch.is_tensor(protected) or protected.dtype != torch.bool:
        raise TypeError("protected must be an int count, a bool mask [B, N] or [N], or None")
    if protected.dim() == 1:
        protected = protected.unsqueeze(0)
    if protected.shape[-1] != N or protected.shape[0] not in (1, B) or protected.dim() != 2:
        raise ValueError(f"protected mask must be [B, N] or [N] with N={N}, B={B}; got {tuple(protected.shape)}")
    return protected.to(device).expand(B, N)


def _complement(idx: torch.Tensor, B: int, N: int) -> torch.Tensor:
    """Sorted complement of the per-sample index set ``idx [B, M]`` in ``range(N)``."""
    taken = torch.zeros(B, N, dtype=torch.bool, device=idx.device)
    taken.scatter_(1, idx, True)
    order = torch.argsort(taken.to(torch.int8), dim=1, stable=True)
    return order[:, : N - idx.shape[1]]


def _as_index_set(idx, B: int, N: int, name: str, device) -> torch.Tensor:
    idx = torch.as_tensor(idx, device=device)
    if idx.dtype in (torch.bool,) or idx.is_floating_point():
        raise TypeError(f"{name} must be an integer index tensor")
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)
    if idx.dim() != 2 or idx.shape[0] not in (1, B):
        raise ValueError(f"{name} must be [M] or [B, M] (B={B}); got {tuple(idx.shape)}")
    return torch.sort(idx.long(), dim=1).values.expand(B, -1)


def _split(metric: torch.Tensor, protected, a_idx, b_idx):
    """Return (a_idx [B,NA], b_idx [B,NB], a_ok [B,NA], b_ok [B,NB], n_ok_a, n_ok_b | None)."""
    if metric.dim() != 3:
        raise ValueError(f"metric must be [B, N, C]; got shape {tuple(metric.shape)}")
    B, N, _ = metric.shape
    dev = metric.device
    if a_idx is None and b_idx is None:
        a_idx = torch.arange(0, N, 2, device=dev).expand(B, -1)
        b_idx = torch.arange(1, N, 2, device=dev).expand(B, -1)
    elif b_idx is None:
        a_idx = _as_index_set(a_idx, B, N, "a_idx", dev)
        b_idx = _complement(a_idx.contiguous(), B, N)
    elif a_idx is None:
        b_idx = _as_index_set(b_idx, B, N, "b_idx", dev)
        a_idx = _complement(b_idx.contiguous(), B, N)
    else:
        a_idx = _as_index_set(a_idx, B, N, "a_idx", dev)
        b_idx = _as_index_set(b_idx, B, N, "b_idx", dev)
    prot = _protected_mask(protected, B, N, dev)
    if prot is None:
        a_ok = torch.ones(a_idx.shape, dtype=torch.bool, device=dev)
        b_ok = torch.ones(b_idx.shape, dtype=torch.bool, device=dev)
        return a_idx, b_idx, a_ok, b_ok, a_idx.shape[1], b_idx.shape[1]
    a_ok = ~prot.gather(1, a_idx)
    b_ok = ~prot.gather(1, b_idx)
    return a_idx, b_idx, a_ok, b_ok, None, None


def _clamp_r(r: int, a_ok, b_ok, n_ok_a, n_ok_b) -> int:
    if not isinstance(r, int) or isinstance(r, bool):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    if r <= 0 or a_ok.shape[1] == 0 or b_ok.shape[1] == 0:
        return 0
    if n_ok_a is None:  # masks are data: one host sync to keep the batch rectangular
        n_ok_a = int(a_ok.sum(1).min().item())
        n_ok_b = int(b_ok.sum(1).min().item())
    return _clamp_r_counts(r, n_ok_a, n_ok_b)


def _clamp_r_counts(r: int, n_ok_a: int, n_ok_b: int) -> int:
    """r clamped to the mergeable A count, and to 0 when no B token is admissible."""
    return 0 if (r <= 0 or n_ok_b == 0) else min(r, n_ok_a)


def _top_r(best: torch.Tensor, part: torch.Tensor, a_idx, b_idx, r: int):
    """best/part: [B, NA] fp32 score and partner position in b_idx -> (src, dst, scores)."""
    order = torch.sort(best, dim=1, descending=True, stable=True).indices[:, :r]
    src = a_idx.gather(1, order)
    dst = b_idx.gather(1, part.long().gather(1, order))
    return src, dst, nan_scores(best.gather(1, order))


def nan_scores(scores: torch.Tensor) -> torch.Tensor:
    """Scores as reported: the ``NAN_SCORE`` rank of a NaN similarity back to NaN."""
    return torch.where(scores == NAN_SCORE, float("nan"), scores)


def _empty_match(B, device):
    e = torch.empty(B, 0, dtype=torch.long, device=device)
    return e, e.clone(), torch.empty(B, 0, dtype=torch.float32, device=device)


def _fast_alternating(metric, protected, a_idx, b_idx, r):
    """The common ToMe case (alternating split, no/int protection): (r, prot) without building
    masks or synchronising with the device; None when the general path is needed."""
    if a_idx is not None or b_idx is not None or not (protected is None or type(protected) is int):
        return None
    if metric.dim() != 3:
        return None
    prot = protected or 0
    _check_protected_count(prot)
    if not isinstance(r, int) or isinstance(r, bool):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    N = metric.shape[1]
    NA, NB = (N + 1) // 2, N // 2
    ok_a = NA - min(NA, (prot + 1) // 2)  # A = even tokens 0, 2, ...: those >= prot
    ok_b = NB - min(NB, prot // 2)  # B = odd tokens 1, 3, ...
    return _clamp_r_counts(r, ok_a, ok_b), prot


# --------------------------------------------------------------------------------------------
# merge_weighted, nearest_merge
# --------------------------------------------------------------------------------------------


def _check_merge_args(x, sizes, src_idx, dst_idx, *, ones_if_none=True):
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, C]; got {tuple(x.shape)}")
    B, N, _ = x.shape
    if sizes is None and ones_if_none:
        sizes = torch.ones(B, N, dtype=torch.float32, device=x.device)
    if sizes is not None:
        if sizes.dim() == 3 and sizes.shape[-1] == 1:
            sizes = sizes.squeeze(-1)
        if sizes.shape != (B, N) or not sizes.is_floating_point():
            raise ValueError(
                f"sizes must be a float tensor [B, N] = [{B}, {N}]; got {tuple(sizes.shape)} {sizes.dtype}")
    if src_idx.shape != dst_idx.shape or src_idx.dim() != 2 or src_idx.shape[0] != B:
        raise ValueError(
            f"src_idx and dst_idx must both be [B, r] with B={B}; got {tuple(src_idx.shape)}, {tuple(dst_idx.shape)}"
        )
    return sizes, src_idx.long(), dst_idx.long()


def _kept_indices(src_idx, B, N):
    return _complement(src_idx, B, N)


def _check_order(order, B: int, K: int):
    """``order`` of ``merge_weighted`` as int64 ``[B, K]`` (K survivors), or None."""
    if order is None:
        return None
    if order.dim() != 2 or tuple(order.shape) != (B, K) or order.is_floating_point() or order.dtype == torch.bool:
        raise ValueError(
            f"order must be an integer index tensor [B, N - r] = [{B}, {K}]; got {tuple(order.shape)} {order.dtype}")
    return order.long()


def _nearest_pairs(x, keep_idx, metric, match_fn):
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, C]; got {tuple(x.shape)}")
    B, N, _ = x.shape
    keep_idx = torch.as_tensor(keep_idx, device=x.device).long()
    if keep_idx.dim() == 1:
        keep_idx = keep_idx.unsqueeze(0).expand(B, -1)
    if keep_idx.dim() != 2 or keep_idx.shape[0] != B or keep_idx.shape[1] > N:
        raise ValueError(f"keep_idx must be [B, K] (B={B}, K<={N}); got {tuple(keep_idx.shape)}")
    keep_idx = torch.sort(keep_idx, dim=1).values
    metric = x if metric is None else metric
    if metric.shape[:2] != x.shape[:2]:
        raise ValueError(f"metric must be [B, N, *] like x; got {tuple(metric.shape)} vs {tuple(x.shape)}")
    n_drop = N - keep_idx.shape[1]
    if n_drop == 0 or keep_idx.shape[1] == 0:
        e = torch.empty(B, 0, dtype=torch.long, device=x.device)
        return keep_idx, e, e
    drop_idx = _complement(keep_idx, B, N)
    src, dst, _ = match_fn(metric, r=n_drop, a_idx=drop_idx, b_idx=keep_idx)
    return keep_idx, src, dst

"""Bipartite soft matching and size-weighted merging (ToMe's primitive, HoliTom's inner merge).

Public functions (each with a ``*_torch`` reference and a ``*_triton`` implementation of the same
signature; :mod:`vtok.kernels` dispatches between them):

``bipartite_match(metric, *, r, protected=None, a_idx=None, b_idx=None) -> (src_idx, dst_idx, scores)``
    Split the tokens into a source set A and a destination set B (default: A = even positions,
    B = odd positions, as ToMe), take the cosine similarity of every A token to every B token,
    keep for each A token its best B partner (ties -> lowest token index) and score, and return
    the ``r`` A tokens with the highest scores (ties -> lowest token index), most similar first.

    *Protected tokens* (``protected``: bool mask ``[B, N]`` or ``[N]``, or an int = that many
    leading tokens, e.g. CLS and a distillation token) are never merged: in A they are never
    sources, and they are also removed from B, so nothing is merged *into* them either (a
    protected token keeps its value exactly, the behaviour ToMe gives its distillation token;
    ToMe's CLS sits in A at index 0 and gets the same guarantee). ``r`` is clamped to the number
    of mergeable A tokens (the minimum over the batch, so shapes stay rectangular), and to 0 when
    a sample has no admissible destination.

    ``a_idx`` / ``b_idx``: optional index sets ``[N_A]`` / ``[N_B]`` (shared) or ``[B, N_A]`` /
    ``[B, N_B]`` (per sample). They must be disjoint; they are sorted internally, so "lowest
    index" always means lowest token index. If only one is given, the other is its complement.

    Returns ``src_idx [B, r]`` and ``dst_idx [B, r]`` (int64 token indices into N) and
    ``scores [B, r]`` (fp32 cosine similarity of each pair), ordered by decreasing score.

``merge_weighted(x, sizes, src_idx, dst_idx) -> (x_kept, sizes_kept, kept_idx)``
    Destinations receive ``sum(x * size)`` and ``sum(size)`` of their sources and are divided
    (the size-weighted average over the original patches, ToMe's ``merge_wavg``). Sources are
    removed, survivors keep their original order; ``kept_idx [B, N - r]`` lists their original
    indices. ``sizes`` is ``[B, N]`` float (``None`` = ones). Accumulation is fp32; outputs come
    back in the input dtypes. Sources must be distinct and must not be destinations themselves.

``nearest_merge(x, sizes, keep_idx, *, metric=None) -> (x_kept, sizes_kept)``
    Every token not in ``keep_idx [B, K]`` (sorted) merges, size-weighted, into its most
    cosine-similar kept token (ties -> lowest index), as one match plus one merge. ``metric``
    defaults to ``x``. This is the vtok form of HoliTom's inner merge: the official code halves
    sequentially (``h_kept <- (h_kept + h_drop) / 2`` in position order, which weights later
    members more); a method that wants that exact weighting can pass matching ``sizes`` or use
    the closed form in the spec; the matching step is the same.

Triton design
-------------
``_match_kernel`` runs one program per (sample, tile of ``BLOCK_A`` A tokens). It streams B in
tiles of ``BLOCK_B`` tokens and C in chunks of ``BLOCK_C`` channels, computes the dot-product
tile with ``tl.dot`` (fp32 accumulation), scales it by the inverse norms and folds it into a
running (max, argmax) per A row. The ``[N_A, N_B]`` score matrix exists only tile by tile on chip;
only ``N_A`` scores and partners reach global memory. When batch x A-tiles cannot fill the GPU
(batch 1, large N), the B tiles are split over ``SPLIT`` programs per A tile and the per-split
maxima (``SPLIT x N_A`` values) are merged on the host, lowest index first. For the alternating
split A and B are strided views of ``metric`` (no copy); given index sets are gathered once. The top-r choice over ``N_A`` values is a
stable ``torch.sort``. ``_merge_kernel`` is gather-based: one program per (sample, surviving
token, channel block) reads its own row and the rows of its sources (a CSR list built with a few
small torch ops over r indices), so every input row is read once, every output row written once,
with no atomics and a deterministic summation order.
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, dot_flags, interpret_enabled, inv_norm, jit, launchable, next_pow2, tl, triton

__all__ = [
    "bipartite_match_torch",
    "bipartite_match_triton",
    "merge_weighted_torch",
    "merge_weighted_triton",
    "nearest_merge_torch",
    "nearest_merge_triton",
]


# --------------------------------------------------------------------------------------------
# shared pre/post-processing (small index bookkeeping, identical for both backends)
# --------------------------------------------------------------------------------------------


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
    return src, dst, best.gather(1, order)


def _empty_match(B, device):
    e = torch.empty(B, 0, dtype=torch.long, device=device)
    return e, e.clone(), torch.empty(B, 0, dtype=torch.float32, device=device)


# --------------------------------------------------------------------------------------------
# bipartite_match
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def bipartite_match_torch(metric, *, r, protected=None, a_idx=None, b_idx=None):
    """Torch reference of :func:`vtok.kernels.bipartite_match` (see the module docstring)."""
    B = metric.shape[0]
    a_idx, b_idx, a_ok, b_ok, n_a, n_b = _split(metric, protected, a_idx, b_idx)
    r = _clamp_r(r, a_ok, b_ok, n_a, n_b)
    if r == 0:
        return _empty_match(B, metric.device)
    C = metric.shape[-1]
    inv = inv_norm(metric)
    xb = metric.gather(1, b_idx[..., None].expand(-1, -1, C)).float()
    inv_b = inv.gather(1, b_idx)
    NA = a_idx.shape[1]
    best = torch.empty(B, NA, dtype=torch.float32, device=metric.device)
    part = torch.empty(B, NA, dtype=torch.long, device=metric.device)
    # Chunk over A rows so the reference never holds more than ~64M scores at once.
    chunk = max(1, (1 << 26) // max(1, B * b_idx.shape[1]))
    for s in range(0, NA, chunk):
        ai = a_idx[:, s : s + chunk]
        xa = metric.gather(1, ai[..., None].expand(-1, -1, C)).float()
        scores = torch.bmm(xa, xb.transpose(1, 2)) * inv.gather(1, ai)[..., None] * inv_b[:, None, :]
        scores = scores.masked_fill(~b_ok[:, None, :], float("-inf"))
        p = scores.argmax(dim=-1)  # first maximal index -> lowest token index (b_idx is sorted)
        bv = scores.gather(-1, p[..., None]).squeeze(-1)
        best[:, s : s + chunk] = bv.masked_fill(~a_ok[:, s : s + chunk], float("-inf"))
        part[:, s : s + chunk] = p
    return _top_r(best, part, a_idx, b_idx, r)


@jit
def _match_kernel(
    xa_ptr, xb_ptr, inva_ptr, invb_ptr, a_ok_ptr, b_ok_ptr, best_ptr, part_ptr,
    NA, NB, C, SPLIT, BATCH, PROT,
    stride_ab, stride_an, stride_ac,
    stride_bb, stride_bn, stride_bc,
    stride_ia, step_ia, stride_ib, step_ib, stride_oka, stride_okb,
    A_STEP: tl.constexpr, A_OFF: tl.constexpr, B_STEP: tl.constexpr, B_OFF: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """For A rows [pid_a tile] of sample pid_b: running (max, argmax) of cos(A, B) over B tiles.

    xa / xb are strided views of the tokens of A and B (for the alternating split, the even and
    odd rows of ``metric`` itself: no copy). With ``SPLIT > 1`` program ``pid_s`` scans only its
    share of the B tiles (more programs for small batches) and writes a partial (best, part) to
    slot ``pid_s`` of ``[SPLIT, BATCH, NA]``; the host keeps the first maximal slot. Only these
    ``SPLIT * BATCH * NA`` values reach global memory.

    Admissibility: with ``MASKED`` the per-sample masks ``a_ok`` / ``b_ok`` are read; otherwise
    row i of A is token ``A_STEP * i + A_OFF`` (likewise B) and the first ``PROT`` tokens are
    protected, which needs no mask tensor and no host round trip. ``part`` is written as the
    token index ``B_STEP * j + B_OFF`` of the partner.
    """
    pid_b = tl.program_id(0)
    pid_a = tl.program_id(1)
    pid_s = tl.program_id(2)
    b_tiles = tl.cdiv(NB, BLOCK_B)
    per_split = tl.cdiv(b_tiles, SPLIT)
    b_start = pid_s * per_split * BLOCK_B
    b_end = tl.minimum(NB, b_start + per_split * BLOCK_B)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    in_a = offs_a < NA
    if MASKED:
        a_ok = tl.load(a_ok_ptr + pid_b * stride_oka + offs_a, mask=in_a, other=0) != 0
    else:
        a_ok = (offs_a * A_STEP + A_OFF) >= PROT
    inv_a = tl.load(inva_ptr + pid_b * stride_ia + offs_a * step_ia, mask=in_a, other=0.0)
    a_base = xa_ptr + pid_b.to(tl.int64) * stride_ab
    b_base = xb_ptr + pid_b.to(tl.int64) * stride_bb
    offs_c = tl.arange(0, BLOCK_C)

    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    part = tl.zeros([BLOCK_A], tl.int64)
    for b0 in range(b_start, b_end, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        in_b = offs_b < b_end
        if MASKED:
            b_ok = (tl.load(b_ok_ptr + pid_b * stride_okb + offs_b, mask=in_b, other=0) != 0) & in_b
        else:
            b_ok = ((offs_b * B_STEP + B_OFF) >= PROT) & in_b
        inv_b = tl.load(invb_ptr + pid_b * stride_ib + offs_b * step_ib, mask=in_b, other=0.0)
        pa = a_base + offs_a[:, None].to(tl.int64) * stride_an + offs_c[None, :] * stride_ac
        pb = b_base + offs_b[None, :].to(tl.int64) * stride_bn + offs_c[:, None] * stride_bc
        acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            in_c = (c0 + offs_c) < C
            ta = tl.load(pa, mask=in_a[:, None] & in_c[None, :], other=0.0)
            tb = tl.load(pb, mask=in_c[:, None] & in_b[None, :], other=0.0)
            if UPCAST:
                ta = ta.to(tl.float32)
                tb = tb.to(tl.float32)
            acc = tl.dot(ta, tb, acc, input_precision=PRECISION)
            pa += BLOCK_C * stride_ac
            pb += BLOCK_C * stride_bc
        s = acc * inv_a[:, None] * inv_b[None, :]
        s = tl.where(b_ok[None, :], s, float("-inf"))
        tile_best, tile_arg = tl.max(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        take = tile_best > best  # strict: an earlier tile (lower index) keeps a tie
        best = tl.where(take, tile_best, best)
        part = tl.where(take, (tile_arg + b0) * B_STEP + B_OFF, part)
    best = tl.where(a_ok, best, float("-inf"))
    out = (pid_s * BATCH + pid_b).to(tl.int64) * NA + offs_a
    tl.store(best_ptr + out, best, mask=in_a)
    tl.store(part_ptr + out, part, mask=in_a)


_MATCH_CONFIGS = [
    # (BLOCK_A, BLOCK_B, BLOCK_C, num_warps, num_stages). The first four were the fastest of a
    # 48-config sweep on an H100 at (1, 25088, 1152), (1, 6272, 3584) and (32, 577, 1024); the last
    # is for small N. Configs that do not fit in shared memory are skipped by the autotuner.
    (128, 256, 64, 8, 3),
    (128, 128, 128, 8, 3),
    (128, 128, 64, 8, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
]

_match_tuned = None


def _get_match_tuned():
    global _match_tuned
    if _match_tuned is None:
        cfgs = [
            triton.Config({"BLOCK_A": a, "BLOCK_B": b, "BLOCK_C": c}, num_warps=w, num_stages=s)
            for a, b, c, w, s in _MATCH_CONFIGS
        ]
        _match_tuned = triton.autotune(configs=cfgs, key=["NA", "NB", "C", "SPLIT"])(_match_kernel)
    return _match_tuned


def _rows_of(metric, idx, alternating_start):
    """A strided view of the rows ``idx`` of metric: a free slice for the alternating split."""
    if alternating_start is not None:
        return metric[:, alternating_start::2]
    C = metric.shape[-1]
    return metric.gather(1, idx[..., None].expand(-1, -1, C))


def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _auto_split(B: int, NA: int, NB: int, device) -> int:
    """Programs sharing the B tiles of one A tile: about four waves of 128-row A tiles, at most 8.

    (Measured on an H100 at (1, 25088, 1152): 1 split 1.9 ms, 4-6 splits 0.81 ms.)
    """
    if device.type != "cuda":
        return 1
    programs = B * triton.cdiv(NA, 128)
    return max(1, min(8, triton.cdiv(NB, 256), triton.cdiv(4 * _num_sms(device), programs)))


def _match_scores_triton(metric, inv, a_idx, b_idx, a_ok, b_ok, alternating, *, prot=0, blocks=None, split=None):
    """(best [B, NA] fp32, part [B, NA] int64) per A row. ``alternating``: A / B are the even / odd
    tokens (``a_idx`` / ``b_idx`` are then not read). ``a_ok is None``: no masks, the first ``prot``
    tokens are protected (alternating split only); ``part`` is then the partner's token index,
    else its position in ``b_idx``."""
    B, N, C = metric.shape
    NA, NB = ((N + 1) // 2, N // 2) if alternating else (a_idx.shape[1], b_idx.shape[1])
    dev = metric.device
    tuned = dev.type == "cuda" and blocks is None and not interpret_enabled()
    if split is None:
        split = _auto_split(B, NA, NB, dev)
    best = torch.empty(split, B, NA, dtype=torch.float32, device=dev)
    part = torch.empty(split, B, NA, dtype=torch.int64, device=dev)
    xa = _rows_of(metric, a_idx, 0 if alternating else None)
    xb = _rows_of(metric, b_idx, 1 if alternating else None)
    if alternating:  # strided views of the inverse norms: no copy
        inv_a, inv_b, step_a, step_b = inv, inv[:, 1:], 2, 2
    else:
        inv_a, inv_b, step_a, step_b = inv.gather(1, a_idx), inv.gather(1, b_idx), 1, 1
    masked = a_ok is not None
    if masked:
        a_ok8 = a_ok.to(torch.int8).contiguous()
        b_ok8 = b_ok.to(torch.int8).contiguous()
        ok_strides = (a_ok8.stride(0), b_ok8.stride(0))
        steps = dict(A_STEP=1, A_OFF=0, B_STEP=1, B_OFF=0)
    else:
        a_ok8 = b_ok8 = inv  # never read
        ok_strides = (0, 0)
        steps = dict(A_STEP=2, A_OFF=0, B_STEP=2, B_OFF=1)
    upcast, prec = dot_flags(metric.dtype, dev)
    args = (xa, xb, inv_a, inv_b, a_ok8, b_ok8, best, part, NA, NB, C, split, B, int(prot),
            xa.stride(0), xa.stride(1), xa.stride(2), xb.stride(0), xb.stride(1), xb.stride(2),
            inv_a.stride(0), step_a, inv_b.stride(0), step_b, *ok_strides)
    if tuned:
        kern = _get_match_tuned()
        grid = lambda meta: (B, triton.cdiv(NA, meta["BLOCK_A"]), split)  # noqa: E731
        kern[grid](*args, **steps, MASKED=masked, UPCAST=upcast, PRECISION=prec)
    else:
        ba, bb, bc = blocks or (16, 16, min(32, max(16, next_pow2(C))))
        kern = launchable(_match_kernel, dev)
        kern[(B, triton.cdiv(NA, ba), split)](*args, **steps, MASKED=masked, BLOCK_A=ba, BLOCK_B=bb, BLOCK_C=bc,
                                               UPCAST=upcast, PRECISION=prec)
    if split == 1:
        return best[0], part[0]
    # Splits cover increasing B ranges: the first maximal split holds the lowest index.
    which = best.argmax(dim=0, keepdim=True)
    return best.gather(0, which)[0], part.gather(0, which)[0]


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


@torch.no_grad()
def bipartite_match_triton(metric, *, r, protected=None, a_idx=None, b_idx=None, _b_split=None):
    """Triton implementation of :func:`vtok.kernels.bipartite_match` (fused, no score matrix).

    ``_b_split`` forces how many programs share the B tiles of one A tile (tests).
    """
    B = metric.shape[0]
    fast = _fast_alternating(metric, protected, a_idx, b_idx, r)
    if fast is not None:
        r, prot = fast
        if r == 0:
            return _empty_match(B, metric.device)
        best, part = _match_scores_triton(metric, inv_norm(metric), None, None, None, None, True, prot=prot,
                                          split=_b_split)
        order = torch.sort(best, dim=1, descending=True, stable=True).indices[:, :r]
        return order * 2, part.gather(1, order), best.gather(1, order)
    alternating = a_idx is None and b_idx is None
    a_idx, b_idx, a_ok, b_ok, n_a, n_b = _split(metric, protected, a_idx, b_idx)
    r = _clamp_r(r, a_ok, b_ok, n_a, n_b)
    if r == 0:
        return _empty_match(B, metric.device)
    inv = inv_norm(metric)
    best, part = _match_scores_triton(metric, inv, a_idx, b_idx, a_ok, b_ok, alternating, split=_b_split)
    return _top_r(best, part, a_idx, b_idx, r)


# --------------------------------------------------------------------------------------------
# merge_weighted
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


def merge_weighted_torch(x, sizes, src_idx, dst_idx):
    """Torch reference of :func:`vtok.kernels.merge_weighted` (see the module docstring)."""
    sizes, src_idx, dst_idx = _check_merge_args(x, sizes, src_idx, dst_idx)
    B, N, C = x.shape
    kept = _kept_indices(src_idx, B, N)
    s = sizes.float()
    xs = x.float() * s[..., None]
    acc = xs.scatter_add(1, dst_idx[..., None].expand(-1, -1, C), xs.gather(1, src_idx[..., None].expand(-1, -1, C)))
    sacc = s.scatter_add(1, dst_idx, s.gather(1, src_idx))
    s_k = sacc.gather(1, kept)
    x_k = acc.gather(1, kept[..., None].expand(-1, -1, C)) / s_k[..., None]
    return x_k.to(x.dtype), s_k.to(sizes.dtype), kept


@jit
def _merge_kernel(
    x_ptr, s_ptr, kept_ptr, start_ptr, count_ptr, srcs_ptr, out_ptr, sout_ptr,
    K, R, C,
    stride_xb, stride_xn, stride_xc, stride_sb,
    stride_ob, stride_on,
    BLOCK_C: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_c = tl.program_id(2)
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = cc < C
    x_base = x_ptr + pid_b.to(tl.int64) * stride_xb
    tok = tl.load(kept_ptr + pid_b * K + pid_k)
    size = tl.load(s_ptr + pid_b * stride_sb + tok).to(tl.float32)
    acc = tl.load(x_base + tok.to(tl.int64) * stride_xn + cc * stride_xc, mask=in_c, other=0.0).to(tl.float32) * size
    ssum = size
    start = tl.load(start_ptr + pid_b * K + pid_k)
    count = tl.load(count_ptr + pid_b * K + pid_k)
    for i in range(start, start + count):
        j = tl.load(srcs_ptr + pid_b * R + i)
        sj = tl.load(s_ptr + pid_b * stride_sb + j).to(tl.float32)
        acc += tl.load(x_base + j.to(tl.int64) * stride_xn + cc * stride_xc, mask=in_c, other=0.0).to(tl.float32) * sj
        ssum += sj
    out = acc / ssum
    tl.store(out_ptr + pid_b.to(tl.int64) * stride_ob + pid_k.to(tl.int64) * stride_on + cc,
             out.to(out_ptr.dtype.element_ty), mask=in_c)
    if pid_c == 0:
        tl.store(sout_ptr + pid_b * K + pid_k, ssum.to(sout_ptr.dtype.element_ty))


@jit
def _merge_sorted_kernel(
    x_ptr, s_ptr, ssrc_ptr, sdst_ptr, bysrc_ptr, out_ptr, sout_ptr, kept_ptr,
    R, C,
    stride_xb, stride_xn, stride_xc, stride_sb, stride_rb,
    stride_ob, stride_on, stride_kb,
    HAS_SIZES: tl.constexpr, LOG2R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per (sample, token n, channel block); the indices need only two sorts.

    ``ssrc``: the sources sorted; ``sdst``: the destinations sorted (stable) and ``bysrc`` the
    sources in that order. A binary search in ``ssrc`` tells whether n is a source (nothing to
    write) and how many sources precede it (its output position is ``n - that``); two in
    ``sdst`` give the range of its own sources, read in a fixed order (no atomics: deterministic).
    """
    pid_b = tl.program_id(0)
    n = tl.program_id(1)
    pid_c = tl.program_id(2)
    r_base = pid_b.to(tl.int64) * stride_rb
    # Three lower-bound searches in one vector (lane 0: #sources < n; lanes 1, 2: the range of
    # n in the sorted destinations; lane 3 idle), LOG2R halvings with masked loads.
    lane = tl.arange(0, 4)
    target = n + (lane == 2).to(tl.int32)
    arr = tl.where(lane == 0, ssrc_ptr + r_base, sdst_ptr + r_base)
    lo = tl.zeros([4], tl.int32)
    hi = tl.where(lane < 3, R, 0)
    for _ in tl.static_range(LOG2R):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(arr + mid, mask=active, other=0)
        lo = tl.where(active & (v < target), mid + 1, lo)
        hi = tl.where(active & (v >= target), mid, hi)
    n_before = tl.sum(tl.where(lane == 0, lo, 0), axis=0)
    first = tl.load(ssrc_ptr + r_base + n_before, mask=n_before < R, other=-1)
    if first != n:
        d_lo = tl.sum(tl.where(lane == 1, lo, 0), axis=0)
        d_hi = tl.sum(tl.where(lane == 2, lo, 0), axis=0)
        cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        in_c = cc < C
        x_base = x_ptr + pid_b.to(tl.int64) * stride_xb
        if HAS_SIZES:
            ssum = tl.load(s_ptr + pid_b * stride_sb + n).to(tl.float32)
        else:
            ssum = tl.full([], 1.0, tl.float32)
        acc = tl.load(x_base + n.to(tl.int64) * stride_xn + cc * stride_xc, mask=in_c, other=0.0).to(tl.float32)
        acc = acc * ssum
        for i in range(d_lo, d_hi):
            j = tl.load(bysrc_ptr + r_base + i)
            if HAS_SIZES:
                sj = tl.load(s_ptr + pid_b * stride_sb + j).to(tl.float32)
            else:
                sj = tl.full([], 1.0, tl.float32)
            acc += tl.load(x_base + j.to(tl.int64) * stride_xn + cc * stride_xc, mask=in_c, other=0.0).to(tl.float32) * sj
            ssum += sj
        pos = n - n_before
        tl.store(out_ptr + pid_b.to(tl.int64) * stride_ob + pos.to(tl.int64) * stride_on + cc,
                 (acc / ssum).to(out_ptr.dtype.element_ty), mask=in_c)
        if pid_c == 0:
            tl.store(sout_ptr + pid_b * stride_kb + pos, ssum.to(sout_ptr.dtype.element_ty))
            tl.store(kept_ptr + pid_b * stride_kb + pos, n.to(tl.int64))


def _merge_blocks(device, C: int) -> tuple[int, int]:
    """(BLOCK_C, num_warps) of the merge kernels: a whole row per program on CUDA, small blocks for the interpreter."""
    if device.type == "cuda":
        block_c = min(1024, next_pow2(C))
        return block_c, (4 if block_c <= 512 else 8)
    return min(32, next_pow2(C)), 4


def merge_weighted_triton(x, sizes, src_idx, dst_idx, *, _path=None):
    """Triton implementation of :func:`vtok.kernels.merge_weighted` (gather-based, fp32 sums).

    Default (*sorted*): the only preprocessing is two small sorts of the r indices, then one
    launch over all tokens. ``_path="csr"``: the earlier kernel, which builds the kept list and a
    CSR of sources per destination with about a dozen torch ops first (kept for comparison in
    the benchmark). Forward only: the outputs carry no autograd graph (the dispatcher picks the
    torch reference when gradients are needed).
    """
    if _path == "csr":
        return _merge_csr(x, sizes, src_idx, dst_idx)
    sizes, src_idx, dst_idx = _check_merge_args(x, sizes, src_idx, dst_idx, ones_if_none=False)
    has_sizes = sizes is not None
    B, N, C = x.shape
    R = src_idx.shape[1]
    K = N - R
    dev = x.device
    if C == 0:  # nothing to launch; same bookkeeping as the reference
        return merge_weighted_torch(x, sizes, src_idx, dst_idx)
    out = torch.empty(B, K, C, dtype=x.dtype, device=dev)
    s_out = torch.empty(B, K, dtype=sizes.dtype if has_sizes else torch.float32, device=dev)
    kept = torch.empty(B, K, dtype=torch.long, device=dev)
    if K == 0:
        return out, s_out, kept
    if has_sizes:
        sizes = sizes.contiguous()
    ssrc = torch.sort(src_idx, dim=1).values
    sdst, perm = torch.sort(dst_idx, dim=1, stable=True)
    bysrc = src_idx.gather(1, perm)
    block_c, warps = _merge_blocks(dev, C)
    s_arg = sizes if has_sizes else out
    launchable(_merge_sorted_kernel, dev)[(B, N, triton.cdiv(C, block_c))](
        x, s_arg, ssrc, sdst, bysrc, out, s_out, kept,
        R, C,
        x.stride(0), x.stride(1), x.stride(2), s_arg.stride(0) if has_sizes else 0, ssrc.stride(0),
        out.stride(0), out.stride(1), K,
        HAS_SIZES=has_sizes, LOG2R=max(1, int(R).bit_length()), BLOCK_C=block_c, num_warps=warps,
    )
    return out, s_out, kept


def _merge_csr(x, sizes, src_idx, dst_idx):
    sizes, src_idx, dst_idx = _check_merge_args(x, sizes, src_idx, dst_idx)
    sizes = sizes.contiguous()
    B, N, C = x.shape
    R = src_idx.shape[1]
    K = N - R
    dev = x.device
    kept = _kept_indices(src_idx, B, N)
    # CSR of sources per destination: sources grouped by destination (stable -> ascending src order).
    order = torch.argsort(dst_idx, dim=1, stable=True)
    srcs = src_idx.gather(1, order).to(torch.int32).contiguous()
    counts = torch.zeros(B, N, dtype=torch.int32, device=dev)
    counts.scatter_add_(1, dst_idx, torch.ones_like(dst_idx, dtype=torch.int32))
    starts = torch.cumsum(counts, dim=1, dtype=torch.int32) - counts
    start_k = starts.gather(1, kept).contiguous()
    count_k = counts.gather(1, kept).contiguous()
    kept32 = kept.to(torch.int32).contiguous()
    out = torch.empty(B, K, C, dtype=x.dtype, device=dev)
    s_out = torch.empty(B, K, dtype=sizes.dtype, device=dev)
    if K == 0 or C == 0:
        return out, s_out, kept
    block_c, warps = _merge_blocks(dev, C)
    grid = (B, K, triton.cdiv(C, block_c))
    launchable(_merge_kernel, dev)[grid](
        x, sizes, kept32, start_k, count_k, srcs, out, s_out,
        K, R, C,
        x.stride(0), x.stride(1), x.stride(2), sizes.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_C=block_c, num_warps=warps,
    )
    return out, s_out, kept


# --------------------------------------------------------------------------------------------
# nearest_merge (HoliTom inner merge)
# --------------------------------------------------------------------------------------------


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


def nearest_merge_torch(x, sizes, keep_idx, *, metric=None):
    """Torch reference of :func:`vtok.kernels.nearest_merge` (see the module docstring)."""
    keep_idx, src, dst = _nearest_pairs(x, keep_idx, metric, bipartite_match_torch)
    if keep_idx.shape[1] == 0:
        raise ValueError("nearest_merge: keep_idx is empty; there is no token to merge into")
    x_k, s_k, _ = merge_weighted_torch(x, sizes, src, dst)
    return x_k, s_k


def nearest_merge_triton(x, sizes, keep_idx, *, metric=None):
    """Triton implementation of :func:`vtok.kernels.nearest_merge`."""
    keep_idx, src, dst = _nearest_pairs(x, keep_idx, metric, bipartite_match_triton)
    if keep_idx.shape[1] == 0:
        raise ValueError("nearest_merge: keep_idx is empty; there is no token to merge into")
    x_k, s_k, _ = merge_weighted_triton(x, sizes, src, dst)
    return x_k, s_k


if not HAS_TRITON:  # pragma: no cover

    def _no_triton(*_a, **_k):
        raise RuntimeError("vtok.kernels: the Triton backend needs the `triton` package")

    bipartite_match_triton = merge_weighted_triton = nearest_merge_triton = _no_triton  # noqa: F811

"""Size-weighted merging (ToMe's ``merge_wavg``) and the nearest merge built on it (for HoliTom).

Each has a torch reference, whose docstring is the contract, and a Triton implementation (a
counting bookkeeping kernel, then one gather-based merge kernel: no atomics, deterministic). Shared
index bookkeeping is in ``indexing.py``, block sizes in ``tuning.py``.
"""

from __future__ import annotations

import torch

from . import tuning
from ._common import HAS_TRITON, jit, launchable, tl, triton
from .indexing import _check_merge_args, _check_order, _kept_indices, _nearest_pairs
from .match import bipartite_match_torch, bipartite_match_triton

__all__ = ["merge_weighted_torch", "merge_weighted_triton", "nearest_merge_torch", "nearest_merge_triton"]


# --------------------------------------------------------------------------------------------
# merge_weighted
# --------------------------------------------------------------------------------------------


def merge_weighted_torch(x, sizes, src_idx, dst_idx, order=None):
    """Torch reference of :func:`vtok.kernels.merge_weighted`; the contract of both backends.

    ``merge_weighted(x, sizes, src_idx, dst_idx, *, order=None) -> (x_kept, sizes_kept, kept_idx)``

    Destinations receive ``sum(x * size)`` and ``sum(size)`` of their sources and are divided
    (the size-weighted average over the original patches, ToMe's ``merge_wavg``). Sources are
    removed, survivors keep their original order; ``kept_idx [B, N - r]`` lists their original
    indices. ``order [B, N - r]`` (a permutation of the survivors' indices) returns them in that
    order instead, and ``kept_idx`` is ``order``: ToMe's [prefix, unmerged A, B] in one gather (the
    reference then skips the complement sort). ``sizes`` is ``[B, N]`` float (``None`` = ones).
    Accumulation is fp32; outputs come back in the input dtypes. Sources must be distinct and must
    not be destinations themselves.
    """
    sizes, src_idx, dst_idx = _check_merge_args(x, sizes, src_idx, dst_idx)
    B, N, C = x.shape
    order = _check_order(order, B, N - src_idx.shape[1])
    kept = _kept_indices(src_idx, B, N) if order is None else order
    s = sizes.float()
    xs = x.float() * s[..., None]
    acc = xs.scatter_add(1, dst_idx[..., None].expand(-1, -1, C), xs.gather(1, src_idx[..., None].expand(-1, -1, C)))
    sacc = s.scatter_add(1, dst_idx, s.gather(1, src_idx))
    s_k = sacc.gather(1, kept)
    x_k = acc.gather(1, kept[..., None].expand(-1, -1, C)) / s_k[..., None]
    return x_k.to(x.dtype), s_k.to(sizes.dtype), kept


@jit
def _merge_prep_kernel(
    src_ptr, dst_ptr, ssrc_ptr, sdst_ptr, bysrc_ptr, tb_ptr,
    R, T, stride_sb, stride_db, stride_ob, stride_tb,
    TILE_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """The index bookkeeping of the merge, by counting (no sort, no scan, no host sync).

    For pair i (program axis 1 over tiles of ``BLOCK_I`` pairs): its slot in ``ssrc`` (the
    sources in increasing order; they are distinct, so slot = #{smaller sources}) and in ``sdst``
    / ``bysrc`` (destinations in increasing order, ties in input order: a stable sort, with the
    source of each). For token tile t = 0..T (the same programs, over tiles of ``BLOCK_I`` tile
    numbers): ``tb[0, t]`` = #{sources < t * TILE_N} and ``tb[1, t]`` = #{destinations < t *
    TILE_N}, where the merge kernel's tile t starts in ``ssrc`` and ``sdst``.
    """
    pid_b = tl.program_id(0)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    in_i = offs_i < R
    s_base = src_ptr + pid_b.to(tl.int64) * stride_sb
    d_base = dst_ptr + pid_b.to(tl.int64) * stride_db
    si = tl.load(s_base + offs_i, mask=in_i, other=0).to(tl.int32)
    di = tl.load(d_base + offs_i, mask=in_i, other=0).to(tl.int32)
    bound = offs_i * TILE_N  # token tile offs_i starts here
    ps = tl.zeros([BLOCK_I], tl.int32)
    pd = tl.zeros([BLOCK_I], tl.int32)
    ts = tl.zeros([BLOCK_I], tl.int32)
    td = tl.zeros([BLOCK_I], tl.int32)
    for j0 in range(0, R, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        in_j = (offs_j < R)[None, :]
        sj = tl.load(s_base + offs_j, mask=offs_j < R, other=0).to(tl.int32)[None, :]
        dj = tl.load(d_base + offs_j, mask=offs_j < R, other=0).to(tl.int32)[None, :]
        ps += tl.sum(((sj < si[:, None]) & in_j).to(tl.int32), axis=1)
        before = (dj < di[:, None]) | ((dj == di[:, None]) & (offs_j[None, :] < offs_i[:, None]))
        pd += tl.sum((before & in_j).to(tl.int32), axis=1)
        ts += tl.sum(((sj < bound[:, None]) & in_j).to(tl.int32), axis=1)
        td += tl.sum(((dj < bound[:, None]) & in_j).to(tl.int32), axis=1)
    o_base = pid_b.to(tl.int64) * stride_ob
    tl.store(ssrc_ptr + o_base + ps, si, mask=in_i)
    tl.store(sdst_ptr + o_base + pd, di, mask=in_i)
    tl.store(bysrc_ptr + o_base + pd, si, mask=in_i)
    t_base = tb_ptr + pid_b.to(tl.int64) * stride_tb
    tl.store(t_base + offs_i, ts, mask=offs_i <= T)
    tl.store(t_base + (T + 1) + offs_i, td, mask=offs_i <= T)


@jit
def _merge_kernel(
    x_ptr, s_ptr, ssrc_ptr, sdst_ptr, bysrc_ptr, tb_ptr, out_ptr, sout_ptr, kept_ptr,
    N, R, C, T,
    stride_xb, stride_xn, stride_xc, stride_sb, stride_rb, stride_tb,
    stride_ob, stride_on, stride_kb,
    HAS_SIZES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, WIN: tl.constexpr, MAXC: tl.constexpr,
):
    """One program per (sample, tile of ``BLOCK_N`` tokens, channel block); gather-based.

    The tile's sources start at ``ssrc[tb[0, t]]`` and its destinations' entries fill
    ``sdst[tb[1, t] : tb[1, t + 1]]`` (from the prep kernel), so a few window comparisons give,
    per token, whether it is a source (nothing to write), its output slot (n - #sources before
    it) and the range of its own sources in ``bysrc``. The first ``MAXC`` sources of every token
    are gathered in one [BLOCK_N, MAXC, BLOCK_C] load (independent loads in flight instead of a
    chain); more, if any, in a loop. Fixed summation order, no atomics: deterministic.
    """
    pid_b = tl.program_id(0)
    t = tl.program_id(1)
    n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = n < N
    r_base = pid_b.to(tl.int64) * stride_rb
    t_base = tb_ptr + pid_b.to(tl.int64) * stride_tb
    s0 = tl.load(t_base + t)
    d0 = tl.load(t_base + (T + 1) + t)
    d1 = tl.load(t_base + (T + 1) + t + 1)
    # sources: at most BLOCK_N of them fall in this tile, all at slots >= s0
    w = s0 + tl.arange(0, BLOCK_N)
    ws = tl.load(ssrc_ptr + r_base + w, mask=w < R, other=2147483647)
    before = s0 + tl.sum((ws[None, :] < n[:, None]).to(tl.int32), axis=1)
    is_src = tl.sum((ws[None, :] == n[:, None]).to(tl.int32), axis=1) > 0
    write = in_n & ~is_src
    # destinations: this tile's entries of sdst, compared in windows of WIN
    lo = tl.zeros([BLOCK_N], tl.int32) + d0
    count = tl.zeros([BLOCK_N], tl.int32)
    for e0 in range(d0, d1, WIN):
        e = e0 + tl.arange(0, WIN)
        wd = tl.load(sdst_ptr + r_base + e, mask=e < d1, other=2147483647)
        lo += tl.sum((wd[None, :] < n[:, None]).to(tl.int32), axis=1)
        count += tl.sum((wd[None, :] == n[:, None]).to(tl.int32), axis=1)
    count = tl.where(write, count, 0)
    cc = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = cc < C
    x_base = x_ptr + pid_b.to(tl.int64) * stride_xb
    s_base = s_ptr + pid_b.to(tl.int64) * stride_sb
    if HAS_SIZES:
        ssum = tl.load(s_base + n, mask=write, other=1.0).to(tl.float32)
    else:
        ssum = tl.full([BLOCK_N], 1.0, tl.float32)
    acc = tl.load(x_base + n[:, None].to(tl.int64) * stride_xn + cc[None, :] * stride_xc,
                  mask=write[:, None] & in_c[None, :], other=0.0).to(tl.float32) * ssum[:, None]
    k = tl.arange(0, MAXC)
    m2 = k[None, :] < count[:, None]
    j2 = tl.load(bysrc_ptr + r_base + lo[:, None] + k[None, :], mask=m2, other=0)
    if HAS_SIZES:
        s2 = tl.load(s_base + j2, mask=m2, other=0.0).to(tl.float32)
    else:
        s2 = m2.to(tl.float32)
    rows = tl.load(x_base + j2[:, :, None].to(tl.int64) * stride_xn + cc[None, None, :] * stride_xc,
                   mask=m2[:, :, None] & in_c[None, None, :], other=0.0)
    acc += tl.sum(rows.to(tl.float32) * s2[:, :, None], axis=1)
    ssum += tl.sum(s2, axis=1)
    for i in range(MAXC, tl.max(count, axis=0)):  # tokens with more than MAXC sources
        more = i < count
        j = tl.load(bysrc_ptr + r_base + lo + i, mask=more, other=0)
        if HAS_SIZES:
            sj = tl.load(s_base + j, mask=more, other=0.0).to(tl.float32)
        else:
            sj = more.to(tl.float32)
        row = tl.load(x_base + j[:, None].to(tl.int64) * stride_xn + cc[None, :] * stride_xc,
                      mask=more[:, None] & in_c[None, :], other=0.0)
        acc += row.to(tl.float32) * sj[:, None]
        ssum += sj
    pos = n - before
    o_rows = out_ptr + pid_b.to(tl.int64) * stride_ob + pos[:, None].to(tl.int64) * stride_on + cc[None, :]
    tl.store(o_rows, (acc / ssum[:, None]).to(out_ptr.dtype.element_ty), mask=write[:, None] & in_c[None, :])
    if tl.program_id(2) == 0:
        tl.store(sout_ptr + pid_b * stride_kb + pos, ssum.to(sout_ptr.dtype.element_ty), mask=write)
        tl.store(kept_ptr + pid_b * stride_kb + pos, n.to(tl.int64), mask=write)


def _sorted_pairs(src_idx, dst_idx, N, tile_n):
    """(ssrc, sdst, bysrc [B, R] int32, tile starts [B, 2, T + 1] int32): see ``_merge_prep_kernel``."""
    B, R = src_idx.shape
    dev = src_idx.device
    T = triton.cdiv(N, tile_n)
    if R > tuning._COUNT_MAX:  # the same by sorting (the counting kernel's R^2 comparisons would dominate)
        ssrc = torch.sort(src_idx, dim=1).values
        sdst, order = torch.sort(dst_idx, dim=1, stable=True)
        bounds = (torch.arange(T + 1, device=dev) * tile_n).expand(B, -1).contiguous()
        tb = torch.stack([torch.searchsorted(ssrc, bounds), torch.searchsorted(sdst, bounds)], 1)
        buf = torch.stack([ssrc, sdst, src_idx.gather(1, order)]).to(torch.int32)
        return buf[0], buf[1], buf[2], tb.to(torch.int32)
    buf = torch.empty(3, B, R, dtype=torch.int32, device=dev)
    tb = torch.empty(B, 2, T + 1, dtype=torch.int32, device=dev)
    bi, bj = tuning._pair_blocks(dev)
    launchable(_merge_prep_kernel, dev)[(B, triton.cdiv(max(R, T + 1), bi))](
        src_idx, dst_idx, buf[0], buf[1], buf[2], tb, R, T, src_idx.stride(0), dst_idx.stride(0), R, 2 * (T + 1),
        TILE_N=tile_n, BLOCK_I=bi, BLOCK_J=bj,
    )
    return buf[0], buf[1], buf[2], tb


def merge_weighted_triton(x, sizes, src_idx, dst_idx, order=None):
    """Triton implementation of :func:`vtok.kernels.merge_weighted` (gather-based, fp32 sums).

    Two launches: the index bookkeeping by counting (``_merge_prep_kernel``), then the merge over
    all tokens; with ``order``, then a ``searchsorted`` and one gather of the survivors (the kernel
    writes them in index order). Forward only: the outputs carry no autograd graph (the dispatcher
    picks the torch reference when gradients are needed).

    1. ``_merge_prep_kernel``: by counting, the sources in increasing order, the destinations in
       increasing order (stable) with their sources, and where each token tile of the merge starts
       in both lists. Above ``tuning._COUNT_MAX`` pairs: two torch sorts and two ``searchsorted``.
    2. ``_merge_kernel``: gather-based, one program per (sample, tile of tokens, channel block). A few
       window comparisons give each token's fate (source: nothing written; else its output slot and
       the range of its sources), the first ``MAXC`` sources of every token are gathered in one load,
       so every input row is read once per use and every output row written once, with no atomics
       and a fixed summation order (deterministic).
    """
    out, s_out, kept = _merge_weighted_triton(x, sizes, src_idx, dst_idx)
    order = _check_order(order, *kept.shape)
    if order is None or not kept.shape[1]:
        return out, s_out, kept
    pos = torch.searchsorted(kept.contiguous(), order.contiguous())  # where each survivor sits in ``kept``
    out = out.gather(1, pos.unsqueeze(-1).expand(-1, -1, out.shape[-1]))
    return out, s_out.gather(1, pos), order


def _merge_weighted_triton(x, sizes, src_idx, dst_idx):
    """:func:`merge_weighted_triton` without ``order``: survivors in index order."""
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
    block_n, block_c, warps = tuning._merge_blocks(dev, C)
    T = triton.cdiv(N, block_n)
    if R:
        ssrc, sdst, bysrc, tb = _sorted_pairs(src_idx.contiguous(), dst_idx.contiguous(), N, block_n)
    else:  # no sources: every tile's windows are empty
        ssrc = sdst = bysrc = torch.empty(B, 1, dtype=torch.int32, device=dev)
        tb = torch.zeros(B, 2, T + 1, dtype=torch.int32, device=dev)
    s_arg = sizes if has_sizes else out
    launchable(_merge_kernel, dev)[(B, T, triton.cdiv(C, block_c))](
        x, s_arg, ssrc, sdst, bysrc, tb, out, s_out, kept,
        N, R, C, T,
        x.stride(0), x.stride(1), x.stride(2), s_arg.stride(0) if has_sizes else 0, ssrc.stride(0), tb.stride(0),
        out.stride(0), out.stride(1), K,
        HAS_SIZES=has_sizes, BLOCK_N=block_n, BLOCK_C=block_c, WIN=2 * block_n, MAXC=tuning._MERGE_MAXC,
        num_warps=warps,
    )
    return out, s_out, kept


# --------------------------------------------------------------------------------------------
# nearest_merge (HoliTom inner merge)
# --------------------------------------------------------------------------------------------



def nearest_merge_torch(x, sizes, keep_idx, *, metric=None):
    """Torch reference of :func:`vtok.kernels.nearest_merge`; the contract of both backends.

    ``nearest_merge(x, sizes, keep_idx, *, metric=None) -> (x_kept, sizes_kept)``

    Every token not in ``keep_idx [B, K]`` (sorted) merges, size-weighted, into its most
    cosine-similar kept token (ties -> lowest index), as one match plus one merge. ``metric``
    defaults to ``x``. This is the vtok form of HoliTom's inner merge: the official code halves
    sequentially (``h_kept <- (h_kept + h_drop) / 2`` in position order, which weights later
    members more); a method that wants that exact weighting can compute its closed form itself
    (kept token ``h / 2^m`` plus the i-th of its m merged tokens ``d_i / 2^(m - i + 1)``, in
    position order); the matching step is the same.

    Used by: no method yet; kept for the planned HoliTom method (its merge inside the LLM).
    """
    keep_idx, src, dst = _nearest_pairs(x, keep_idx, metric, bipartite_match_torch)
    if keep_idx.shape[1] == 0:
        raise ValueError("nearest_merge: keep_idx is empty; there is no token to merge into")
    x_k, s_k, _ = merge_weighted_torch(x, sizes, src, dst)
    return x_k, s_k


def nearest_merge_triton(x, sizes, keep_idx, *, metric=None):
    """Triton implementation of :func:`vtok.kernels.nearest_merge` (the Triton match, then the Triton
    merge). Used by: no method yet; kept for the planned HoliTom method."""
    keep_idx, src, dst = _nearest_pairs(x, keep_idx, metric, bipartite_match_triton)
    if keep_idx.shape[1] == 0:
        raise ValueError("nearest_merge: keep_idx is empty; there is no token to merge into")
    x_k, s_k, _ = merge_weighted_triton(x, sizes, src, dst)
    return x_k, s_k


if not HAS_TRITON:  # pragma: no cover

    def _no_triton(*_a, **_k):
        raise RuntimeError("vtok.kernels: the Triton backend needs the `triton` package")

    merge_weighted_triton = nearest_merge_triton = _no_triton  # noqa: F811

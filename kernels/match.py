"""Bipartite matching (ToMe's primitive): each A token's most cosine-similar B token, the top r.

The torch reference, whose docstring is the contract, and the Triton implementation beside it
(norms, A·Bᵀ and row max fused without the score matrix, then a top r by counting). Shared index
bookkeeping is in ``indexing.py``, block sizes and autotuning in ``tuning.py``.
"""

from __future__ import annotations

import torch

from . import tuning
from ._common import (
    HAS_TRITON,
    NAN_SCORE,
    NORM_EPS,
    dot_flags,
    interpret_enabled,
    inv_norm,
    jit,
    launchable,
    next_pow2,
    tl,
    triton,
)
from .indexing import (
    _clamp_r,
    _empty_match,
    _fast_alternating,
    _split,
    _top_r,
    nan_scores,
)

__all__ = ["bipartite_match_torch", "bipartite_match_triton"]


# --------------------------------------------------------------------------------------------
# torch reference
# --------------------------------------------------------------------------------------------


def _tome_case(metric, protected, a_idx, b_idx, r):
    """``(fast, empty)``: ToMe's case as ``_fast_alternating`` finds it ((r, prot) or None), and the empty
    match to return at once when it leaves nothing to merge (else None). Both backends start here."""
    fast = _fast_alternating(metric, protected, a_idx, b_idx, r)
    if fast is not None and fast[0] == 0:
        return fast, _empty_match(metric.shape[0], metric.device)
    return fast, None


@torch.no_grad()
def bipartite_match_torch(metric, *, r, protected=None, a_idx=None, b_idx=None):
    """Torch reference of :func:`vtok.kernels.bipartite_match`; the contract of both backends.

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

    *NaN*: a NaN or infinite token has NaN similarities; they rank below every number (and above an
    inadmissible partner). An A token takes a NaN partner only when all its similarities are NaN (then
    its lowest admissible B token) and such a token comes after every A token with a number; its score
    is NaN. The merge stays valid for any r, and a sample's result never depends on another sample.

    ``a_idx`` / ``b_idx``: optional index sets ``[N_A]`` / ``[N_B]`` (shared) or ``[B, N_A]`` /
    ``[B, N_B]`` (per sample). They must be disjoint; they are sorted internally, so "lowest
    index" always means lowest token index. If only one is given, the other is its complement.

    Returns ``src_idx [B, r]`` and ``dst_idx [B, r]`` (int64 token indices into N) and
    ``scores [B, r]`` (fp32 cosine similarity of each pair), ordered by decreasing score.

    In ToMe's case (alternating split, no or int protection) the reference builds no mask tensors
    and does not synchronise with the device, as the Triton path: the admissible rows are
    ``index >= protected`` and r is clamped from the counts (on a CPU those small operations cost
    more than the matching itself).
    """
    fast, empty = _tome_case(metric, protected, a_idx, b_idx, r)
    if empty is not None:
        return empty
    B = metric.shape[0]
    if fast is not None:
        r, prot = fast
        N = metric.shape[1]
        a_idx = torch.arange(0, N, 2, device=metric.device).expand(B, -1)
        b_idx = torch.arange(1, N, 2, device=metric.device).expand(B, -1)
        a_ok = b_ok = None  # nothing to mask
        if prot:
            a_ok, b_ok = a_idx >= prot, b_idx >= prot
    else:
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
        scores = torch.where(scores.isnan(), NAN_SCORE, scores)  # NaN ranks below every number (see NAN_SCORE)
        if b_ok is not None:
            scores = scores.masked_fill(~b_ok[:, None, :], float("-inf"))
        p = scores.argmax(dim=-1)  # first maximal index -> lowest token index (b_idx is sorted)
        bv = scores.gather(-1, p[..., None]).squeeze(-1)
        if a_ok is not None:
            bv = bv.masked_fill(~a_ok[:, s : s + chunk], float("-inf"))
        best[:, s : s + chunk] = bv
        part[:, s : s + chunk] = p
    return _top_r(best, part, a_idx, b_idx, r)


# --------------------------------------------------------------------------------------------
# Triton (the design is in the docstring of ``bipartite_match_triton``)
# --------------------------------------------------------------------------------------------


#: ``key`` value of an A row with no candidate (protected, masked, or not reached): below every key.
NO_KEY = -(2**63)
_NO_KEY = tl.constexpr(NO_KEY)  # the same, as the kernels see it
_EPS = tl.constexpr(NORM_EPS)  # the norm floor of ``inv_norm``, for the kernels that compute norms
_NAN_SCORE = tl.constexpr(NAN_SCORE)  # the rank of a NaN similarity (see ``NAN_SCORE``)


@jit
def _prologue_kernel(
    x_ptr, inv_ptr, key_ptr, N, C, NA,
    stride_xb, stride_xn, stride_xc, stride_ib, stride_kb,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Inverse norms ``1 / max(||x||, 1e-12)`` (fp32, correctly rounded sqrt and division) of a
    tile of rows, and the match keys of the same rows set to ``_NO_KEY`` (one launch for both)."""
    pid_b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_r = rows < N
    base = x_ptr + pid_b.to(tl.int64) * stride_xb + rows[:, None].to(tl.int64) * stride_xn
    ss = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        v = tl.load(base + cc[None, :] * stride_xc, mask=in_r[:, None] & (cc < C)[None, :], other=0.0).to(tl.float32)
        ss += tl.sum(v * v, axis=1)
    inv = tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), tl.maximum(tl.sqrt_rn(ss), _EPS))
    tl.store(inv_ptr + pid_b * stride_ib + rows, inv, mask=in_r)
    tl.store(key_ptr + pid_b.to(tl.int64) * stride_kb + rows, tl.full([BLOCK_R], _NO_KEY, tl.int64), mask=rows < NA)


@jit
def _match_kernel(
    xa_ptr, xb_ptr, inva_ptr, invb_ptr, a_ok_ptr, b_ok_ptr, key_ptr,
    NA, NB, C, SPLIT, PROT,
    stride_ab, stride_an, stride_ac,
    stride_bb, stride_bn, stride_bc,
    stride_ia, step_ia, stride_ib, step_ib, stride_oka, stride_okb, stride_kb,
    A_STEP: tl.constexpr, A_OFF: tl.constexpr, B_STEP: tl.constexpr, B_OFF: tl.constexpr,
    MASKED: tl.constexpr, EVEN_C: tl.constexpr, FUSED: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """For A rows [pid_a tile] of sample pid_b: running (max, argmax) of cos(A, B) over B tiles.

    xa / xb are strided views of the tokens of A and B (for the alternating split, the even and
    odd rows of ``metric`` itself: no copy). With ``SPLIT > 1`` program ``pid_s`` scans only its
    share of the B tiles (more programs for small batches). The ``[N_A, N_B]`` scores exist only
    tile by tile on chip. The result is flushed with one ``atomic_max`` per A row of the packed key

        key = (order-preserving int32 of the fp32 score) << 32 | (2^32 - 1 - partner position)

    so the best score wins and, on equal scores, the lowest partner position (the reference's
    first argmax) wins, whichever split saw it: no partial results go back to the host, and the
    result does not depend on the split. ``key [B, NA]`` starts at ``_NO_KEY`` (the prologue
    kernel); rows without an admissible partner keep it.

    ``FUSED`` (one split only, for batches that fill the GPU without splitting): the squared norms
    are summed from the very tiles the dot product reads (``inva`` / ``invb`` are not read) and
    every row is stored once, ``_NO_KEY`` included, so no prologue launch is needed.

    Admissibility: with ``MASKED`` the per-sample masks ``a_ok`` / ``b_ok`` are read; otherwise
    row i of A is token ``A_STEP * i + A_OFF`` (likewise B) and the first ``PROT`` tokens are
    protected (no mask tensor, no host round trip).
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
    if not FUSED:
        inv_a = tl.load(inva_ptr + pid_b * stride_ia + offs_a * step_ia, mask=in_a, other=0.0)
    a_base = xa_ptr + pid_b.to(tl.int64) * stride_ab
    b_base = xb_ptr + pid_b.to(tl.int64) * stride_bb
    offs_c = tl.arange(0, BLOCK_C)

    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    part = tl.zeros([BLOCK_A], tl.int32)
    for b0 in range(b_start, b_end, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        in_b = offs_b < b_end
        if MASKED:
            b_ok = (tl.load(b_ok_ptr + pid_b * stride_okb + offs_b, mask=in_b, other=0) != 0) & in_b
        else:
            b_ok = ((offs_b * B_STEP + B_OFF) >= PROT) & in_b
        pa = a_base + offs_a[:, None].to(tl.int64) * stride_an + offs_c[None, :] * stride_ac
        pb = b_base + offs_b[None, :].to(tl.int64) * stride_bn + offs_c[:, None] * stride_bc
        acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
        sq_a = tl.zeros([BLOCK_A], tl.float32)
        sq_b = tl.zeros([BLOCK_B], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            if EVEN_C:
                ta = tl.load(pa, mask=in_a[:, None], other=0.0)
                tb = tl.load(pb, mask=in_b[None, :], other=0.0)
            else:
                in_c = (c0 + offs_c) < C
                ta = tl.load(pa, mask=in_a[:, None] & in_c[None, :], other=0.0)
                tb = tl.load(pb, mask=in_c[:, None] & in_b[None, :], other=0.0)
            if FUSED:
                fa = ta.to(tl.float32)
                fb = tb.to(tl.float32)
                sq_a += tl.sum(fa * fa, axis=1)
                sq_b += tl.sum(fb * fb, axis=0)
            if UPCAST:
                ta = ta.to(tl.float32)
                tb = tb.to(tl.float32)
            acc = tl.dot(ta, tb, acc, input_precision=PRECISION)
            pa += BLOCK_C * stride_ac
            pb += BLOCK_C * stride_bc
        if FUSED:
            inv_a = tl.div_rn(tl.full([BLOCK_A], 1.0, tl.float32), tl.maximum(tl.sqrt_rn(sq_a), _EPS))
            inv_b = tl.div_rn(tl.full([BLOCK_B], 1.0, tl.float32), tl.maximum(tl.sqrt_rn(sq_b), _EPS))
        else:
            inv_b = tl.load(invb_ptr + pid_b * stride_ib + offs_b * step_ib, mask=in_b, other=0.0)
        s = acc * inv_a[:, None] * inv_b[None, :]
        s = tl.where(s != s, _NAN_SCORE, s)  # NaN ranks as NAN_SCORE: no max below sees a NaN
        s = tl.where(b_ok[None, :], s, float("-inf"))
        tile_best, tile_arg = tl.max(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        take = tile_best > best  # strict: an earlier tile (lower index) keeps a tie
        best = tl.where(take, tile_best, best)
        part = tl.where(take, tile_arg + b0, part)
    # -0.0 -> +0.0 (equal as floats, so they must pack equal), then an int32 whose signed order
    # is the float order, above the complemented partner position (the lower position packs higher).
    sb = tl.where(best == 0.0, 0.0, best).to(tl.int32, bitcast=True)
    sk = sb ^ ((sb >> 31) & 0x7FFFFFFF)
    key = (sk.to(tl.int64) << 32) | (0xFFFFFFFF - part.to(tl.int64))
    ok = in_a & a_ok & (best > float("-inf"))
    k_rows = key_ptr + pid_b.to(tl.int64) * stride_kb + offs_a
    if FUSED:
        tl.store(k_rows, tl.where(ok, key, _NO_KEY), mask=in_a)
    else:
        tl.atomic_max(k_rows, key, mask=ok)


def _match_tuner(device):
    """The autotuned match kernel (configs and timing from ``tuning``): compiled on CUDA, interpreted
    elsewhere (tests)."""
    global _match_tuned
    if device.type == "cuda":
        if _match_tuned is None:
            _match_tuned = tuning._autotuned(_match_kernel, do_bench=tuning._short_bench)
        return _match_tuned
    return launchable(_match_kernel, device, wrap=tuning._interpreted_autotuned)


_match_tuned = None


def _prologue(metric, NA):
    """(inv [B, N] fp32, key [B, NA] int64 = _NO_KEY) in one launch."""
    B, N, C = metric.shape
    dev = metric.device
    inv = torch.empty(B, N, dtype=torch.float32, device=dev)
    key = torch.empty(B, NA, dtype=torch.int64, device=dev)
    br, bc = tuning._prologue_blocks(dev, C)
    launchable(_prologue_kernel, dev)[(B, triton.cdiv(N, br))](
        metric, inv, key, N, C, NA, metric.stride(0), metric.stride(1), metric.stride(2), N, NA,
        BLOCK_R=br, BLOCK_C=bc,
    )
    return inv, key


def _rows_of(metric, idx, alternating_start):
    """A strided view of the rows ``idx`` of metric: a free slice for the alternating split."""
    if alternating_start is not None:
        return metric[:, alternating_start::2]
    C = metric.shape[-1]
    return metric.gather(1, idx[..., None].expand(-1, -1, C))


def _match_keys_triton(metric, a_idx, b_idx, a_ok, b_ok, alternating, *, prot=0, split=None, autotune=None):
    """Packed ``key [B, NA]`` int64 per A row (see ``_match_kernel``): one launch with one split
    (the fused kernel), else two (prologue, match). ``alternating``: A / B are the even / odd tokens (``a_idx`` / ``b_idx`` are then not
    read). ``a_ok is None``: no masks, the first ``prot`` tokens are protected (alternating split
    only). ``split`` forces how many programs share the B tiles of one A tile (tests).
    ``autotune``: whether to launch through the autotuner (default: on CUDA, compiled); ``True``
    under the interpreter runs the tuned path on CPU (tests: several configs, timing runs)."""
    B, N, C = metric.shape
    NA, NB = ((N + 1) // 2, N // 2) if alternating else (a_idx.shape[1], b_idx.shape[1])
    dev = metric.device
    tuned = (dev.type == "cuda" and not interpret_enabled()) if autotune is None else autotune
    if split is None:
        split = tuning._auto_split(B, NA, NB, dev)
    fused = split == 1  # norms inside the match kernel, plain stores: no prologue launch
    xa = _rows_of(metric, a_idx, 0 if alternating else None)
    xb = _rows_of(metric, b_idx, 1 if alternating else None)
    if fused:
        key = torch.empty(B, NA, dtype=torch.int64, device=dev)
        inv_a = inv_b = key  # never read
        step_a = step_b = 0
    else:
        inv, key = _prologue(metric, NA)
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
        a_ok8 = b_ok8 = key  # never read
        ok_strides = (0, 0)
        steps = dict(A_STEP=2, A_OFF=0, B_STEP=2, B_OFF=1)
    upcast, prec = dot_flags(metric.dtype, dev)
    args = (xa, xb, inv_a, inv_b, a_ok8, b_ok8, key, NA, NB, C, split, int(prot),
            xa.stride(0), xa.stride(1), xa.stride(2), xb.stride(0), xb.stride(1), xb.stride(2),
            inv_a.stride(0), step_a, inv_b.stride(0), step_b, *ok_strides, key.stride(0))
    consts = dict(steps, MASKED=masked, FUSED=fused, UPCAST=upcast, PRECISION=prec)
    if tuned:
        even_c = C % tuning._EVEN_C == 0
        consts["EVEN_C"] = even_c
        tkey = (next_pow2(NA), next_pow2(NB), C, split, masked, even_c, metric.dtype, dev)
        cfg = tuning._MATCH_BEST.get(tkey)
        if cfg is None:
            tuner = _match_tuner(dev)
            tuner[lambda meta: (B, triton.cdiv(NA, meta["BLOCK_A"]), split)](*args, **consts)
            tuning._MATCH_BEST[tkey] = tuner.best_config
        else:
            launchable(_match_kernel, dev)[(B, triton.cdiv(NA, cfg.kwargs["BLOCK_A"]), split)](
                *args, **consts, **cfg.all_kwargs())
    else:
        ba, bb, bc = tuning._untuned_match_blocks(C)
        launchable(_match_kernel, dev)[(B, triton.cdiv(NA, ba), split)](
            *args, **consts, BLOCK_A=ba, BLOCK_B=bb, BLOCK_C=bc, EVEN_C=C % bc == 0)
    return key


@jit
def _rank_kernel(
    key_ptr, aidx_ptr, bidx_ptr, src_ptr, dst_ptr, score_ptr,
    NA, R, stride_kb, stride_ab, stride_bb, stride_ob,
    A_STEP: tl.constexpr, A_OFF: tl.constexpr, B_STEP: tl.constexpr, B_OFF: tl.constexpr, GATHER: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Top-r of the packed keys by counting: rank(i) = #{j: score_j > score_i, or equal and j < i}.

    One program per (sample, tile of ``BLOCK_I`` A rows) compares its rows with all ``NA`` keys
    (``NA^2`` comparisons in all, no sort, no host sync), which is the order of a stable
    descending sort; rows with rank < R write their source token, partner token and score to
    slot ``rank`` of ``src`` / ``dst`` / ``score [B, R]``.
    """
    pid_b = tl.program_id(0)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    in_i = offs_i < NA
    k_base = key_ptr + pid_b.to(tl.int64) * stride_kb
    ki = tl.load(k_base + offs_i, mask=in_i, other=_NO_KEY)
    si = (ki >> 32).to(tl.int32)  # the score part (int32 compares are cheaper)
    rank = tl.zeros([BLOCK_I], tl.int32)
    for j0 in range(0, NA, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        sj = (tl.load(k_base + offs_j, mask=offs_j < NA, other=_NO_KEY) >> 32).to(tl.int32)
        beats = (sj[None, :] > si[:, None]) | ((sj[None, :] == si[:, None]) & (offs_j[None, :] < offs_i[:, None]))
        beats = beats & (offs_j < NA)[None, :]
        rank += tl.sum(beats.to(tl.int32), axis=1)
    sel = in_i & (rank < R)
    score = (si ^ ((si >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    score = tl.where(score == _NAN_SCORE, float("nan"), score)
    pos = 0xFFFFFFFF - (ki & 0xFFFFFFFF)
    if GATHER:
        src = tl.load(aidx_ptr + pid_b * stride_ab + offs_i, mask=sel, other=0)
        dst = tl.load(bidx_ptr + pid_b * stride_bb + pos, mask=sel, other=0)
    else:
        src = (offs_i * A_STEP + A_OFF).to(tl.int64)
        dst = pos * B_STEP + B_OFF
    out = pid_b.to(tl.int64) * stride_ob + rank
    tl.store(src_ptr + out, src, mask=sel)
    tl.store(dst_ptr + out, dst, mask=sel)
    tl.store(score_ptr + out, score, mask=sel)


def _top_r_sorted(key, r, a_idx=None, b_idx=None):
    """The same as the counting kernel, by sorting: descending score bits, ties by lower row
    (stable); rows without a partner (``_NO_KEY``) sort last, as r never reaches them."""
    order = torch.sort(key >> 32, dim=1, descending=True, stable=True).indices[:, :r]
    k = key.gather(1, order)
    sb = (k >> 32).to(torch.int32)
    scores = nan_scores((sb ^ ((sb >> 31) & 0x7FFFFFFF)).view(torch.float32))
    pos = 0xFFFFFFFF - (k & 0xFFFFFFFF)
    if a_idx is None:  # alternating split: A row i is token 2i, B position p is token 2p + 1
        return order * 2, pos * 2 + 1, scores
    return a_idx.gather(1, order), b_idx.gather(1, pos), scores


def _top_r_triton(key, r, a_idx=None, b_idx=None):
    """(src, dst, scores) [B, r] from the packed keys; token indices from the alternating split
    (``a_idx is None``) or from the index sets."""
    B, NA = key.shape
    dev = key.device
    if NA > tuning._COUNT_MAX:
        return _top_r_sorted(key, r, a_idx, b_idx)
    src, dst = torch.empty(2, B, r, dtype=torch.int64, device=dev)  # one allocation (host time matters here)
    scores = torch.empty(B, r, dtype=torch.float32, device=dev)
    gather = a_idx is not None
    ai, bi = (a_idx, b_idx) if gather else (key, key)  # never read without GATHER
    bi_, bj = tuning._pair_blocks(dev)
    launchable(_rank_kernel, dev)[(B, triton.cdiv(NA, bi_))](
        key, ai, bi, src, dst, scores, NA, r, key.stride(0), ai.stride(0), bi.stride(0), r,
        A_STEP=2, A_OFF=0, B_STEP=2, B_OFF=1, GATHER=gather, BLOCK_I=bi_, BLOCK_J=bj,
    )
    return src, dst, scores


def bipartite_match_triton(metric, *, r, protected=None, a_idx=None, b_idx=None):
    """Triton implementation of :func:`vtok.kernels.bipartite_match` (fused, no score matrix).

    In the common case (alternating split, int protection) two launches (the fused match, the
    counting top-r) or, with split B tiles, three (prologue first); no host synchronisation.

    At small sizes (ToMe on a ViT-L batch) the cost is the number of launches, not the arithmetic,
    so there is no torch glue between them either; with the merge that follows (``merge.py``) the
    common case is five launches at most:

    1. ``_prologue_kernel``: fp32 inverse norms of all tokens, and the match keys set to "none".
    2. ``_match_kernel``: one program per (sample, tile of ``BLOCK_A`` A tokens, B split). It streams
       B in tiles of ``BLOCK_B`` tokens and C in chunks of ``BLOCK_C`` channels, computes the
       dot-product tile with ``tl.dot`` (fp32 accumulation), scales it by the inverse norms and folds
       it into a running (max, argmax) per A row. The ``[N_A, N_B]`` score matrix exists only tile by
       tile on chip. When batch x A-tiles cannot fill the GPU (batch 1, large N) the B tiles are split
       over ``SPLIT`` programs per A tile; each flushes its rows with an ``atomic_max`` of a packed
       int64 key (score bits, then the complemented partner position), so the best score and, on a
       tie, the lowest partner win whatever the split. With one split the norms are computed in the
       match kernel itself and step 1 is skipped. For the alternating split A and B are strided
       views of ``metric`` (no copy); given index sets are gathered once.
    3. ``_rank_kernel``: the top r by counting, rank(i) = #{j beating i} (score, then lower index:
       the order of a stable descending sort), one program per tile of A rows; rows with rank < r
       write their (source, destination, score) to slot rank. Its N_A^2 comparisons grow with the
       square of the length, so above ``tuning._COUNT_MAX`` rows a stable torch sort of the keys
       replaces it.
    """
    return _bipartite_match_triton(metric, r=r, protected=protected, a_idx=a_idx, b_idx=b_idx)


@torch.no_grad()
def _bipartite_match_triton(metric, *, r, protected=None, a_idx=None, b_idx=None, split=None, autotune=None):
    """:func:`bipartite_match_triton` with the knobs tests use: ``split`` forces how many programs
    share the B tiles of one A tile; ``autotune=True`` takes the autotuned path even under the
    interpreter (see ``_match_keys_triton``)."""
    fast, empty = _tome_case(metric, protected, a_idx, b_idx, r)
    if empty is not None:
        return empty
    if fast is not None:
        r, prot = fast
        key = _match_keys_triton(metric, None, None, None, None, True, prot=prot, split=split, autotune=autotune)
        return _top_r_triton(key, r)
    B = metric.shape[0]
    alternating = a_idx is None and b_idx is None
    a_idx, b_idx, a_ok, b_ok, n_a, n_b = _split(metric, protected, a_idx, b_idx)
    r = _clamp_r(r, a_ok, b_ok, n_a, n_b)
    if r == 0:
        return _empty_match(B, metric.device)
    key = _match_keys_triton(metric, a_idx, b_idx, a_ok, b_ok, alternating, split=split, autotune=autotune)
    return _top_r_triton(key, r, a_idx, b_idx)


if not HAS_TRITON:  # pragma: no cover

    def _no_triton(*_a, **_k):
        raise RuntimeError("vtok.kernels: the Triton backend needs the `triton` package")

    bipartite_match_triton = _bipartite_match_triton = _no_triton  # noqa: F811

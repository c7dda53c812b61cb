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
At small sizes (ToMe on a ViT-L batch) the cost is the number of launches, not the arithmetic,
so the common case (alternating split, int protection) is five launches in all, with no host
synchronisation and no torch glue between them:

1. ``_prologue_kernel``: fp32 inverse norms of all tokens, and the match keys set to "none".
2. ``_match_kernel``: one program per (sample, tile of ``BLOCK_A`` A tokens, B split). It streams
   B in tiles of ``BLOCK_B`` tokens and C in chunks of ``BLOCK_C`` channels, computes the
   dot-product tile with ``tl.dot`` (fp32 accumulation), scales it by the inverse norms and folds
   it into a running (max, argmax) per A row. The ``[N_A, N_B]`` score matrix exists only tile by
   tile on chip. When batch x A-tiles cannot fill the GPU (batch 1, large N) the B tiles are split
   over ``SPLIT`` programs per A tile; each flushes its rows with an ``atomic_max`` of a packed
   int64 key (score bits, then the complemented partner position), so the best score and, on a
   tie, the lowest partner win whatever the split. For the alternating split A and B are strided
   views of ``metric`` (no copy); given index sets are gathered once.
3. ``_rank_kernel``: the top r by counting, rank(i) = #{j beating i} (score, then lower index:
   the order of a stable descending sort), one program per tile of A rows; rows with rank < r
   write their (source, destination, score) to slot rank. Its N_A^2 comparisons grow with the
   square of the length, so above ``_COUNT_MAX`` rows a stable torch sort of the keys replaces it.
4. ``_merge_prep_kernel``: again by counting, the sources in increasing order, the destinations
   in increasing order (stable) with their sources, and where each token tile of the merge starts
   in both lists. Above ``_COUNT_MAX`` pairs: two torch sorts and two ``searchsorted``.
5. ``_merge_kernel``: gather-based, one program per (sample, tile of tokens, channel block). A few
   window comparisons give each token's fate (source: nothing written; else its output slot and
   the range of its sources), the first ``MAXC`` sources of every token are gathered in one load,
   so every input row is read once per use and every output row written once, with no atomics
   and a fixed summation order (deterministic).
"""

from __future__ import annotations

import torch

from ._common import (
    HAS_TRITON,
    NORM_EPS,
    dot_flags,
    interpret_enabled,
    inv_norm,
    jit,
    launchable,
    next_pow2,
    num_sms as _num_sms,
    tl,
    triton,
)

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


#: ``key`` value of an A row with no candidate (protected, masked, or not reached): below every key.
NO_KEY = -(2**63)
_NO_KEY = tl.constexpr(NO_KEY)  # the same, as the kernels see it
_EPS = tl.constexpr(NORM_EPS)  # the norm floor of ``inv_norm``, for the kernels that compute norms


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
_EVEN_C = 128  # every BLOCK_C above divides it


def _autotuned(fn, do_bench=None):
    """``fn`` (the match kernel, or its interpreted twin) under Triton's autotuner over ``_MATCH_CONFIGS``."""
    cfgs = [
        triton.Config({"BLOCK_A": a, "BLOCK_B": b, "BLOCK_C": c}, num_warps=w, num_stages=s)
        for a, b, c, w, s in _MATCH_CONFIGS
    ]
    # Every timed config starts from the prologue's keys: atomic_max would otherwise leave the
    # maximum over all timed configs, whose scores can differ in the last bit (different
    # summation orders), and the first call of a shape would disagree with the later ones.
    import inspect

    # ``do_bench`` is newer than Triton 3.0; without it Triton's default timing is used
    takes_bench = "do_bench" in inspect.signature(triton.autotune).parameters
    extra = {"do_bench": do_bench} if do_bench is not None and takes_bench else {}
    return triton.autotune(configs=cfgs, key=["NA", "NB", "C", "SPLIT", "MASKED"],
                           restore_value=["key_ptr"], **extra)(fn)


def _wall_clock_bench(kernel_call, quantiles):
    """``do_bench`` for the autotuner under the interpreter (tests of the tuned path on CPU):
    each config runs three times, as timing runs repeat a launch, and its wall time is its score."""
    import time

    t0 = time.perf_counter()
    for _ in range(3):
        kernel_call()
    t = (time.perf_counter() - t0) / 3
    return [t] * len(quantiles) if quantiles else t


def _interpreted_autotuned(fn):
    return _autotuned(fn, do_bench=_wall_clock_bench)


def _short_bench(kernel_call, quantiles):
    """Triton's ``do_bench`` with 5 ms of warm-up and 25 ms of timing per config (the defaults,
    25 and 100 ms, spend over half a second on each new shape for a kernel of 0.01 to 1 ms)."""
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def _match_tuner(device):
    """The autotuned match kernel: compiled on CUDA, interpreted elsewhere (tests)."""
    global _match_tuned
    if device.type == "cuda":
        if _match_tuned is None:
            _match_tuned = _autotuned(_match_kernel, do_bench=_short_bench)
        return _match_tuned
    return launchable(_match_kernel, device, wrap=_interpreted_autotuned)


_match_tuned = None


def _auto_split(B: int, NA: int, NB: int, device) -> int:
    """Programs sharing the B tiles of one A tile.

    1 (the fused single-split kernel, no prologue launch) when the batch alone gives at least half
    a wave of 128-row A tiles and each scans few B tiles, or four waves whatever their length (at
    (32, 577, 1024) on an H100 one and two splits ran within 5 %). Else about four waves, at most
    8 splits (at (1, 25088, 1152): one split 1.9 ms, four to six 0.8 ms).
    """
    if device.type != "cuda":
        return 1
    programs = B * triton.cdiv(NA, 128)
    sms = _num_sms(device)
    if (2 * programs >= sms and NB <= 2048) or programs >= 4 * sms:
        return 1
    return max(1, min(8, triton.cdiv(NB, 256), triton.cdiv(4 * sms, programs)))


#: (NA and NB rounded up to powers of two, C, SPLIT, MASKED, EVEN_C, dtype, device) -> the
#: autotuner's choice, launched directly on later calls: the autotuner's own bookkeeping costs
#: about as much host time as a launch, and tuning every exact length would time five configs at
#: every layer of a ToMe schedule (the token count changes at each), where one choice per
#: power-of-two range serves them all.
_MATCH_BEST: dict = {}


def _prologue(metric, NA):
    """(inv [B, N] fp32, key [B, NA] int64 = _NO_KEY) in one launch."""
    B, N, C = metric.shape
    dev = metric.device
    inv = torch.empty(B, N, dtype=torch.float32, device=dev)
    key = torch.empty(B, NA, dtype=torch.int64, device=dev)
    br, bc = (32, min(256, next_pow2(C))) if dev.type == "cuda" else (16, min(32, next_pow2(C)))
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
        split = _auto_split(B, NA, NB, dev)
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
        even_c = C % _EVEN_C == 0
        consts["EVEN_C"] = even_c
        tkey = (next_pow2(NA), next_pow2(NB), C, split, masked, even_c, metric.dtype, dev)
        cfg = _MATCH_BEST.get(tkey)
        if cfg is None:
            tuner = _match_tuner(dev)
            tuner[lambda meta: (B, triton.cdiv(NA, meta["BLOCK_A"]), split)](*args, **consts)
            _MATCH_BEST[tkey] = tuner.best_config
        else:
            launchable(_match_kernel, dev)[(B, triton.cdiv(NA, cfg.kwargs["BLOCK_A"]), split)](
                *args, **consts, **cfg.all_kwargs())
    else:
        ba, bb, bc = 16, 16, min(32, max(16, next_pow2(C)))  # small tiles: the interpreter's speed
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


def _pair_blocks(device) -> tuple[int, int]:
    """(BLOCK_I, BLOCK_J) of the counting kernels (rank, merge prep)."""
    return (32, 256) if device.type == "cuda" else (16, 16)


#: Above this many rows the counting kernels (the top r over N_A rows, the merge bookkeeping over
#: r pairs) give way to stable torch sorts, O(n log n) instead of n^2 comparisons (the top r: 0.08
#: ms at N_A = 12544 on an H100, four times that at twice the length). The bench shapes stay
#: below it; the crossover itself has not been timed on a GPU yet.
_COUNT_MAX = 16384


def _top_r_sorted(key, r, a_idx=None, b_idx=None):
    """The same as the counting kernel, by sorting: descending score bits, ties by lower row
    (stable); rows without a partner (``_NO_KEY``) sort last, as r never reaches them."""
    order = torch.sort(key >> 32, dim=1, descending=True, stable=True).indices[:, :r]
    k = key.gather(1, order)
    sb = (k >> 32).to(torch.int32)
    scores = (sb ^ ((sb >> 31) & 0x7FFFFFFF)).view(torch.float32)
    pos = 0xFFFFFFFF - (k & 0xFFFFFFFF)
    if a_idx is None:  # alternating split: A row i is token 2i, B position p is token 2p + 1
        return order * 2, pos * 2 + 1, scores
    return a_idx.gather(1, order), b_idx.gather(1, pos), scores


def _top_r_triton(key, r, a_idx=None, b_idx=None):
    """(src, dst, scores) [B, r] from the packed keys; token indices from the alternating split
    (``a_idx is None``) or from the index sets."""
    B, NA = key.shape
    dev = key.device
    if NA > _COUNT_MAX:
        return _top_r_sorted(key, r, a_idx, b_idx)
    src, dst = torch.empty(2, B, r, dtype=torch.int64, device=dev)  # one allocation (host time matters here)
    scores = torch.empty(B, r, dtype=torch.float32, device=dev)
    gather = a_idx is not None
    ai, bi = (a_idx, b_idx) if gather else (key, key)  # never read without GATHER
    bi_, bj = _pair_blocks(dev)
    launchable(_rank_kernel, dev)[(B, triton.cdiv(NA, bi_))](
        key, ai, bi, src, dst, scores, NA, r, key.stride(0), ai.stride(0), bi.stride(0), r,
        A_STEP=2, A_OFF=0, B_STEP=2, B_OFF=1, GATHER=gather, BLOCK_I=bi_, BLOCK_J=bj,
    )
    return src, dst, scores


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
def bipartite_match_triton(metric, *, r, protected=None, a_idx=None, b_idx=None, _b_split=None, _autotune=None):
    """Triton implementation of :func:`vtok.kernels.bipartite_match` (fused, no score matrix).

    In the common case (alternating split, int protection) two launches (the fused match, the
    counting top-r) or, with split B tiles, three (prologue first); no host synchronisation.
    Test knobs: ``_b_split`` forces how many programs share the B tiles of one A tile;
    ``_autotune=True`` takes the autotuned path even under the interpreter.
    """
    B = metric.shape[0]
    fast = _fast_alternating(metric, protected, a_idx, b_idx, r)
    if fast is not None:
        r, prot = fast
        if r == 0:
            return _empty_match(B, metric.device)
        key = _match_keys_triton(metric, None, None, None, None, True, prot=prot, split=_b_split, autotune=_autotune)
        return _top_r_triton(key, r)
    alternating = a_idx is None and b_idx is None
    a_idx, b_idx, a_ok, b_ok, n_a, n_b = _split(metric, protected, a_idx, b_idx)
    r = _clamp_r(r, a_ok, b_ok, n_a, n_b)
    if r == 0:
        return _empty_match(B, metric.device)
    key = _match_keys_triton(metric, a_idx, b_idx, a_ok, b_ok, alternating, split=_b_split, autotune=_autotune)
    return _top_r_triton(key, r, a_idx, b_idx)


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


#: sources per token gathered in one load by the merge kernel (more go through a loop)
_MERGE_MAXC = 4


def _merge_blocks(device, C: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps) of the merge kernel; small blocks for the interpreter."""
    if device.type == "cuda":
        return 16, min(128, next_pow2(C)), 4
    return 8, min(32, next_pow2(C)), 4


def _sorted_pairs(src_idx, dst_idx, N, tile_n):
    """(ssrc, sdst, bysrc [B, R] int32, tile starts [B, 2, T + 1] int32): see ``_merge_prep_kernel``."""
    B, R = src_idx.shape
    dev = src_idx.device
    T = triton.cdiv(N, tile_n)
    if R > _COUNT_MAX:  # the same by sorting (the counting kernel's R^2 comparisons would dominate)
        ssrc = torch.sort(src_idx, dim=1).values
        sdst, order = torch.sort(dst_idx, dim=1, stable=True)
        bounds = (torch.arange(T + 1, device=dev) * tile_n).expand(B, -1).contiguous()
        tb = torch.stack([torch.searchsorted(ssrc, bounds), torch.searchsorted(sdst, bounds)], 1)
        buf = torch.stack([ssrc, sdst, src_idx.gather(1, order)]).to(torch.int32)
        return buf[0], buf[1], buf[2], tb.to(torch.int32)
    buf = torch.empty(3, B, R, dtype=torch.int32, device=dev)
    tb = torch.empty(B, 2, T + 1, dtype=torch.int32, device=dev)
    bi, bj = _pair_blocks(dev)
    launchable(_merge_prep_kernel, dev)[(B, triton.cdiv(max(R, T + 1), bi))](
        src_idx, dst_idx, buf[0], buf[1], buf[2], tb, R, T, src_idx.stride(0), dst_idx.stride(0), R, 2 * (T + 1),
        TILE_N=tile_n, BLOCK_I=bi, BLOCK_J=bj,
    )
    return buf[0], buf[1], buf[2], tb


def merge_weighted_triton(x, sizes, src_idx, dst_idx):
    """Triton implementation of :func:`vtok.kernels.merge_weighted` (gather-based, fp32 sums).

    Two launches: the index bookkeeping by counting (``_merge_prep_kernel``), then the merge over
    all tokens. Forward only: the outputs carry no autograd graph (the dispatcher picks the torch
    reference when gradients are needed).
    """
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
    block_n, block_c, warps = _merge_blocks(dev, C)
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
        HAS_SIZES=has_sizes, BLOCK_N=block_n, BLOCK_C=block_c, WIN=2 * block_n, MAXC=_MERGE_MAXC, num_warps=warps,
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

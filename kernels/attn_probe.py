"""Attention probes without the attention map: chosen rows (``attention_rows``) and attention received per key
(``attention_colmean``), as torch references (chunked over query rows) and two-pass Triton kernels (see
"Triton kernels" below); the contracts are the docstrings of the dispatching functions in ``vtok.kernels``.
"""

from __future__ import annotations

import math

import torch

from ._common import HAS_TRITON, dot_flags, jit, launchable, next_pow2, num_sms, tl, triton

__all__ = [
    "attention_rows_torch",
    "attention_rows_triton",
    "attention_colmean_torch",
    "attention_colmean_triton",
]

_LOG2E = 1.4426950408889634
#: Positions at or beyond this are "no causal limit".
_NO_LIMIT = 2**30


def _check_qk(q, k):
    """(B, Hq, Hkv, d) of q [B, Hq, R, d] and k [B, Hkv, Nk, d], or a clear error."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q must be [B, Hq, R, d] and k [B, Hkv, Nk, d]; got {tuple(q.shape)}, {tuple(k.shape)}")
    B, Hq, _, d = q.shape
    if k.shape[0] != B or k.shape[-1] != d:
        raise ValueError(f"q and k disagree on batch or head dim: {tuple(q.shape)} vs {tuple(k.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key heads ({Hkv}) (GQA)")
    return B, Hq, Hkv, d


def _probe_args(q, k, key_mask, query_mask=None, same_dtype=False):
    """Checked arguments of a probe: (B, Hq, Hkv, d, Nq, Nk, key mask on q's device or None).
    ``same_dtype``: the Triton kernels' own rule, q and k share a dtype."""
    B, Hq, Hkv, d = _check_qk(q, k)
    if same_dtype and q.dtype != k.dtype:
        raise ValueError(f"q and k must share a dtype; got {q.dtype} and {k.dtype}")
    Nq, Nk = q.shape[2], k.shape[2]
    km = _key_mask(key_mask, B, Nk, q.device)
    if query_mask is not None and (query_mask.dtype != torch.bool or query_mask.shape != (B, Nq)):
        raise ValueError(f"query_mask must be a bool tensor [B, Nq] = [{B}, {Nq}]; got {tuple(query_mask.shape)}")
    return B, Hq, Hkv, d, Nq, Nk, km


def _key_mask(key_mask, B, Nk, device):
    if key_mask is None:
        return None
    if key_mask.dtype != torch.bool or key_mask.shape != (B, Nk):
        raise ValueError(f"key_mask must be a bool tensor [B, Nk] = [{B}, {Nk}]; got {tuple(key_mask.shape)} {key_mask.dtype}")
    return key_mask.to(device)


def _row_positions(causal_offset, B, R, device) -> torch.Tensor | None:
    if causal_offset is None:
        return None
    if isinstance(causal_offset, bool):
        raise TypeError("causal_offset must be an int or an integer tensor [R] / [B, R]")
    if isinstance(causal_offset, int):
        return (causal_offset + torch.arange(R, device=device)).expand(B, R)
    pos = torch.as_tensor(causal_offset, device=device)
    if pos.is_floating_point():
        raise TypeError("causal_offset must be integer")
    pos = pos.long()
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    if pos.shape[-1] != R or pos.shape[0] not in (1, B) or pos.dim() != 2:
        raise ValueError(f"causal_offset tensor must be [R] or [B, R] (R={R}); got {tuple(pos.shape)}")
    return pos.expand(B, R)


def _scale(scale, d):
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


# --------------------------------------------------------------------------------------------
# torch references
# --------------------------------------------------------------------------------------------


def _probs_torch(q, k, scale, allowed):
    """q [B,Hq,M,d], k [B,Hkv,Nk,d], allowed [B,M,Nk] or None -> per-head probs [B,Hkv,G,M,Nk] fp32."""
    B, Hq, M, d = q.shape
    Hkv = k.shape[1]
    qf = q.float().reshape(B, Hkv, Hq // Hkv, M, d)
    kf = k.float()[:, :, None]
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if allowed is None:
        return torch.softmax(s, dim=-1)
    a = allowed[:, None, None]
    s = s.masked_fill(~a, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.where(a.any(-1, keepdim=True), p, torch.zeros((), device=p.device))


@torch.no_grad()
def attention_rows_torch(q, k, *, scale=None, key_mask=None, causal_offset=None):
    """Torch reference of :func:`vtok.kernels.attention_rows` (its docstring is the contract)."""
    B, Hq, Hkv, d, R, Nk, km = _probe_args(q, k, key_mask)
    dev = q.device
    pos = _row_positions(causal_offset, B, R, dev)
    allowed = None
    if km is not None or pos is not None:
        allowed = torch.ones(B, R, Nk, dtype=torch.bool, device=dev)
        if km is not None:
            allowed &= km[:, None, :]
        if pos is not None:
            allowed &= torch.arange(Nk, device=dev)[None, None, :] <= pos[..., None]
    p = _probs_torch(q, k, _scale(scale, d), allowed)
    return p.sum(dim=(1, 2)) / Hq


def attention_colmean_torch(q, k, *, scale=None, key_mask=None, query_mask=None, causal=False):
    """Torch reference of :func:`vtok.kernels.attention_colmean`, chunked over query rows."""
    return _attention_colmean_torch(q, k, scale=scale, key_mask=key_mask, query_mask=query_mask, causal=causal)


@torch.no_grad()
def _attention_colmean_torch(q, k, *, scale=None, key_mask=None, query_mask=None, causal=False, chunk=None):
    """:func:`attention_colmean_torch` with the knob tests use: ``chunk`` query rows at a time
    (default: about 64 MiB of fp32 scores)."""
    B, Hq, Hkv, d, Nq, Nk, km = _probe_args(q, k, key_mask, query_mask)
    dev = q.device
    sc = _scale(scale, d)
    if chunk is None:  # keep one chunk of fp32 scores around 64 MiB
        chunk = max(1, (16 << 20) // max(1, B * Hq * Nk))
    acc = torch.zeros(B, Nk, dtype=torch.float32, device=dev)
    kpos = torch.arange(Nk, device=dev)
    for s0 in range(0, Nq, chunk):
        qc = q[:, :, s0 : s0 + chunk]
        m = qc.shape[2]
        allowed = None
        if km is not None or causal:
            allowed = torch.ones(B, m, Nk, dtype=torch.bool, device=dev)
            if km is not None:
                allowed &= km[:, None, :]
            if causal:
                qpos = torch.arange(s0, s0 + m, device=dev) + (Nk - Nq)
                allowed &= kpos[None, None, :] <= qpos[None, :, None]
        p = _probs_torch(qc, k, sc, allowed)  # [B,Hkv,G,m,Nk]
        if query_mask is not None:
            p = p * query_mask[:, None, None, s0 : s0 + m, None].to(p.dtype)
        acc += p.sum(dim=(1, 2, 3))
    nq = torch.full((B,), float(Nq), device=dev) if query_mask is None else query_mask.sum(1).float()
    return acc / (nq * Hq).clamp_min(1.0)[:, None]


# --------------------------------------------------------------------------------------------
# Triton kernels
#
# Both probes are computed in two passes from q and k of one layer, so the model keeps
# SDPA/FlashAttention: pass 1 finds each row's log-sum-exp with an online softmax over key tiles;
# pass 2 recomputes the score tiles and turns them into probabilities ``exp(s - lse)`` and sums
# them over heads (rows probe) or over heads and query tiles (column probe). The ``[Nq, Nk]`` map
# never exists, only ``[BLOCK_M, BLOCK_N]`` tiles on chip; the extra memory is the LSE
# (``4 B Hq Nq`` bytes) and the output. The torch references chunk over query rows so they never
# hold the whole map either.
# --------------------------------------------------------------------------------------------


@jit
def _lse_kernel(
    q_ptr, k_ptr, kmask_ptr, qpos_ptr, lse_ptr,
    Hq, M, Nk, D, GROUP, qk_scale, KEYS_PER_SPLIT, BH,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_pb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """lse2[b, h, i] = log2 sum_j 2^(s_ij * log2e) over allowed keys (-inf when none).

    Program ``pid_s`` covers keys ``[pid_s * KEYS_PER_SPLIT, ...)`` and writes slot ``pid_s`` of
    ``[SPLIT, B * Hq, M]``; the host combines the partial log-sum-exps (few query rows, long rows:
    the keys are spread over more programs).
    """
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // Hq
    h = pid_bh % Hq
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < M
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=in_m[:, None] & in_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qpos = tl.load(qpos_ptr + b * stride_pb + offs_m, mask=in_m, other=0)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    n_start = pid_s * KEYS_PER_SPLIT
    n_end = tl.minimum(Nk, n_start + KEYS_PER_SPLIT)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_n = offs_n < n_end
        kt = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd,
                     mask=in_d[:, None] & in_n[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        kok = (tl.load(kmask_ptr + b * stride_mb + offs_n, mask=in_n, other=0) != 0) & in_n
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        ok = kok[None, :] & (offs_n[None, :] <= qpos[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
    tl.store(lse_ptr + (pid_s * BH + pid_bh).to(tl.int64) * M + offs_m, lse, mask=in_m)


@jit
def _rows_kernel(
    q_ptr, k_ptr, kmask_ptr, qpos_ptr, lse_ptr, out_ptr,
    Hq, M, Nk, D, GROUP, qk_scale, inv_h,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_pb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[b, i, j] = mean_h 2^(s_hij * log2e - lse2_hi) for one (row tile, key tile)."""
    b = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < Nk
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    qpos = tl.load(qpos_ptr + b * stride_pb + offs_m, mask=in_m, other=0)
    kok = (tl.load(kmask_ptr + b * stride_mb + offs_n, mask=in_n, other=0) != 0) & in_n
    ok = kok[None, :] & (offs_n[None, :] <= qpos[:, None]) & in_m[:, None]
    q_base = q_ptr + b.to(tl.int64) * stride_qb
    k_base = k_ptr + b.to(tl.int64) * stride_kb
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for h in range(0, Hq):
        q = tl.load(q_base + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=in_m[:, None] & in_d[None, :], other=0.0)
        kt = tl.load(k_base + (h // GROUP) * stride_kh + offs_n[None, :].to(tl.int64) * stride_kn
                     + offs_d[:, None] * stride_kd, mask=in_d[:, None] & in_n[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            kt = kt.to(tl.float32)
        lse = tl.load(lse_ptr + (b * Hq + h) * M + offs_m, mask=in_m, other=float("-inf"))
        lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse_safe[:, None])
        acc += tl.where(ok & (lse[:, None] > float("-inf")), p, 0.0)
    out = acc * inv_h
    tl.store(out_ptr + b.to(tl.int64) * M * Nk + offs_m[:, None] * Nk + offs_n[None, :], out,
             mask=in_m[:, None] & in_n[None, :])


@jit
def _colsum_kernel(
    q_ptr, k_ptr, kmask_ptr, qmask_ptr, lse_ptr, denom_ptr, out_ptr,
    Hq, M, Nk, D, GROUP, qk_scale, causal_shift,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_qmb,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[b, j] = sum_{h, i valid} 2^(s_hij * log2e - lse2_hi) / denom[b] for one key tile."""
    b = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < Nk
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    kok = (tl.load(kmask_ptr + b * stride_mb + offs_n, mask=in_n, other=0) != 0) & in_n
    q_base = q_ptr + b.to(tl.int64) * stride_qb
    k_base = k_ptr + b.to(tl.int64) * stride_kb
    acc = tl.zeros([BLOCK_N], tl.float32)
    for h in range(0, Hq):
        kt = tl.load(k_base + (h // GROUP) * stride_kh + offs_n[None, :].to(tl.int64) * stride_kn
                     + offs_d[:, None] * stride_kd, mask=in_d[:, None] & in_n[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            in_m = offs_m < M
            q = tl.load(q_base + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                        mask=in_m[:, None] & in_d[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            qok = (tl.load(qmask_ptr + b * stride_qmb + offs_m, mask=in_m, other=0) != 0) & in_m
            lse = tl.load(lse_ptr + (b * Hq + h) * M + offs_m, mask=in_m, other=float("-inf"))
            qok = qok & (lse > float("-inf"))
            lse_safe = tl.where(qok, lse, 0.0)
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
            ok = qok[:, None] & kok[None, :]
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
            p = tl.where(ok, tl.exp2(s - lse_safe[:, None]), 0.0)
            acc += tl.sum(p, axis=0)
    denom = tl.load(denom_ptr + b)
    tl.store(out_ptr + b * Nk + offs_n, acc / denom, mask=in_n)


def _blocks(device, d, m_hint):
    bd = max(16, next_pow2(d))
    if device.type == "cuda":
        bm = 16 if m_hint <= 16 else (32 if m_hint <= 32 else 64)
        bn = 64 if bd <= 128 else 32
        return bm, bn, bd, 4
    return 16, 16, bd, 4


def _lse_split(device, programs: int, Nk: int, bn: int) -> int:
    """Key splits of the LSE pass: enough programs for about two waves, each >= 4 key tiles.
    (H100, 1 x 16 heads x 16 rows x 25088 keys: one program per head left the GPU nearly idle.)"""
    if device.type != "cuda":
        return 1
    sms = num_sms(device)
    return max(1, min(triton.cdiv(2 * sms, max(1, programs)), triton.cdiv(Nk, 4 * bn)))


def _run_lse(q, k, kmask8, qpos32, scale, bm, bn, bd, warps, split=None):
    B, Hq, M, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    m_tiles = triton.cdiv(M, bm)
    if split is None:
        split = _lse_split(q.device, B * Hq * m_tiles, Nk, bn)
    keys_per_split = triton.cdiv(triton.cdiv(Nk, bn), split) * bn
    split = triton.cdiv(Nk, keys_per_split) if Nk else 1
    lse = torch.empty(split, B, Hq, M, dtype=torch.float32, device=q.device)
    upcast, prec = dot_flags(q.dtype, q.device)
    launchable(_lse_kernel, q.device)[(B * Hq, m_tiles, split)](
        q, k, kmask8, qpos32, lse,
        Hq, M, Nk, D, Hq // Hkv, scale * _LOG2E, keys_per_split, B * Hq,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        kmask8.stride(0), qpos32.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, UPCAST=upcast, PRECISION=prec, num_warps=warps,
    )
    if split == 1:
        return lse[0]
    # log2-sum-exp2 over the splits (a split with no allowed key holds -inf)
    m = lse.amax(0)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return torch.log2(torch.exp2(lse - m_safe).sum(0)) + m_safe


def _kmask8(key_mask, B, Nk, device):
    if key_mask is None:
        return torch.ones(1, Nk, dtype=torch.int8, device=device).expand(B, Nk)
    return key_mask.to(torch.int8).contiguous()


def attention_rows_triton(q, k, *, scale=None, key_mask=None, causal_offset=None):
    """Triton implementation of :func:`vtok.kernels.attention_rows` (two passes, no map)."""
    return _attention_rows_triton(q, k, scale=scale, key_mask=key_mask, causal_offset=causal_offset)


@torch.no_grad()
def _attention_rows_triton(q, k, *, scale=None, key_mask=None, causal_offset=None, lse_splits=None):
    """:func:`attention_rows_triton` with the knob tests use: ``lse_splits`` forces the number of
    key splits of the LSE pass."""
    B, Hq, Hkv, d, R, Nk, km = _probe_args(q, k, key_mask, same_dtype=True)
    dev = q.device
    pos = _row_positions(causal_offset, B, R, dev)
    out = torch.empty(B, R, Nk, dtype=torch.float32, device=dev)
    if R == 0 or Nk == 0 or B == 0:
        return out.zero_()
    kmask8 = _kmask8(km, B, Nk, dev)
    if pos is None:
        qpos32 = torch.full((1, R), _NO_LIMIT, dtype=torch.int32, device=dev).expand(B, R)
    else:
        qpos32 = pos.clamp(-1, _NO_LIMIT).to(torch.int32).contiguous()
    sc = _scale(scale, d)
    bm, bn, bd, warps = _blocks(dev, d, R)
    lse = _run_lse(q, k, kmask8, qpos32, sc, bm, bn, bd, warps, split=lse_splits)
    upcast, prec = dot_flags(q.dtype, dev)
    launchable(_rows_kernel, dev)[(B, triton.cdiv(R, bm), triton.cdiv(Nk, bn))](
        q, k, kmask8, qpos32, lse, out,
        Hq, R, Nk, d, Hq // Hkv, sc * _LOG2E, 1.0 / Hq,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        kmask8.stride(0), qpos32.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, UPCAST=upcast, PRECISION=prec, num_warps=warps,
    )
    return out


@torch.no_grad()
def attention_colmean_triton(q, k, *, scale=None, key_mask=None, query_mask=None, causal=False):
    """Triton implementation of :func:`vtok.kernels.attention_colmean` (LSE pass + column pass)."""
    B, Hq, Hkv, d, Nq, Nk, km = _probe_args(q, k, key_mask, query_mask, same_dtype=True)
    dev = q.device
    out = torch.zeros(B, Nk, dtype=torch.float32, device=dev)
    if Nq == 0 or Nk == 0 or B == 0:
        return out
    kmask8 = _kmask8(km, B, Nk, dev)
    if query_mask is None:
        qmask8 = torch.ones(1, Nq, dtype=torch.int8, device=dev).expand(B, Nq)
        denom = torch.full((B,), float(Nq * Hq), device=dev)
    else:
        qmask8 = query_mask.to(dev).to(torch.int8).contiguous()
        denom = (query_mask.to(dev).sum(1).float() * Hq).clamp_min(1.0)
    shift = Nk - Nq
    if causal:
        qpos32 = (torch.arange(Nq, device=dev, dtype=torch.int32) + shift).clamp(-1, _NO_LIMIT)[None].expand(B, Nq)
    else:
        qpos32 = torch.full((1, Nq), _NO_LIMIT, dtype=torch.int32, device=dev).expand(B, Nq)
    sc = _scale(scale, d)
    bm, bn, bd, warps = _blocks(dev, d, Nq)
    if dev.type == "cuda":
        bm = 64
    lse = _run_lse(q, k, kmask8, qpos32, sc, bm, bn, bd, warps)
    upcast, prec = dot_flags(q.dtype, dev)
    launchable(_colsum_kernel, dev)[(B, triton.cdiv(Nk, bn))](
        q, k, kmask8, qmask8, lse, denom, out,
        Hq, Nq, Nk, d, Hq // Hkv, sc * _LOG2E, shift,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        kmask8.stride(0), qmask8.stride(0),
        CAUSAL=bool(causal),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, UPCAST=upcast, PRECISION=prec, num_warps=warps,
    )
    return out


if not HAS_TRITON:  # pragma: no cover

    def _no_triton(*_a, **_k):
        raise RuntimeError("vtok.kernels: the Triton backend needs the `triton` package")

    attention_rows_triton = _attention_rows_triton = attention_colmean_triton = _no_triton  # noqa: F811

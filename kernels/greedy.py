"""Greedy diverse selection: k-center (farthest point) and max-sum (least cumulative similarity).

A per-step torch reference and a persistent Triton kernel (``greedy_select_triton`` documents its design);
the contract is the docstring of ``vtok.kernels.greedy_select``.
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, dot_flags, inv_norm, jit, launchable, next_pow2, tl, triton

__all__ = ["greedy_select_torch", "greedy_select_triton"]

_MODES = {"kcenter": 0, "maxsum": 1}
#: Largest N whose state vector is kept in registers (one [N] fp32 vector per program).
REGISTER_N_MAX = 8192
#: Largest Gram matrix (bytes, whole batch) the fast path may allocate: on CUDA also at most a
#: quarter of the free device memory at call time.
GRAM_BYTES = 4 << 30


def _gram_budget(device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return min(GRAM_BYTES, free // 4)
    return GRAM_BYTES


def _prepare(x, k, mode, pivot, mask):
    """Checked arguments (x with non-finite tokens zeroed, k clamped to N, pivot [B] on x's device, mask: those
    tokens masked) and the output ``idx`` [B, k], all -1."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, d]; got {tuple(x.shape)}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {sorted(_MODES)}; got {mode!r}")
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    B, N, _ = x.shape
    dev = x.device
    k = min(k, N)
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != (B, N):
            raise ValueError(f"mask must be a bool tensor [B, N] = [{B}, {N}]; got {tuple(mask.shape)} {mask.dtype}")
        mask = mask.to(dev)
    finite = torch.isfinite(x).all(-1)
    if N and not bool(finite.all()):  # a NaN / inf token has no similarity: never selected
        mask = finite if mask is None else mask & finite.to(mask.device)
        x = x.masked_fill(~finite[..., None], 0)  # so no NaN reaches the state of the tokens it is compared with
    if pivot is None:
        if mask is None:
            pivot = torch.zeros(B, dtype=torch.long, device=dev)
        else:
            pivot = torch.argmax(mask.to(torch.int8), dim=1)  # first valid token
    else:
        pivot = torch.as_tensor(pivot, device=dev)
        if pivot.is_floating_point() or pivot.dtype == torch.bool:
            raise TypeError("pivot must be an int or an integer tensor [B]")
        pivot = pivot.long().reshape(-1).expand(B) if pivot.numel() == 1 else pivot.long()
        if pivot.shape != (B,):
            raise ValueError(f"pivot must be [B] = [{B}]; got {tuple(pivot.shape)}")
    if k > 0 and N > 0:
        if bool(((pivot < 0) | (pivot >= N)).any()):
            raise ValueError(f"pivot out of range [0, {N}): {pivot.tolist()}")
        if mask is not None:
            ok = mask.gather(1, pivot[:, None]).squeeze(1)
            if not bool(ok.all()):
                bad = (~ok).nonzero().flatten().tolist()
                raise ValueError(f"pivot points at a masked (invalid) or non-finite token in samples {bad}; pass a "
                                 "valid pivot")
    return x, k, pivot, mask, torch.full((B, k), -1, dtype=torch.long, device=dev)


@torch.no_grad()
def greedy_select_torch(x, k, *, mode="kcenter", pivot=None, mask=None):
    """Per-step torch loop; reference of :func:`vtok.kernels.greedy_select` (its docstring is the contract).

    Used by ToDRE's stage 1 (max-sum, its v2 default, or k-center, its v1)."""
    x, k, pivot, mask, out = _prepare(x, k, mode, pivot, mask)
    if k == 0:
        return out
    B, N, _ = x.shape
    dev = x.device
    xf = x.float()
    inv = inv_norm(x)
    inf = torch.tensor(float("inf"), device=dev)
    state = torch.full((B, N), float("-inf") if mode == "kcenter" else 0.0, device=dev)
    if mask is not None:
        state = state.masked_fill(~mask, float("inf"))
    c = pivot.clone()
    out[:, 0] = c
    rows = torch.arange(B, device=dev)
    for t in range(1, k):
        active = c >= 0
        cc = c.clamp_min(0)
        dots = torch.bmm(xf, xf[rows, cc][:, :, None]).squeeze(-1)
        sim = dots * inv * inv[rows, cc][:, None]
        new = torch.maximum(state, sim) if mode == "kcenter" else state + sim
        new[rows, cc] = inf
        state = torch.where(active[:, None], new, state)
        nxt = torch.argmin(state, dim=1)  # first minimal index -> lowest token index
        val = state[rows, nxt]
        c = torch.where(active & (val < inf), nxt, torch.full_like(nxt, -1))
        out[:, t] = c
    return out


@jit
def _gram_kernel(
    x_ptr, inv_ptr, g_ptr,
    N, D,
    stride_xb, stride_xn, stride_xd, stride_ib, stride_gb, stride_gn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """G[b, m, n] = (x_m . x_n * inv_n) * inv_m in fp32 (row m = the selected token)."""
    pid_b = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m = offs_m < N
    in_n = offs_n < N
    x_base = x_ptr + pid_b.to(tl.int64) * stride_xb
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        in_d = dd < D
        ta = tl.load(x_base + offs_m[:, None].to(tl.int64) * stride_xn + dd[None, :] * stride_xd,
                     mask=in_m[:, None] & in_d[None, :], other=0.0)
        tb = tl.load(x_base + offs_n[None, :].to(tl.int64) * stride_xn + dd[:, None] * stride_xd,
                     mask=in_d[:, None] & in_n[None, :], other=0.0)
        if UPCAST:
            ta = ta.to(tl.float32)
            tb = tb.to(tl.float32)
        acc = tl.dot(ta, tb, acc, input_precision=PRECISION)
    inv_m = tl.load(inv_ptr + pid_b * stride_ib + offs_m, mask=in_m, other=0.0)
    inv_n = tl.load(inv_ptr + pid_b * stride_ib + offs_n, mask=in_n, other=0.0)
    g = acc * inv_n[None, :] * inv_m[:, None]
    tl.store(g_ptr + pid_b.to(tl.int64) * stride_gb + offs_m[:, None].to(tl.int64) * stride_gn + offs_n[None, :],
             g, mask=in_m[:, None] & in_n[None, :])


@jit
def _greedy_kernel(
    g_ptr, x_ptr, inv_ptr, valid_ptr, pivot_ptr, out_ptr, state_ptr,
    N, D, K,
    stride_gb, stride_gn,
    stride_xb, stride_xn, stride_xd, stride_ib,
    MAXSUM: tl.constexpr, USE_GRAM: tl.constexpr, IN_REGS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    INF = float("inf")
    init = 0.0 if MAXSUM else float("-inf")
    c = tl.load(pivot_ptr + pid_b).to(tl.int32)
    tl.store(out_ptr + pid_b * K, c.to(tl.int64))
    g_base = g_ptr + pid_b.to(tl.int64) * stride_gb
    x_base = x_ptr + pid_b.to(tl.int64) * stride_xb
    offs = tl.arange(0, BLOCK_N)
    if IN_REGS:
        # Whole state vector in registers; one G row per step.
        inb = offs < N
        valid = tl.load(valid_ptr + pid_b * N + offs, mask=inb, other=0) != 0
        state = tl.where(valid, init, INF)
        for t in range(1, K):
            live = c >= 0
            sim = tl.load(g_base + c.to(tl.int64) * stride_gn + offs, mask=inb & live, other=0.0)
            if MAXSUM:
                new = state + sim
            else:
                new = tl.maximum(state, sim)
            new = tl.where(offs == c, INF, new)
            state = tl.where(live, new, state)
            val, nxt = tl.min(state, axis=0, return_indices=True, return_indices_tie_break_left=True)
            c = tl.where(live & (val < INF), nxt.to(tl.int32), -1)
            tl.store(out_ptr + pid_b * K + t, c.to(tl.int64))
    else:
        # State in a per-sample scratch row; each step is one pass over N that applies the
        # previous choice and finds the next one.
        s_base = state_ptr + pid_b.to(tl.int64) * N
        for n0 in range(0, N, BLOCK_N):
            nn = n0 + offs
            inb = nn < N
            valid = tl.load(valid_ptr + pid_b * N + nn, mask=inb, other=0) != 0
            tl.store(s_base + nn, tl.where(valid, init, INF), mask=inb)
        tl.debug_barrier()
        offs_d = tl.arange(0, BLOCK_D)
        for t in range(1, K):
            live = c >= 0
            cs = tl.maximum(c, 0)
            inv_c = tl.load(inv_ptr + pid_b * stride_ib + cs)
            best_v = INF
            best_i = -1
            for n0 in range(0, N, BLOCK_N):
                nn = n0 + offs
                inb = nn < N
                if USE_GRAM:
                    sim = tl.load(g_base + cs.to(tl.int64) * stride_gn + nn, mask=inb, other=0.0)
                else:
                    dot = tl.zeros([BLOCK_N], tl.float32)
                    for d0 in range(0, D, BLOCK_D):
                        dd = d0 + offs_d
                        in_d = dd < D
                        xc = tl.load(x_base + cs.to(tl.int64) * stride_xn + dd * stride_xd, mask=in_d, other=0.0)
                        xt = tl.load(x_base + nn[:, None].to(tl.int64) * stride_xn + dd[None, :] * stride_xd,
                                     mask=inb[:, None] & in_d[None, :], other=0.0)
                        dot += tl.sum(xt.to(tl.float32) * xc.to(tl.float32)[None, :], axis=1)
                    inv_n = tl.load(inv_ptr + pid_b * stride_ib + nn, mask=inb, other=0.0)
                    sim = dot * inv_n * inv_c
                st = tl.load(s_base + nn, mask=inb, other=INF)
                if MAXSUM:
                    new = st + sim
                else:
                    new = tl.maximum(st, sim)
                new = tl.where(nn == c, INF, new)
                st = tl.where(live, new, st)
                tl.store(s_base + nn, st, mask=inb)
                st = tl.where(inb, st, INF)
                v, i = tl.min(st, axis=0, return_indices=True, return_indices_tie_break_left=True)
                take = v < best_v  # strict: an earlier block (lower index) keeps a tie
                best_i = tl.where(take, i + n0, best_i)
                best_v = tl.where(take, v, best_v)
            tl.debug_barrier()
            c = tl.where(live & (best_v < INF), best_i, -1).to(tl.int32)
            tl.store(out_ptr + pid_b * K + t, c.to(tl.int64))


def gram_triton(x: torch.Tensor, inv: torch.Tensor, *, blocks=None) -> torch.Tensor:
    """Cosine Gram matrix ``[B, N, N]`` fp32 (row m scaled last by ``inv_m``), tiled Triton GEMM."""
    B, N, D = x.shape
    g = torch.empty(B, N, N, dtype=torch.float32, device=x.device)
    upcast, prec = dot_flags(x.dtype, x.device)
    if blocks is None:
        if x.device.type == "cuda":
            blocks, warps, stages = (128, 128, 64), 8, 3
        else:
            blocks, warps, stages = (16, 16, min(32, max(16, next_pow2(D)))), 4, 1
    else:
        warps, stages = 4, 2
    bm, bn, bd = blocks
    grid = (B, triton.cdiv(N, bm), triton.cdiv(N, bn))
    launchable(_gram_kernel, x.device)[grid](
        x, inv, g, N, D,
        x.stride(0), x.stride(1), x.stride(2), inv.stride(0), g.stride(0), g.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, UPCAST=upcast, PRECISION=prec,
        num_warps=warps, num_stages=stages,
    )
    return g


def greedy_select_triton(x, k, *, mode="kcenter", pivot=None, mask=None):
    """Triton implementation of :func:`vtok.kernels.greedy_select` (one program per sample).

    Used by: ToDRE (stage 1).

    One persistent program per sample runs all ``k - 1`` steps; the per-token state (running max
    similarity, or cumulative similarity) never leaves the chip between steps when it fits:

    * **Gram path** (when ``B * N * N * 4`` bytes fit ``GRAM_BYTES`` = 4 GiB and, on CUDA, a
      quarter of the free device memory; n = 25088 needs 2.5 GB): a tiled Triton GEMM writes
      ``G = X^ X^T`` in fp32 once (``2 N^2 d`` FLOPs, the only big work), then each greedy step reads
      one row of G (``4 N`` bytes), combines it into the state and takes the masked argmin. With
      ``N <= 8192`` the whole state vector lives in the registers of one program (16 warps; ToDRE's
      n = 2880 is one 4096-wide vector); above that it lives in a per-sample fp32 scratch row
      (``4 N`` bytes, L2-resident) that each step updates block by block.
    * **Streaming path** (G does not fit): G is not formed; each step recomputes ``X^ x^_c`` block
      by block (a fused mat-vec over d) with the state in the scratch row. It is correct at any N,
      but one program (one SM) per sample streams all of X every step, so for batch 1 it is slower
      than a per-step torch loop that spreads each mat-vec over the whole GPU. That is the
      documented limit of this design.
    """
    return _greedy_select_triton(x, k, mode=mode, pivot=pivot, mask=mask)


@torch.no_grad()
def _greedy_select_triton(x, k, *, mode="kcenter", pivot=None, mask=None, path=None, block_n=None):
    """:func:`greedy_select_triton` with the knobs tests use: ``path`` ("regs", "gram", "stream")
    and ``block_n`` force a code path."""
    x, k, pivot, mask, out = _prepare(x, k, mode, pivot, mask)
    if k == 0:
        return out
    B, N, D = x.shape
    dev = x.device
    inv = inv_norm(x)
    valid = (mask if mask is not None else torch.ones(B, N, dtype=torch.bool, device=dev)).to(torch.int8).contiguous()
    if path is None:
        fits = B * N * N * 4 <= _gram_budget(dev)
        path = "regs" if (fits and N <= REGISTER_N_MAX) else ("gram" if fits else "stream")
    if path not in ("regs", "gram", "stream"):
        raise ValueError(f"path must be 'regs', 'gram' or 'stream'; got {path!r}")
    use_gram = path in ("regs", "gram")
    g = gram_triton(x, inv) if use_gram else inv  # placeholder pointer when unused
    in_regs = path == "regs"
    if in_regs:
        block_n = next_pow2(N)
        if block_n > REGISTER_N_MAX:
            raise ValueError(f"register path holds N <= {REGISTER_N_MAX}; got N={N}")
        warps = 16 if block_n >= 4096 else (8 if block_n >= 1024 else 4)
    elif dev.type == "cuda":
        # gram: 4096-wide blocks of a G row per iteration; stream: a [256, 64] tile of X.
        block_n = block_n or (4096 if use_gram else 256)
        warps = 16 if block_n >= 4096 else 8
    else:
        block_n, warps = block_n or 16, 4
    block_d = 32 if dev.type == "cuda" else min(32, max(16, next_pow2(D)))
    state = torch.empty(B, N, dtype=torch.float32, device=dev) if not in_regs else inv
    pivot = pivot.contiguous()
    launchable(_greedy_kernel, dev)[(B,)](
        g, x, inv, valid, pivot, out, state,
        N, D, k,
        g.stride(0) if use_gram else 0, g.stride(1) if use_gram else 0,
        x.stride(0), x.stride(1), x.stride(2), inv.stride(0),
        MAXSUM=_MODES[mode] == 1, USE_GRAM=use_gram, IN_REGS=in_regs,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
    )
    return out


if not HAS_TRITON:  # pragma: no cover

    def greedy_select_triton(*_a, **_k):  # noqa: F811
        raise RuntimeError("vtok.kernels: the Triton backend needs the `triton` package")

    _greedy_select_triton = greedy_select_triton

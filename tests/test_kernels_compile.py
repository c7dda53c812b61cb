"""Ahead-of-time compilation of every Triton kernel for a GPU target, without a GPU.

The interpreter (tests/test_kernels.py) checks what the kernels compute, but it accepts code the
real compiler rejects (loop-carried type changes, unsupported ops, shared-memory overflow). Here
each kernel goes through the full Triton pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with
the bundled ptxas) for sm_90 (H100) with the block sizes the GPU path launches, so a CPU-only CI
catches compile errors before a GPU run does. Nothing is launched.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from vtok.kernels import attn_probe, greedy, match, merge, tuning  # noqa: E402

import triton.language as tl  # noqa: E402

_PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
pytestmark = [
    pytest.mark.skipif(not os.path.exists(_PTXAS), reason="triton's bundled ptxas is not available"),
    pytest.mark.skipif(not isinstance(tl.cdiv, JITFunction),
                       reason="triton was imported with TRITON_INTERPRET=1 (its own helpers are interpreted "
                              "functions), so nothing can be compiled in this process"),
]

H100 = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024  # bytes of shared memory per block on H100


def _compile(kernel, types, consts, *, warps=4, stages=3, target=H100):
    fn = kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    jf = JITFunction(fn)  # compiled-mode wrapper even if TRITON_INTERPRET=1 was set at import
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in jf.arg_names}
    return triton.compile(ASTSource(jf, sig, consts), target=target,
                          options={"num_warps": warps, "num_stages": stages})


def _check(k, *, tensor_cores: bool):
    assert "cubin" in k.asm and k.metadata.shared <= SMEM_LIMIT
    if tensor_cores:
        assert "wgmma" in k.asm["ptx"] or "mma" in k.asm["ptx"]


MATCH_TYPES = {"xa_ptr": "*bf16", "xb_ptr": "*bf16", "inva_ptr": "*fp32", "invb_ptr": "*fp32",
               "a_ok_ptr": "*i8", "b_ok_ptr": "*i8", "key_ptr": "*i64"}


def test_compile_prologue():
    types = {"x_ptr": "*bf16", "inv_ptr": "*fp32", "key_ptr": "*i64"}
    _check(_compile(match._prologue_kernel, types, {"BLOCK_R": 32, "BLOCK_C": 256}), tensor_cores=False)


#: the alternating split with a protected count (no masks): ToMe's case
FAST = {"A_STEP": 2, "A_OFF": 0, "B_STEP": 2, "B_OFF": 1, "MASKED": False, "EVEN_C": True, "FUSED": False}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("cfg", tuning._MATCH_CONFIGS, ids=str)
def test_compile_match_autotune_configs(cfg, fused):
    a, b, c, w, s = cfg
    k = _compile(match._match_kernel, MATCH_TYPES,
                 {**FAST, "FUSED": fused, "BLOCK_A": a, "BLOCK_B": b, "BLOCK_C": c, "UPCAST": False,
                  "PRECISION": "tf32"},
                 warps=w, stages=s)
    _check(k, tensor_cores=True)
    # split kernels flush with the packed-key atomic_max; the fused one stores every row once
    assert ("atom" in k.asm["ptx"]) != fused


def test_compile_match_fp32_ieee_masked():
    types = {**MATCH_TYPES, "xa_ptr": "*fp32", "xb_ptr": "*fp32"}
    k = _compile(match._match_kernel, types,
                 {"A_STEP": 1, "A_OFF": 0, "B_STEP": 1, "B_OFF": 0, "MASKED": True, "EVEN_C": False, "FUSED": True,
                  "BLOCK_A": 64, "BLOCK_B": 64, "BLOCK_C": 32, "UPCAST": False, "PRECISION": "ieee"})
    _check(k, tensor_cores=False)


@pytest.mark.parametrize("gather", [True, False])
def test_compile_rank(gather):
    types = {"key_ptr": "*i64", "aidx_ptr": "*i64", "bidx_ptr": "*i64", "src_ptr": "*i64", "dst_ptr": "*i64",
             "score_ptr": "*fp32"}
    bi, bj = 64, 128
    consts = {"A_STEP": 2, "A_OFF": 0, "B_STEP": 2, "B_OFF": 1, "GATHER": gather, "BLOCK_I": bi, "BLOCK_J": bj}
    _check(_compile(match._rank_kernel, types, consts), tensor_cores=False)


def test_compile_merge_prep():
    types = {"src_ptr": "*i64", "dst_ptr": "*i64", "ssrc_ptr": "*i32", "sdst_ptr": "*i32", "bysrc_ptr": "*i32",
             "tb_ptr": "*i32"}
    block_i, block_j = tuning._pair_blocks(torch.device("cuda"))
    tile_n = tuning._merge_blocks(torch.device("cuda"), 1152)[0]
    consts = {"TILE_N": tile_n, "BLOCK_I": block_i, "BLOCK_J": block_j}
    _check(_compile(merge._merge_prep_kernel, types, consts), tensor_cores=False)


@pytest.mark.parametrize("has_sizes", [True, False])
def test_compile_merge(has_sizes):
    types = {"x_ptr": "*bf16", "out_ptr": "*bf16", "s_ptr": "*fp32", "sout_ptr": "*fp32", "kept_ptr": "*i64",
             "ssrc_ptr": "*i32", "sdst_ptr": "*i32", "bysrc_ptr": "*i32", "tb_ptr": "*i32"}
    block_n, block_c, warps = tuning._merge_blocks(torch.device("cuda"), 1152)
    consts = {"HAS_SIZES": has_sizes, "BLOCK_N": block_n, "BLOCK_C": block_c, "WIN": 2 * block_n,
              "MAXC": tuning._MERGE_MAXC}
    _check(_compile(merge._merge_kernel, types, consts, warps=warps), tensor_cores=False)


def test_compile_gram():
    k = _compile(greedy._gram_kernel, {"x_ptr": "*bf16", "inv_ptr": "*fp32", "g_ptr": "*fp32"},
                 {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 64, "UPCAST": False, "PRECISION": "tf32"}, warps=8)
    _check(k, tensor_cores=True)


GREEDY_TYPES = {"g_ptr": "*fp32", "x_ptr": "*bf16", "inv_ptr": "*fp32", "valid_ptr": "*i8",
                "pivot_ptr": "*i64", "out_ptr": "*i64", "state_ptr": "*fp32"}


@pytest.mark.parametrize("path", ["regs", "gram", "stream"])
def test_compile_greedy(path):
    regs = path == "regs"
    block_n = {"regs": greedy.REGISTER_N_MAX, "gram": 4096, "stream": 256}[path]
    consts = {"MAXSUM": path == "gram", "USE_GRAM": path != "stream", "IN_REGS": regs,
              "BLOCK_N": block_n, "BLOCK_D": 32}
    _check(_compile(greedy._greedy_kernel, GREEDY_TYPES, consts, warps=16 if block_n >= 4096 else 8),
           tensor_cores=False)


PROBE_TYPES = {"q_ptr": "*bf16", "k_ptr": "*bf16", "kmask_ptr": "*i8", "qpos_ptr": "*i32", "lse_ptr": "*fp32",
               "out_ptr": "*fp32", "qmask_ptr": "*i8", "denom_ptr": "*fp32", "qk_scale": "fp32", "inv_h": "fp32"}


@pytest.mark.parametrize("name,consts", [
    ("_lse_kernel", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 128}),
    ("_rows_kernel", {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_D": 128}),
    ("_colsum_kernel", {"CAUSAL": True, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 128}),
])
def test_compile_attention_probes(name, consts):
    k = _compile(getattr(attn_probe, name), PROBE_TYPES, {**consts, "UPCAST": False, "PRECISION": "tf32"})
    _check(k, tensor_cores=True)


def test_cuda_autotuner_setup(monkeypatch):
    """The autotuner the CUDA path builds (built here without a GPU; nothing is launched): it
    restores the match keys between timed configs (the packed-key atomic_max would otherwise
    accumulate over them) and times with short runs through a ``do_bench`` call that the
    installed Triton accepts."""
    import inspect

    import triton.testing

    monkeypatch.setattr(match, "_match_tuned", None)
    tuner = match._match_tuner(torch.device("cuda"))
    assert tuner.restore_value == ["key_ptr"]
    assert tuner.do_bench is tuning._short_bench
    assert [c.kwargs["BLOCK_A"] for c in tuner.configs] == [c[0] for c in tuning._MATCH_CONFIGS]
    inspect.signature(triton.testing.do_bench).bind(lambda: None, warmup=5, rep=25, quantiles=(0.5, 0.2, 0.8))

"""Shared plumbing for the kernel modules: optional Triton import, interpreter launch, dtype flags.

Nothing here is numerical except :func:`inv_norm`, which both the Triton path and the torch
reference use, so that the two see bit-identical inverse norms and differ only in the parts the
kernels replace (dot products, reductions).
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch

try:  # Triton is a Linux-only dependency; the torch references must work without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    HAS_TRITON = False
    # Kernel signatures annotate constexpr arguments with ``tl.constexpr``; give them something
    # to evaluate so the modules import. The decorated functions are never launched.
    tl = SimpleNamespace(constexpr=int)

#: Squared-norm floor: ``1 / max(||x||, EPS)`` with ``EPS = 1e-12`` (as ``F.normalize``).
NORM_EPS = 1e-12

#: Where a NaN cosine similarity (a NaN or infinite token) ranks in matching: below every cosine
#: (>= -1), above an inadmissible partner (-inf). Both backends rank with it and report NaN, so a NaN
#: token is never preferred, an all-NaN row still gets a partner, and no order depends on how a
#: max or a sort treats NaN.
NAN_SCORE = -2.0


def jit(fn):
    """``triton.jit`` when Triton is importable, else the plain function (never launched)."""
    if HAS_TRITON:
        return triton.jit(fn)
    return fn


def interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreted(fn, wrap=None):
    """The plain Python kernel ``fn`` as Triton's interpreter runs it (``wrap``: e.g. an autotuner around it).

    Triton's own helpers (``tl.max``, ``tl.sum``, ...) are ``@triton.jit`` functions themselves, and
    ``triton.jit`` picks compiled or interpreted when triton is imported; so the interpreter works
    only when ``TRITON_INTERPRET=1`` was set before the first ``import triton``.
    """
    from triton.runtime.jit import JITFunction

    if isinstance(getattr(triton.language, "max", None), JITFunction):
        raise RuntimeError(
            "vtok.kernels: triton was imported before TRITON_INTERPRET=1 was set, so its own helpers are "
            "compiled-mode functions that the CPU interpreter cannot call; set TRITON_INTERPRET=1 before "
            "the first import of triton (e.g. in the shell), or use VTOK_KERNELS=torch"
        )
    return _interpreted_cached(fn, wrap)


@functools.cache
def _interpreted_cached(fn, wrap):
    from triton.runtime.interpreter import InterpretedFunction

    kernel = InterpretedFunction(fn)
    return wrap(kernel) if wrap is not None else kernel


def launchable(kernel, device: torch.device, wrap=None):
    """Return something that can be launched as ``kernel[grid](...)`` for tensors on ``device``.

    On CUDA this is the kernel itself. Elsewhere Triton can only run under its interpreter
    (``TRITON_INTERPRET=1``, see :func:`interpreted`); the interpreted kernel is built here, at
    launch time, from the plain Python function.

    ``wrap``: what wraps the interpreted function (an autotuner for tests of the tuned path; a
    module-level callable, as it is part of the cache key). On CUDA ``kernel`` is returned as is,
    so pass the already wrapped kernel there.
    """
    if not HAS_TRITON:
        raise RuntimeError("vtok.kernels: the Triton backend needs the `triton` package (pip install triton)")
    if device.type == "cuda":
        return kernel
    if not interpret_enabled():
        raise RuntimeError(
            f"vtok.kernels: Triton kernels need a CUDA tensor (got device '{device}'). "
            "Set TRITON_INTERPRET=1 to run them on CPU under the Triton interpreter (slow, for tests), "
            "or use VTOK_KERNELS=torch / the *_torch references."
        )
    fn = kernel
    while hasattr(fn, "fn"):  # autotuner -> JITFunction / InterpretedFunction -> python function
        fn = fn.fn
    return interpreted(fn, wrap)


def dot_flags(dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    """(UPCAST, INPUT_PRECISION) for ``tl.dot`` on tiles of ``dtype``.

    * fp32 uses ``"ieee"``: no TF32 rounding, so the argmax decisions match a fp32 torch matmul.
    * fp16/bf16 feed the tensor cores directly with fp32 accumulation.
    * The CPU interpreter multiplies bf16 tiles as raw uint16 bit patterns (Triton 3.x), so there
      the tiles are upcast to fp32 first. bf16 x bf16 products are exact in fp32, so this changes
      only the summation order, not the meaning.
    """
    upcast = dtype == torch.bfloat16 and device.type != "cuda"
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return upcast, precision


def inv_norm(x: torch.Tensor) -> torch.Tensor:
    """``1 / max(||x||_2, 1e-12)`` over the last dimension, in fp32 (shared by both backends)."""
    n = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)
    return 1.0 / n.clamp_min(NORM_EPS)


@functools.cache
def num_sms(device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: asked on every launch's grid choice)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def is_interpreting(device: torch.device) -> bool:
    return device.type != "cuda"

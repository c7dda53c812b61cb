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


def jit(fn):
    """``triton.jit`` when Triton is importable, else the plain function (never launched)."""
    if HAS_TRITON:
        return triton.jit(fn)
    return fn


def interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_INTERPRETED: dict = {}
_LANG_JIT: list | None = None


def _lang_jit_functions():
    """(module, name, interpreted) for every ``@triton.jit`` helper inside ``triton.language``.

    ``tl.max``, ``tl.sum``, ``tl.argmin`` ... are themselves ``@triton.jit`` functions. If triton
    was imported before ``TRITON_INTERPRET=1`` was set they are compiled-mode ``JITFunction`` objects,
    which refuse to be called from an interpreted kernel. We keep interpreted twins and swap them
    in for the duration of an interpreted launch (see :class:`_Interpreted`).
    """
    global _LANG_JIT
    if _LANG_JIT is None:
        import sys

        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        found = []
        for mod_name, mod in list(sys.modules.items()):
            if mod is None or not (mod_name == "triton.language" or mod_name.startswith("triton.language.")):
                continue
            for name, val in list(vars(mod).items()):
                if isinstance(val, JITFunction):
                    found.append((mod, name, val, InterpretedFunction(val.fn)))
        _LANG_JIT = found
    return _LANG_JIT


class _Interpreted:
    """``kernel[grid](...)`` under the interpreter, whatever the import order of triton was.

    Two things are undone after every launch so that compiled kernels keep working in the same
    process (e.g. a test session that also compiles for a GPU target):

    * the interpreted twins of ``triton.language`` helpers are swapped back for the originals;
    * the interpreter patches ``triton.language`` builtins while a kernel runs and restores them,
      but an interpreted *helper* call (``tl.max`` inside the kernel) patches them again and
      never restores (Triton 3.x). Every attribute the interpreter sets during the launch is
      recorded with its first (pristine) value and put back.

    ``wrap`` (optional) turns the interpreted function into what is launched, e.g. an autotuner
    around it; its attributes (``best_config``) are reachable through this object.
    """

    def __init__(self, fn, wrap=None):
        from triton.runtime.interpreter import InterpretedFunction

        self.fn = InterpretedFunction(fn)
        if wrap is not None:
            self.fn = wrap(self.fn)

    def __getattr__(self, name):
        return getattr(self.__dict__["fn"], name)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from triton.runtime import interpreter

            scope_cls = interpreter._LangPatchScope
            plain_set_attr = scope_cls.set_attr
            pristine: dict = {}

            def recording_set_attr(scope, obj, name, value):
                pristine.setdefault((id(obj), name), (obj, name, getattr(obj, name, interpreter._MISSING)))
                plain_set_attr(scope, obj, name, value)

            swapped = []
            scope_cls.set_attr = recording_set_attr
            try:
                for mod, name, jit_fn, interp in _lang_jit_functions():
                    if vars(mod).get(name) is jit_fn:
                        setattr(mod, name, interp)
                        swapped.append((mod, name, jit_fn))
                return self.fn[grid](*args, **kwargs)
            finally:
                scope_cls.set_attr = plain_set_attr
                for obj, name, original in pristine.values():
                    if original is interpreter._MISSING:
                        if hasattr(obj, name):
                            delattr(obj, name)
                    else:
                        setattr(obj, name, original)
                for mod, name, jit_fn in swapped:
                    setattr(mod, name, jit_fn)

        return launch


def launchable(kernel, device: torch.device, wrap=None):
    """Return something that can be launched as ``kernel[grid](...)`` for tensors on ``device``.

    On CUDA this is the kernel itself. Elsewhere Triton can only run under its interpreter
    (``TRITON_INTERPRET=1``). ``triton.jit`` decides compiled vs interpreted when a module is
    imported, which would make the outcome depend on import order (pytest's conftest may import
    triton long before a test sets the variable); so the interpreted kernel is built here, at
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
    if (fn, wrap) not in _INTERPRETED:
        _INTERPRETED[(fn, wrap)] = _Interpreted(fn, wrap)
    return _INTERPRETED[(fn, wrap)]


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

"""Triton's interpreter in a process that may also compile kernels: a test utility, not shipped.

``vtok.kernels`` runs kernels on CPU with Triton's plain interpreter, which works only when
``TRITON_INTERPRET=1`` was set before the first ``import triton``. The test session cannot promise
that: pytest imports modules at collection, and ``test_kernels_compile.py`` needs compiled-mode
triton in the same process. ``conftest.py`` therefore swaps this launcher in for
``vtok.kernels._common.interpreted``: it runs a kernel under the interpreter whatever the import
order was, by swapping Triton's private interpreter state for the duration of each launch.
"""

from __future__ import annotations

import functools

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


@functools.cache
def interpreted_any_import_order(fn, wrap=None):
    """Drop-in for ``vtok.kernels._common.interpreted`` (same arguments, cached the same way)."""
    return _Interpreted(fn, wrap)

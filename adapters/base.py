"""Adapter base class: one per model family, owning all knowledge of that family."""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from typing import ClassVar

import torch
from torch import nn

from vtok.method import LLM_PROBES, Method, Probe, per_thread

__all__ = ["Adapter", "InstanceWrap", "per_thread"]


#: Why vtok's hooks run outside a torch.compile'd graph; torch puts it into the error that
#: ``torch.compile(model, fullgraph=True)`` raises when it reaches the first hook.
COMPILE_REASON = (
    "vtok: a method is attached to this model, and its hooks choose tokens from the data (values read on the host, "
    "shapes that depend on them), so they run eagerly between compiled graphs and torch.compile(model, "
    "fullgraph=True) cannot capture the model in one graph. Compile without fullgraph (torch.compile(model)): the "
    "model's modules are compiled and vtok's hooks run between them with the same results; or handle.remove() "
    "the method to compile the untouched model in one graph"
)


#: torch.compiler.disable shows a reason in its graph-break error in recent torch releases only
_DISABLE_TAKES_REASON = "reason" in inspect.signature(torch.compiler.disable).parameters


def outside_compiled_graph(fn):
    """``fn`` as torch.compile sees it: never traced (its data-dependent work would break the graph at an
    arbitrary line, or be specialised on values), run eagerly where a compiled model calls it; with
    ``fullgraph=True`` compilation stops there, with ``COMPILE_REASON`` where torch shows a reason."""
    if _DISABLE_TAKES_REASON:
        return torch.compiler.disable(fn, reason=COMPILE_REASON)
    return torch.compiler.disable(fn)  # pragma: no cover - older torch: the error names the hook only


class InstanceWrap:
    """Shadows a method of one module instance with a wrapper (an instance attribute); ``remove`` deletes it.

    Used for the model's ``generate`` and the core model's ``get_image_features`` / ``get_video_features``: the only place where the
    image sizes and the features they produced meet, both in ``forward`` and when ``generate``
    pre-computes the features (it drops ``image_sizes`` before the prefill), and transformers offers no
    hook there. The class and every other instance are untouched.
    """

    def __init__(self, obj, name: str, make):
        if name in vars(obj):
            raise ValueError(
                f"{type(obj).__name__}.{name} is already replaced on this model instance; vtok cannot attach twice"
            )
        self.obj, self.name = obj, name
        self.fn = make(getattr(obj, name))
        setattr(obj, name, self.fn)

    def remove(self) -> None:
        if vars(self.obj).get(self.name) is self.fn:
            delattr(self.obj, self.name)


class Adapter:
    """Attaches methods to one model instance with instance-level hooks, and removes them.

    Subclasses declare the stages they run and the probe types they serve, say whether a model
    is theirs (``matches``), and install hooks in ``attach``. Hooks are kept in ``self._hooks``
    and removed by ``detach``; nothing on the model's class is ever touched.

    Nested calls: a hook (method code included) may call the model it is attached to, e.g. to
    score frames with the same VLM. While one of this adapter's hooks runs, every hook of the
    adapter passes through (``in_hook()``), so the nested call runs the untouched model and the
    outer call's per-forward state is left as it was. The flag is per thread.
    """

    name: ClassVar[str] = ""
    stages: ClassVar[tuple[str, ...]] = ()
    #: whether an in_vit merge can be undone for a before_llm method that needs full grids (each patch then
    #: takes its merged token's value: the tower ran on fewer tokens, the method decides what the LLM gets)
    unmerges_for_grids: ClassVar[bool] = False
    #: whether an in_vit method alone shortens the LLM's prompt (False where the tower's merges are always
    #: undone for the model's own packing: LLaVA-NeXT / OneVision)
    in_vit_shortens_prompt: ClassVar[bool] = True
    probe_types: ClassVar[tuple[type, ...]] = ()

    def __init__(self, model: nn.Module, methods: dict[str, list[Method]], handle):
        self.model = model
        self.methods = methods
        self.handle = handle
        self._hooks: list = []
        self._local = threading.local()

    def all_methods(self) -> list[Method]:
        """Every attached method once, in the order given to ``vtok.apply``."""
        return list({id(m): m for chain in self.methods.values() for m in chain}.values())

    def method(self, stage: str) -> Method | None:
        """The one method of a stage that takes a single method (in_vit), or None."""
        chain = self.methods.get(stage, [])
        return chain[0] if chain else None

    # ------------------------------------------------------------ discovery
    @classmethod
    def matches(cls, model: nn.Module) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------ checks
    def num_llm_layers(self) -> int | None:
        return None

    def dims(self) -> dict:
        """Sizes a trainable method builds its modules for (``Method.build``)."""
        return {}

    def parts(self) -> dict:
        """The model's own modules a trainable method may start from (``Method.build``), by role."""
        return {}

    def num_vit_blocks(self) -> int | None:
        """How many vision-encoder blocks an ``in_vit`` schedule covers here (``vit_schedule(n)``'s n);
        None where the adapter runs no ``in_vit`` stage."""
        return None

    def check_probe(self, probe: Probe, method: Method) -> None:
        """Raise ValueError if this adapter cannot serve ``probe`` for ``method``."""
        if not isinstance(probe, self.probe_types):
            served = ", ".join(t.__name__ for t in self.probe_types) or "none"
            raise ValueError(
                f"method {method.name!r} needs the probe {probe!r}, which the {self.name} adapter cannot serve "
                f"(it serves: {served}); use the method with a model family that provides it"
            )
        if isinstance(probe, LLM_PROBES):
            self._check_llm_layer(probe.layer, f"{method.name} probe layer")

    def _check_llm_layer(self, layer: int, what: str) -> None:
        n = self.num_llm_layers()
        if n is not None and not (0 <= layer < n):
            raise ValueError(f"{what} = {layer} is outside the language model, which has layers 0..{n - 1}")

    def validate(self) -> None:
        for stage, chain in self.methods.items():
            for method in chain:
                if stage not in self.stages:
                    raise ValueError(
                        f"method {method.name!r} runs at stage {stage!r}, which the {self.name} adapter does not "
                        f"support (it supports: {', '.join(self.stages)})"
                    )
                if stage == "in_llm":
                    if not method.llm_layers() and method.stages == ("in_llm",):  # several stages: this one may be off
                        raise ValueError(f"{method.name}: an in_llm method must name its layers (llm_layers())")
                    for layer in method.llm_layers():
                        self._check_llm_layer(layer, f"{method.name} layer")
        for method in self.all_methods():
            for probe in method.probes():
                self.check_probe(probe, method)
            self._check_probe_order(method)
        vit = self.method("in_vit")
        grid = [m.name for m in self.methods.get("before_llm", []) if m.needs_full_grids]
        if vit is not None and grid and not self.unmerges_for_grids:
            raise ValueError(
                f"{grid[0]} needs every image's full token grid, but {vit.name} merges tokens inside the vision tower "
                f"before it; use {grid[0]} without {vit.name}, or a before_llm method that takes any token set"
            )

    @staticmethod
    def _check_probe_order(method: Method) -> None:
        """An LLM probe is computed when its decoder layer runs and is handed to the method's in_llm
        stages at later layers; one that no stage can receive is refused here, not at run time."""
        stage_layers = sorted(method.llm_layers()) if "in_llm" in method.stages else []
        for p in method.probes():
            if not isinstance(p, LLM_PROBES):
                continue
            if not stage_layers:
                raise ValueError(
                    f"{method.name}: an {type(p).__name__} probe at layer {p.layer} is computed inside the language model "
                    f"and handed only to in_llm stages, which {method.name} does not have (stages: "
                    f"{', '.join(method.stages)}); ask for it from an in_llm stage at a later layer"
                )
            if p.layer >= stage_layers[-1]:
                raise ValueError(
                    f"{method.name}: its {type(p).__name__} probe at layer {p.layer} is at or after its last stage layer "
                    f"{stage_layers[-1]}; a stage at layer L sees the probes of layers < L (the probe is computed "
                    f"when its layer runs), so put the probe before a stage layer (e.g. layer {stage_layers[-1] - 1})"
                )

    # ------------------------------------------------------------ hooks
    def in_hook(self) -> bool:
        """True while one of this adapter's hooks runs in this thread (a model call now is nested)."""
        return getattr(self._local, "depth", 0) > 0

    @contextlib.contextmanager
    def nested(self):
        """Inside: this thread counts as inside a hook, so a model call runs untouched (every hook of this
        adapter passes through); after: the flag as it was (works inside a hook and outside one)."""
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth

    def guarded(self, fn):
        """``fn`` as a hook that passes through (returns None) when called from inside another hook
        of this adapter, and marks the thread as inside a hook while it runs."""

        @functools.wraps(fn)
        def run(*args):
            if self.in_hook():
                return None
            self._local.depth = 1
            try:
                return fn(*args)
            finally:
                self._local.depth = 0

        return run

    def hook(self, module: nn.Module, fn, *, pre: bool, prepend: bool = False) -> None:
        """Register ``fn`` (kwargs-style) as a forward pre- or post-hook of ``module``, guarded for nesting and
        run outside any torch.compile'd graph of the model (``outside_compiled_graph``)."""
        fn = outside_compiled_graph(self.guarded(fn))
        if pre:
            h = module.register_forward_pre_hook(fn, with_kwargs=True, prepend=prepend)
        else:
            h = module.register_forward_hook(fn, with_kwargs=True, prepend=prepend)
        self._hooks.append(h)

    def attach(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def detach(self) -> None:
        while self._hooks:
            self._hooks.pop().remove()

    @contextlib.contextmanager
    def hooks_stashed(self):
        """Inside: the model as if nothing were attached (every hook entry and instance wrapper of this
        adapter taken out); after: everything back exactly, hook order included. For copying the model."""
        dicts, attrs = {}, []
        for h in self._hooks:
            if hasattr(h, "hooks_dict_ref"):  # torch's RemovableHandle: its dict and the with_kwargs/always_called ones
                refs = [h.hooks_dict_ref()] + [r() for r in getattr(h, "extra_dict_ref", ())]
                for d in refs:
                    if d is not None and h.id in d:
                        dicts.setdefault(id(d), (d, list(d.items())))[0].pop(h.id)
            else:  # an instance wrapper (an attribute of one module instance)
                obj, name = h.obj, h.name
                if name in vars(obj):
                    attrs.append((obj, name, vars(obj).pop(name)))
        try:
            yield
        finally:
            for d, items in dicts.values():
                d.clear()
                d.update(items)
            for obj, name, value in attrs:
                vars(obj)[name] = value

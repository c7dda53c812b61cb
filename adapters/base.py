"""Adapter base class: one per model family, owning all knowledge of that family."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from vtok.method import LLMAttention, Method, Probe

__all__ = ["Adapter"]


class Adapter:
    """Attaches methods to one model instance with instance-level hooks, and removes them.

    Subclasses declare the stages they run and the probe types they serve, say whether a model
    is theirs (``matches``), and install hooks in ``attach``. Hooks are kept in ``self._hooks``
    and removed by ``detach``; nothing on the model's class is ever touched.
    """

    name: ClassVar[str] = ""
    stages: ClassVar[tuple[str, ...]] = ()
    probe_types: ClassVar[tuple[type, ...]] = ()

    def __init__(self, model: nn.Module, methods: dict[str, Method], handle):
        self.model = model
        self.methods = methods
        self.handle = handle
        self._hooks: list = []

    # ------------------------------------------------------------ discovery
    @classmethod
    def matches(cls, model: nn.Module) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------ checks
    def num_llm_layers(self) -> int | None:
        return None

    def check_probe(self, probe: Probe, method: Method) -> None:
        """Raise ValueError if this adapter cannot serve ``probe`` for ``method``."""
        if not isinstance(probe, self.probe_types):
            served = ", ".join(t.__name__ for t in self.probe_types) or "none"
            raise ValueError(
                f"method {method.name!r} needs the probe {probe!r}, which the {self.name} adapter cannot serve "
                f"(it serves: {served}); use the method with a model family that provides it"
            )
        if isinstance(probe, LLMAttention):
            self._check_llm_layer(probe.layer, f"{method.name} probe layer")

    def _check_llm_layer(self, layer: int, what: str) -> None:
        n = self.num_llm_layers()
        if n is not None and not (0 <= layer < n):
            raise ValueError(f"{what} = {layer} is outside the language model, which has layers 0..{n - 1}")

    def validate(self) -> None:
        for stage, method in self.methods.items():
            if stage not in self.stages:
                raise ValueError(
                    f"method {method.name!r} runs at stage {stage!r}, which the {self.name} adapter does not "
                    f"support (it supports: {', '.join(self.stages)})"
                )
            if stage == "in_llm":
                for layer in method.llm_layers():
                    self._check_llm_layer(layer, f"{method.name} layer")
            for probe in method.probes():
                self.check_probe(probe, method)

    # ------------------------------------------------------------ hooks
    def hook(self, module: nn.Module, fn, *, pre: bool) -> None:
        if pre:
            h = module.register_forward_pre_hook(fn, with_kwargs=True)
        else:
            h = module.register_forward_hook(fn, with_kwargs=True)
        self._hooks.append(h)

    def attach(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def detach(self) -> None:
        while self._hooks:
            self._hooks.pop().remove()

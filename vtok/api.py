"""`vtok.apply`: attach methods to a model instance; the handle removes them again."""

from __future__ import annotations

from torch import nn

from .method import Method, get_method_class

__all__ = ["apply", "Handle"]

_ATTR = "_vtok_handle"


def _build_methods(method_or_list, hparams: dict) -> list[Method]:
    if isinstance(method_or_list, (list, tuple)):
        items = list(method_or_list)
        if not items:
            raise ValueError("vtok.apply got an empty method list; give at least one method name")
        unknown = [k for k in hparams if not isinstance(hparams[k], dict)]
        if unknown:
            raise TypeError(
                f"with several methods, give hyper-parameters per method, e.g. "
                f"vtok.apply(model, ['pool', 'fastv'], fastv={{'retain': 0.5}}); got {unknown}"
            )
        out = []
        for item in items:
            if isinstance(item, Method):
                out.append(item)
            elif isinstance(item, tuple) and len(item) == 2:
                out.append(get_method_class(item[0])(**item[1]))
            else:
                cls = get_method_class(item)
                out.append(cls(**hparams.get(cls.name, {})))
        extra = set(hparams) - {m.name for m in out}
        if extra:
            raise TypeError(f"hyper-parameters given for methods not in the list: {sorted(extra)}")
        return out
    if isinstance(method_or_list, Method):
        if hparams:
            raise TypeError("pass hyper-parameters either to the Method instance or to vtok.apply, not both")
        return [method_or_list]
    cls = get_method_class(method_or_list)
    try:
        return [cls(**hparams)]
    except TypeError as e:
        import dataclasses

        names = [f.name for f in dataclasses.fields(cls)]
        raise TypeError(f"{cls.name}: {e}; its hyper-parameters are {names} (see vtok.describe({cls.name!r}))") from None


class Handle:
    """An attachment of vtok methods to one model instance.

    Methods of different stages compose, and several methods of the before_llm or in_llm stage form a
    chain run in list order (each sees what the previous one left). ``stats`` lists the reductions of
    the last prefill, one record per method and step; ``probe_costs`` the probe computations it ran. ``remove()`` (or leaving the ``with``
    block) takes every hook off again; the model is then exactly as before.
    """

    def __init__(self, model: nn.Module, methods: list[Method]):
        from vtok.adapters import find_adapter

        self.model = model
        self.methods = methods
        self.stats: list = []
        self.probe_costs: list = []
        #: why the last prefill ran the untouched model (a call vtok cannot reduce but HF serves), or None
        self.passthrough: str | None = None
        self._warned: set = set()
        by_stage: dict[str, list[Method]] = {}  # stage -> the chain of methods run there, in list order
        for m in methods:
            for stage in m.stages:
                by_stage.setdefault(stage, []).append(m)
        vit = by_stage.get("in_vit", [])
        if len(vit) > 1:
            raise ValueError(
                f"two in_vit methods: {', '.join(repr(m.name) for m in vit)}; one method merges inside the vision "
                "tower at a time (chain before_llm or in_llm methods instead, e.g. ['tome', 'pool'])"
            )
        adapter_cls = find_adapter(model)
        self.adapter = adapter_cls(model, by_stage, self)
        self.adapter.validate()
        if getattr(model, _ATTR, None) is not None:
            raise ValueError("this model already has vtok methods attached; call handle.remove() first")
        try:
            self.adapter.attach()
        except BaseException:
            self.adapter.detach()  # take off whatever attach() installed before it failed
            raise
        setattr(model, _ATTR, self)
        self.attached = True

    def note_passthrough(self, reason: str | None) -> None:
        """Record (and warn once per reason) that a prefill runs untouched."""
        self.passthrough = reason
        if reason is not None and reason not in self._warned:
            import warnings

            self._warned.add(reason)
            warnings.warn(f"vtok: this call runs the untouched model: {reason} (see handle.passthrough)", stacklevel=4)

    def remove(self) -> None:
        """Take every hook off; idempotent."""
        if not self.attached:
            return
        self.adapter.detach()
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)
        self.attached = False

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "removed"
        return f"<vtok.Handle {state}: {', '.join(m.name for m in self.methods)} on {type(self.model).__name__}>"


def apply(model: nn.Module, method_or_list, **hparams) -> Handle:
    """Attach one method (by name or instance) or a list of methods of different stages.

    >>> handle = vtok.apply(model, "fastv", layer=2, retain=0.5)
    >>> with vtok.apply(model, ["pool", "fastv"], fastv={"retain": 0.5}): ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"vtok.apply needs a torch.nn.Module, got {type(model).__name__}")
    return Handle(model, _build_methods(method_or_list, hparams))

"""`vtok.apply`: attach methods to a model instance; the handle removes them again."""

from __future__ import annotations

import contextlib
import threading
import weakref

from torch import nn

from .method import Method, get_method_class

__all__ = ["apply", "Handle"]

_ATTR = "_vtok_handle"
#: instance attributes an attachment sets so copies of the model behave (see Handle._install_copy_rules)
_COPY_RULES = ("__deepcopy__", "__reduce_ex__")


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
    the last prefill, one record per method and step; ``probe_costs`` the probe computations it ran.
    ``remove()`` (or leaving the ``with`` block) takes every hook off again; the model is then exactly
    as before.

    Trainable methods (``Method.build``) own modules that live here, never on the model:
    ``parameters()``, ``train()``/``eval()``, ``save(path)`` (their parameters only, safetensors) and
    ``vtok.apply(..., weights=path)``.
    """

    def __init__(self, model: nn.Module, methods: list[Method], weights=None, processor=None):
        from vtok.adapters import find_adapter

        self.model = model
        self.methods = methods
        #: the processor (or tokenizer) of the model: methods read the call's question through it
        self.processor = processor
        self.stats: list = []
        self.probe_costs: list = []
        #: why the last prefill ran the untouched model (a call vtok cannot reduce but HF serves), or None
        self.passthrough: str | None = None
        self._warned: set = set()
        self._context = threading.local()
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
        dims = {**self.adapter.dims(), "in_vit": vit[0].name if vit else None}  # + what merges in the tower first
        self.dims = dims
        for m in methods:
            _check_not_shared(m, dims)
            m.bind(dims)
        self.adapter.validate()
        if getattr(model, _ATTR, None) is not None:
            raise ValueError("this model already has vtok methods attached; call handle.remove() first")
        self.modules = self._build_modules()
        #: whether ``weights=`` / ``load`` gave the trainable modules trained values
        self.weights_loaded = False
        if isinstance(weights, str) and weights == "untrained":  # an explicit opt-in: timing and mechanics only
            self.weights_loaded = True
        elif weights is not None:
            self.load(weights)
        try:
            self.adapter.attach()
        except BaseException:
            self.adapter.detach()  # take off whatever attach() installed before it failed
            raise
        setattr(model, _ATTR, self)
        self._install_copy_rules()
        self.attached = True
        _LIVE.add(self)

    # trainable methods -------------------------------------------------------------------------
    def _build_modules(self) -> nn.ModuleDict:
        """Each trainable method's modules, built for this model's sizes, on its device and dtype."""
        ref = next(self.model.parameters(), None)
        out = nn.ModuleDict()
        for i, m in enumerate(self.methods):
            mods = m.build(self.adapter.dims(), self.adapter.parts())
            if not mods:
                continue
            md = nn.ModuleDict(mods)
            if ref is not None:
                md.to(device=ref.device, dtype=ref.dtype if ref.dtype.is_floating_point else None)
            m.modules = md
            out[m.name if m.name not in out else f"{m.name}_{i}"] = md
        return out.eval()  # an inference plugin: handle.train() to train them

    def parameters(self, recurse: bool = True):
        """The trainable methods' parameters (the model's own are not among them)."""
        return self.modules.parameters(recurse)

    def train(self, mode: bool = True) -> "Handle":
        self.modules.train(mode)
        return self

    def eval(self) -> "Handle":
        return self.train(False)

    def _metadata(self) -> dict:
        import json

        return {"vtok_methods": json.dumps([[m.name, {k: repr(v) for k, v in m.config().items()}] for m in self.methods])}

    def save(self, path) -> None:
        """Write only the trainable methods' parameters (safetensors; method names and settings in the metadata)."""
        from safetensors.torch import save_file

        if not len(self.modules):
            raise ValueError(f"none of {[m.name for m in self.methods]} has trainable modules; there is nothing to save")
        state = {k: v.detach().contiguous().cpu() for k, v in self.modules.state_dict().items()}
        save_file(state, str(path), metadata=self._metadata())

    def load(self, path) -> None:
        """Load what ``save`` wrote, onto this handle's modules (the model's device and dtype)."""
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        saved = [n for n, _ in json.loads(meta.get("vtok_methods", "[]"))]
        mine = [m.name for m in self.methods]
        if saved != mine:
            raise ValueError(f"{path} holds weights of the methods {saved}; this handle attaches {mine}")
        missing, unexpected = self.modules.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path} does not fit these methods' modules (missing {list(missing)[:4]}, unexpected "
                f"{list(unexpected)[:4]}); were they saved with other settings? saved: {meta.get('vtok_methods')}"
            )
        self.weights_loaded = True
        import ast

        for m, (_, cfg) in zip(self.methods, json.loads(meta.get("vtok_methods", "[]"))):
            for k in m.trained_settings:  # facts about the weights (what they were trained on)
                if k in cfg:
                    setattr(m, k, ast.literal_eval(cfg[k]))

    def check_trained(self) -> None:
        """Refuse to run a method whose modules mean nothing untrained (``needs_weights``) in eval mode
        without loaded weights: its output would be noise, silently."""
        if self.weights_loaded or self.modules.training:
            return
        for m in self.methods:
            if m.needs_weights and getattr(m, "modules", None) is not None:
                raise ValueError(
                    f"{m.name} runs its own trained modules, and none were loaded: pass vtok.apply(model, "
                    f"{m.name!r}, weights=path) (what `vtok train {m.name}` or handle.save wrote), call "
                    "handle.train() to train them, or pass weights='untrained' to run them untrained on purpose "
                    "(timing, mechanics)"
                )

    @contextlib.contextmanager
    def context(self, *, videos=None, frames=None):
        """What the calls inside the block are about, for methods that read it (``CallVideos``): ``videos``, one
        ``vtok.video.Frames`` (or None) per sample. ``frames``: for a standalone vision encoder, the batch rows
        are videos of these frame counts, one after the other (``[8, 12]``: rows 0-7 one video, 8-19 the next),
        so an in_vit method can merge across neighbouring frames (the VLM adapters know their videos
        themselves). Per thread; nested blocks restore the outer one."""
        if frames is not None:
            frames = [int(f) for f in frames]
            if not frames or min(frames) < 1:
                raise ValueError(f"frames={frames}: give each video's frame count, at least 1")
        outer = getattr(self._context, "value", {})
        self._context.value = {**outer, "videos": videos, "frames": frames}
        try:
            yield self
        finally:
            self._context.value = outer

    def call_context(self) -> dict:
        """The innermost ``context`` of this thread ({} outside one)."""
        return getattr(self._context, "value", {})

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
        for name in _COPY_RULES:
            self.model.__dict__.pop(name, None)
        self.attached = False

    # copies -----------------------------------------------------------------------------------------
    def _install_copy_rules(self) -> None:
        """``copy.deepcopy(model)`` gives an untouched copy: no vtok hooks, no handle (attach methods to it
        with ``vtok.apply``); ``pickle``/``torch.save(model)`` and ``copy.copy`` of the attached model are
        refused with a clear error (the hooks are closures bound to this model, they cannot be saved, and
        a shallow copy would share them). Instance attributes only; ``remove()`` takes them off."""
        model, handle = self.model, self

        def deepcopy_untouched(memo):
            return handle._deepcopy_untouched(memo)

        def refuse(protocol=None):
            raise TypeError(
                f"this {type(model).__name__} has vtok methods attached ({', '.join(m.name for m in handle.methods)}); "
                "their hooks cannot be pickled or shallow-copied. Save the model's weights "
                "(model.save_pretrained(...) or torch.save(model.state_dict(), ...)), or call handle.remove() "
                "first and vtok.apply again after loading; copy.deepcopy(model) gives an untouched copy"
            )

        model.__dict__["__deepcopy__"] = deepcopy_untouched
        model.__dict__["__reduce_ex__"] = refuse

    def _deepcopy_untouched(self, memo):
        import copy

        model = self.model
        saved = {name: model.__dict__.pop(name) for name in (_ATTR, *_COPY_RULES) if name in model.__dict__}
        try:
            with self.adapter.hooks_stashed():
                return copy.deepcopy(model, memo)
        finally:
            model.__dict__.update(saved)

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "removed"
        return f"<vtok.Handle {state}: {', '.join(m.name for m in self.methods)} on {type(self.model).__name__}>"


#: the attached handles (weak: a handle that is gone is not attached)
_LIVE: "weakref.WeakSet[Handle]" = weakref.WeakSet()


def _check_not_shared(method: Method, dims: dict) -> None:
    """One method instance resolves depth-dependent settings for one model: attaching it to a second,
    differently shaped model while the first attachment lives would change the first one silently."""
    for h in list(_LIVE):
        if h.attached and any(m is method for m in h.methods) and h.dims != dims:
            raise ValueError(
                f"this {method.name!r} instance is attached to another model of a different shape ({type(h.model).__name__}); "
                f"give each model its own instance, e.g. vtok.apply(model, {type(method).__name__}(**m.config()))"
            )


def _check_not_compiled(model: nn.Module) -> None:
    """torch.compile'd code does not see hooks added after it was compiled: refuse a compiled wrapper,
    and warn when this model's class has compiled code already (compile -> run -> apply)."""
    import warnings

    try:
        from torch._dynamo.eval_frame import (
            OptimizedModule,
            _debug_get_cache_entry_list,
        )
    except ImportError:  # pragma: no cover - torch without dynamo
        return
    if isinstance(model, OptimizedModule):
        raise ValueError(
            "vtok.apply got a torch.compile'd model; attach to the original model first and compile afterwards: "
            "vtok.apply(model._orig_mod, ...) then torch.compile(model)"
        )
    fn = getattr(type(model).forward, "__wrapped__", type(model).forward)
    try:
        compiled = len(_debug_get_cache_entry_list(fn.__code__)) > 0
    except Exception:  # noqa: BLE001 - a private helper; no answer means no warning
        compiled = False
    if compiled:
        warnings.warn(
            f"vtok: torch.compile'd code of {type(model).__name__} has already run; if this model was compiled "
            "before vtok.apply, its compiled version does not see vtok's hooks and runs unreduced. Attach first "
            "and compile afterwards (or call torch._dynamo.reset() before compiling again)",
            stacklevel=3,
        )


def apply(model: nn.Module, method_or_list, *, weights=None, processor=None, **hparams) -> Handle:
    """Attach one method (by name or instance) or a list of methods of different stages.

    ``weights``: a file ``handle.save`` wrote, loaded into the trainable methods' modules.
    ``processor``: the model's processor or tokenizer, for methods that read the question (``Question``).

    >>> handle = vtok.apply(model, "fastv", layer=2, retain=0.5)
    >>> with vtok.apply(model, ["pool", "fastv"], fastv={"retain": 0.5}): ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"vtok.apply needs a torch.nn.Module, got {type(model).__name__}")
    _check_not_compiled(model)
    return Handle(model, _build_methods(method_or_list, hparams), weights=weights, processor=processor)

"""Methods, stages, probe requests and the method registry."""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from .probes import (  # noqa: F401  (re-exported: methods import them from here)
    LLM_PROBES,
    QUERY_SETS,
    AskModel,
    AttentionScores,
    CallVideos,
    LLMAttention,
    LLMStep,
    LLMView,
    Probe,
    Question,
    TextQuery,
    Transition,
    Transitions,
    TransitionStats,
    ViTAttention,
    ViTKeyCorrelation,
)
from .probes import __all__ as _probes_all

if TYPE_CHECKING:  # pragma: no cover
    from .tokens import VisualTokens

__all__ = [  # and, re-exported, every name of vtok.probes.__all__ (the probes and the in-LLM view)
    "STAGES", "Method", "register", "get_method_class", "list_methods", "describe", "hparam",
    "BudgetContext", "keep_count", "allocate", "per_thread",
] + list(_probes_all)

STAGES = ("in_vit", "before_llm", "in_llm", "projector")
POSITION_POLICIES = ("keep", "compact")


class _ThreadState(threading.local):
    """Per-thread attribute storage; a copy of its owner starts with none (a copy has made no call yet)."""

    def __deepcopy__(self, memo):
        return type(self)()

    def __reduce__(self):
        return (type(self), ())


class per_thread:
    """An attribute kept per thread, in the owner's ``_local`` (created on first use): per-call state of an adapter
    (the forward in flight, the prefill a decode step continues, captured probes) and what a method's last call
    found (HoliTom's ``last_split``) must not be shared by calls running in different threads. ``factory`` gives
    a thread's first value (default None)."""

    def __init__(self, factory=None):
        self.factory = factory

    def __set_name__(self, owner, name):
        self.name = name

    @staticmethod
    def _state(obj):
        local = obj.__dict__.get("_local")
        return local if local is not None else obj.__dict__.setdefault("_local", _ThreadState())

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        local = self._state(obj)
        if not hasattr(local, self.name):
            setattr(local, self.name, self.factory() if self.factory else None)
        return getattr(local, self.name)

    def __set__(self, obj, value):
        setattr(self._state(obj), self.name, value)


def hparam(default, help: str, *, type=None, range: str | None = None, choices=None, **kw):
    """A method hyper-parameter: a dataclass field with a one-line description and what it accepts.

    ``type``: ``int``, ``float`` (any real number: Python, numpy or a 0-d tensor; stored as float),
    ``bool``, ``str`` or a tuple of types; ``range``: an interval such as ``"(0, 1]"`` or ``"[1, inf)"``;
    ``choices``: the allowed values. A field whose default is None also accepts None. One validator
    (:func:`check_hparams`) gives every method the same errors, and ``vtok describe`` prints these.
    """
    if range is not None:
        _parse_range(range)
    return field(default=default, metadata={"help": help, "type": type, "range": range, "choices": choices, **kw})


def _parse_range(text: str) -> tuple:
    lo_c, hi_c = text[0], text[-1]
    lo, hi = (float(v) for v in text[1:-1].split(","))
    if lo_c not in "[(" or hi_c not in "])":
        raise ValueError(f"bad range {text!r}; write e.g. '(0, 1]'")
    return lo, hi, lo_c == "[", hi_c == "]"


def _requirement(meta: dict) -> str:
    """Human words for what a field accepts, e.g. 'an int >= 1', 'a number in (0, 1]'."""
    t, rng, choices = meta.get("type"), meta.get("range"), meta.get("choices")
    if choices is not None:
        return f"one of {tuple(choices)}"
    kind = {int: "an int", float: "a number", bool: "True or False", str: "a string"}.get(t) if not isinstance(t, tuple) else None
    kind = kind or ("one of the types " + ", ".join(x.__name__ for x in t) if isinstance(t, tuple) else "a value")
    if rng is None:
        return kind
    lo, hi, lo_in, hi_in = _parse_range(rng)
    if math.isinf(hi):
        return f"{kind} {'>=' if lo_in else '>'} {lo:g}"
    return f"{kind} in {rng}"


def _coerce(value, t):
    """The value as the declared type, or raise TypeError. Real numbers of any library count as numbers."""
    if t is None or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalar or 0-d tensor
        value = value.item()
    if isinstance(t, tuple):
        if isinstance(value, bool) and bool not in t:
            raise TypeError
        if not isinstance(value, t):
            raise TypeError
        return value
    if t is bool:
        if not isinstance(value, bool):
            raise TypeError
        return value
    if isinstance(value, bool):
        raise TypeError
    if t is int:
        if isinstance(value, numbers.Integral):
            return int(value)
        raise TypeError
    if t is float:
        if isinstance(value, numbers.Real) and math.isfinite(float(value)):
            return float(value)
        raise TypeError
    if not isinstance(value, t):
        raise TypeError
    return value


def check_hparams(method: "Method") -> None:
    """The shared validator: type, range and choices of every declared field (coerced in place)."""
    for f in dataclasses.fields(method):
        meta = f.metadata
        if not meta or not any(meta.get(k) is not None for k in ("type", "range", "choices")):
            continue
        value = getattr(method, f.name)
        if value is None and f.default is None:
            continue
        req = _requirement(meta)
        try:
            value = _coerce(value, meta.get("type"))
        except TypeError:
            raise TypeError(f"{method.name}: {f.name}={value!r} must be {req}; {meta.get('help', '')}") from None
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise ValueError(f"{method.name}: {f.name}={value!r} is not one of {tuple(meta['choices'])}")
        if meta.get("range") is not None:
            lo, hi, lo_in, hi_in = _parse_range(meta["range"])
            ok = (value >= lo if lo_in else value > lo) and (value <= hi if hi_in else value < hi)
            if not ok:
                raise ValueError(f"{method.name}: {f.name}={value!r} is out of range: it must be {req}; {meta.get('help', '')}")
        object.__setattr__(method, f.name, value)


# ---------------------------------------------------------------- methods


@dataclass(frozen=True)
class BudgetContext:
    """What a method needs to know about a model to reach a token budget: visual tokens per image
    (patches entering the vision tower's blocks, CLS excluded), the tower's blocks that reach them, and the
    tokens before the patches in each tower row (the class token, registers)."""

    visual_tokens: int
    vit_blocks: int
    prefix_tokens: int = 1


@dataclass
class Method:
    """Base class of every method: a dataclass of validated hyper-parameters.

    Subclasses set ``name`` and ``stages`` and implement the hooks of their stages:
    ``before_llm(tokens, probes) -> VisualTokens``; ``in_llm(view) -> list[LongTensor]``
    (per sample, the kept positions among the visual tokens entering the layer) together with
    ``llm_layers()``; ``probes()`` lists what they need from the adapter.
    """

    name: ClassVar[str] = ""
    stages: ClassVar[tuple[str, ...]] = ()
    #: hyper-parameters that make the method a no-op (invariant 2); None if it has none
    noop: ClassVar[dict | None] = None
    #: a setting that really reduces tokens on tiny test models
    example: ClassVar[dict] = {}
    #: for a method of several stages: per stage, the settings that turn that stage alone into a no-op
    #: (so each stage is checked on its own against its reference)
    stage_off: ClassVar[dict] = {}
    #: the source's default setting in words (``vtok describe`` and the README table show it)
    paper: ClassVar[str] = ""
    #: whether the method reads attention scores (documented per method; serving engines avoid those)
    needs_scores: ClassVar[bool] = False
    #: whether output tokens are kept input tokens or merge destinations (False: new tokens, e.g. pooling)
    kept_meaningful: ClassVar[bool] = True
    #: whether the in_llm stage replaces hidden states (LLMStep.hidden): drop == mask does not hold then
    in_llm_merges: ClassVar[bool] = False
    #: whether before_llm needs every image's full token grid (so no in_vit merge may run before it)
    needs_full_grids: ClassVar[bool] = False
    #: whether before_llm reads the native grids: on LLaVA-NeXT / OneVision every AnyRes crop's and video
    #: frame's projected grid before the model's own unpadding / 2x2 pooling (one unit per image / video,
    #: ``grids[u] = [(g, g)] * crops`` or ``[(G, G)] * frames``). The model's packing then applies to what the
    #: method returns if it keeps every native token in order; otherwise the method declares the layout
    #: (``VisualTokens.layout``). Only the first method of a before_llm chain may; other adapters' units are
    #: already native (LLaVA-1.5: the projected grid). See ``vtok.adapters.anyres_stages``.
    native_grids: ClassVar[bool] = False
    #: whether the method's modules are meaningless untrained: a forward in eval mode without loaded
    #: ``weights=`` is refused (training them, in ``handle.train()`` mode, is allowed)
    needs_weights: ClassVar[bool] = False
    #: whether the projector stage runs the method's own projector instead of the model's (the FLOP count
    #: then has the method's ``overhead_flops`` in place of the model's projector)
    replaces_projector: ClassVar[bool] = False
    #: whether ``settings_for_budget`` reaches only a few counts (M3's nested scales, TokenFLEX's n x n, TempMe's
    #: fixed shares): comparisons give such a method its nearest setting and match the baselines to the count
    #: it reached, instead of moving every other method's budget to it (``snap_budget``)
    nearest_budget: ClassVar[bool] = False
    #: settings that describe the trained weights (e.g. the sizes trained on): loading weights restores
    #: them from the file's metadata
    trained_settings: ClassVar[tuple] = ()

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.name == "position_policy" and getattr(self, f.name) not in POSITION_POLICIES:
                raise ValueError(
                    f"{self.name}: position_policy={getattr(self, f.name)!r} is not one of {POSITION_POLICIES}"
                )
        check_hparams(self)
        self.validate()
        object.__setattr__(self, "_vtok_ready", True)

    def __setattr__(self, name, value):
        """A hyper-parameter set after construction is validated again (a bad value raises at once)."""
        object.__setattr__(self, name, value)
        if self.__dict__.get("_vtok_ready") and name in type(self).__dataclass_fields__:
            check_hparams(self)
            self.validate()

    def validate(self) -> None:
        """Check hyper-parameters; raise ValueError naming the bad value and the valid range."""

    def probes(self) -> list[Probe]:
        return []

    # stage hooks ---------------------------------------------------------
    def before_llm(self, tokens: "VisualTokens", probes: dict) -> "VisualTokens":
        raise NotImplementedError

    def projector(self, tokens: "VisualTokens", project) -> "VisualTokens":
        """The ``projector`` stage: ``tokens`` are the vision tower's features as the model's projector would
        get them (vision width; one unit per image with its ``grid``; ``owner`` is the batch row), ``project``
        is the model's own projector (a callable on ``[U, N, vision width]``). Return the tokens the LLM gets
        (LLM width), at most as many per unit as came in, with ``mask`` marking real ones; the adapter splices
        them in place of the image's placeholders. A method that brings its own projector (``build``) calls
        it instead of ``project``."""
        raise NotImplementedError

    def llm_layers(self) -> list[int]:
        return []

    def in_llm(self, view: LLMView) -> list[torch.Tensor]:
        raise NotImplementedError

    def at_noop(self) -> bool:
        """Whether the current settings are the method's no-op setting (``noop``)."""
        return self.noop is not None and all(getattr(self, k) == v for k, v in self.noop.items())

    def position_policy_at(self, stage: str) -> str:
        """The position policy of this method's tokens after ``stage`` ('keep' or 'compact'); methods
        whose stages differ (ToDRE: compact before the LLM, keep inside it) override this."""
        return getattr(self, "position_policy", "compact")

    # the model the method is applied to --------------------------------------------------------
    def bind(self, dims: dict) -> None:
        """Called by ``vtok.apply`` with the model's facts (``dims``: ``llm_layers``, ``llm_hidden``,
        ``vit_blocks``, ``vit_feature_block``, ``vision_cls``, ... whatever the adapter knows, and ``in_vit``:
        the name of the method merging inside the vision tower in the same attachment, or None) before
        ``probes()``, ``llm_layers()`` or any stage is asked, so defaults given as a share of the
        model's depth resolve here (read them back with ``self.dims``). Override to check that the
        method fits the model (raise ValueError naming the problem); call ``super().bind(dims)``."""
        object.__setattr__(self, "_vtok_dims", dict(dims))

    @property
    def dims(self) -> dict:
        """The facts of the model this method was last applied to (empty before ``vtok.apply``)."""
        return self.__dict__.get("_vtok_dims", {})

    # trainable methods ---------------------------------------------------------------------------
    def build(self, dims: dict, parts: dict) -> dict | None:
        """A trainable method returns its ``nn.Module``s, built for a model of these sizes (``dims``:
        ``llm_hidden``, ``vision_hidden``, whatever the adapter knows); ``parts`` names the model's own
        modules a method may start from (``projector``; copy them, never train the model's own). The
        handle keeps the modules (on the model's device and dtype) and sets them as ``self.modules``.
        Default: no modules."""
        return None

    def train_variants(self, batch: int, rng) -> list[dict]:
        """For one training step of ``batch`` samples: the settings of each forward whose losses are averaged
        (hyper-parameter overrides; a per-sample value as a list). ``rng``: a ``numpy.random.Generator``.
        Default: one forward at the current settings."""
        return [{}]

    # what the method costs and keeps (eval/ asks the method, never names it) ------------------
    def overhead_flops(self, event, spec, units=None) -> int:
        """FLOPs of the method's own computations for one ``Reduction`` event, beyond the probes the
        adapter serves (those are counted from ``handle.probe_costs``). ``spec``: the model's
        ``vtok.eval.flops.ModelSpec``; ``units``: for in_vit events, (tokens in, tokens out) per image."""
        return 0

    def step_flops(self) -> int | None:
        """FLOPs of data-dependent work (iterations) the stage that just ran in this thread counted for itself,
        read once by the adapter into ``Reduction.flops`` (default: None, nothing counted)."""
        return None

    def token_schedule(self, visual_tokens: int, units: list[int]) -> list:
        """The ``Reduction`` events this method would record for one sample with ``visual_tokens`` visual
        tokens in ``units`` (tokens per image), without running it (for ``vtok.eval.flops.estimate``).

        The default knows methods with a ``retain`` field: before_llm keeps ``retain`` of each unit,
        each in_llm layer keeps ``retain`` of the tokens entering it. Others override it or raise.
        """
        from .stats import Reduction

        retain = getattr(self, "retain", None)
        events, n = [], visual_tokens
        for stage in self.stages:
            if retain is None or stage not in ("before_llm", "projector", "in_llm"):
                raise ValueError(f"cannot tell how many tokens {self.name!r} keeps at stage {stage!r} without running it; "
                                 "pass reductions=")  # fmt: skip
            if stage == "in_llm":
                for layer in sorted(set(self.llm_layers())):
                    out = keep_count(n, retain)
                    events.append(Reduction(self.name, stage, layer, [n], [out], None))
                    n = out
            else:
                out = sum(keep_count(u, retain) for u in units)
                events.append(Reduction(self.name, stage, None, [n], [out], None))
                n = out
        return events

    @classmethod
    def settings_for_budget(cls, budget: float, context: "BudgetContext") -> dict | None:
        """Hyper-parameters that keep about ``budget`` of the visual tokens on the model ``context``
        describes (for comparisons at one budget, e.g. ``vtok demo``); None if the method has no such
        setting. The default sets ``retain``."""
        names = {f.name for f in dataclasses.fields(cls)}
        return {"retain": budget} if "retain" in names else None

    @classmethod
    def snap_budget(cls, budget: float, context: "BudgetContext") -> float:
        """The nearest budget this method reaches exactly on ``context``'s model (default: any)."""
        return budget

    # helpers --------------------------------------------------------------
    def config(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def keep_count(n: int, retain: float) -> int:
    """Tokens kept out of ``n`` at ratio ``retain``: round half up, at least 1 when n > 0."""
    if n <= 0:
        return 0
    return max(1, min(n, int(n * float(retain) + 0.5)))


def allocate(total: int, sizes: list[int], weights: list[float], floor: int = 1) -> list[int]:
    """A budget over groups of tokens (crops, frames): split ``total`` tokens over groups of ``sizes`` tokens in proportion to ``weights``, each group
    capped at its size and given at least ``floor`` tokens while the total allows it (groups of
    larger weight first). Water-filling for the caps, then largest remainders (ties: lower index).
    All weights zero: in proportion to the sizes. Sums to ``min(total, sum(sizes))``."""
    g = len(sizes)
    total = min(int(total), sum(sizes))
    k = [0] * g
    order = sorted(range(g), key=lambda i: (-weights[i], i))
    left = total
    for i in order:  # the floor, heaviest groups first
        give = min(floor, sizes[i], left)
        k[i] += give
        left -= give
    w = [float(x) for x in weights]
    if sum(w[i] for i in range(g) if k[i] < sizes[i]) <= 0:
        w = [float(s) for s in sizes]
    share = [0.0] * g
    open_ = [i for i in range(g) if k[i] < sizes[i] and w[i] > 0]
    rest = float(left)
    while open_ and rest > 1e-9:
        wsum = sum(w[i] for i in open_)
        over = [i for i in open_ if share[i] + rest * w[i] / wsum >= sizes[i] - k[i]]
        if not over:
            for i in open_:
                share[i] += rest * w[i] / wsum
            rest = 0.0
            break
        for i in over:  # these fill up; the rest is spread again over the others
            rest -= sizes[i] - k[i] - share[i]
            share[i] = float(sizes[i] - k[i])
        open_ = [i for i in open_ if i not in over]
    whole = [min(int(math.floor(s + 1e-9)), sizes[i] - k[i]) for i, s in enumerate(share)]
    left -= sum(whole)
    frac = sorted(range(g), key=lambda i: (-(share[i] - whole[i]), i))
    for i in frac:
        if left <= 0:
            break
        if k[i] + whole[i] < sizes[i]:
            whole[i] += 1
            left -= 1
    for i in range(g):  # anything still left (all weight on full groups): first groups with room
        while left > 0 and k[i] + whole[i] < sizes[i]:
            whole[i] += 1
            left -= 1
    return [a + b for a, b in zip(k, whole)]


# ---------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    bad = [s for s in cls.stages if s not in STAGES]
    if bad or not cls.stages:
        raise ValueError(f"{cls.__name__}: stages {cls.stages} must be a non-empty subset of {STAGES}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_methods() -> None:
    from . import methods  # noqa: F401  (registers the built-in methods on import)


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    _load_builtin_methods()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    _load_builtin_methods()
    if not isinstance(name, str):
        raise TypeError(f"a method is given by name (str) or as a vtok Method instance, not {type(name).__name__}")
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def describe(name: str, model=None) -> str:
    """Every hyper-parameter of a method with its default, one line each; then, after a blank line, the rest
    of the method's docstring (what it does and the choices it made), if any. With ``model``: also how many
    trainable parameters the method has on that model (attached at its defaults and removed again)."""
    cls = get_method_class(name)
    lines = [f"{cls.name}: {(cls.__doc__ or '').strip().splitlines()[0]}", f"  stages: {', '.join(cls.stages)}"]
    if cls.paper:
        lines.append(f"  paper default: {cls.paper}")
    if model is not None:
        from .api import apply

        with apply(model, name) as h:
            count = sum(p.numel() for p in h.parameters())
        lines.append(f"  trainable parameters on this {type(model).__name__}: {count:,}")
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else "(required)"
        meta = f.metadata
        accepts = f" [{_requirement(meta)}]" if any(meta.get(k) is not None for k in ("type", "range", "choices")) else ""
        lines.append(f"  {f.name} = {default!r}{accepts}: {meta.get('help', '')}")
    body = "\n".join(inspect.cleandoc(cls.__doc__ or "").splitlines()[1:]).strip()
    if body:  # the rest of the docstring (what the method does, the choices it made), after a blank line
        lines += [""] + [f"  {line}".rstrip() for line in body.splitlines()]
    return "\n".join(lines)

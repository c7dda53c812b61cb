"""Latency of ``generate``: time to first token, decode throughput and peak memory (``measure``).

    lat = vtok.eval.latency.measure(model, inputs, max_new_tokens=32, warmup=1, repeats=5)
    lat.ttft_ms, lat.decode_tokens_per_s, lat.peak_memory_mb
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

__all__ = ["Latency", "Run", "Timer", "measure", "prefill_time"]


@dataclass
class Latency:
    ttft_ms: float
    decode_tokens_per_s: float
    peak_memory_mb: float | None
    peak_extra_mb: float | None
    memory_kind: str
    new_tokens: int
    batch: int
    repeats: int
    warmup: int
    device: str
    ttft_all_ms: list = field(default_factory=list)
    decode_all: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        mem = f", peak {self.peak_memory_mb:.1f} MB ({self.memory_kind})" if self.peak_memory_mb is not None else ""
        return (
            f"TTFT {self.ttft_ms:.2f} ms, decode {self.decode_tokens_per_s:.1f} tok/s per sample "
            f"(batch {self.batch}, {self.new_tokens} new tokens, median of {self.repeats}){mem}"
        )


class _Clock:
    """CUDA events on a CUDA device, perf_counter elsewhere (``cpu_time``: the process's CPU time instead, which
    leaves out the time other processes hold the cores -- for ratios on a shared machine, with one thread)."""

    def __init__(self, device: torch.device, cpu_time: bool = False):
        self.cuda = device.type == "cuda"
        self.now = time.process_time if cpu_time and not self.cuda else time.perf_counter

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return self.now()

    def ms(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return float(a.elapsed_time(b))
        return (b - a) * 1000.0


class _FirstLogits:
    """A LogitsProcessor that marks the first time it is called (the prefill's logits exist)."""

    def __init__(self, clock: _Clock):
        self.clock = clock
        self.first = None
        self.calls = 0

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = self.clock.mark()
        self.calls += 1
        return scores


# ----------------------------------------------------------------------------- memory


def _rss_bytes(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Memory:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.kind = "cuda_max_allocated" if self.cuda else "cpu_peak_rss"
        self.before = 0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            if not _reset_cpu_peak():
                self.kind = "cpu_peak_rss_since_start"  # VmHWM could not be reset: process-lifetime peak
            self.before = _rss_bytes("VmRSS") or 0

    def stop(self) -> tuple[float | None, float | None]:
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _rss_bytes("VmHWM")
            if peak is None:
                import resource

                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                self.kind = "cpu_ru_maxrss"
        return peak / 2**20, max(peak - self.before, 0) / 2**20


# ----------------------------------------------------------------------------- measurement


def _device_of(model, inputs) -> torch.device:
    for v in inputs.values():
        if isinstance(v, torch.Tensor):
            return v.device
    return next(model.parameters()).device


@dataclass
class Run:
    """One timed ``generate``: TTFT, decode tokens/s per sample, peak memory and its growth (MB)."""

    ttft_ms: float
    decode_tokens_per_s: float
    peak_mb: float | None
    extra_mb: float | None
    new_tokens: int


class Timer:
    """Times single ``generate`` calls of one model on one device, one call at a time.

    ``measure`` runs it in a loop; ``vtok.eval.bench`` interleaves calls of different settings with it.
    ``clock`` is exposed so that hooks can mark moments inside a call on the same clock.
    """

    def __init__(self, model, inputs: dict, max_new_tokens: int = 32, cpu_time: bool = False, **generate_kwargs):
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
        self.model, self.inputs = model, inputs
        self.device = _device_of(model, inputs)
        self.clock = _Clock(self.device, cpu_time)
        self.memory = _Memory(self.device)
        ids = inputs.get("input_ids")
        self.prompt_len = int(ids.shape[1]) if ids is not None else 0
        self.batch = int(ids.shape[0]) if ids is not None else 1
        kw = dict(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
        if getattr(getattr(model, "generation_config", None), "pad_token_id", None) is None:
            kw["pad_token_id"] = 0
        kw.update(generate_kwargs)
        self.kwargs = kw

    def run(self, timed: bool = True) -> Run | None:
        """One greedy ``generate``; None when not ``timed`` (a warm-up)."""
        from transformers import LogitsProcessorList

        clock, mem = self.clock, self.memory
        proc = _FirstLogits(clock)
        if timed:
            mem.start()
        with torch.no_grad():
            t0 = clock.mark()
            out = self.model.generate(**self.inputs, logits_processor=LogitsProcessorList([proc]), **self.kwargs)
            t1 = clock.mark()
        if not timed:
            return None
        peak, extra = mem.stop()
        n_new = int(out.shape[1] - self.prompt_len)
        rest = clock.ms(proc.first, t1)
        rate = (n_new - 1) / (rest / 1000.0) if n_new > 1 and rest > 0 else float("nan")
        return Run(clock.ms(t0, proc.first), rate, peak, extra, n_new)


def measure(model, inputs: dict, max_new_tokens: int = 32, warmup: int = 1, repeats: int = 5, **generate_kwargs) -> Latency:
    """TTFT, decode tokens/s (per sample) and peak memory of ``model.generate(**inputs)``; medians over repeats.

    One timed ``generate`` per repeat, greedy, with ``min_new_tokens = max_new_tokens`` so every repeat
    decodes the same number of tokens. A logits processor marks the moment the prefill's logits exist
    (it runs once per generated token): TTFT is the time from the call to that mark (inputs already on
    the device; the vision tower, the projector, the method and the prefill), decode throughput is
    ``(tokens - 1) / (end - mark)`` per sample. On CUDA the marks are CUDA events recorded on the
    current stream (no synchronisation inside the loop); on CPU ``time.perf_counter``. ``warmup``
    untimed runs first; the reported numbers are medians over ``repeats``.

    Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (bytes
    held by tensors, weights included), and ``peak_extra`` = peak minus what was allocated before the
    call (activations + KV cache + method work). On CPU there is no allocator counter: the process's
    peak resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` before each run when
    the kernel allows it) -- an upper bound that includes everything the process holds; ``peak_extra``
    is its growth over the RSS before the call. ``memory_kind`` says which one was measured.
    """
    if not isinstance(repeats, int) or repeats < 1 or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats!r}, warmup={warmup!r}")
    timer = Timer(model, inputs, max_new_tokens, **generate_kwargs)
    for _ in range(warmup):
        timer.run(timed=False)
    runs = [timer.run() for _ in range(repeats)]
    peaks = [r.peak_mb for r in runs if r.peak_mb is not None]
    extras = [r.extra_mb for r in runs if r.extra_mb is not None]
    return Latency(
        ttft_ms=statistics.median(r.ttft_ms for r in runs),
        decode_tokens_per_s=statistics.median(r.decode_tokens_per_s for r in runs),
        peak_memory_mb=max(peaks) if peaks else None,
        peak_extra_mb=max(extras) if extras else None,
        memory_kind=timer.memory.kind,
        new_tokens=runs[-1].new_tokens,
        batch=timer.batch,
        repeats=repeats,
        warmup=warmup,
        device=str(timer.device),
        ttft_all_ms=[r.ttft_ms for r in runs],
        decode_all=[r.decode_tokens_per_s for r in runs],
    )


def prefill_time(fn, device: torch.device | str | None = None, clock: _Clock | None = None) -> tuple[object, float]:
    """Run ``fn()`` once and return (its result, wall time in ms), timed with CUDA events on a CUDA device
    (or on ``clock``, e.g. a ``Timer``'s)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    clock = clock or _Clock(device)
    t0 = clock.mark()
    out = fn()
    t1 = clock.mark()
    return out, clock.ms(t0, t1)

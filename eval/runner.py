"""Comparison runner (``compare``): accuracy, visual tokens, FLOPs and TTFT of methods against the full model
and the ``random`` / ``pool`` baselines at the same budget, as a markdown table, JSON and a Pareto plot.

    result = vtok.eval.runner.compare(model, dataset, [("fastv", {"layer": 2, "retain": 0.25})], out_dir="out")
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = ["Setting", "Row", "Comparison", "compare", "parse_method", "BASELINES"]

BASELINES = ("random", "pool")


@dataclass(frozen=True)
class Setting:
    method: str | None  # None: the full model
    settings: tuple = ()  # sorted (key, value) pairs
    role: str = "method"  # "full", "method", "baseline"
    budget: float | None = None  # retained fraction the baselines are matched to

    @property
    def label(self) -> str:
        return self.method or "full"

    def hparams(self) -> dict:
        return dict(self.settings)

    def settings_str(self) -> str:
        """``k=v, ...``; a weights file by its name (tables carry no machine's folders)."""
        from pathlib import Path

        return ", ".join(f"{k}={Path(str(v)).name if k == 'weights' else v}" for k, v in self.settings) or "-"


@dataclass
class Row:
    method: str
    settings: str
    role: str
    budget: float | None
    n: int
    accuracy: float
    visual_tokens: float
    visual_tokens_full: float
    tflops: float
    flops_ratio: float
    ttft_ms: float
    note: str = ""
    extras: dict = field(default_factory=dict)  # the dataset's extra per-sample metrics, averaged (NaN skipped)


@dataclass
class Comparison:
    dataset: str
    model: str
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    processes: int = 1
    score_name: str = "accuracy"  # what the dataset's score is (its ``score_name``), the column's header

    def unit(self) -> tuple:
        """(prefix, scale) that shows the full model's FLOPs per sample as a number >= 1 (T, G, M or K)."""
        top = max((r.tflops for r in self.rows), default=1.0) * 1e12
        for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if top >= scale:
                return prefix, scale
        return "", 1.0

    def markdown(self) -> str:
        prefix, scale = self.unit()
        extra = list(dict.fromkeys(k for r in self.rows for k in r.extras))
        head = (
            f"| method | settings | budget | {self.score_name} | "
            + "".join(f"{k} | " for k in extra)
            + f"visual tokens | {prefix}FLOPs/sample | FLOPs vs full | TTFT ms |\n"
            + "|---" * (8 + len(extra)) + "|"
        )
        n = self.rows[0].n if self.rows else 0
        procs = f"{self.processes} process" + ("es" if self.processes != 1 else "")
        lines = [f"**{self.model}** on **{self.dataset}** ({n} samples, {procs})", "", head]
        for r in self.rows:
            budget = "-" if r.budget is None else f"{r.budget:.3g}"
            lines.append(
                f"| {r.method} | {r.settings} | {budget} | {100 * r.accuracy:.1f}% | "
                + "".join(f"{_fmt(r.extras.get(k))} | " for k in extra)
                + f"{r.visual_tokens:.1f} | "
                f"{r.tflops * 1e12 / scale:.4g} | {_pct(r.flops_ratio)} | {r.ttft_ms:.2f} |"
            )
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "model": self.model, "processes": self.processes,
                "score_name": self.score_name, "rows": [asdict(r) for r in self.rows],
                "notes": list(self.notes)}  # fmt: skip

    def table(self, timing: bool = False) -> list:
        """Rows as tuples for comparisons (TTFT left out unless ``timing``)."""
        out = []
        for r in self.rows:
            t = (r.method, r.settings, r.budget, r.n, round(r.accuracy, 9), round(r.visual_tokens, 6), r.tflops)
            out.append(t + ((r.ttft_ms,) if timing else ()))
        return out

    def plot(self, path) -> Path:
        """Pareto plot: accuracy vs TFLOPs per sample, one marker/colour per method, the frontier dashed."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 4.4), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        markers = "osD^v<>PX*h"
        prefix, scale = self.unit()
        k = 1e12 / scale
        names = list(dict.fromkeys(r.method for r in self.rows))
        for i, name in enumerate(names):
            pts = sorted((r.tflops * k, 100 * r.accuracy) for r in self.rows if r.method == name)
            xs, ys = zip(*pts)
            style = dict(marker=markers[i % len(markers)], label=name, linestyle="-" if len(pts) > 1 else "none")
            if name == "full":
                style.update(color="black", markersize=9)
            ax.plot(xs, ys, **style)
        front = _pareto([(r.tflops * k, 100 * r.accuracy) for r in self.rows])
        if len(front) > 1:
            fx, fy = zip(*front)
            ax.step(fx, fy, where="post", color="grey", linestyle="--", linewidth=1, label="Pareto front")
        ax.set_xlabel(f"{prefix}FLOPs per sample")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{self.model} / {self.dataset}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        return save_figure(fig, path)

    def write(self, out_dir) -> dict:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(self.markdown())
        (out / "results.json").write_text(json.dumps(self.to_dict(), indent=2))
        png = self.plot(out / "pareto.png")
        return {"markdown": out / "results.md", "json": out / "results.json", "plot": png}


def _pct(v) -> str:
    return "-" if math.isnan(v) else f"{100 * v:.1f}%"


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def save_figure(fig, path) -> Path:
    """Lay out a matplotlib ``Figure`` and write it to ``path`` (folders created)."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _pareto(points):
    """Points not dominated (lower FLOPs and higher accuracy), sorted by FLOPs."""
    best = -math.inf
    front = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets and quotes: ``"r=[0,0,8],x=1"`` -> ``["r=[0,0,8]", "x=1"]``."""
    items, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth or quote:
        raise ValueError(f"unbalanced brackets or quotes in {text!r}")
    items.append(text[start:])
    return [s for s in items if s.strip()]


def parse_method(spec: str) -> tuple:
    """``"fastv:layer=2,retain=0.5"`` -> ("fastv", {"layer": 2, "retain": 0.5}); values are Python
    literals, lists and tuples included (``tome:r=[0,0,8,8]``, ``tome:r=(8,-0.5)``)."""
    import ast

    name, _, rest = spec.partition(":")
    if not name:
        raise ValueError(f"empty method name in {spec!r}; write e.g. fastv:layer=2,retain=0.5")
    hp = {}
    for item in _split_top_level(rest):
        key, eq, val = item.partition("=")
        if not eq:
            raise ValueError(f"bad hyper-parameter {item!r} in {spec!r}; write key=value")
        try:
            hp[key.strip()] = ast.literal_eval(val.strip())
        except (ValueError, SyntaxError):
            hp[key.strip()] = val.strip()
    return name.strip(), hp


# ----------------------------------------------------------------------------- distribution


class _Single:
    process_index = 0
    num_processes = 1
    is_main_process = True


def _state():
    """accelerate's process state; on a machine without CUDA, processes started by ``accelerate launch
    --multi_gpu`` (torchrun) join a gloo process group (accelerate's MULTI_CPU)."""
    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover
        return _Single()
    return PartialState(cpu=not torch.cuda.is_available())


def _gather(state, items: list) -> list:
    if state.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return list(gather_object(list(items)))


def _shard(n: int, rank: int, world: int) -> list:
    per = math.ceil(n / world)
    return list(range(min(n, rank * per), min(n, (rank + 1) * per)))


# ----------------------------------------------------------------------------- running one setting


@dataclass(frozen=True)
class _Sample:
    """One sample's numbers under one setting."""

    index: int
    score: float
    visual_entry: float  # visual tokens entering (the full count)
    visual_final: float  # visual tokens left at the end
    flops: float
    extra: dict = field(default_factory=dict)  # the dataset's extra metrics of this sample


@dataclass
class _ShardResult:
    """What one process measured for one setting: its samples and the wall time of each batch (ms)."""

    samples: list
    batch_ms: list


def _run(model, dataset, setting: Setting, indices: list, batch_size: int, bar) -> _ShardResult:
    """The samples of ``indices`` under ``setting``, and the time of each batch."""
    import vtok

    from .flops import Tracker
    from .latency import prefill_time

    kw = {"processor": dataset_processor(dataset)} if dataset_processor(dataset) is not None else {}
    handle = vtok.apply(model, setting.method, **setting.hparams(), **kw) if setting.method else None
    records, times = [], []
    device = next(model.parameters()).device
    try:
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            batch = dataset.batch(idx)
            with Tracker(model, handle) as tracker:
                scores, ms = prefill_time(lambda: dataset.score(model, batch), device)
            times.append(ms)
            extras = [{k: float(v) for k, v in s.items() if k != "score"} if isinstance(s, dict) else {} for s in scores]
            scores = [float(s["score"]) if isinstance(s, dict) else float(s) for s in scores]
            if len(scores) != len(idx):
                raise ValueError(f"{dataset.name}.score returned {len(scores)} scores for {len(idx)} samples")
            reports = tracker.reports(padded=False)
            if len(reports) == 1 and reports[0].batch == len(idx):
                r = reports[0]
                flops, entry, final = r.sample_totals, r.visual_entry, r.visual_final
            else:  # several forwards per batch: share their totals equally
                tot = sum(r.total for r in reports)
                flops = [tot / len(idx)] * len(idx)
                entry = [sum(sum(r.visual_entry) for r in reports) / len(idx)] * len(idx)
                final = [sum(sum(r.visual_final) for r in reports) / len(idx)] * len(idx)
            records += [_Sample(*rec) for rec in zip(idx, scores, entry, final, flops, extras)]
            if bar is not None:
                bar.update(1)
    finally:
        if handle is not None:
            handle.remove()
    return _ShardResult(records, times)


def _summarise(setting: Setting, shards: list, full: Row | None) -> Row:
    """One row from the results of every process (``shards``, in rank order)."""
    times = [t for shard in shards for t in shard.batch_ms]
    recs = sorted((s for shard in shards for s in shard.samples), key=lambda s: s.index)
    n = len(recs)
    acc = sum(r.score for r in recs) / n
    entry = sum(r.visual_entry for r in recs) / n
    final = sum(r.visual_final for r in recs) / n
    tflops = sum(r.flops for r in recs) / n / 1e12
    extras = {}
    for k in dict.fromkeys(k for r in recs for k in r.extra):
        vals = [r.extra[k] for r in recs if k in r.extra and not math.isnan(r.extra[k])]
        extras[k] = sum(vals) / len(vals) if vals else math.nan
    return Row(
        method=setting.label,
        settings=setting.settings_str(),
        role=setting.role,
        budget=setting.budget,
        n=n,
        accuracy=acc,
        visual_tokens=final,
        visual_tokens_full=entry,
        tflops=tflops,
        flops_ratio=(tflops / full.tflops if full.tflops else 1.0) if full is not None else (1.0 if setting.method is None else math.nan),
        ttft_ms=statistics.median(times) if times else float("nan"),
        extras=extras,
    )


def _reference_row(path, result: "Comparison", n: int) -> Row:
    """The "full" row of an earlier ``results.json`` (same model, dataset and number of samples; the seed is the
    caller's to keep), so a later run compares against it without running the untouched model again."""
    data = json.loads(Path(path).read_text())
    rows = [r for r in data.get("rows", []) if r.get("role") == "full"]
    if not rows or data.get("model") != result.model or data.get("dataset") != result.dataset or rows[0]["n"] != n:
        raise ValueError(
            f"{path}: no full-model row for {result.model} on {result.dataset} with {n} samples "
            f"(it has {data.get('model')} on {data.get('dataset')}, n={rows[0]['n'] if rows else '-'}); "
            "run it once without reference="
        )
    row = Row(**rows[0])
    row.note = (row.note + "; " if row.note else "") + f"from {Path(path).name}"
    return row


def dataset_processor(dataset):
    """The processor (or tokenizer) a dataset builds its prompts with, handed to ``vtok.apply`` for methods that
    read the question or ask the model (QuoTA); None if the dataset has none."""
    proc = getattr(dataset, "processor", None)
    return proc if proc is not None else getattr(getattr(dataset, "helper", None), "processor", None)


def _can_attach(model, setting: Setting) -> str | None:
    """None if the method attaches to this model, else the reason."""
    import vtok

    try:
        vtok.apply(model, setting.method, **setting.hparams()).remove()
    except (ValueError, TypeError) as e:
        return str(e).splitlines()[0]
    return None


def compare(model, dataset, methods, *, batch_size: int = 8, baselines=BASELINES, out_dir=None, progress: bool = True,
            limit: int | None = None, model_name: str | None = None, reference=None) -> Comparison:  # fmt: skip
    """Evaluate ``methods`` (a list of (name, settings dict) or ``"name:k=v,..."`` strings) on ``dataset``.

    Adds the full model first (or, with ``reference``, the full row of an earlier results.json on the same
    model, dataset and samples; ``reference="none"``: no full row and no FLOPs ratio, for a sweep split over
    processes) and, per method, the ``baselines`` at the same budget. Writes results.md,
    results.json and pareto.png to ``out_dir`` (rank 0) when given. Returns the ``Comparison``
    (``result.markdown()`` is the table).

    ``dataset``: the protocol of ``vtok.eval.datasets`` (``name``, ``__len__``, ``batch``, ``score``,
    optional ``prepare``).

    Rows: "full" (no method) first; then every (method, settings) followed by the ``random`` and ``pool``
    baselines at the same budget: the setting's ``retain`` when it has one, otherwise the fraction of
    visual tokens the method really kept (measured over the whole dataset). A baseline the model's adapter
    cannot run (e.g. a before-LLM baseline on a plain ViT) is left out with a note.

    Columns: accuracy (mean score), visual tokens (mean per sample left at the last LLM layer; for a ViT
    the tokens leaving the last block), TFLOPs per sample (``vtok.eval.flops``, exact convention, each
    sample's own lengths so the number does not depend on batching), FLOPs relative to full, and TTFT:
    the median wall time of one ``score`` call (for first-token scoring, a prefill of one batch).

    Data parallel: under ``accelerate launch`` each process takes a contiguous shard of the dataset
    (batches are formed inside the shard), results are gathered after every setting (so all processes
    agree on the measured budgets), and rank 0 writes the outputs. Per-sample numbers do not depend on the
    number of processes, so the table is the same as a single-process run (TTFT aside).
    """
    from tqdm.auto import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
    parsed = [parse_method(m) if isinstance(m, str) else (m[0], dict(m[1] if len(m) > 1 else {})) for m in methods]
    if model_name == "offline-vlm":  # trained methods run with the weights vtok ships for this model
        from .offline import shipped_weights

        for name, hp in parsed:
            if "weights" not in hp and shipped_weights(name) is not None:
                hp["weights"] = str(shipped_weights(name))
    state = _state()
    main = state.is_main_process
    model.eval()
    if hasattr(dataset, "prepare"):
        dataset.prepare(model)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    mine = _shard(n, state.process_index, state.num_processes)
    n_batches = math.ceil(len(mine) / batch_size)
    bar = tqdm(total=n_batches * (1 + len(parsed) * (1 + len(baselines))), desc=f"vtok eval {dataset.name}",
               disable=not (progress and main), unit="batch")  # fmt: skip
    result = Comparison(dataset=dataset.name, model=model_name or type(model).__name__, processes=state.num_processes,
                        score_name=getattr(dataset, "score_name", "accuracy"))
    seen = set()
    full_rows: list = []  # the full-model row the others are measured against (none with reference="none")

    def run(setting: Setting) -> Row:
        bar.set_postfix_str(f"{setting.label} {setting.settings_str()}")
        shards = _gather(state, [_run(model, dataset, setting, mine, batch_size, bar)])
        row = _summarise(setting, shards, full_rows[0] if full_rows else None)
        result.rows.append(row)
        seen.add((setting.method, repr(setting.settings)))  # repr: list values are unhashable
        if out_dir is not None and main:  # after every row: an interrupted long run keeps what it finished
            result.write(out_dir)
        return row

    try:
        if reference == "none":  # no full-model row (another process computes it): no FLOPs ratio either
            full = None
            bar.update(n_batches)
        elif reference is not None:  # the untouched model's row of an earlier run on the same questions
            full = _reference_row(reference, result, n)
            result.rows.append(full)
            full_rows.append(full)
            bar.update(n_batches)
        else:
            full = run(Setting(None, (), "full"))
            full_rows.append(full)
        for name, hp in parsed:
            setting = Setting(name, tuple(sorted(hp.items())), "method", hp.get("retain"))
            if (setting.method, repr(setting.settings)) in seen:
                bar.update(n_batches * (1 + len(baselines)))
                continue
            row = run(setting)
            budget = hp.get("retain")
            if budget is None and full is None and baselines:
                raise ValueError(f"{name}: without a full-model row (reference='none') a method needs retain= for its baselines")
            if budget is None and full is not None:
                budget = row.visual_tokens / full.visual_tokens if full.visual_tokens else 1.0
                budget = round(budget, 4)
            row.budget = budget
            for base in baselines:
                bs = Setting(base, (("retain", budget),), "baseline", budget)
                if (bs.method, repr(bs.settings)) in seen:  # once per budget, not once per method
                    bar.update(n_batches)
                    continue
                why = _can_attach(model, bs)
                if why is not None:
                    result.notes.append(f"baseline {base} (retain={budget}) left out: {why}")
                    bar.update(n_batches)
                    continue
                run(bs)
    finally:
        bar.close()
    if out_dir is not None and main:
        result.write(out_dir)
    return result

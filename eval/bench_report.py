"""`vtok bench` output: the issue targets, the markdown table, the Pareto plot and the files (``write``)."""

from __future__ import annotations

import json
import math
from pathlib import Path


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



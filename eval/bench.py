"""`vtok bench` (``python -m vtok.eval.bench``): time every registered method against the untouched model.

The command line; the work is in bench_settings (what runs), bench_replay (the ideal), bench_run
(timed rounds, rows), bench_report (table, targets, plot, files) and bench_cases (the models).
Rows, timing, the ideal TTFT and overhead, and GPU mode: docs/BENCHMARKS.md, "End-to-end".
"""

from __future__ import annotations

import argparse
import sys

import torch

# the pieces' names stay importable from here (tests and older callers use ``bench.<name>``)
from .bench_replay import _capture, _hidden, _replay, attention_share, model_stacks  # noqa: F401
from .bench_report import _stages, load_accuracy, markdown, plot, targets, write  # noqa: F401
from .bench_run import Options, run, run_case
from .bench_settings import BUDGETS, Case, Setting, case_settings, per_block_r  # noqa: F401

#: the case builders (cpu_cases, gpu_cases, quick_cases, vit_cases) stay importable from here (__getattr__)
__all__ = ["Case", "Setting", "run", "run_case", "markdown", "targets", "plot", "per_block_r", "main"]

_WHAT = "time every registered method against the untouched model: TTFT, ideal TTFT, overhead, memory, FLOPs"
_EXAMPLES = """\
examples:
    vtok bench                                  # CPU (default without CUDA): the offline VLM + a ViT section
    vtok bench --quick                          # tiny random models: a smoke run of a few seconds
    vtok bench --mode gpu                       # LLaVA-OneVision-7B / LLaVA-1.5-7B shapes, random bf16 weights
    vtok bench --threads 1 --clock cpu          # on a CPU shared with other jobs
    python -m vtok.eval.bench --out vtok-bench --accuracy vtok-eval/results.json

Everything runs in one process and one run; only ratios measured in that run are compared. What the
rows and columns measure (the ideal TTFT, the overhead, the A/A control): docs/BENCHMARKS.md.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """``vtok bench`` (see ``vtok.cli.SUBCOMMANDS``); the same arguments as ``python -m vtok.eval.bench``."""
    p = subparsers.add_parser("bench", help=_WHAT, description=_WHAT, epilog=_EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
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
    p = argparse.ArgumentParser(prog="python -m vtok.eval.bench", description=_WHAT, epilog=_EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    _arguments(p)
    return _cmd(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


def __getattr__(name):
    """The case builders live in bench_cases (imported on first use: it builds models); their names stay
    importable from here."""
    if name in ("cpu_cases", "vit_cases", "quick_cases", "gpu_cases"):
        from . import bench_cases

        return getattr(bench_cases, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

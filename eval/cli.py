"""``vtok eval``: compare methods on a model and a dataset (accuracy, visual tokens, FLOPs, TTFT); ``run``
documents the command line.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="compare methods: accuracy, visual tokens, FLOPs, TTFT (markdown table + Pareto plot)",
        description=inspect.cleandoc(run.__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="tiny-llava", help="model name (see --list)")
    p.add_argument("--dataset", default="synthetic", help="dataset name (see --list), with settings as NAME:K=V,... "
                   "(e.g. video-needle:frames=16)")
    p.add_argument("--methods", nargs="*", default=[], metavar="NAME:K=V,...",
                   help="methods with settings, e.g. fastv:layer=2,retain=0.5 pool:factor=2")  # fmt: skip
    p.add_argument("--n", type=int, default=16, help="samples (datasets that take a size)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first LIMIT samples")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baselines", action="store_true", help="do not add the random and pool baselines")
    p.add_argument("--out", default=None, help="directory for results.md, results.json and pareto.png")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", default=None, help="device for the model (default: the process's accelerate device)")
    p.add_argument("--list", action="store_true", help="list the known models and datasets")
    p.add_argument("--reference", default=None, help="results.json of an earlier run on the same model, dataset, --n "
                   "and --seed: its full-model row is used instead of running the untouched model again; 'none': no full row "
                   "(split a sweep over processes; FLOPs ratios then left empty)")
    p.add_argument("--flops", metavar="CONFIG", default=None,
                   help="print the FLOPs of a full-size config (e.g. llava-1.5-7b) with and without --methods")  # fmt: skip
    p.add_argument("--text-tokens", type=int, default=64, help="with --flops: text tokens of the prompt")
    p.add_argument("--output-tokens", type=int, default=0, help="with --flops: decoded tokens R")
    p.set_defaults(func=run)
    return p


def _flops_table(args) -> int:
    from .flops import estimate
    from .runner import parse_method

    settings = [None] + [parse_method(m) for m in args.methods]
    print(f"| {args.flops} | exact TFLOPs | FastV-convention TFLOPs | prefill | vision | decode |")
    print("|---|---|---|---|---|---|")
    for s in settings:
        kw = dict(text_tokens=args.text_tokens, output_tokens=args.output_tokens, method=s)
        ex, fv = estimate(args.flops, **kw), estimate(args.flops, convention="fastv", **kw)
        name = "full" if s is None else f"{s[0]} {s[1]}"
        p = ex.parts
        print(f"| {name} | {ex.total / 1e12:.3f} | {fv.total / 1e12:.3f} | {p['prefill'] / 1e12:.3f} | "
              f"{p['vision'] / 1e12:.3f} | {p['decode'] / 1e12:.3f} |")  # fmt: skip
    return 0


def run(args) -> int:
    """``vtok eval``: compare methods on a model and a dataset (accuracy, visual tokens, FLOPs, TTFT).

        vtok eval --model tiny-llava --dataset synthetic --methods fastv:layer=2,retain=0.5 pool:factor=2 --out out/
        accelerate launch --multi_gpu --num_processes 2 -m vtok.cli eval ...   # data parallel; rank 0 writes
                                             # (on a CPU-only machine too: the processes join a gloo group)
        vtok eval --flops llava-1.5-7b --methods fastv:layer=2,retain=0.5   # FLOPs of a full-size config, no weights

    Models and datasets are looked up by name in ``vtok.eval.datasets.MODELS`` / ``DATASETS``
    (``--list`` shows them); the ``random`` and ``pool`` baselines are added at each method's budget.
    """
    from . import datasets

    if args.list:
        datasets.load_registries()
        print("models: " + ", ".join(sorted(datasets.MODELS)))
        print("datasets: " + ", ".join(sorted(datasets.DATASETS)))
        return 0
    if args.flops:
        return _flops_table(args)
    from vtok.method import get_method_class

    from .runner import BASELINES, _state, compare, parse_method

    for spec in args.methods or []:  # a bad name or setting fails now, not after the model and the full row ran
        name, hp = parse_method(spec)
        weights = hp.pop("weights", None)  # vtok.apply's, not a hyper-parameter
        if weights is not None and weights != "untrained" and not Path(str(weights)).is_file():
            raise FileNotFoundError(f"{spec}: weights file {weights} does not exist")
        get_method_class(name)(**hp)
    datasets.lookup("model", args.model)
    dataset_name, dataset_kw = parse_method(args.dataset)  # NAME:K=V,... as for methods (video-needle:frames=16)
    datasets.lookup("dataset", dataset_name)
    state = _state()
    model = datasets.load_model(args.model)
    device = args.device or (str(state.device) if hasattr(state, "device") else None)
    if device is not None:
        model.to(device)
    dataset = datasets.load_dataset(dataset_name, model, model_name=args.model, n=args.n, seed=args.seed, **dataset_kw)
    result = compare(
        model,
        dataset,
        args.methods,
        batch_size=args.batch_size,
        baselines=() if args.no_baselines else BASELINES,
        out_dir=args.out,
        progress=not args.no_progress,
        limit=args.limit,
        model_name=args.model,
        reference=args.reference,
    )
    if state.is_main_process:
        print(result.markdown())
        if args.out:
            print(f"written: {args.out}/results.md, results.json, pareto.png")
    return 0

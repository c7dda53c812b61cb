"""`vtok demo`: the main job. A real offline VLM, several methods at two budgets, one table and a plot
(``run_demo``).
"""

from __future__ import annotations

import time
from pathlib import Path

#: the offline VLM's DINOv2 at 224 px: 16 x 16 patches entering 12 blocks
CONTEXT_PATCHES, CONTEXT_BLOCKS = 256, 12
#: the baselines every method is compared with (the runner adds them itself)
BASELINES = ("random", "pool")


def demo_settings(budgets, methods=None) -> list:
    """(method, settings) per budget, from each method's own ``settings_for_budget``: every registered
    method except the baselines, or ``methods``. Each budget snaps to what every method can reach
    exactly (``snap_budget``, e.g. ToMe's 256 - 12 r patches), so methods and baselines share budgets."""
    import vtok
    from vtok.method import BudgetContext, get_method_class

    context = BudgetContext(CONTEXT_PATCHES, CONTEXT_BLOCKS)
    names = list(methods) if methods else [m for m in vtok.list_methods() if m not in BASELINES]
    classes = [get_method_class(m) for m in names]
    unusable = [c.name for c in classes if c.settings_for_budget(0.5, context) is None]
    if methods and unusable:
        raise ValueError(f"{unusable} have no setting for a token budget; give methods that do")
    classes = [c for c in classes if c.name not in unusable]
    # methods with a few discrete counts (M3's nested scales, TempMe's shares) take their nearest setting
    # and the runner adds the baselines at the budget they reach, instead of moving everyone's budget
    common = [c for c in classes if not c.nearest_budget]
    snapped = []
    for b in budgets:
        for c in common:
            b = c.snap_budget(b, context)
        snapped.append(b)
    return [(c.name, c.settings_for_budget(b, context)) for b in snapped for c in classes]


def run_demo(n: int = 200, budgets=(0.5, 0.25), methods=None, out: str = "vtok-demo", batch_size: int = 16,
             seed: int = 0, threads: int | None = None):  # fmt: skip
    """Builds the offline VLM on first use (DINOv2 ViT-S/14 + SmolLM2-135M from PyPI wheels, the trained
    projector from ``eval/assets``), then runs the comparison runner on ``n`` easy-VQA test questions: the
    full model, every demo method in the registry at each budget, and the ``random`` and ``pool``
    baselines at the same budgets. Prints the markdown table; writes results.md, results.json and
    pareto.png to ``out``. Returns the ``Comparison``.
    """
    import torch

    from . import offline
    from .harnesses import EasyVQA
    from .runner import compare

    if threads:
        torch.set_num_threads(threads)
    for b in budgets:
        if not 0 < b <= 1:
            raise ValueError(f"budget {b} must be a fraction of visual tokens kept, in (0, 1]")
    t0 = time.time()
    model, _, helper = offline.load_vlm()
    dataset = EasyVQA(helper, n=n, seed=seed)
    settings = demo_settings(budgets, methods)
    print(f"[vtok demo] {len(settings)} method settings + baselines on {n} easy-VQA test questions")
    result = compare(model, dataset, settings, batch_size=batch_size, out_dir=out, model_name="offline-vlm")
    print(result.markdown())
    for note in result.notes:
        print("note:", note)
    print(f"[vtok demo] wrote {Path(out) / 'results.md'} and {Path(out) / 'pareto.png'} in {time.time() - t0:.0f} s")
    return result


def _cmd(args) -> int:
    if args.export:
        from . import offline

        print(offline.export_vlm(args.export))
        return 0
    run_demo(
        n=args.n,
        budgets=args.budgets,
        methods=args.methods,
        out=args.out,
        batch_size=args.batch_size,
        seed=args.seed,
        threads=args.threads,
    )
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="compare methods on a real offline VLM (easy-VQA)")
    p.add_argument("--n", type=int, default=200, help="easy-VQA test questions (default 200)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25], help="fractions of visual tokens kept")
    p.add_argument("--methods", nargs="+", default=None, help="methods to compare (default: every registered one)")
    p.add_argument("--out", default="vtok-demo", help="output folder (results.md, results.json, pareto.png)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--export", metavar="DIR", default=None,
                   help="instead of comparing: write the demo VLM to DIR as an HF checkpoint (model + LlavaProcessor "
                        "with its chat template) for from_pretrained, pipeline() and lmms-eval")
    p.set_defaults(func=_cmd)

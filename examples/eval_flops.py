"""FLOPs of full-size LLaVA configs (no weights, no download) and of a tiny model checked against PyTorch.

    python examples/eval_flops.py
"""

import torch

import vtok
from vtok.eval import flops
from vtok.testing import TINY_CASES

FASTV = ("fastv", {"layer": 2, "retain": 0.5})

# 1. full-size configs: LLaVA-1.5-7B with 576 visual + 64 text tokens, with and without FastV (K=2, R=50%)
for convention in ("exact", "fastv"):
    full = flops.estimate("llava-1.5-7b", text_tokens=64, convention=convention)
    pruned = flops.estimate("llava-1.5-7b", text_tokens=64, convention=convention, method=FASTV)
    print(f"llava-1.5-7b {convention:>5}: full {full.total / 1e12:.3f} T, fastv {pruned.total / 1e12:.3f} T "
          f"({100 * pruned.total / full.total:.1f}%)")
print(flops.estimate("llava-onevision-7b", images=0, frames=32, text_tokens=64, output_tokens=32))

# 2. a real (tiny) model: one forward, the reductions read from handle.stats, compared with FlopCounterMode
case = TINY_CASES["llava"]
model = case.build()
batch = case.batch(case.make_samples(model, case.specs))
with vtok.apply(model, "fastv", layer=2, retain=0.5) as handle:
    report, measured = flops.counted(flops.count, model, handle, **batch)
print(report)
print(f"FlopCounterMode: {measured} FLOPs, analytic: {report.total} FLOPs; per sample {report.sample_totals}")
assert report.total == measured and torch.is_grad_enabled()

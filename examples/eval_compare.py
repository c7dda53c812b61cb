"""Compare methods against the full model and the random/pool baselines: markdown table + Pareto plot.

    python examples/eval_compare.py out/
    accelerate launch --multi_gpu --num_processes 2 examples/eval_compare.py out/   # data parallel

The same from the command line: ``vtok eval --model tiny-llava --dataset synthetic --methods
fastv:layer=2,retain=0.25 pool:factor=2 --out out/``.
"""

import sys

from vtok.eval import datasets, runner

out = sys.argv[1] if len(sys.argv) > 1 else "vtok-eval-out"
model = datasets.load_model("tiny-llava")
dataset = datasets.SyntheticDataset("llava", n=16)  # answers = the full model's next token
result = runner.compare(model, dataset, ["fastv:layer=2,retain=0.25", ("pool", {"factor": 2})], batch_size=4,
                        out_dir=out, model_name="tiny-llava")
print(result.markdown())

"""The README's "Write your own method" examples run as written, on the tiny models of every VLM adapter."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import vtok
from vtok.method import _REGISTRY
from vtok.testing import TINY_CASES

README = Path(__file__).resolve().parents[1] / "README.md"


def _examples() -> str:
    text = README.read_text()
    part = text[text.index("### Write your own method") :]
    part = part[: part.index("\n## ")]
    blocks = re.findall(r"```python\n(.*?)```", part, flags=re.S)
    assert len(blocks) == 5, "one example per stage: before_llm, in_llm, in_vit (two: within rows, across frames), projector"
    return "import torch\n" + "\n".join(blocks)


@pytest.fixture(scope="module")
def readme_methods():
    names = ("top_cls", "instruction_prune", "merge_neighbours", "pair_frames", "pool_then_project")
    ns: dict = {}
    exec(compile(_examples(), str(README), "exec"), ns)  # noqa: S102 - the README's own code
    yield {**{n: vtok.method.get_method_class(n) for n in names}, "ns": ns}
    for n in names:  # keep the registry as the other tests expect it
        _REGISTRY.pop(n, None)


@pytest.mark.parametrize("case_name", ["llava", "llava_next", "llava_onevision"])
def test_readme_methods_run(readme_methods, case_name):
    case, model = TINY_CASES[case_name], tiny_model(case_name)
    batch = case.batch(case.make_samples(model, case.specs, 0))
    batch.pop("position_ids", None)
    names = ["instruction_prune"]
    if case_name != "llava_onevision":  # its SigLIP tower has no CLS token (the adapter refuses kind='cls')
        names.insert(0, "top_cls")
    with vtok.apply(model, names) as h, torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
    steps = [(r.method, r.layer) for r in h.stats]
    assert steps[-2:] == [("instruction_prune", 1), ("instruction_prune", 3)]
    assert all(o < i for r in h.stats for i, o in zip(r.tokens_in, r.tokens_out))


def test_readme_in_vit_method_runs(readme_methods):
    model = tiny_model("llava")
    batch = TINY_CASES["llava"].batch(TINY_CASES["llava"].make_samples(model, [(3, 1, 2)], 0))
    with vtok.apply(model, "merge_neighbours", r=2) as h, torch.no_grad():
        model(**batch)
    assert [(r.stage, r.tokens_in, r.tokens_out) for r in h.stats][0] == ("in_vit", [17], [15])


def test_readme_cross_frame_example_prints_what_it_says(readme_methods):
    ns = readme_methods["ns"]
    src = ns["h"].adapter.source
    # 6 frames of 16 patches + CLS: pairs become 3 rows of 34 tokens, 3 first-frame patches merged away
    assert tuple(ns["out"].last_hidden_state.shape) == (3, 31, 32) and src.rows.tolist() == [0, 0, 1, 1, 2, 2]
    assert src.sizes.sum(1).tolist() == [34.0] * 3 and int((src.sizes == 2).sum()) == 9


def test_readme_projector_method_runs(readme_methods):
    model = tiny_model("llava")
    batch = TINY_CASES["llava"].batch(TINY_CASES["llava"].make_samples(model, [(3, 1, 2), (2, 2, 4)], 0))
    with vtok.apply(model, "pool_then_project") as h, torch.no_grad():
        out = model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 2
    assert [(r.stage, r.tokens_in, r.tokens_out) for r in h.stats] == [("projector", [16, 32], [4, 8])]

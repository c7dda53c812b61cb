"""vtok.eval: latency, the comparison runner (table, Pareto plot, baselines), `vtok eval`, accelerate data
parallelism and the lmms-eval plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import EntryPoint, entry_points
from importlib.util import find_spec

import pytest
from conftest import tiny_model

import vtok
from vtok.eval import datasets, latency, runner
from vtok.eval.lmms_plugin import split_vtok_args
from vtok.testing import TINY_CASES

needs_plot = pytest.mark.skipif(find_spec("matplotlib") is None, reason="matplotlib is not installed")
needs_accelerate = pytest.mark.skipif(find_spec("accelerate") is None, reason="accelerate is not installed")


# ----------------------------------------------------------------------------- latency


def test_latency_measure():
    case = TINY_CASES["llava"]
    model = tiny_model("llava")
    batch = case.batch(case.make_samples(model, case.specs[:1]))
    with vtok.apply(model, "fastv", layer=2, retain=0.5):
        lat = latency.measure(model, batch, max_new_tokens=3, warmup=1, repeats=2)
    assert lat.new_tokens == 3 and lat.batch == 1 and lat.repeats == 2 and len(lat.ttft_all_ms) == 2
    assert lat.ttft_ms > 0 and lat.decode_tokens_per_s > 0
    assert lat.peak_memory_mb > 0 and lat.memory_kind.startswith("cpu")
    assert "TTFT" in str(lat)
    with pytest.raises(ValueError, match="max_new_tokens"):
        latency.measure(model, batch, max_new_tokens=0)


# ----------------------------------------------------------------------------- runner


def test_parse_method():
    assert runner.parse_method("fastv:layer=2,retain=0.5") == ("fastv", {"layer": 2, "retain": 0.5})
    assert runner.parse_method("fastv:query=mean") == ("fastv", {"query": "mean"})
    assert runner.parse_method("pool") == ("pool", {})
    with pytest.raises(ValueError, match="key=value"):
        runner.parse_method("fastv:layer")


@needs_plot
def test_runner_table_plot_and_baselines(tmp_path):
    model = tiny_model("llava")
    ds = datasets.SyntheticDataset("llava", n=6, seed=1)
    res = runner.compare(model, ds, ["fastv:layer=2,retain=0.5", ("pool", {"factor": 2}), "fastv:layer=1,retain=0.5"],
                         batch_size=3, out_dir=tmp_path, progress=False, model_name="tiny-llava")  # fmt: skip
    rows = [(r.method, r.settings, r.budget) for r in res.rows]
    assert rows == [
        ("full", "-", None),
        ("fastv", "layer=2, retain=0.5", 0.5),
        ("random", "retain=0.5", 0.5),
        ("pool", "retain=0.5", 0.5),
        ("pool", "factor=2", 0.25),  # no retain: the budget is the fraction the method really kept
        ("random", "retain=0.25", 0.25),
        ("pool", "retain=0.25", 0.25),
        ("fastv", "layer=1, retain=0.5", 0.5),  # its baselines at 0.5 ran already: not again
    ]
    full = res.rows[0]
    assert full.accuracy == 1.0 and full.flops_ratio == 1.0 and full.n == 6
    assert all(r.flops_ratio < 1 and r.visual_tokens < full.visual_tokens for r in res.rows[1:])
    assert res.rows[1].visual_tokens == full.visual_tokens / 2
    md = (tmp_path / "results.md").read_text()
    assert "| method | settings | budget | accuracy | visual tokens |" in md and "| fastv |" in md
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["method"] == "full"
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert runner._pareto([(1, 50), (2, 40), (3, 90), (0.5, 10)]) == [(0.5, 10), (1, 50), (3, 90)]


def test_runner_on_a_vit_leaves_out_unrunnable_baselines():
    case = "timm_vit"
    model = tiny_model(case)
    ds = datasets.SyntheticDataset(case, n=3)
    res = runner.compare(model, ds, [("tome", {"r": 2})], batch_size=3, progress=False)
    assert [r.method for r in res.rows] == ["full", "tome"]
    assert res.rows[1].visual_tokens < res.rows[0].visual_tokens and res.rows[1].flops_ratio < 1
    assert len(res.notes) == 2 and all("left out" in n for n in res.notes)


# ----------------------------------------------------------------------------- CLI


@needs_plot
def test_cli_eval(tmp_path, capsys):
    from vtok.cli import main

    assert main(["eval", "--list"]) == 0
    listed = capsys.readouterr().out
    # the real-data entries register themselves in vtok.eval.harnesses; the CLI must load them
    for name in ("tiny-llava", "offline-vlm", "offline-dinov2", "easy-vqa", "easy-vqa-mosaic", "video-needle",
                 "video-fidelity", "digits-probe"):
        assert name in listed, name
    assert main(["eval", "--flops", "llava-1.5-7b", "--methods", "fastv:layer=2,retain=0.5"]) == 0
    out = capsys.readouterr().out
    assert "| full | 8.910 | 3.329 |" in out and "fastv" in out
    code = main(["eval", "--model", "tiny-llava", "--dataset", "synthetic", "--n", "4", "--batch-size", "2",
                 "--methods", "fastv:layer=2,retain=0.5", "tome:r=[2,2]", "--no-baselines", "--no-progress",
                 "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["full", "fastv", "tome"]
    assert rows[2]["settings"] == "r=[2, 2]"  # a list-valued setting is not split at its commas
    assert (tmp_path / "pareto.png").exists() and "| fastv |" in capsys.readouterr().out
    # --reference: the full row of that run, not run again; the method's row is the same
    again = tmp_path / "again"
    assert main(["eval", "--model", "tiny-llava", "--dataset", "synthetic", "--n", "4", "--batch-size", "2",
                 "--methods", "fastv:layer=2,retain=0.5", "--no-baselines", "--no-progress", "--out", str(again),
                 "--reference", str(tmp_path / "results.json")]) == 0  # fmt: skip
    rows2 = json.loads((again / "results.json").read_text())["rows"]
    assert rows2[0]["note"] == "from results.json" and rows2[0]["ttft_ms"] == rows[0]["ttft_ms"]
    for k in ("accuracy", "visual_tokens", "tflops", "flops_ratio"):
        assert rows2[1][k] == rows[1][k], k
    split = tmp_path / "split"  # reference "none": no full row, no FLOPs ratio; the method's numbers the same
    assert main(["eval", "--model", "tiny-llava", "--dataset", "synthetic", "--n", "4", "--batch-size", "2",
                 "--methods", "fastv:layer=2,retain=0.5", "tome:r=[2,2]", "--no-baselines", "--no-progress",
                 "--out", str(split), "--reference", "none"]) == 0  # fmt: skip
    rows3 = json.loads((split / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows3] == ["fastv", "tome"] and all(r["flops_ratio"] != r["flops_ratio"] for r in rows3)
    assert rows3[0]["tflops"] == rows[1]["tflops"] and rows3[0]["accuracy"] == rows[1]["accuracy"]
    with pytest.raises(ValueError, match="no full-model row for tiny-llava on synthetic-llava with 3 samples"):
        from vtok.eval import datasets as ds
        from vtok.eval.runner import compare

        m = ds.load_model("tiny-llava")
        compare(m, ds.load_dataset("synthetic", m, n=3, model_name="tiny-llava"), [], model_name="tiny-llava",
                progress=False, reference=tmp_path / "results.json")  # fmt: skip


# ----------------------------------------------------------------------------- accelerate


@pytest.mark.slow
@needs_accelerate
@needs_plot
def test_accelerate_two_processes_same_table(tmp_path):
    """The README's `accelerate launch --multi_gpu --num_processes 2 -m vtok.cli eval ...` (gloo on CPU) gives the
    table of a single process, and the table says how many processes ran."""
    args = ["--model", "tiny-llava", "--n", "4", "--batch-size", "2", "--methods", "fastv:layer=2,retain=0.5",
            "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # `python -m accelerate.commands.launch` is `accelerate launch` run by this interpreter
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "-m", "vtok.cli", "eval", *args, "--out", str(tmp_path / "two")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from vtok.cli import main

    assert main(["eval", *args, "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    assert "4 samples, 2 processes" in (tmp_path / "two" / "results.md").read_text()
    assert "4 samples, 1 process)" in (tmp_path / "one" / "results.md").read_text()
    drop = ("ttft_ms",)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(two["rows"]) == strip(one["rows"])


# ----------------------------------------------------------------------------- lmms-eval plugin


def test_split_vtok_args():
    assert split_vtok_args({"pretrained": "p", "vtok_method": "fastv", "vtok_layer": 2, "device": "cpu"}) == (
        "fastv",
        {"layer": 2},
        {"pretrained": "p", "device": "cpu"},
    )
    assert split_vtok_args({"vtok_method": "pool+fastv", "vtok_fastv.retain": 0.5}) == (
        ["pool", "fastv"],
        {"fastv": {"retain": 0.5}},
        {},
    )
    assert split_vtok_args({"device": "cpu"}) == (None, {}, {"device": "cpu"})
    with pytest.raises(ValueError, match="without vtok_method"):
        split_vtok_args({"vtok_retain": 0.5})


@pytest.mark.skipif(find_spec("lmms_eval") is None, reason="lmms-eval is not installed (pip install vtok[lmms])")
def test_lmms_eval_discovers_the_plugin():
    """Load the entry point the way lmms-eval's ModelRegistryV2 does and resolve the model class."""
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    installed = [ep for ep in entry_points(group="lmms_eval.models") if ep.value.startswith("vtok.")]
    ep = installed[0] if installed else EntryPoint("vtok", "vtok.eval.lmms_plugin:manifests", "lmms_eval.models")
    registry = ModelRegistryV2()
    for manifest in registry._coerce_payload_to_manifests(ep.load()):
        registry.register_manifest(manifest)
    resolved = registry.resolve("vtok")
    assert resolved.model_type == "simple" and resolved.class_path == "vtok.eval.lmms_plugin.VtokLlava"
    cls = registry.get_model_class("vtok_llava_hf")  # imports the class and validates it like lmms-eval does
    assert issubclass(cls, lmms) and cls.is_simple
    if installed:  # the real discovery path, when vtok is installed with its entry point
        from lmms_eval.models import get_model

        assert get_model("vtok") is cls


@pytest.mark.skipif(find_spec("lmms_eval") is None, reason="lmms-eval is not installed (pip install vtok[lmms])")
@pytest.mark.skipif("llava_next" not in TINY_CASES, reason="no tiny LLaVA-NeXT case")
def test_lmms_plugin_generates_with_the_method_attached(tmp_path):
    """A local checkpoint (tiny LLaVA-NeXT + its processor) through lmms-eval's llava_hf code with fastv on."""
    import numpy as np
    from lmms_eval.api.instance import Instance
    from PIL import Image

    from vtok.testing import anyres_processor
    from vtok.eval.lmms_plugin import VtokLlava

    model = TINY_CASES["llava_next"].build()
    proc = anyres_processor(model)
    proc.tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }} {% endfor %}"
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    lm = VtokLlava(pretrained=str(tmp_path), device="cpu", dtype="float32", vtok_method="fastv", vtok_layer=2,
                   vtok_retain=0.5)  # fmt: skip
    assert lm.vtok_handle is not None and lm.vtok_handle.attached
    rng = np.random.default_rng(0)
    lm.task_dict = {"t": {"test": {0: {"image": Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))}}}}
    args = ("w5 w7 w9", {"max_new_tokens": 3, "until": ["</s>"]}, lambda doc: [doc["image"]], 0, "t", "test")
    (text,) = lm.generate_until([Instance("generate_until", args, 0, {"task": "t", "doc_id": 0, "repeats": 1})])
    assert isinstance(text, str) and text
    summary = lm.vtok_summary()
    assert summary["requests"] == 1 and summary["visual_tokens_out"] == summary["visual_tokens_in"] / 2

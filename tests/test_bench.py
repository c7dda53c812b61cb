"""`vtok bench` end to end on tiny models: rows from the registry, the table and JSON fields, the ideal/overhead
arithmetic per round, the replay at the method's lengths, the per-block ToMe budget, the GPU-mode model path.

Timings are not asserted (a CPU shared with other jobs); structure and arithmetic are.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

import vtok
from vtok.cli import main as cli_main
from vtok.eval import bench
from vtok.method import get_method_class, keep_count


@pytest.fixture
def one_thread():
    """On a shared CPU, tiny models' ops wait for a descheduled second thread at every parallel region."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        rc = cli_main(["bench", "--quick", "--cases", "tiny-llava", "tiny-vit-timm", "--repeats", "2", "--warmup", "1",
                       "--out", str(out), "--no-progress", "--clock", "cpu", "--threads", "1"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return out, json.loads((out / "bench.json").read_text())


def _rows(data, case):
    c = next(c for c in data["cases"] if c["name"] == case)
    return c, {(r["method"], r["settings"], r["role"]): r for r in c["rows"]}


def test_every_registered_method_is_run_or_listed_with_a_reason(quick):
    _, data = quick
    for case in ("tiny-llava", "tiny-vit-timm"):
        c, _ = _rows(data, case)
        seen = {r["method"] for r in c["rows"]} | {s["method"] for s in c["skipped"]}
        assert set(vtok.list_methods()) <= seen
        assert all(s["reason"] for s in c["skipped"])
    c, rows = _rows(data, "tiny-llava")
    # LLaVA runs every stage; only budget settings of methods without a budget knob may be skipped
    assert all("has no budget setting" in s["reason"] for s in c["skipped"])
    for name in vtok.list_methods():
        cls = get_method_class(name)
        settings = [r for r in c["rows"] if r["method"] == name]
        assert settings and settings[0]["label"].startswith("default") and settings[0]["hparams"] == {}
        if any(f == "retain" for f in cls.__dataclass_fields__):  # budgets through retain
            budgets = {r["hparams"].get("retain") for r in settings}
            assert {0.25, 0.1} <= budgets | {getattr(cls(), "retain", None)}
    # random's default is retain=0.25: run once, both labels kept
    assert [r["label"] for r in c["rows"] if r["method"] == "random"][0] == "default = budget 0.25"
    vit, _ = _rows(data, "tiny-vit-timm")
    assert [r["settings"] for r in vit["rows"] if r["method"] == "tome"] == ["r=2"]
    assert {s["method"] for s in vit["skipped"]} == {m for m in vtok.list_methods() if "in_vit" not in get_method_class(m).stages}


def test_untouched_row_is_the_reference(quick):
    _, data = quick
    for c in data["cases"]:
        ref = c["rows"][0]
        assert ref["role"] == "untouched" and ref["flops_ratio"] == 1.0
        for key in ("ttft_ratio", "ideal_ratio", "vs_ideal", "decode_ratio", "peak_ratio", "speedup"):
            assert ref[key]["median"] == 1.0, key
        assert ref["overhead_pct"]["median"] == 0.0
        assert c["untouched"]["ttft_ms"]["n"] == 2 * (len(c["rows"]) - 1)  # two rounds per timed setting
        assert c["rows"][1]["role"] == "control" and c["rows"][1]["ideal_stacks"] == list(c["rows"][0]["lengths"])


def test_ratios_ideal_and_overhead_follow_from_the_raw_timings(quick):
    _, data = quick
    checked = 0
    for c in data["cases"]:
        for r in c["rows"][1:]:
            assert len(r["rounds"]) == 2
            for i, rd in enumerate(r["rounds"]):
                u, m = rd["untouched_ms"], rd["method_ms"]
                ideal = u + sum(rd["replay_ms"][s] - rd["untouched_stacks_ms"][s] for s in r["ideal_stacks"])
                assert set(rd["replay_ms"]) == set(r["ideal_stacks"])
                assert r["ttft_ratio"]["samples"][i] == pytest.approx(m / u)
                assert r["ideal_ratio"]["samples"][i] == pytest.approx(ideal / u)
                assert r["vs_ideal"]["samples"][i] == pytest.approx(m / ideal)
                assert r["overhead_ms"]["samples"][i] == pytest.approx(m - ideal)
                assert r["overhead_pct"]["samples"][i] == pytest.approx(100 * (m - ideal) / u)
                assert r["speedup"]["samples"][i] == pytest.approx(u / m)
                checked += 1
            for key in ("ttft_ratio", "ideal_ratio", "overhead_pct"):
                s = r[key]
                assert s["median"] == pytest.approx(statistics.median(s["samples"]))
                assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
    assert checked > 10


def test_lengths_flops_and_stacks_per_stage(quick):
    _, data = quick
    c, rows = _rows(data, "tiny-llava")
    ref = c["rows"][0]
    full_llm, full_vit = ref["lengths"]["llm"], ref["lengths"]["vision"]
    n = ref["visual_entry"]
    for r in c["rows"][2:]:
        stages = get_method_class(r["method"]).stages
        if "projector" in stages:  # tokenflex's default keeps a 4x4 grid whole: its own projector only
            reduced = r["visual_entry"] < n
            assert r["ideal_stacks"] == (["llm"] if reduced else []) and r["lengths"]["vision"] == full_vit
            assert r["lengths"]["llm"] == [x - (n - r["visual_entry"]) for x in full_llm]
            assert (r["flops_ratio"] < 1) == reduced
            continue
        assert 0 < r["flops_ratio"] < 1
        ev = r["events"]
        assert ev and all(e["method"] == r["method"] for e in ev)
        if "in_llm" in stages:  # full length up to each stage layer, reduced from it on; only the LLM is replayed
            expect = list(full_llm)
            for e in ev:  # a before_llm stage (ToDRE's first) reduces from layer 0 on
                removed = e["tokens_in"][0] - e["tokens_out"][0]
                layer = e["layer"] if e["stage"] == "in_llm" else 0
                expect = expect[:layer] + [x - removed for x in expect[layer:]]
            assert r["lengths"]["llm"] == expect
            entry = n if "before_llm" not in stages else next(e["tokens_out"][0] for e in ev if e["stage"] == "before_llm")
            assert r["ideal_stacks"] == ["llm"] and r["visual_entry"] == entry
            retain = {**get_method_class(r["method"])().config(), **r["hparams"]}.get("retain")
            if retain is not None:  # a data-dependent later stage (ToDRE's drop) may leave fewer
                cls = get_method_class(r["method"])
                assert (r["visual_final"] <= keep_count(n, retain)) if cls.stage_off else (r["visual_final"] == keep_count(n, retain))
        elif "before_llm" in stages:
            assert r["ideal_stacks"] == ["llm"] and r["lengths"]["vision"] == full_vit
            assert r["lengths"]["llm"] == [x - (n - r["visual_entry"]) for x in full_llm]
        elif "in_vit" in stages:
            assert r["ideal_stacks"] == ["vision", "llm"]
            # a merge at a block's input (in_vit_pre) shortens that block's attention already
            pre = callable(getattr(get_method_class(r["method"]), "in_vit_pre", None))
            first = r["lengths"]["vision"][0]
            assert (first < full_vit[0] if pre else first == full_vit[0]) and r["lengths"]["vision"][-1] < full_vit[-1]
        if r["method"] == "random" and "retain" in r["hparams"]:
            assert r["visual_entry"] == keep_count(n, r["hparams"]["retain"])


def test_markdown_json_and_plot_written(quick):
    out, data = quick
    md = (out / "bench.md").read_text()
    assert (out / "bench_pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| method | settings | budget | visual tokens → LLM (→ last layer) | FLOPs | TTFT | ideal TTFT |" in md
    assert "| tome | r=2 |" in md and "Not run: fastv (default)" in md
    for c in data["cases"]:
        assert f"### {c['name']}:" in md
        assert md.count("| untouched (A/A) |") == len(data["cases"])
    assert [t["target"][:15] for t in data["targets"]] == [t["target"][:15] for t in bench.targets(data)]
    assert "| target | measured | met |" in md
    assert data["meta"]["clock"] == "cpu" and data["meta"]["repeats"] == 2


def test_plot_takes_accuracy_from_a_vtok_eval_run(quick, tmp_path):
    _, data = quick
    res = {"dataset": "synthetic-llava", "rows": [{"method": "full", "settings": "-", "accuracy": 1.0},
                                                  {"method": "fastv", "settings": "retain=0.25", "accuracy": 0.5}]}  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(res))
    paths = bench.write(json.loads(json.dumps(data)), tmp_path)  # results.json found in the folder
    assert paths["plot"].exists()
    written = json.loads(paths["json"].read_text())
    assert written["meta"]["accuracy_from"].endswith("results.json")
    acc = bench.load_accuracy(tmp_path / "results.json")
    assert acc["values"][("untouched", "-")] == 1.0 and acc["values"][("fastv", "retain=0.25")] == 0.5


def test_per_block_r_reaches_the_budget_within_each_blocks_limit():
    # offline VLM: DINOv2 ViT-S/14, 12 blocks, CLS + 256 patches (CLS protected, dropped before the LLM)
    for budget, target in ((0.25, 64), (0.10, 26)):
        assert keep_count(256, budget) == target
        r, left = bench.per_block_r(12, 257, 256, target)
        assert left == target and sum(r) == 256 - target and max(r) - min(r) <= 1
    # a tiny tower where the limit bites: block 0 may merge 8 of 16, block 1 then 4 of 8
    assert bench.per_block_r(2, 17, 16, 4) == ([8, 4], 4)
    r, left = bench.per_block_r(2, 17, 16, 2)
    assert r == [8, 4] and left == 4  # cannot go lower: reported, not hidden
    assert bench.per_block_r(3, 10, 10, 10) == ([0, 0, 0], 10)


def test_replay_runs_untouched_blocks_at_the_methods_lengths(one_thread):
    from vtok.testing import TINY_CASES

    case = TINY_CASES["llava"]
    model = case.build()
    inputs = case.batch(case.make_samples(model, case.specs[:1]))
    inputs.pop("position_ids")
    c = bench.Case("t", "vlm", model, inputs, "tiny")
    stacks = bench.model_stacks(model)
    base = bench._capture(c, stacks)
    with vtok.apply(model, "tome", r=[6, 4]) as h:
        cap = bench._capture(c, stacks, h)
    fns = bench._replay(c, stacks, cap, ["vision", "llm"])
    seen = {name: [] for name in stacks}
    hooks = [b.register_forward_pre_hook(lambda m, a, kw, name=name: seen[name].append(bench._hidden(a, kw)[1].shape[1]),
                                         with_kwargs=True) for name, blocks in stacks.items() for b in blocks]  # fmt: skip
    try:
        assert not hasattr(model, "_vtok_handle")
        for fn in fns.values():
            fn()
    finally:
        for hk in hooks:
            hk.remove()
    share = bench.attention_share(model)
    vin = [x.n_in for x in cap.calls["vision"]]
    vout = [x.n_out for x in cap.calls["vision"]]
    assert vin == [17, 11] and vout == [11, 7]
    assert seen["vision"] == [o + round(share * (i - o)) for i, o in zip(vin, vout)]
    n_text = base.calls["llm"][0].n_in - 16
    assert seen["llm"] == [n_text + 6] * 4  # 17 -> 7 tokens, 6 visual (CLS dropped), at every layer


def test_gpu_mode_builds_the_real_classes_at_toy_shapes(one_thread):
    """CPU counterpart of test_gpu_mode_on_cuda: the model-building path of GPU mode."""
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

    from vtok.eval.flops import visual_layout

    builders = bench.gpu_cases("cpu", tiny=True)
    kinds = [LlavaOnevisionForConditionalGeneration, LlavaForConditionalGeneration, CLIPVisionModel]
    for build, cls in zip(builders, kinds):
        case = build()
        assert isinstance(case.model, cls)
        assert case.model.config._attn_implementation == "sdpa"
        with torch.no_grad():
            out = case.forward()
        assert out is not None
        if case.kind == "vlm":  # as many placeholders as the model's own layout makes features
            cfg = case.model.config
            video = "pixel_values_videos" in case.inputs
            n = visual_layout(cfg, images=0, frames=2)[2] if video else visual_layout(cfg, images=1)[2]
            assert int((case.inputs["input_ids"] == (cfg.video_token_id if video else cfg.image_token_id)).sum()) == n
    res = bench.run_case(builders[0](), bench.Options(repeats=1, warmup=0, new_tokens=2, methods=["pool"], control=False))
    assert [r["method"] for r in res["rows"]] == ["untouched", "pool", "pool", "pool"]
    assert all(r["ttft_ratio"] for r in res["rows"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CPU counterpart: the toy-shape test above)")
def test_gpu_mode_on_cuda():
    res = bench.run_case(bench.gpu_cases("cuda", tiny=True)[0](),
                         bench.Options(repeats=1, warmup=1, new_tokens=2, methods=["fastv"]))  # fmt: skip
    rows = [r for r in res["rows"] if r["role"] == "method"]
    assert rows and all(r["ideal_ratio"] and math.isfinite(r["overhead_pct"]["median"]) for r in rows)

"""vtok.eval.flops: the analytic count equals FlopCounterMode on every tiny adapter case, with and without
every method that case supports; full-size configs on the meta device; the FastV convention; layouts."""

from __future__ import annotations

import pytest
import torch
from conftest import supported_pairs, tiny_model, tiny_processor

import vtok
from vtok.eval import flops
from vtok.method import get_method_class
from vtok.testing import TINY_CASES

TOL = 0.01  # acceptance: within 1% (the count is exact on every case so far)


def _batch(case_name, seed=0):
    case = TINY_CASES[case_name]
    model = tiny_model(case_name)
    return model, case.batch(case.make_samples(model, case.specs, seed))


def _attach(model, method, case_name):
    if method is None:
        return None
    cls = get_method_class(method)
    return vtok.apply(model, cls(**cls.example), processor=tiny_processor(case_name))


CASES = [pytest.param(c, None, id=f"{c}-none") for c in TINY_CASES] + supported_pairs()


@pytest.mark.parametrize("case_name,method", CASES)
def test_exact_equals_flop_counter(case_name, method):
    model, batch = _batch(case_name)
    handle = _attach(model, method, case_name)
    try:
        try:  # one forward: FlopCounterMode around count's own forward
            report, reference = flops.counted(flops.count, model, handle, **batch)
        except flops.UnsupportedModel as e:
            pytest.skip(f"no FLOPs formula for {case_name}: {e}")
        if method is not None and TINY_CASES[case_name].kind == "vlm":
            assert handle.stats, "the method reduced nothing; the comparison would not test the reduced count"
    finally:
        if handle is not None:
            handle.remove()
    assert reference > 0
    assert abs(report.total - reference) <= TOL * reference, (report.parts, reference)
    assert report.total == sum(report.parts.values())


def test_generate_decode_steps():
    """Tracker over generate and count(output_tokens=R, logits_to_keep=1) both equal FlopCounterMode's generate
    (per-layer KV lengths after in-LLM pruning)."""
    model, batch = _batch("llava")
    handle = _attach(model, "fastv", "llava")
    r = 3
    try:
        def gen():
            return model.generate(**batch, max_new_tokens=r, min_new_tokens=r, do_sample=False, pad_token_id=0)

        with flops.Tracker(model, handle) as tracker:
            _, reference = flops.counted(gen)
        (tracked,) = tracker.reports()
        analytic = flops.count(model, handle, output_tokens=r, logits_to_keep=1, **batch)
    finally:
        if handle is not None:
            handle.remove()
    assert tracker.records[0].decode_steps == [1] * (r - 1)
    assert tracked.total == analytic.total
    assert abs(tracked.total - reference) <= TOL * reference
    assert tracked.parts["decode"] > 0 and tracked.parts["lm_head"] > 0


def test_per_sample_equals_single_runs():
    """per_sample is each sample's own work: equal to counting that sample alone (LLaVA-1.5: equal images)."""
    case = TINY_CASES["llava"]
    model = tiny_model("llava")
    samples = case.make_samples(model, case.specs)
    with vtok.apply(model, "fastv", layer=2, retain=0.5) as handle:
        report = flops.count(model, handle, **case.batch(samples))
        alone = [flops.count(model, handle, **case.batch([s])).total for s in samples]
        summed = flops.count(model, handle, padded=False, **case.batch(samples))
    assert report.sample_totals == alone
    assert summed.total == sum(alone) <= report.total  # padding only adds work
    assert report.llm_padded[0] > report.llm_padded[-1]
    assert report.visual_final == [e // 2 for e in report.visual_entry]


def test_causal_skip_counts_the_triangle():
    model, batch = _batch("llava")
    dense = flops.count(model, **batch)
    tri = flops.count(model, causal_skip=True, **batch)
    s = flops.model_spec(model).llm
    b, n = batch["input_ids"].shape
    saved = s.layers * b * 4 * s.heads * s.head_dim * (n * n - n * (n + 1) // 2)
    assert dense.parts["prefill"] - tri.parts["prefill"] == saved
    assert dense.parts["vision"] == tri.parts["vision"]


def test_fastv_convention_formula():
    d, m, layers = 4096, 11008, 32
    n = 576 + 64

    def f(x):
        return 4 * x * d * d + 2 * x * x * d + 2 * x * d * m

    full = flops.estimate("llava-1.5-7b", text_tokens=64, convention="fastv")
    pruned = flops.estimate("llava-1.5-7b", text_tokens=64, convention="fastv", method=("fastv", {"layer": 2, "retain": 0.5}))
    assert full.total == layers * f(n)
    assert pruned.total == 2 * f(n) + (layers - 2) * f(n - 288)
    # HoliTom's decode term for R output tokens
    r = 10
    dec = flops.estimate("llava-1.5-7b", text_tokens=64, convention="fastv", output_tokens=r).parts["decode"]
    assert dec == pytest.approx(layers * (r * (4 * d * d + 2 * d * m) + 2 * d * (r * n + r * (r + 1) / 2)))


def test_full_size_configs_on_meta_device():
    expected = {"llava-1.5-7b": 7.06e9, "llava-next-7b": 7.06e9, "llava-onevision-7b": 8.03e9}
    for name, params in expected.items():
        model = flops.meta_model(name)
        assert next(model.parameters()).device.type == "meta"
        assert flops.spec_mismatches(model) == []
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.01)
        report = flops.estimate(name, text_tokens=64, output_tokens=16)
        assert report.parts["vision"] > 0 and report.parts["prefill"] > 0 and report.parts["decode"] > 0
    ex = flops.estimate("llava-1.5-7b", text_tokens=64)
    fv = flops.estimate("llava-1.5-7b", text_tokens=64, method=("fastv", {"layer": 2, "retain": 0.5}))
    assert fv.llm_tokens[1] == [640] and fv.llm_tokens[2] == [352]
    assert 0.5 < fv.total / ex.total < 0.65


def test_full_size_layouts():
    cfg = flops.full_size_config
    assert flops.visual_layout(cfg("llava-1.5-7b"), images=2) == (2, 1152, 1152)
    assert flops.visual_layout(cfg("llava-next-7b"), image_size=(672, 672)) == (5, 2880, 2928)
    assert flops.visual_layout(cfg("llava-onevision-7b"), image_size=(672, 672)) == (5, 3645, 3699)
    assert flops.visual_layout(cfg("llava-onevision-7b"), images=0, frames=32) == (32, 23328, 32 * 196 + 1)


@pytest.mark.parametrize("case_name", [c for c in ("llava_next", "llava_onevision") if c in TINY_CASES])
def test_layouts_match_the_real_processor(case_name):
    case = TINY_CASES[case_name]
    model = tiny_model(case_name)
    ids = torch.tensor(flops.model_spec(model).placeholder_ids)
    for size in [(40, 70), (200, 37), (99, 1745), (1745, 99)]:  # last two: ~nothing left unpadded
        batch = case.batch(case.make_samples(model, [(2, [size], 2)]))
        with flops.Tracker(model) as tracker, torch.no_grad():
            model(**batch)
        crops, rows, tokens = flops.visual_layout(model.config, image_size=size)
        assert tokens == int(torch.isin(batch["input_ids"], ids).sum()), size
        assert crops == sum(c[0] for c in tracker.records[0].vision_calls), size
        assert rows == tracker.records[0].projector_rows, size


def test_errors_are_clear():
    model, batch = _batch("llava")
    with pytest.raises(ValueError, match="convention"):
        flops.count(model, convention="macs", **batch)
    with pytest.raises(ValueError, match="needs the model's inputs"):
        flops.count(model)
    with pytest.raises(flops.UnsupportedModel, match="no formula"):
        flops.model_spec(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown full-size config"):
        flops.estimate("llava-13b")
    with pytest.raises(ValueError, match="output_tokens"):
        flops.estimate("llava-1.5-7b", output_tokens=-1)


@pytest.mark.parametrize("case_name", ["llava", "clip_vision"])
def test_tracker_keeps_every_event_across_batches(case_name):
    """One handle, one Tracker per batch: every batch has the same shapes, so the same count. The Tracker
    once told old events from new ones by id(); CPython reuses the ids of freed events, and in_vit events
    went missing at random from the second batch on."""
    model, batch = _batch(case_name)
    cls = get_method_class("tome")
    parts = []
    with vtok.apply(model, cls(**cls.example)) as handle:
        for _ in range(6):
            with flops.Tracker(model, handle) as tracker, torch.no_grad():
                model(**batch)
            (report,) = tracker.reports()
            parts.append(report.parts)
            assert len([e for e in handle.stats if e.stage == "in_vit"]) == len(tracker.records[-1].events)
    assert all(p == parts[0] for p in parts)

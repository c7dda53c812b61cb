"""Core bugs of the spine, each pinned by a test: probe/stage layer order, stages that remove nothing,
nested model calls from inside a hook, failed attaches, list-valued settings on the command line."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_model

import vtok
from vtok.testing import TINY_CASES
from vtok.method import LLMAttention, LLMView, Method, hparam


@dataclass
class TwoStages(Method):
    """Test method: in_llm stages at ``layers``; at each, keeps the first ``keep[i]`` visual tokens and
    records which LLM probes it was handed."""

    name = "two_stages"
    stages = ("in_llm",)

    layers: tuple = hparam((1, 3), "stage layers")
    keep: tuple = hparam((1.0, 0.5), "fraction kept at each stage")
    probe_layers: tuple = hparam((2,), "LLMAttention probe layers")
    position_policy: str = hparam("keep", "positions")

    def __post_init__(self):
        super().__post_init__()
        self.seen: list = []

    def probes(self):
        return [LLMAttention(layer=p, query="last") for p in self.probe_layers]

    def llm_layers(self):
        return list(self.layers)

    def in_llm(self, view: LLMView):
        self.seen.append((view.layer, sorted(p.layer for p in view.probes)))
        frac = self.keep[self.layers.index(view.layer)]
        return [torch.arange(max(1, int(idx.numel() * frac))) for idx in view.visual_index]


@dataclass
class LateProbeBeforeLLM(Method):
    name = "late_probe_before_llm"
    stages = ("before_llm",)

    def probes(self):
        return [LLMAttention(layer=2)]

    def before_llm(self, tokens, probes):
        return tokens


def _batch(case_name="llava", seed=0):
    case, model = TINY_CASES[case_name], tiny_model(case_name)
    batch = case.batch(case.make_samples(model, case.specs, seed))
    batch.pop("position_ids", None)
    return model, batch


@pytest.mark.parametrize("case_name", ["llava", "llava_next", "llava_onevision"])
def test_probe_between_stage_layers_reaches_the_later_stage_only(case_name):
    """A probe at a layer at or after the first stage layer used to be requested at every stage and
    raised 'not computed' at the first one."""
    model, batch = _batch(case_name)
    m = TwoStages(keep=(0.75, 0.5))
    with vtok.apply(model, m) as h, torch.no_grad():
        model(**batch)
        model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert m.seen[:2] == [(1, []), (3, [2])]
    assert [r.layer for r in h.stats] == [1, 3]


@pytest.mark.parametrize("case_name", ["llava", "llava_next", "llava_onevision"])
def test_stage_that_removes_nothing_then_a_probe(case_name):
    """After a stage that removes nothing the stored state was None and the next probe read .valid of it."""
    model, batch = _batch(case_name)
    m = TwoStages(keep=(1.0, 0.5))
    with vtok.apply(model, m) as h, torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
    first, second = h.stats
    assert first.tokens_in == first.tokens_out and all(b < a for a, b in zip(second.tokens_in, second.tokens_out))


def test_probe_layer_order_is_checked_at_apply():
    model = tiny_model("llava")
    before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    with pytest.raises(ValueError, match=r"probe at layer 3 .* last stage layer 3"):
        vtok.apply(model, TwoStages(layers=(1, 3), probe_layers=(3,)))
    with pytest.raises(ValueError, match=r"probe at layer 2 .* only to in_llm stages"):
        vtok.apply(model, LateProbeBeforeLLM())
    assert not hasattr(model, "_vtok_handle")
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == before


@dataclass
class CallsTheModel(Method):
    """Test method: before the LLM, calls the attached model on another input, then keeps every
    other token. ``inner`` is (model, kwargs); the nested call's logits are stored."""

    name = "calls_the_model"
    stages = ("before_llm",)
    position_policy: str = hparam("compact", "positions")

    def __post_init__(self):
        super().__post_init__()
        self.inner = None
        self.inner_logits = []

    def before_llm(self, tokens, probes):
        if self.inner is not None:
            model, kwargs = self.inner
            with torch.no_grad():
                self.inner_logits.append(model(**kwargs).logits)
        return tokens.select_indices([torch.arange(0, int(n), 2) for n in tokens.counts().tolist()])


@pytest.mark.parametrize("case_name", ["llava", "llava_next", "llava_onevision"])
def test_a_method_may_call_the_attached_model(case_name):
    """The nested call runs the untouched model; the outer call goes on as if it had not happened."""
    model, batch = _batch(case_name, seed=1)
    _, other = _batch(case_name, seed=2)
    with torch.no_grad():
        untouched_other = model(**other).logits
    plain = CallsTheModel()
    with vtok.apply(model, plain) as h, torch.no_grad():
        ref = model(**batch).logits
        ref_stats = [(r.tokens_in, r.tokens_out) for r in h.stats]
    nested = CallsTheModel()
    nested.inner = (model, other)
    with vtok.apply(model, nested) as h, torch.no_grad():
        out = model(**batch).logits
        gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
        stats = [(r.tokens_in, r.tokens_out) for r in h.stats]
    assert torch.equal(out, ref)
    assert stats == ref_stats
    torch.testing.assert_close(nested.inner_logits[0], untouched_other, atol=1e-6, rtol=1e-6)
    with vtok.apply(model, plain):
        ref_gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert torch.equal(gen, ref_gen)


def test_failed_attach_takes_off_what_it_installed(monkeypatch):
    model = tiny_model("llava")
    from vtok.adapters.llava import LlavaAdapter

    before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]

    def broken(self):
        raise RuntimeError("attach_vision failed")

    monkeypatch.setattr(LlavaAdapter, "attach_vision", broken)
    with pytest.raises(RuntimeError, match="attach_vision failed"):
        vtok.apply(model, "fastv", layer=2, retain=0.5)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == before
    assert not hasattr(model, "_vtok_handle")


def test_method_settings_take_list_and_tuple_literals():
    from vtok.eval.runner import parse_method

    assert parse_method("tome:r=[0,0,8,8]") == ("tome", {"r": [0, 0, 8, 8]})
    assert parse_method("tome:r=(8,-0.5),prop_attn=False") == ("tome", {"r": (8, -0.5), "prop_attn": False})
    assert parse_method("fastv:layer=2,retain=0.5,query='last'") == (
        "fastv",
        {"layer": 2, "retain": 0.5, "query": "last"},
    )
    assert parse_method("pool") == ("pool", {})
    with pytest.raises(ValueError, match="unbalanced"):
        parse_method("tome:r=[0,0")


def test_one_validator_for_every_method():
    import numpy as np

    from vtok.method import get_method_class

    Pool, Random, FastV = (get_method_class(n) for n in ("pool", "random", "fastv"))
    with pytest.raises(TypeError, match=r"pool: retain=True must be a number in \(0, 1\]"):
        Pool(retain=True)
    with pytest.raises(ValueError, match=r"random: seed=.* is out of range"):
        Random(seed=2**70)
    assert Random(retain=np.float32(0.5)).retain == 0.5  # real numbers of any library
    assert Random(retain=torch.tensor(0.25)).retain == 0.25
    assert isinstance(FastV(layer=np.int64(3)).layer, int)
    with pytest.raises(ValueError, match="query='first' is not one of"):
        FastV(query="first")
    m = Random(retain=0.5)
    with pytest.raises(ValueError, match="out of range"):
        m.retain = 2.0  # changed after construction: validated again
    assert "[a number in (0, 1]]" in vtok.describe("random") and "[an int >= 1]" in vtok.describe("fastv")


def test_a_grid_method_after_an_in_vit_merge_gets_the_unmerged_grid():
    """LLaVA unmerges the tower's merged tokens for a method that needs full grids (each patch takes its merged
    token's value); an adapter that cannot is refused at apply (checked on a stand-in)."""
    model = tiny_model("llava")
    case = TINY_CASES["llava"]
    batch = case.batch(case.make_samples(model, case.specs, 0))
    with vtok.apply(model, ["tome", "pool"], tome={"r": 2}, pool={"factor": 2}) as h, torch.no_grad():
        model(**batch)
    vit, pool = [r for r in h.stats if r.stage == "in_vit"], [r for r in h.stats if r.stage == "before_llm"]
    assert vit and sum(vit[-1].tokens_out) < sum(vit[0].tokens_in)
    assert pool[0].tokens_in == [16, 16, 32] and pool[0].tokens_out == [4, 4, 8]  # 4x4 grids, pooled 2x2
    from vtok.adapters.llava import LlavaAdapter

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LlavaAdapter, "unmerges_for_grids", False)
        with pytest.raises(ValueError, match="pool needs every image's full token grid, but tome merges"):
            vtok.apply(model, ["tome", "pool", "fastv"], tome={"r": 2}, pool={"factor": 2}, fastv={"retain": 0.5})
    assert not hasattr(model, "_vtok_handle")


def test_pool_an_empty_grid():
    """An AnyRes grid with nothing left after unpadding (a very tall image) pools to nothing, not an error."""
    from vtok.method import get_method_class

    for kw in ({"factor": 2}, {"retain": 0.25}):
        p = get_method_class("pool")(**kw)
        assert p.output_grid(3, 0) == (0, 0)
        feats, sizes, first = p._pool_grid(torch.zeros(2, 0, 4), 3, 0)
        assert feats.shape == (2, 0, 4) and sizes.numel() == 0 and first.numel() == 0

"""TransPrune: the paper's schedule on a LLaVA-1.5-shaped model, TTV from the model's own sub-blocks,
and the score on hand-made inputs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_model

import vtok
from vtok.hf_compat import output_cache
from vtok.method import AttentionScores, LLMView, Method, Transition, TransitionStats, get_method_class
from vtok.methods.transprune import transition_variation
from vtok.testing import TINY_CASES, llava_samples, tiny_llava

TransPrune = get_method_class("transprune")


def test_llava15_shaped_schedule_576_504_360_72_in_stats_and_cache():
    model = tiny_llava(image_size=336, patch=14, layers=32)  # 24x24 = 576 patches, 32 decoder layers
    case = TINY_CASES["llava"]
    batch = case.batch(llava_samples(model, [(3, 1, 5), (6, 1, 2)], seed=0))
    batch.pop("position_ids")
    with vtok.apply(model, "transprune") as h:  # the paper's defaults
        out = model.generate(**batch, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        steps = [(r.layer, r.tokens_in, r.tokens_out) for r in h.stats]
    assert steps == [(7, [576] * 2, [504] * 2), (9, [504] * 2, [360] * 2), (12, [360] * 2, [72] * 2)]
    cache = output_cache(out)
    lens = [cache.layers[i].get_seq_length() for i in range(32)]
    s = batch["input_ids"].shape[1]
    assert lens[:7] == [s + 1] * 7  # prompt + 1 decoded token (the last one is not cached yet)
    assert lens[7:9] == [s + 1 - 72] * 2 and lens[9:12] == [s + 1 - 216] * 3 and lens[12:] == [s + 1 - 504] * 20


def test_transition_variation_by_hand():
    torch.manual_seed(0)
    x, y = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    stats = torch.stack([x.square().sum(-1), y.square().sum(-1), (x * y).sum(-1)], -1)
    over = torch.ones(2, 5, dtype=torch.bool)
    over[1, 3:] = False  # a padded sample: the softmax runs over its real tokens only
    got = transition_variation(stats, over)
    for b in range(2):
        n = int(over[b].sum())
        m = y[b, :n].norm(dim=-1) / x[b, :n].norm(dim=-1)
        d = torch.nn.functional.cosine_similarity(x[b, :n], y[b, :n], dim=-1)
        torch.testing.assert_close(got[b, :n], m * torch.softmax(1 - d, 0), rtol=1e-5, atol=1e-6)
        assert not got[b, n:].any()


@dataclass
class _BothTransitions(Method):
    """Test method: reads Transition(1) both ways at layer 2 and keeps everything."""

    name = "_t_both_transitions"
    stages = ("in_llm",)
    position_policy = "keep"
    seen = {}  # noqa: RUF012  (class attribute, not a field)

    def probes(self):
        return [Transition(1), Transition(1, stats=True)]

    def llm_layers(self):
        return [2]

    def in_llm(self, view):
        type(self).seen = {"vec": view.probes[Transition(1)], "st": view.probes[Transition(1, stats=True)], "view": view}
        return [torch.arange(i.numel()) for i in view.visual_index]


def test_transition_stats_are_the_reductions_of_the_transition_vectors():
    case = TINY_CASES["llava"]
    model = tiny_model("llava")
    batch = case.batch(case.make_samples(model, case.specs, 0))
    with vtok.apply(model, _BothTransitions()):
        model(**batch)
    seen = _BothTransitions.seen
    vec, st, view = seen["vec"], seen["st"], seen["view"]
    assert isinstance(st, TransitionStats) and st.attn.shape[:2] == st.valid.shape
    for b, idx in enumerate(view.visual_index):
        for (xs, ys), got in (((vec.attn_in, vec.attn_out), st.attn), ((vec.mlp_in, vec.mlp_out), st.mlp)):
            x, y = xs[b].float(), ys[b].float()
            want = torch.stack([x.square().sum(-1), y.square().sum(-1), (x * y).sum(-1)], -1)
            torch.testing.assert_close(got[b, idx], want, rtol=1e-5, atol=1e-5)
    assert bool(st.valid[~st.visual].any())  # the text tokens are there too (TTV's softmax needs them)


def _view(layer, n_vis, stats_by_layer, iga, n0=None):
    s = n_vis + 2
    valid = torch.ones(1, s, dtype=torch.bool)
    visual = torch.zeros(1, s, dtype=torch.bool)
    visual[0, 1 : 1 + n_vis] = True
    orig = torch.arange(s)[None]
    probes = {
        Transition(layer_, stats=True): TransitionStats(a, m, valid, visual, orig) for layer_, (a, m) in stats_by_layer.items()
    }
    per_key = torch.zeros(1, s)
    per_key[0, 1 : 1 + n_vis] = iga
    view = LLMView(
        layer, torch.zeros(1, s, 4), valid, visual, [torch.arange(1, 1 + n_vis)], probes, positions=orig,
        orig_index=orig, text_after=~visual & (orig > n_vis), state={} if n0 is None else {"n0": n0},
        attend=lambda q: AttentionScores(per_key, per_key.sum(1), orig, valid),
    )  # fmt: skip
    return view


def _stats(magnitudes, cosines, n_text=2):
    """(attn, mlp) stats giving these magnitudes/cosines at the visual tokens (text: m = 1, cos = 1)."""
    m = torch.tensor([1.0] + list(magnitudes) + [1.0])
    c = torch.tensor([1.0] + list(cosines) + [1.0])
    st = torch.stack([torch.ones_like(m), m.square(), m * c], -1)[None]
    return st, st * torch.tensor([1.0, 0.0, 0.0])  # mlp: output 0 (no transition)


def test_score_is_alpha_ttv_plus_iga_and_keeps_the_stage_ratio_of_the_original_count():
    m = TransPrune(layers=(3, 5), ratios=(0.5,), retain=0.25, accumulate=(1, 4), alpha=0.5)
    m.bind({"llm_layers": 8})
    assert [p.layer for p in m.probes()] == [1, 2, 3, 4]
    # 8 visual tokens: token 6 transitions most; the instruction looks at token 1 most
    a, mlp = _stats([1, 1, 1, 1, 1, 1, 3, 1], [1, 1, 1, 1, 1, 1, -1, 1])
    iga = torch.tensor([0.0, 0.9, 0.02, 0.02, 0.02, 0.02, 0.02, 0.0])
    view = _view(3, 8, {1: (a, mlp), 2: (a, mlp)}, iga)
    kept = m.in_llm(view)[0].tolist()
    assert len(kept) == 4 and {1, 6} <= set(kept)
    # by hand: TTV summed over layers 1, 2 (< 3), normalised; IGA normalised; equal weights
    ttv = 2 * transition_variation(a, torch.ones(1, 10, dtype=torch.bool))[0, 1:9]
    score = 0.5 * ttv / ttv.sum() + 0.5 * iga / iga.sum()
    assert kept == sorted(torch.sort(-score, stable=True).indices[:4].tolist())
    # the second stage keeps 0.25 of the ORIGINAL 8, whatever entered it
    view2 = _view(5, 4, {layer: _stats([1] * 4, [1] * 4) for layer in (1, 2, 3, 4)}, torch.ones(4), n0=view.state["n0"])
    assert m.in_llm(view2)[0].numel() == 2


def test_no_instruction_gives_no_nan():
    m = TransPrune(layers=(3,), ratios=(), retain=0.5, accumulate=(1, 2))
    m.bind({"llm_layers": 8})
    a, mlp = _stats([1, 2, 3, 4], [1, 0, 1, 0])
    view = _view(3, 4, {1: (a, mlp), 2: (a, mlp)}, torch.zeros(4))
    assert m.in_llm(view)[0].tolist() == [1, 3]  # TTV alone decides (cos 0: more change, bigger magnitude)


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="one fraction in"):
        TransPrune(layers=(7, 9, 12), ratios=(0.5,))
    with pytest.raises(ValueError, match="increasing ints"):
        TransPrune(layers=(9, 7), ratios=(0.5,))
    assert TransPrune(layers=[7, 9], ratios=[0.5]).layers == (7, 9)  # lists from a config or the CLI
    assert TransPrune(retain=0.9).schedule() == [0.9, 0.9, 0.9]  # earlier ratios never below the final one

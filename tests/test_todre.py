"""ToDRE: spec tests of its two stages on hand-made inputs, and its stages on a real (tiny) LLaVA."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import vtok
from vtok.method import AttentionScores, LLMAttention, LLMView, ViTAttention, get_method_class
from vtok.testing import TINY_CASES
from vtok.tokens import VisualTokens

ToDRE = get_method_class("todre")
CLS = ViTAttention(layer=-1, kind="cls")


def _bound(**kw):
    m = ToDRE(**kw)
    m.bind({"llm_layers": 32, "vision_cls": True})
    return m


def _greedy_by_hand(x, k, pivot, mode):
    """The paper's Algorithm 1 (max-sum) / Gonzalez (k-center), one python loop over plain cosines."""
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    cos = xn @ xn.T
    chosen = [pivot]
    while len(chosen) < k:
        rest = [i for i in range(x.shape[0]) if i not in chosen]
        if mode == "maxsum":
            chosen.append(min(rest, key=lambda i: (float(cos[i, chosen].sum()), i)))
        else:
            chosen.append(max(rest, key=lambda i: (float((1 - cos[i, chosen]).min()), -i)))
    return chosen


@pytest.mark.parametrize("mode", ["maxsum", "kcenter"])
def test_stage1_picks_the_cls_pivot_then_the_least_similar_tokens(mode):
    torch.manual_seed(0)
    n, k = 24, 6
    feats = torch.randn(1, n, 16)
    cls_row = torch.rand(1, n)
    cls_row[0, 13] = 5.0  # the pivot
    tokens = VisualTokens.from_features(feats, torch.tensor([0]), grid=(4, 6))
    out = _bound(retain=k / n, diversity=mode).before_llm(tokens, {CLS: cls_row})
    want = _greedy_by_hand(feats[0], k, 13, mode)
    assert 13 in out.positions[0].tolist()
    assert out.positions[0].tolist() == sorted(want)  # kept in raster order
    assert torch.equal(out.features[0], feats[0, sorted(want)])


def test_maxsum_and_kcenter_differ_where_the_rules_differ():
    # pivot 0; a tight cluster {1, 2} far from 0 and a token 3 at a middle distance: k-center takes the
    # farthest (the cluster), then 3; max-sum takes the cluster's first, then still prefers ...
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.05], [-1.0, -0.05], [0.0, 1.0]])
    tokens = VisualTokens.from_features(x[None], torch.tensor([0]))
    cls_row = torch.tensor([[9.0, 0.0, 0.0, 0.0]])
    for mode in ("maxsum", "kcenter"):
        got = _bound(retain=0.75, diversity=mode).before_llm(tokens, {CLS: cls_row}).positions[0].tolist()
        assert got == sorted(_greedy_by_hand(x, 3, 0, mode)), mode


def test_anyres_pivot_comes_from_the_base_image():
    torch.manual_seed(1)
    feats = torch.randn(1, 10, 8)
    tokens = VisualTokens.from_features(feats, torch.tensor([0]))
    tokens.extra["crop"] = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2]])
    cls_row = torch.zeros(1, 10)
    cls_row[0, 2] = 1.0
    cls_row[0, 8] = 9.0  # highest overall, but in a crop
    m = _bound(retain=0.1)
    assert m._pivots(tokens, {CLS: cls_row}).tolist() == [2]
    assert m.before_llm(tokens, {CLS: cls_row}).positions[0].tolist() == [2]


def test_budget_is_per_image_and_ragged_units_keep_their_share():
    torch.manual_seed(2)
    feats = torch.randn(3, 20, 8)
    tokens = VisualTokens.from_features(feats, torch.tensor([0, 0, 1]))
    tokens.mask[1, 10:] = False  # a unit of 10 tokens
    out = _bound(retain=0.25).before_llm(tokens, {CLS: torch.rand(3, 20)})
    assert out.counts().tolist() == [5, 3, 5]
    alone = _bound(retain=0.25).before_llm(
        VisualTokens.from_features(feats[2:], torch.tensor([0])), {CLS: torch.rand(3, 20)[2:] * 0 + 1}
    )
    assert alone.counts().tolist() == [5]


def _view(t2v, v2t, n_vis=4, text_after=True):
    """One layer-9 view of B samples: [text, 4 visual, text x2]; stage 2 reads the probes of layer 8."""
    b = len(t2v)
    s = 1 + n_vis + 2
    visual = torch.zeros(b, s, dtype=torch.bool)
    visual[:, 1 : 1 + n_vis] = True
    valid = torch.ones(b, s, dtype=torch.bool)
    after = torch.zeros(b, s, dtype=torch.bool)
    if text_after:
        after[:, 1 + n_vis :] = True
    orig = torch.arange(s).expand(b, s)
    v_per_key = torch.zeros(b, s)
    v_per_key[:, 1 + n_vis] = torch.tensor(v2t)  # visual rows' mass on the first question token
    v_per_key[:, 1 : 1 + n_vis] = ((1 - torch.tensor(v2t)) / n_vis)[:, None]
    probes = {
        LLMAttention(8, "instruction"): AttentionScores(torch.zeros(b, s), torch.tensor(t2v), orig, valid),
        LLMAttention(8, "visual"): AttentionScores(v_per_key, torch.zeros(b), orig, valid),
    }
    return LLMView(
        9, torch.zeros(b, s, 4), valid, visual, [torch.arange(1, 1 + n_vis)] * b, probes,
        positions=orig, orig_index=orig, text_before=valid & ~visual & ~after, text_after=after,
    )  # fmt: skip


def test_stage2_drops_every_visual_token_of_a_sample_whose_shares_fell_below_tau():
    m = _bound(tau=0.10, check_layer=8)
    kept = m.in_llm(_view([0.05, 0.30, 0.09], [0.0, 0.0, 0.2]))
    assert [k.numel() for k in kept] == [0, 4, 4]  # per sample: the 2nd's text still looks, the 3rd's visual rows do
    assert [k.numel() for k in m.in_llm(_view([0.05], [0.0], text_after=False))] == [4]  # no question: keeps


def test_stage2_layers_scale_with_depth_and_stop_before_the_last_layer():
    m = _bound()
    assert m.llm_layers() == [29, 30, 31]  # checks at 28 (= 7*32/8), 29, 30
    assert {p.layer for p in m.probes() if isinstance(p, LLMAttention)} == {28, 29, 30}
    m.recheck = False
    assert m.llm_layers() == [29]
    m.bind({"llm_layers": 4, "vision_cls": False})
    m.recheck = True
    assert m.llm_layers() == [3] and CLS not in m.probes()  # 7*4/8 = 3 is the last layer: ℓ = L - 2
    with pytest.raises(ValueError, match="check_layer=3 leaves no later layer"):
        ToDRE(check_layer=3).bind({"llm_layers": 4})


def test_both_stages_on_llava_and_the_stats_show_each_step():
    case = TINY_CASES["llava"]
    model = tiny_model("llava")
    batch = case.batch(case.make_samples(model, case.specs, 0))
    with vtok.apply(model, "todre", retain=0.5, check_layer=1, tau=1.0) as h:
        model(**batch)
        steps = [(r.stage, r.layer, r.tokens_in, r.tokens_out) for r in h.stats]
    n = 16  # tiny CLIP: 16 patches per image
    first = [(s, layer) for s, layer, _, _ in steps]
    assert first[0] == ("before_llm", None) and all(s == "in_llm" for s, _ in first[1:])
    assert steps[0][2] == [n, n, 2 * n] and steps[0][3] == [n // 2, n // 2, n]  # the last sample has 2 images
    assert steps[1][1] == 2 and all(o == 0 for o in steps[1][3])  # tau = 1: every sample drops at layer 2


def test_tome_then_todre_compose():
    case = TINY_CASES["llava"]
    model = tiny_model("llava")
    batch = case.batch(case.make_samples(model, case.specs, 0))
    with vtok.apply(model, ["tome", "todre"], tome={"r": 2}, todre={"retain": 0.5, "check_layer": 1}) as h:
        out = model(**batch)
        stages = [r.stage for r in h.stats]
    assert torch.isfinite(out.logits).all()
    assert stages[0] == "in_vit" and "before_llm" in stages and "in_llm" in stages


def test_one_instance_on_two_differently_shaped_models_is_refused():
    a, b = tiny_model("llava"), tiny_model("llava_siglip")
    m = ToDRE(check_layer=1)
    with vtok.apply(a, m):
        with pytest.raises(ValueError, match="attached to another model of a different shape"):
            vtok.apply(b, m)
    with vtok.apply(b, m):  # once the first attachment is gone the instance may move
        assert m.dims["vision_cls"] is False

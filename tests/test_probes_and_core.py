"""Probes against eager attention maps, VisualTokens helpers, composition and before_llm semantics."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_model

import vtok
from vtok.kernels import merge_weighted
from vtok.method import LLMAttention, Method, TextQuery, ViTAttention
from vtok.testing import TINY_CASES
from vtok.tokens import VisualTokens


@pytest.fixture(scope="module")
def llava():
    return tiny_model("llava")


@pytest.fixture(scope="module")
def eager(llava):
    m = copy.deepcopy(llava)
    m.set_attn_implementation("eager")
    return m


def batch_of(model, specs, seed=0):
    case = TINY_CASES["llava"]
    return case.batch(case.make_samples(model, specs, seed))


@dataclass
class Recorder(Method):
    """Keeps everything; records the probes it was served."""

    name = "recorder"
    stages = ("before_llm", "in_llm")
    wanted: tuple = ()

    def probes(self):
        return list(self.wanted)

    def before_llm(self, tokens, probes):
        self.before = {"tokens": tokens, "probes": probes}
        return tokens

    def llm_layers(self):
        return [2]

    def in_llm(self, view):
        self.view = view
        return [torch.arange(i.numel()) for i in view.visual_index]


def test_llm_attention_rows_match_eager_maps(llava, eager):
    batch = batch_of(llava, [(3, 1, 4), (9, 1, 2)])
    rec = Recorder(wanted=(LLMAttention(layer=1, query="last"), LLMAttention(layer=1, query="mean")))
    with vtok.apply(llava, rec):
        with torch.no_grad():
            llava(**batch)
    with torch.no_grad():
        att = eager(**batch, output_attentions=True).attentions[1].mean(1)  # [B, S, S] eager, head mean
    mask = batch["attention_mask"].bool()
    last = rec.view.probes[LLMAttention(1, "last")]
    torch.testing.assert_close(last.per_key, att[:, -1], atol=1e-5, rtol=1e-4)
    mean = rec.view.probes[LLMAttention(1, "mean")]
    ref = (att * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(mean.per_key, ref, atol=1e-5, rtol=1e-4)
    assert llava.config.text_config._attn_implementation == "sdpa"


def _eager_query_set(att, rows):
    """Eager reference of a query set: head-averaged rows [B, S, S] averaged over the chosen rows."""
    w = rows.float()
    return (att * w[:, :, None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)


@pytest.mark.parametrize("query", ["text", "instruction", "visual", "mask"])
def test_llm_query_sets_match_eager_maps(llava, eager, query):
    """Declared probes of every query set (computed at their layer) and the on-demand ``view.attention`` at
    the stage layer both equal the eager attention maps averaged over that set's rows; the visual mass
    is the share of that attention on visual keys."""
    batch = batch_of(llava, [(3, 1, 4), (9, 1, 2)])
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    visual = ids == llava.config.image_token_id
    after = mask & ~visual & (torch.arange(ids.shape[1]) > torch.where(visual, torch.arange(ids.shape[1]), -1).max(1, keepdim=True).values)
    rows = {"text": mask & ~visual, "instruction": after, "visual": visual,
            "mask": mask & (torch.arange(ids.shape[1]) % 3 == 0)}[query]  # fmt: skip
    declared = () if query == "mask" else (LLMAttention(layer=1, query=query),)
    got = {}

    @dataclass
    class AtStage(Recorder):
        def in_llm(self, view):
            q = rows if query == "mask" else query
            got["stage"] = view.attention(q)
            got["view"] = view
            return super().in_llm(view)

    rec = AtStage(wanted=declared)
    with vtok.apply(llava, rec), torch.no_grad():
        llava(**batch)
    with torch.no_grad():
        att = eager(**batch, output_attentions=True).attentions
    if declared:
        res = got["view"].probes[declared[0]]
        ref = _eager_query_set(att[1].mean(1), rows)
        torch.testing.assert_close(res.per_key, ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(res.visual_mass, (ref * visual).sum(1), atol=1e-5, rtol=1e-4)
    ref2 = _eager_query_set(att[2].mean(1), rows)  # the stage is at layer 2: its own attention
    torch.testing.assert_close(got["stage"].per_key, ref2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["stage"].at(got["view"]), ref2, atol=1e-5, rtol=1e-4)
    v = got["view"]
    assert torch.equal(v.text_after, after) and torch.equal(v.text_before, mask & ~visual & ~after)
    assert torch.equal(v.last, torch.full((2,), ids.shape[1] - 1))


def test_vit_attention_probes_match_eager_maps(llava, eager):
    batch = batch_of(llava, [(3, 2, 4)])
    rec = Recorder(wanted=(ViTAttention(layer=0, kind="cls"), ViTAttention(layer=1, kind="colmean")))
    with vtok.apply(llava, rec):
        with torch.no_grad():
            llava(**batch)
    with torch.no_grad():
        att = eager.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions
    cls = rec.before["probes"][ViTAttention(0, "cls")]
    torch.testing.assert_close(cls, att[0].mean(1)[:, 0, 1:], atol=1e-5, rtol=1e-4)  # CLS dropped: "default"
    col = rec.before["probes"][ViTAttention(1, "colmean")]
    torch.testing.assert_close(col, att[1].mean(1).mean(1)[:, 1:], atol=1e-5, rtol=1e-4)
    assert cls.shape == (2, 16)


def test_text_query_probe(llava):
    batch = batch_of(llava, [(3, 1, 4), (9, 1, 2)])
    rec = Recorder(wanted=(TextQuery(),))
    with vtok.apply(llava, rec):
        with torch.no_grad():
            llava(**batch)
    (q0, e0), (q1, e1) = rec.before["probes"][TextQuery()]
    assert q0.numel() == 1 + 3 + 1 + 4 and q1.numel() == 1 + 9 + 1 + 2
    assert not torch.isin(q0, torch.tensor([llava.config.image_token_id, 0])).any()
    assert e0.shape == (q0.numel(), llava.config.text_config.hidden_size)


def test_before_llm_units_and_spans(llava):
    batch = batch_of(llava, [(3, 2, 4), (9, 1, 2)])
    rec = Recorder()
    with vtok.apply(llava, rec):
        with torch.no_grad():
            llava(**batch)
    t = rec.before["tokens"]
    assert t.owner.tolist() == [0, 0, 1] and t.grid == (4, 4)
    assert t.features.shape == (3, 16, llava.config.text_config.hidden_size)


def test_random_before_llm_equals_shorter_prompt(llava):
    """Compact policy: the model behaves as if the prompt held only the kept image tokens."""
    case = TINY_CASES["llava"]
    samples = case.make_samples(llava, [(3, 1, 4), (6, 2, 2)], 7)
    batch = case.batch(samples)
    batch.pop("position_ids")
    with vtok.apply(llava, "random", retain=0.5, seed=3) as h:
        gen = llava.generate(**batch, max_new_tokens=6, do_sample=False)
        kept = h.stats[0].kept
    emb = llava.get_input_embeddings()
    with torch.no_grad():
        feats = llava.model.get_image_features(batch["pixel_values"]).pooler_output
    rows, img = [], 0
    for b, s in enumerate(samples):
        ids = s["input_ids"]
        vis = ids == llava.config.image_token_id
        vis_idx = vis.nonzero().squeeze(1)
        keep = ~vis
        keep[vis_idx[kept[b]]] = True
        e = emb(ids).detach().clone()
        n_img = s["pixel_values"].shape[0]
        e[vis] = torch.cat([feats[img + j] for j in range(n_img)]).to(e.dtype)
        img += n_img
        rows.append(e[keep])
    n = max(r.shape[0] for r in rows)
    embeds = torch.stack([torch.cat([torch.zeros(n - r.shape[0], r.shape[1]), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(n - r.shape[0]), torch.ones(r.shape[0])]) for r in rows]).long()
    ref = llava.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(gen[:, -6:], ref[:, -6:])


def test_pool_factor_two_counts_and_values(llava):
    batch = batch_of(llava, [(3, 1, 4)])
    rec = Recorder()
    with vtok.apply(llava, "pool", factor=2) as h:
        with torch.no_grad():
            llava(**batch)
    assert h.stats[0].tokens_out == [4] and h.stats[0].kept is None
    t = VisualTokens.from_features(torch.arange(16.0).view(1, 16, 1), torch.tensor([0]), grid=(4, 4))
    out = vtok.method.get_method_class("pool")(factor=2).before_llm(t, {})
    assert out.features.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert out.sizes.flatten().tolist() == [4, 4, 4, 4]
    odd = VisualTokens.from_features(torch.arange(9.0).view(1, 9, 1), torch.tensor([0]), grid=(3, 3))
    out = vtok.method.get_method_class("pool")(factor=2).before_llm(odd, {})
    assert out.features.flatten().tolist() == [2.0, 3.5, 6.5, 8.0] and out.sizes.flatten().tolist() == [4, 2, 2, 1]
    assert rec.name == "recorder"


def test_compose_before_and_in_llm(llava):
    batch = batch_of(llava, [(3, 1, 4), (9, 1, 2)])
    with vtok.apply(llava, ["pool", "fastv"], pool={"factor": 2}, fastv={"layer": 2, "retain": 0.5}) as h:
        with torch.no_grad():
            llava(**batch)
        out = llava.generate(**{k: v for k, v in batch.items() if k != "position_ids"}, max_new_tokens=4)
    assert [(r.method, r.tokens_in, r.tokens_out) for r in h.stats] == [
        ("pool", [16, 16], [4, 4]),
        ("fastv", [4, 4], [2, 2]),
    ]
    assert out.shape[1] == batch["input_ids"].shape[1] + 4


def test_select_on_long_units_keeps_the_chosen_tokens():
    n = 300  # more tokens than a small integer type can count
    t = VisualTokens.from_features(torch.arange(n, dtype=torch.float32).view(1, n, 1), torch.tensor([0]))
    keep = torch.zeros(1, n, dtype=torch.bool)
    chosen = torch.tensor([5, 130, 255, 299])
    keep[0, chosen] = True
    s = t.select(keep)
    assert s.features[0, :, 0].tolist() == chosen.float().tolist() and s.positions[0].tolist() == chosen.tolist()


def test_visual_tokens_select_keeps_order_and_ragged():
    x = torch.arange(2 * 5 * 1.0).view(2, 5, 1)
    t = VisualTokens.from_features(x, torch.tensor([0, 1]))
    keep = torch.tensor([[1, 0, 1, 0, 1], [0, 1, 0, 0, 0]], dtype=torch.bool)
    s = t.select(keep)
    assert s.counts().tolist() == [3, 1]
    assert s.positions[0].tolist() == [0, 2, 4] and s.positions[1, 0] == 1
    assert s.features[0, :, 0].tolist() == [0, 2, 4] and s.features[1, 0, 0] == 6
    assert s.mask.tolist() == [[True, True, True], [True, False, False]]
    s2 = t.select_indices([torch.tensor([4, 0]), torch.tensor([3])])
    assert s2.positions[0].tolist() == [0, 4]


def test_weighted_merge_and_visual_tokens_merge():
    x = torch.tensor([[[1.0], [3.0], [10.0], [0.0]]])
    sizes = torch.tensor([[1.0, 3.0, 1.0, 1.0]])
    feats, sz, kept = merge_weighted(x, sizes, torch.tensor([[0]]), torch.tensor([[1]]))
    assert kept[0].tolist() == [1, 2, 3]
    assert feats[0, 0, 0].item() == pytest.approx((1 * 1 + 3 * 3) / 4) and sz[0, 0] == 4
    t = VisualTokens.from_features(x, torch.tensor([0]))
    t.sizes = sizes
    m = t.merge(torch.tensor([[0, 3]]), torch.tensor([[1, 2]]))
    assert m.positions[0].tolist() == [1, 2]
    assert m.features[0, :, 0].tolist() == pytest.approx([2.5, 5.0])
    assert m.sizes[0].tolist() == [4.0, 2.0]


def test_list_and_describe():
    assert {"random", "pool", "fastv"} <= set(vtok.list_methods())
    text = vtok.describe("random")
    assert "retain = 0.25" in text and "seed = 0" in text and "position_policy" in text
    for name in vtok.list_methods():
        lines = vtok.describe(name).split("\n\n")[0].splitlines()  # the hyper-parameters (the docstring follows)
        assert all(":" in line for line in lines[2:]), name


def test_cli_list_and_describe(capsys):
    from vtok.cli import main

    assert main(["list"]) == 0
    assert "fastv" in capsys.readouterr().out
    assert main(["describe", "pool"]) == 0
    assert "factor = 2" in capsys.readouterr().out


def test_labels_loss_with_compaction(llava):
    batch = batch_of(llava, [(3, 1, 4), (9, 1, 2)])
    labels = batch["input_ids"].clone()
    labels[(labels == llava.config.image_token_id) | (batch["attention_mask"] == 0)] = -100
    with torch.no_grad():
        ref = llava(**batch, labels=labels)
        with vtok.apply(llava, "fastv", layer=2, retain=1.0):
            same = llava(**batch, labels=labels)
        with vtok.apply(llava, "random", retain=0.5):
            out = llava(**batch, labels=labels)
    torch.testing.assert_close(same.loss, ref.loss)
    assert out.logits.shape == ref.logits.shape and torch.isfinite(out.loss)
    assert not torch.equal(out.loss, ref.loss)


def test_stats_describe_the_last_prefill_even_text_only(llava):
    batch = batch_of(llava, [(3, 1, 4)])
    with vtok.apply(llava, "fastv", retain=0.5) as h:
        with torch.no_grad():
            llava(**batch)
            assert h.stats
            llava(input_ids=torch.tensor([[1, 5, 6, 7]]))
        assert h.stats == []

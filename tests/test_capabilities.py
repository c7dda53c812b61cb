"""The in-LLM stage's capabilities beyond the invariant suite: a merge equals the same merge by hand,
a three-layer schedule on a LLaVA-1.5-shaped depth and grid, chains of methods per stage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from capability_methods import NearestMerge, StagedPrune
from conftest import tiny_model
from test_invariants import MaskedReference, forward, pruned_schedule

import vtok
from vtok.testing import TINY_CASES, llava_samples, left_pad_batch, tiny_llava
from vtok.hf_compat import output_cache

VLMS = ["llava", "llava_next", "llava_onevision"]


def _batch(case_name, seed=0):
    case, model = TINY_CASES[case_name], tiny_model(case_name)
    return model, case.batch(case.make_samples(model, case.specs, seed))


@pytest.mark.parametrize("case_name", VLMS)
def test_merge_equals_the_same_merge_by_hand(case_name):
    """What layer K receives after a merge stage: the hidden states entering K with the dropped visual
    tokens removed and each kept visual token replaced by the mean of itself and the dropped tokens most
    similar to it -- recomputed here from the definition."""
    model, batch = _batch(case_name, seed=5)
    m = NearestMerge(layer=2, retain=0.4)
    lm = model.model.language_model
    seen = {}

    def before_vtok(module, args, kwargs):
        seen["in"] = (args[0] if args else kwargs["hidden_states"]).clone()

    def after_vtok(module, args, kwargs):
        seen["out"] = (args[0] if args else kwargs["hidden_states"]).clone()

    first = lm.layers[2].register_forward_pre_hook(before_vtok, with_kwargs=True, prepend=True)
    with vtok.apply(model, m) as h, torch.no_grad():
        last = lm.layers[2].register_forward_pre_hook(after_vtok, with_kwargs=True)
        try:
            model(**batch)
        finally:
            first.remove()
            last.remove()
        (rec,) = h.stats
    ids = batch["input_ids"]
    valid = batch["attention_mask"].bool()
    token = model.config.image_token_id if case_name != "llava_onevision" else model.config.image_token_id
    visual = ids == token
    for b in range(ids.shape[0]):
        vis = visual[b].nonzero().squeeze(1)
        x = seen["in"][b, vis].float()
        n = vis.numel()
        kept = rec.kept[b]
        assert torch.equal(kept, torch.linspace(0, n - 1, kept.numel()).round().long())
        drop = torch.ones(n, dtype=torch.bool)
        drop[kept] = False
        want = x[kept].clone()
        for i in drop.nonzero().squeeze(1).tolist():  # one dropped token at a time, as a person would
            cos = torch.stack([F.cosine_similarity(x[i], x[j], dim=0) for j in kept.tolist()])
            want[int(cos.argmax())] += x[i]
        counts = torch.ones(kept.numel())
        for i in drop.nonzero().squeeze(1).tolist():
            cos = torch.stack([F.cosine_similarity(x[i], x[j], dim=0) for j in kept.tolist()])
            counts[int(cos.argmax())] += 1
        want = want / counts[:, None]
        # the layout layer 2 receives: left-padded, text as it was, kept visual tokens in order
        keep_seq = valid[b] & ~visual[b]
        keep_seq[vis[kept]] = True
        got = seen["out"][b, -int(keep_seq.sum()) :]
        got_visual = got[visual[b][keep_seq]]
        torch.testing.assert_close(got_visual.float(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[~visual[b][keep_seq]], seen["in"][b][keep_seq & ~visual[b]])


def test_three_layer_schedule_on_a_llava15_shaped_depth():
    """TransPrune's schedule on a 32-layer LLaVA-1.5-shaped model (24x24 = 576 visual tokens): stats and
    the KV cache both show 576 -> 504 -> 360 -> 72 visual tokens after layers 7, 9 and 12."""
    model = tiny_llava(image_size=48, patch=2, layers=32)
    samples = llava_samples(model, [(5, 1, 6), (2, 1, 9)], seed=0)
    batch = left_pad_batch(samples)
    batch.pop("position_ids", None)
    m = StagedPrune(layers=(7, 9, 12), ratios=(0.875, 0.625, 0.125), probe_layer=6)
    with vtok.apply(model, m) as h, torch.no_grad():
        out = model.generate(**batch, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        stats = [(r.layer, r.tokens_in, r.tokens_out) for r in h.stats]
    assert stats == [(7, [576, 576], [504, 504]), (9, [504, 504], [360, 360]), (12, [360, 360], [72, 72])]
    cache = output_cache(out)
    lens = [cache.layers[i].get_seq_length() for i in range(32)]
    s = batch["input_ids"].shape[1] + 1  # prompt + the one decode step that went into the cache
    visual_in_cache = {i: 576 - (s - n) for i, n in enumerate(lens)}
    assert [visual_in_cache[i] for i in (0, 6, 7, 8, 9, 11, 12, 31)] == [576, 576, 504, 504, 360, 360, 72, 72]


@pytest.mark.parametrize("case_name", VLMS)
def test_before_llm_chain(case_name):
    """``["pool", "random"]``: random draws from what pool left; stats show both steps; the result equals
    running random on pool's output by hand (a chain is the composition), batched equals one by one."""
    model, batch = _batch(case_name, seed=2)
    pool = vtok.method.get_method_class("pool")(factor=2)
    rnd = vtok.method.get_method_class("random")(retain=0.5, seed=1)
    with vtok.apply(model, [pool, rnd]) as h, torch.no_grad():
        out = forward(model, batch)
        steps = [(r.method, r.stage, r.tokens_in, r.tokens_out) for r in h.stats]
    assert [s[:2] for s in steps] == [("pool", "before_llm"), ("random", "before_llm")]
    assert steps[1][2] == steps[0][3] and all(o < i for i, o in zip(steps[1][2], steps[1][3]))
    captured = {}

    class Composed(vtok.Method):
        name = "composed"
        stages = ("before_llm",)
        position_policy = "compact"

        def before_llm(self, tokens, probes):
            return rnd.before_llm(pool.before_llm(tokens, {}), {})

    with vtok.apply(model, Composed()), torch.no_grad():
        captured["ref"] = forward(model, batch)
    torch.testing.assert_close(out, captured["ref"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("policy", ["keep", "compact"])
@pytest.mark.parametrize("case_name", VLMS)
def test_in_llm_chain_drop_equals_mask(case_name, policy):
    """Two in_llm methods at different layers (FastV at 1, then the staged method at 2 and 3): stats show
    each step; drop == mask at every stage layer; generate equals the masked reference."""
    model, batch = _batch(case_name, seed=3)
    gen_batch = {k: v for k, v in batch.items() if k != "position_ids"}
    fastv = vtok.method.get_method_class("fastv")(layer=1, retain=0.75, position_policy=policy)
    staged = StagedPrune(layers=(2, 3), ratios=(0.5, 0.25), probe_layer=1, position_policy=policy)
    with vtok.apply(model, [fastv, staged]) as h:
        out = forward(model, batch)
        stages = list(h.stats)
        generated = model.generate(**gen_batch, max_new_tokens=6, do_sample=False)
    assert [(r.method, r.layer) for r in stages] == [("fastv", 1), ("t_staged", 2), ("t_staged", 3)]
    schedule = pruned_schedule(batch, stages, model.config.image_token_id)
    with MaskedReference(model, schedule, policy) as ref:
        want = forward(model, batch)
        want_gen = model.generate(**gen_batch, max_new_tokens=6, do_sample=False)
    keep = batch["attention_mask"].bool() & ~ref.pruned_at(99)
    torch.testing.assert_close(out[keep], want[keep], atol=2e-5, rtol=1e-4)
    assert torch.equal(generated, want_gen)


def test_state_is_fresh_for_every_prefill():
    model, batch = _batch("llava")
    m = StagedPrune()
    with vtok.apply(model, m) as h, torch.no_grad():
        forward(model, batch)
        first = [(r.tokens_in, r.tokens_out) for r in h.stats]
        forward(model, batch)
        assert [(r.tokens_in, r.tokens_out) for r in h.stats] == first


@pytest.mark.parametrize("case_name", VLMS)
def test_transition_probe_is_the_models_own_sub_block_io(case_name):
    """Transition(L) holds, at the visual tokens, the attention's normed input and its output before the
    residual, and the MLP's normed input and output -- as the model computed them in this forward."""
    from dataclasses import dataclass

    from vtok.method import Transition

    model, batch = _batch(case_name, seed=4)
    dec = model.model.language_model.layers[1]
    mine = {}
    hooks = [
        dec.input_layernorm.register_forward_hook(lambda m, a, out: mine.__setitem__("attn_in", out)),
        dec.self_attn.register_forward_hook(lambda m, a, out: mine.__setitem__("attn_out", out[0])),
        dec.post_attention_layernorm.register_forward_hook(lambda m, a, out: mine.__setitem__("mlp_in", out)),
        dec.mlp.register_forward_hook(lambda m, a, out: mine.__setitem__("mlp_out", out)),
    ]
    got = {}

    @dataclass
    class Reads(vtok.Method):
        name = "reads_transitions"
        stages = ("in_llm",)
        position_policy = "keep"

        def probes(self):
            return [Transition(1)]

        def llm_layers(self):
            return [2]

        def in_llm(self, view):
            got["t"], got["view"] = view.probes[Transition(1)], view
            return [torch.arange(i.numel()) for i in view.visual_index]

    try:
        with vtok.apply(model, Reads()), torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    t, view = got["t"], got["view"]
    rows = t.rows_for(view)
    for name in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
        for b, idx in enumerate(view.visual_index):
            torch.testing.assert_close(getattr(t, name)[b][rows[b]], mine[name][b, idx], atol=0, rtol=0)


def test_a_method_reads_the_question_through_the_processor(tmp_path):
    """``Question``: the text after the image, decoded with the processor's tokenizer, per sample; without
    a processor the method is refused at apply."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vtok.testing_processor import save_tiny_llava_checkpoint
    from vtok.method import Question

    path = save_tiny_llava_checkpoint(tmp_path / "ckpt")
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    proc = AutoProcessor.from_pretrained(path)
    img = torch.rand(3, 32, 32)
    texts = ["USER: <image> what is in the image ? ASSISTANT:", "USER: <image> w20 w21 ? ASSISTANT:"]
    inputs = proc(images=[img, img], text=texts, return_tensors="pt", padding=True)
    got = {}

    class Reads(vtok.Method):
        name = "reads_question"
        stages = ("before_llm",)
        position_policy = "compact"

        def probes(self):
            return [Question()]

        def before_llm(self, tokens, probes):
            got["q"] = probes[Question()]
            return tokens

    with pytest.raises(ValueError, match="reads the call's question.*processor=processor"):
        vtok.apply(model, Reads())
    with vtok.apply(model, Reads(), processor=proc), torch.no_grad():
        model(**inputs)
    assert got["q"] == ["what is in the image ? ASSISTANT:", "w20 w21 ? ASSISTANT:"]

"""Vision adapters: hidden states, ViT probes, errors, and in_vit inside LLaVA (order, splice, composition)."""

from __future__ import annotations

import pytest
import torch

import vtok
from vtok.adapters import find_adapter
from vtok.adapters.vit import HFVisionAdapter, OpenClipViTAdapter, TimmViTAdapter, check_vit_method
from vtok.method import Method, ViTAttention
from vtok.methods.tome import ToMe
from vtok.testing import (
    left_pad_batch,
    llava_samples,
    tiny_hf_vision,
    tiny_llava,
    tiny_llava_tower,
    tiny_open_clip_vit,
    tiny_timm_vit,
)

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

IMG = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_adapters_are_found():
    assert find_adapter(tiny_hf_vision("siglip")) is HFVisionAdapter
    assert find_adapter(tiny_timm_vit()) is TimmViTAdapter
    assert find_adapter(tiny_open_clip_vit()) is OpenClipViTAdapter
    with pytest.raises(ValueError, match="timm_vit"):
        find_adapter(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("warm", [False, True])
def test_hf_hidden_states_follow_the_merges(warm):
    model = tiny_hf_vision("clip")
    with torch.no_grad():
        if warm:  # transformers installs its capture hooks before vtok attaches: vtok's run first anyway
            model(pixel_values=IMG, output_hidden_states=True)
        with vtok.apply(model, "tome", r=[2, 3]):
            out = model(pixel_values=IMG, output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [17, 15, 12]
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    assert out.pooler_output.shape == (2, 32)


def test_open_clip_custom_blocks_and_clip_model():
    import open_clip

    model = tiny_open_clip_vit(qk_norm=True, output_tokens=True)
    with torch.no_grad():
        ref = model(IMG)
        with vtok.apply(model, "tome", r=3) as h:
            pooled, tokens = model(IMG)
        assert tokens.shape == (2, 16 - 6, 32) and pooled.shape == ref[0].shape
        assert [s.tokens_out for s in h.stats] == [[14, 14], [11, 11]]
        assert torch.equal(model(IMG)[0], ref[0])
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=8, mlp_ratio=2.0),
        text_cfg=dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1),
    ).eval()
    with torch.no_grad(), vtok.apply(clip, "tome", r=2) as h:
        clip.encode_image(IMG)
    assert [s.tokens_out[0] for s in h.stats] == [15, 13]


# ----------------------------------------------------------------------------- ViT probes


class ProbeRecorder(ToMe):
    """ToMe that also asks for ViT attention statistics of block 0 and keeps what it is handed."""

    def probes(self):
        return [ViTAttention(layer=0, kind="cls"), ViTAttention(layer=0, kind="colmean")]

    def in_vit(self, view):
        self.seen = dict(view.probes)
        return super().in_vit(view)


def _check_probes(model, run, attn_map):
    m = ProbeRecorder(r=1)
    with torch.no_grad(), vtok.apply(model, m):
        run()
    full = attn_map()  # [B, N, N] head-averaged attention of block 0, from the model itself
    torch.testing.assert_close(m.seen[ViTAttention(0, "cls")], full[:, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m.seen[ViTAttention(0, "colmean")], full.mean(1), atol=1e-5, rtol=1e-4)


def test_vit_probes_hf_timm_open_clip():
    hf = tiny_hf_vision("dinov2", attn_implementation="eager")
    with torch.no_grad():
        attn0 = lambda: hf(pixel_values=IMG, output_attentions=True).attentions[0].mean(1)  # noqa: E731
        _check_probes(hf, lambda: hf(pixel_values=IMG), attn0)

    tm = tiny_timm_vit()
    blk = tm.blocks[0]
    blk.attn.fused_attn = False
    seen = []
    spy = blk.attn.attn_drop.register_forward_hook(lambda mod, a, o: seen.append(o))
    with torch.no_grad():
        _check_probes(tm, lambda: tm(IMG), lambda: (seen.clear(), tm(IMG), seen[-1].mean(1))[2])
    spy.remove()

    oc = tiny_open_clip_vit()

    def oc_map():
        x = oc._embeds(IMG)
        b0 = oc.transformer.resblocks[0]
        h = b0.ln_1(x)
        return b0.attn(h, h, h, need_weights=True, average_attn_weights=True)[1]

    with torch.no_grad():
        _check_probes(oc, lambda: oc(IMG), oc_map)


# ----------------------------------------------------------------------------- errors


def test_clear_errors():
    with pytest.raises(ValueError, match="does not support"):
        vtok.apply(tiny_timm_vit(), "random")
    from timm.models.vision_transformer import ResPostBlock

    with pytest.raises(ValueError, match="ResPostBlock"):
        vtok.apply(tiny_timm_vit(block_fn=ResPostBlock), "tome")
    with pytest.raises(ValueError, match="prop_attn=False"):
        check_vit_method(ToMe(), "flash_attention_2")
    check_vit_method(ToMe(prop_attn=False), "flash_attention_2")
    with pytest.raises(ValueError, match="no class token"):
        vtok.apply(tiny_hf_vision("siglip"), ProbeRecorder())
    model = tiny_llava()
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    model.config.vision_feature_layer = -2  # one tower block reaches the features
    with pytest.raises(ValueError, match="only 1 encoder blocks"):
        vtok.apply(model, "tome", r=[2, 2])
    model.config.vision_feature_layer = -1
    with pytest.raises(ValueError, match="protect_cls=True"):
        vtok.apply(model, "tome", protect_cls=False)
    with pytest.raises(ValueError, match="ViT attention probes"):
        vtok.apply(model, [ToMe(r=2), ViTProbing()])
    model.config.vision_feature_layer = [-2, -1]
    with pytest.raises(ValueError, match="several feature layers"):
        vtok.apply(model, "tome")
    model.config.vision_feature_layer = -1
    assert not hasattr(model, "_vtok_handle")
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks


class ViTProbing(Method):
    name = "vit_probing_test"  # not registered
    stages = ("before_llm",)

    def probes(self):
        return [ViTAttention(layer=-1, kind="cls")]

    def before_llm(self, tokens, probes):
        return tokens


# ----------------------------------------------------------------------------- inside LLaVA


def _llava_reference(model, sample, r):
    """What LLaVA + in_vit ToMe must compute, from the definition: the tower merges (vtok on the tower
    alone), the merged tokens are put in raster order of their first patch, projected, and replace
    the image's placeholders in a shorter prompt run through the untouched model."""
    cfg = model.config
    tower = model.model.vision_tower
    drop = 1 if cfg.vision_feature_select_strategy == "default" else 0
    with torch.no_grad(), vtok.apply(tower, "tome", r=r) as h:
        hs = tower(pixel_values=sample["pixel_values"], output_hidden_states=True).hidden_states
        hs = hs[cfg.vision_feature_layer]
        first = h.adapter.source.first()[:, drop:]
    feats = hs[:, drop:].gather(1, first.argsort(1)[..., None].expand(-1, -1, hs.shape[-1]))
    with torch.no_grad():
        feats = model.model.multi_modal_projector(feats)
    ids = sample["input_ids"]
    emb = model.get_input_embeddings()(ids)
    parts, img, i = [], 0, 0
    image = ids == cfg.image_token_id
    keep_text = []
    while i < ids.numel():
        if image[i]:
            j = i
            while j < ids.numel() and image[j]:
                j += 1
            parts.append(feats[img])
            keep_text += [False] * feats.shape[1]
            img, i = img + 1, j
        else:
            parts.append(emb[i : i + 1])
            keep_text.append(True)
            i += 1
    with torch.no_grad():
        logits = model(inputs_embeds=torch.cat(parts)[None]).logits[0]
    return logits[torch.tensor(keep_text)], ~image


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_llava_tome_equals_shorter_prompt_reference(tower):
    model = tiny_llava() if tower == "clip" else tiny_llava_tower("siglip")
    samples = llava_samples(model, [(3, 1, 4), (1, 2, 6)], seed=7)
    for s in samples:
        ref, text = _llava_reference(model, s, r=3)
        with torch.no_grad(), vtok.apply(model, "tome", r=3) as h:
            out = model(input_ids=s["input_ids"][None], pixel_values=s["pixel_values"]).logits[0]
        torch.testing.assert_close(out[text], ref, atol=2e-5, rtol=1e-4)
        vit = [r for r in h.stats if r.stage == "in_vit"]
        n_img = s["pixel_values"].shape[0]
        n0 = 17 if tower == "clip" else 16
        assert [r.tokens_in for r in vit] == [[n0 * n_img], [(n0 - 3) * n_img]]


def test_llava_dinov2_tower_and_composition():
    model = tiny_llava_tower("dinov2")
    samples = llava_samples(model, [(3, 1, 4), (9, 1, 2), (1, 2, 6)], seed=1)
    batch = left_pad_batch(samples)
    with torch.no_grad():
        ref = model(**batch).logits
        with vtok.apply(model, "tome", r=0):
            assert torch.equal(model(**batch).logits, ref)
        with vtok.apply(model, ["tome", "random"], tome={"r": 2}, random={"retain": 0.5}) as h:
            out = model(**batch).logits
            for i, s in enumerate(samples):
                one = model(**left_pad_batch([s])).logits
                torch.testing.assert_close(out[i, -one.shape[1] :], one[0], atol=2e-5, rtol=1e-4)
            gen_batch = {k: v for k, v in batch.items() if k != "position_ids"}
            gen = model.generate(**gen_batch, max_new_tokens=4, do_sample=False)
            assert gen.shape[1] == batch["input_ids"].shape[1] + 4
        assert torch.equal(model(**batch).logits, ref)
    # per sample: 17 -> 15 -> 13 tower tokens per image; 12 merged features enter random, 6 survive
    vit = [r for r in h.stats if r.stage == "in_vit"]
    (rnd,) = [r for r in h.stats if r.stage == "before_llm"]
    assert vit[-1].tokens_out == [13, 13, 26]
    assert rnd.tokens_in == [12, 12, 24] and rnd.tokens_out == [6, 6, 12]
    for k, n in zip(rnd.kept, rnd.tokens_in):
        assert k.numel() and int(k.max()) < n


def test_llava_tome_keep_policy_generate_batch_equals_one_by_one():
    model = tiny_llava()
    samples = llava_samples(model, [(9, 1, 2), (1, 2, 6)], seed=2)
    strip = lambda b: {k: v for k, v in b.items() if k != "position_ids"}  # noqa: E731
    batch = strip(left_pad_batch(samples))
    with torch.no_grad(), vtok.apply(model, "tome", r=4, position_policy="keep"):
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1] :]
        for i, s in enumerate(samples):
            one = model.generate(**strip(left_pad_batch([s])), max_new_tokens=4, do_sample=False)
            new = one[0, s["input_ids"].numel() :]  # may stop early at EOS; the batch row then pads
            assert new.numel() and torch.equal(out[i, : new.numel()], new)


def test_llava_tome_generate_with_repeated_images():
    """Beam search repeats each sample's group of images ([A, B] -> [A, B, A, B]) in the features generate
    pre-computed; each repeated row gets its own image's merged tokens and in_vit record."""
    model = tiny_llava()
    samples = llava_samples(model, [(9, 1, 2), (1, 2, 6)], seed=2)
    batch = {k: v for k, v in left_pad_batch(samples).items() if k != "position_ids"}
    with torch.no_grad(), vtok.apply(model, "tome", r=2) as h:
        model.generate(**batch, max_new_tokens=3, do_sample=False)
        once = [(r.tokens_in, r.tokens_out, r.kept) for r in h.stats if r.stage == "in_vit"]
        beams = model.generate(**batch, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
        twice = [(r.tokens_in, r.tokens_out, r.kept) for r in h.stats if r.stage == "in_vit"]
    assert beams.shape[0] == 2 * len(samples)
    assert len(twice) == len(once) > 0
    for (tin, tout, kept), (tin2, tout2, kept2) in zip(once, twice):
        assert tin2 == [n for n in tin for _ in range(2)] and tout2 == [n for n in tout for _ in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(kept2, [k for k in kept for _ in range(2)]))


def test_llava_tome_precomputed_features_must_be_the_towers_own():
    """With in_vit attached, pre-computed features are recognised by identity (rows of the merged tower
    output), never by value: the tower's own rows work, copies of them get a clear error."""
    model = tiny_llava()
    s = llava_samples(model, [(3, 2, 4)], seed=3)[0]
    ids = s["input_ids"][None]
    with torch.no_grad(), vtok.apply(model, "tome", r=2):
        ref = model(input_ids=ids, pixel_values=s["pixel_values"]).logits
        image = model.model.get_image_features(s["pixel_values"])
        out = model(input_ids=ids, mm_encoder_outputs={"image": image}).logits
        image = model.model.get_image_features(s["pixel_values"])
        image.pooler_output = [t.clone() for t in image.pooler_output]
        with pytest.raises(ValueError, match="pass pixel_values"):
            model(input_ids=ids, mm_encoder_outputs={"image": image})
    assert torch.equal(out, ref)


def test_standalone_towers_refuse_merging_their_class_token():
    """Their outputs read token 0 as the class token (HF pooler, timm / open_clip heads and patch slices)."""
    for model in (tiny_hf_vision("clip"), tiny_hf_vision("dinov2"), tiny_timm_vit(), tiny_open_clip_vit()):
        with pytest.raises(ValueError, match="protect_cls=False would merge the class token"):
            vtok.apply(model, "tome", r=2, protect_cls=False)
        assert not hasattr(model, "_vtok_handle")
    vtok.apply(tiny_hf_vision("siglip"), "tome", r=2, protect_cls=False).remove()  # no class token: nothing to protect


def test_tome_under_gradient_checkpointing_is_refused_clearly():
    """Checkpointed blocks are recomputed in backward on token counts that moved on; eval/no_grad is fine."""
    llava = tiny_llava()
    llava.train()
    enable = getattr(llava, "activation_checkpointing_enable", None) or llava.gradient_checkpointing_enable  # 5.24 renamed it
    enable()
    timm_vit = tiny_timm_vit()
    timm_vit.train()
    timm_vit.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    with vtok.apply(timm_vit, "tome", r=2):
        with pytest.raises(ValueError, match="gradient checkpointing"):
            timm_vit(x)
        with torch.no_grad():
            timm_vit(x)
    pixel = torch.randn(1, 3, 32, 32)
    with vtok.apply(llava, "tome", r=2):
        with pytest.raises(ValueError, match="gradient checkpointing"):
            llava.model.get_image_features(pixel_values=pixel)
    (getattr(llava, "activation_checkpointing_disable", None) or llava.gradient_checkpointing_disable)()
    with vtok.apply(llava, "tome", r=2):
        llava.model.get_image_features(pixel_values=pixel)

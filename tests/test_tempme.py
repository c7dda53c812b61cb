"""TempMe (#18): the token schedule of the spec, the clip position tables at the right clips, LoRA equal to the
updated weights (HF CLIP split q/k/v, open_clip's packed nn.MultiheadAttention), training through the hooks,
save/reload, remove() exact, the parameter count at ViT-B/16 shapes, and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import vtok
from vtok.method import describe
from vtok.methods.tempme import TempMe, info_nce, video_embeddings
from vtok.testing import tiny_hf_vision, tiny_open_clip_vit
from vtok.vit import regroup_rows


def _clip(layers=12, image=224, patch=32, width=64, seed=0):
    cfg = transformers.CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                                        num_attention_heads=4, image_size=image, patch_size=patch)  # fmt: skip
    torch.manual_seed(seed)
    return transformers.CLIPVisionModel(cfg).eval()


def _randomise(handle, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def test_the_token_schedule_of_the_spec_on_vit_b32_shapes():
    """12 frames of ViT-B/32 (50 tokens): 34 per frame after ImgMe, then 44, 56, 107 and 97 tokens per video."""
    model = _clip()
    px = torch.randn(24, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with vtok.apply(model, "tempme") as h, h.context(frames=[12, 12]), torch.no_grad():
        out = model(pixel_values=px)
        emb = video_embeddings(h)
    steps = [(r.layer, r.point, r.tokens_in, r.tokens_out, len(r.units)) for r in h.stats]
    assert steps[7] == (7, "mlp", [36] * 24, [34] * 24, 24)
    assert steps[8:] == [
        (8, "attn", [68] * 12, [48] * 12, 12), (8, "mlp", [48] * 12, [44] * 12, 12),
        (9, "attn", [88] * 6, [62] * 6, 6), (9, "mlp", [62] * 6, [56] * 6, 6),
        (10, "attn", [168] * 2, [118] * 2, 2), (10, "mlp", [118] * 2, [107] * 2, 2),
        (11, "mlp", [107] * 2, [97] * 2, 2),
    ]  # fmt: skip
    assert tuple(out.last_hidden_state.shape) == (2, 97, 64)
    assert emb.shape == (2, 64) and torch.allclose(emb.norm(dim=-1), torch.ones(2))


def test_clip_position_tables_are_added_to_the_tokens_of_their_clip():
    """No merges (all shares 0): block 0 of a 2-block tower is the ClipMe block; its input is every two frames as
    one row, class tokens first, plus the table row of each token's clip (frame within the 4-frame window)."""
    model = _clip(layers=2, image=32, patch=8)
    px = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    m = TempMe(frames=4, merge_frames=(2,), img_r=0, clip_ratio=0.0, intra_ratio=0.0, last_ratio=0.0, lora_rank=0)
    with vtok.apply(model, m) as h, h.context(frames=[4, 4]), torch.no_grad():
        _randomise(h)
        out = model(pixel_values=px).last_hidden_state
        table = m.modules["pos"][0].detach().clone()
    assert table.shape == (4, 64)
    vm = getattr(model, "vision_model", model)
    with torch.no_grad():
        x = regroup_rows(vm.pre_layrnorm(vm.embeddings(px)), 2, 1)  # [4, 34, C]: [cls, cls, frame a, frame b]
        clip = torch.tensor([0, 1] + [0] * 16 + [1] * 16)  # the token's frame within its pair
        first = torch.tensor([0, 2, 0, 2])  # the pair's first frame within its 4-frame window
        x = x + table[first[:, None] + clip[None, :]]
        for layer in vm.encoder.layers:
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)


def test_lora_equals_the_updated_q_k_v_weights_on_hf_clip():
    model = _clip(layers=4, image=64, patch=16)
    px = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    m = TempMe(frames=4, merge_frames=(2, 2), img_r=1)
    with vtok.apply(model, m) as h, h.context(frames=[4, 4]), torch.no_grad():
        _randomise(h)
        out = model(pixel_values=px).last_hidden_state
        lora = [(lo.A.clone(), lo.B.clone()) for lo in m.modules["lora"]]
        pos = [p.clone() for p in m.modules["pos"]]
    updated = copy.deepcopy(model)
    c = 64
    with torch.no_grad():
        for layer, (a, b) in zip(getattr(updated, "vision_model", updated).encoder.layers, lora):
            for j, proj in enumerate((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)):
                proj.weight += b[j * c : (j + 1) * c] @ a
    plain = TempMe(frames=4, merge_frames=(2, 2), img_r=1, lora_rank=0)
    with vtok.apply(updated, plain) as h2, h2.context(frames=[4, 4]), torch.no_grad():
        for p, q in zip(plain.modules["pos"], pos):
            p.copy_(q)
        ref = updated(pixel_values=px).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_lora_on_open_clips_packed_attention_equals_the_updated_weight():
    model = tiny_open_clip_vit(seed=0).eval()
    mha = model.transformer.resblocks[0].attn
    x = torch.randn(2, 17, mha.embed_dim)
    m = TempMe(frames=4, merge_frames=(2,), img_r=1)
    m.prop_attn = False  # the block's attention is called directly here, with its arguments positional
    with vtok.apply(model, m) as h, torch.no_grad():
        _randomise(h)
        a, b = m.qkv_lora(0)
        got = mha(x, x, x, need_weights=False)[0]
        w = mha.in_proj_weight + b @ a
    ref_mha = copy.deepcopy(mha)
    with torch.no_grad():
        ref_mha.in_proj_weight.copy_(w)
        ref = ref_mha(x, x, x, need_weights=False)[0]
        untouched = mha(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, untouched) and "forward" not in vars(mha)


def test_training_lowers_the_loss_saves_reloads_and_leaves_the_model_untouched(tmp_path):
    model = _clip(layers=4, image=64, patch=16)
    px = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(pixel_values=px).last_hidden_state
        frame = torch.nn.functional.normalize(model(pixel_values=px).pooler_output, dim=-1)
        target = torch.nn.functional.normalize(frame.view(4, 4, -1).mean(1), dim=-1)  # the full-token video vector
    h = vtok.apply(model, "tempme", frames=4, merge_frames=(2, 2), img_r=1)
    h.train()
    opt = torch.optim.AdamW(h.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        with h.context(frames=[4] * 4):
            model(pixel_values=px)
            loss = info_nce(video_embeddings(h), target, scale=20.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses
    h.eval()
    path = tmp_path / "tempme.safetensors"
    h.save(path)
    with h.context(frames=[4] * 4), torch.no_grad():
        model(pixel_values=px)
        trained = video_embeddings(h)
    h.remove()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(model(pixel_values=px).last_hidden_state, ref)
    with vtok.apply(model, "tempme", frames=4, merge_frames=(2, 2), img_r=1, weights=path) as h2:
        with h2.context(frames=[4] * 4), torch.no_grad():
            model(pixel_values=px)
            assert torch.equal(video_embeddings(h2), trained)


def test_trainable_parameters_at_vit_b16_shapes():
    """Vision LoRA rank 8 on q|k|v of 12 blocks of width 768 (294,912) + clip tables of 12, 6, 3 rows (16,128);
    the paper's 0.50 M adds 197 k of text-tower LoRA."""
    cfg = transformers.CLIPVisionConfig()  # ViT-B/32 defaults: width 768, 12 blocks
    with torch.device("meta"):
        model = transformers.CLIPVisionModel(cfg)
    text = describe("tempme", model)
    assert "trainable parameters on this CLIPVisionModel: 311,040" in text


def test_videos_that_do_not_fit_its_windows_are_refused():
    model = _clip(layers=2, image=32, patch=8)
    with vtok.apply(model, "tempme", frames=4, merge_frames=(2,)) as h, torch.no_grad():
        with h.context(frames=[4, 3]), pytest.raises(ValueError, match="windows of 4 frames"):
            model(pixel_values=torch.randn(7, 3, 32, 32))
        with h.context(frames=[4, 1]), pytest.raises(ValueError, match="mixes single images and videos"):
            model(pixel_values=torch.randn(5, 3, 32, 32))
        model(pixel_values=torch.randn(3, 3, 32, 32))  # three single images: ImgMe and the merges within each
        assert [len(r.units) for r in h.stats] == [3, 3, 3]


def test_a_video_of_several_windows_reads_every_frames_class_token():
    model = tiny_hf_vision("clip", seed=0).eval()
    px = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with vtok.apply(model, "tempme", frames=4, merge_frames=(2,), img_r=1) as h, h.context(frames=[8]), torch.no_grad():
        model(pixel_values=px)
        cls = h.adapter.frame_class_tokens()
        emb = video_embeddings(h)
    assert len(cls) == 1 and cls[0].shape[0] == 8 and emb.shape[0] == 1


def test_a_whole_open_clip_model_gets_text_tower_lora_too_and_the_papers_half_million():
    import open_clip

    with torch.device("meta"):
        big = open_clip.CLIP(embed_dim=512, vision_cfg=dict(layers=12, width=768, patch_size=16, image_size=224),
                             text_cfg=dict(layers=12, width=512, heads=8, context_length=77, vocab_size=49408))  # fmt: skip
    # 294,912 vision LoRA + 16,128 clip tables + 196,608 text LoRA (width 512, 12 blocks): the paper's 0.50 M
    assert "trainable parameters on this CLIP: 507,648" in describe("tempme", big)
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=dict(layers=2, width=32, patch_size=8, image_size=32, head_width=16),
                           text_cfg=dict(layers=2, width=32, heads=2, context_length=8, vocab_size=50)).eval()  # fmt: skip
    text = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    with vtok.apply(model, "tempme", frames=2, merge_frames=(2,), img_r=1) as h, torch.no_grad():
        _randomise(h)
        got = model.encode_text(text)
        updates = [h.methods[0].text_qkv_lora(i) for i in range(2)]
        updates = [(a.clone(), b.clone()) for a, b in updates]
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        for blk, (a, b) in zip(ref_model.transformer.resblocks, updates):
            blk.attn.in_proj_weight += b @ a
        torch.testing.assert_close(got, ref_model.encode_text(text), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, model.encode_text(text))  # removed: the untouched text tower again


@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_settings_for_a_budget_reach_the_single_image_count_they_predict(budget):
    """On single images (the demo's comparisons), ``settings_for_budget`` picks the clip share whose count
    ``single_image_tokens`` predicts; the tower run with it leaves exactly that many patches per image."""
    from vtok.method import BudgetContext

    model = _clip(image=224, patch=16)  # 196 patches + CLS, 12 blocks
    context = BudgetContext(196, 12)
    hp = TempMe.settings_for_budget(budget, context)
    want = TempMe.single_image_tokens(196, 12, **hp)
    assert want == round(TempMe.snap_budget(budget, context) * 196)
    assert abs(want - budget * 196) <= 2
    px = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with vtok.apply(model, "tempme", **hp), torch.no_grad():
        out = model(pixel_values=px).last_hidden_state
    assert out.shape[1] == 1 + want

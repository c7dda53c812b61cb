"""in_vit everywhere (#15 item 6): merges inside the towers of LLaVA-NeXT (every crop) and OneVision (images and
video frames), undone at the projector's output so the model's own unpadding / pooling apply; row groups and
merges across neighbouring frames (``ViTMerge.regroup``, at a block's input), on a tiny CLIP video batch and on
OneVision videos; ToMe + HoliTom on OneVision videos."""

from __future__ import annotations

import pytest
import torch
from capability_methods import FramePairMerge
from conftest import tiny_model
from test_holitom import Seeing

import vtok
from vtok.method import Method
from vtok.testing import LLAVA_ONEVISION_VIDEO, TINY_CASES, tiny_hf_vision
from vtok.vit import ViTMerge, ViTView, merge_tokens, regroup_index, regroup_rows


def test_regroup_puts_every_rows_prefix_first_then_the_rows_in_order():
    x = torch.arange(4 * 3).view(4, 3, 1)  # 4 rows of [cls, p, p]
    out = regroup_rows(x, 2, 1)[..., 0]
    assert out.tolist() == [[0, 3, 1, 2, 4, 5], [6, 9, 7, 8, 10, 11]]
    assert regroup_index(3, 2, 1).tolist() == [[0, 2, 3], [1, 4, 5]]
    assert torch.equal(regroup_rows(x, 1, 1), x)
    assert regroup_rows(x, 4, 0)[..., 0].tolist() == [list(range(12))]


# ------------------------------------------------------------------ a tiny CLIP video batch


def _clip_by_hand(model, pixels, method, frames):
    """The CLIP tower with ``method``'s merges done by hand: embeddings, pre-norm, then at block 0 the frame
    pairs concatenated and merged at its input, attention, the within-row merge before the MLP (ToMe's block),
    and the other blocks as they are. No proportional attention (the method is built without it)."""
    vm = getattr(model, "vision_model", model)
    layers = vm.encoder.layers
    x = vm.pre_layrnorm(vm.embeddings(pixels))
    groups = torch.arange(len(frames)).repeat_interleave(torch.tensor(frames))
    view = ViTView(0, method.k, x, x, torch.ones(x.shape[:2]), 1, {}, groups, torch.ones_like(groups), "attn")
    plan = method.in_vit_pre(view)
    x = regroup_rows(x, plan.regroup, 1)
    x, sizes = merge_tokens(x, torch.ones(x.shape[:2]), plan)
    layer = layers[0]
    h = layer.layer_norm1(x)
    attn = layer.self_attn
    keys = attn.k_proj(h).view(*h.shape[:2], attn.num_heads, -1).mean(2)
    x = x + attn(h)[0]
    plan = method.in_vit(ViTView(0, method.k, x, keys, sizes, 2, {}, groups[::2], None, "mlp"))
    x, sizes = merge_tokens(x, sizes, plan)
    x = x + layer.mlp(layer.layer_norm2(x))
    for layer in layers[1:]:
        x = layer(x, None)
        x = x[0] if isinstance(x, tuple) else x
    return vm.post_layernorm(x[:, 0]), x, sizes


def test_frames_of_one_video_merge_across_each_other_in_a_clip_tower():
    model = tiny_hf_vision("clip", seed=0).eval()
    frames = [2, 4]
    pixels = torch.randn(sum(frames), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    method = FramePairMerge(k=3, prop_attn=False)
    with vtok.apply(model, method) as h, h.context(frames=frames), torch.no_grad():
        out = model(pixel_values=pixels)
        src = h.adapter.source
        stats = list(h.stats)
    with torch.no_grad():
        pooled, last, sizes = _clip_by_hand(model, pixels, method, frames)
    assert out.last_hidden_state.shape[0] == 3  # frame pairs are one row each
    torch.testing.assert_close(out.last_hidden_state, last, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooler_output, pooled, atol=1e-5, rtol=1e-5)
    # where every original token went: frame b is in row b // 2; each output token holds `size` originals
    assert src.rows.tolist() == [0, 0, 1, 1, 2, 2]
    counts = torch.zeros_like(src.sizes).view(-1).index_add_(
        0, (src.rows.unsqueeze(1) * src.sizes.shape[1] + src.assign).view(-1), torch.ones(src.assign.numel())
    )
    assert torch.equal(counts.view_as(src.sizes), src.sizes) and torch.equal(src.sizes, sizes)
    assert [(r.layer, r.tokens_in, r.tokens_out) for r in stats] == [(0, [34] * 3, [31] * 3), (0, [31] * 3, [28] * 3)]
    # a token's unmerged value: every original token gets the value of the output token holding it
    full = src.gather(out.last_hidden_state)
    assert full.shape == (6, 17, last.shape[-1])
    assert torch.equal(full[3, 0], out.last_hidden_state[1, 1])  # frame 3's class token: second of clip 1


def test_a_video_whose_frames_do_not_pair_is_refused_and_the_frame_counts_must_fit():
    model = tiny_hf_vision("clip", seed=0).eval()
    pixels = torch.randn(5, 3, 32, 32)

    class Pairs(FramePairMerge):  # always asks for pairs
        def _pairs(self, view):
            return True

    with vtok.apply(model, Pairs(k=1)) as h, torch.no_grad():
        with h.context(frames=[2, 3]), pytest.raises(ValueError, match="not a multiple of 2"):
            model(pixel_values=pixels)
        with h.context(frames=[2, 2]), pytest.raises(ValueError, match="describes 4 frames, but the encoder got 5"):
            model(pixel_values=pixels)


def test_rows_are_concatenated_only_at_a_blocks_input():
    model = tiny_hf_vision("clip", seed=0).eval()

    class Late(FramePairMerge):
        def in_vit(self, view):
            return ViTMerge(torch.zeros(view.x.shape[0], 0, dtype=torch.long), torch.zeros(view.x.shape[0], 0, dtype=torch.long), regroup=2)

    with vtok.apply(model, Late(k=1)) as h, h.context(frames=[2]), torch.no_grad():
        with pytest.raises(ValueError, match="only at a block's input"):
            model(pixel_values=torch.randn(2, 3, 32, 32))


# ------------------------------------------------------------------ LLaVA-NeXT / OneVision towers


class Handed(Method):
    """Keeps what before_llm was handed; returns it unchanged."""

    name = "t_handed"
    stages = ("before_llm",)
    needs_full_grids = True

    def before_llm(self, tokens, probes):
        self.tokens = tokens
        return tokens


def _setup(case, model, specs=None):
    samples = case.make_samples(model, specs or case.specs, 0)
    return samples, case.batch(samples)


def test_tome_in_every_llava_next_crop_is_undone_at_the_projector():
    """Each crop's base grid holds as many distinct projected values as the tower left tokens (CLS dropped): the
    model's own unpadding and newlines run on the unmerged grids; the LLM layout is the model's own."""
    case = TINY_CASES["llava_next"]
    model = tiny_model("llava_next")
    _, batch = _setup(case, model)
    with torch.no_grad():
        ref = model(**batch).logits
    spy = Handed()
    with vtok.apply(model, ["tome", spy], tome={"r": 2}) as h, torch.no_grad():
        out = model(**batch).logits
        vit = [r for r in h.stats if r.stage == "in_vit"]
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    crops = len(vit[0].units)  # every crop of every image went through the tower, and is counted for its sample
    assert crops > len(batch["image_sizes"]) and vit[0].units == [(g * g + 1, g * g + 1 - 2)] * crops
    assert [r.layer for r in vit] == [0]  # the feature layer is -2: only block 0 of 2 feeds it
    assert sum(vit[0].tokens_in) == crops * (g * g + 1) and len(vit[0].tokens_in) == 3
    t = spy.tokens
    for u in range(t.num_units):
        base = t.features[u, : g * g]
        assert torch.unique(base, dim=0).shape[0] == g * g - 2
    assert out.shape == ref.shape and not torch.allclose(out, ref)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)


def test_vit_probes_are_unmerged_per_patch_on_llava_next():
    from vtok.method import ViTAttention

    class Probed(Handed):
        def probes(self):
            return [ViTAttention(layer=1, kind="colmean")]

        def before_llm(self, tokens, probes):
            self.probe = probes[self.probes()[0]]
            return tokens

    model = tiny_model("llava_next")
    _, batch = _setup(TINY_CASES["llava_next"], model)
    spy = Probed()
    with vtok.apply(model, ["tome", spy], tome={"r": 2}), torch.no_grad():
        model(**batch)
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    for u in range(spy.probe.shape[0]):  # the base grid: one value per token left after block 0's merge
        assert torch.unique(spy.probe[u, : g * g]).numel() == g * g - 2


@pytest.fixture(scope="module")
def ov_video():
    model = tiny_model("llava_onevision")
    samples, batch = _setup(LLAVA_ONEVISION_VIDEO, model)
    singles = [LLAVA_ONEVISION_VIDEO.batch([s]) for s in samples]
    with torch.no_grad():  # the untouched model cannot run videos of different lengths in one batch
        refs = [model(**s).logits for s in singles]
    return model, batch, singles, refs


def _untouched(model, singles, refs):
    with torch.no_grad():
        return all(torch.equal(model(**s).logits, r) for s, r in zip(singles, refs))


def _batch_equals_one_by_one(model, batch, singles, out):
    gen_kw = dict(max_new_tokens=3, do_sample=False)
    gen = model.generate(**batch, **gen_kw)
    s_len = batch["input_ids"].shape[1]
    for i, s in enumerate(singles):
        one = model(**s).logits
        torch.testing.assert_close(out[i, -one.shape[1] :], one[0], atol=2e-5, rtol=1e-4)
        new = model.generate(**s, **gen_kw)[0, s["input_ids"].shape[1] :]
        assert torch.equal(gen[i, s_len : s_len + new.numel()], new)


def test_frame_pairs_merge_across_frames_in_the_onevision_tower(ov_video):
    model, batch, singles, refs = ov_video
    with vtok.apply(model, "t_frames", k=2) as h, torch.no_grad():
        out = model(**batch).logits
        vit = [r for r in h.stats if r.stage == "in_vit"]
        # 8 and 12 frames of 6x6 patches: pairs of frames become rows of 72 tokens, 2 merged across, 2 within
        assert [(r.point, r.tokens_in, r.tokens_out) for r in vit] == [
            ("attn", [4 * 72, 6 * 72], [4 * 70, 6 * 70]), ("mlp", [4 * 70, 6 * 70], [4 * 68, 6 * 68])
        ]
        assert vit[0].units == [(72, 70)] * 10 and [k.numel() for k in vit[0].kept] == [4 * 70, 6 * 70]
        _batch_equals_one_by_one(model, batch, singles, out)
    assert _untouched(model, singles, refs)


def test_an_odd_frame_count_is_refused_by_a_pairing_merge():
    model = tiny_model("llava_onevision")
    _, batch = _setup(LLAVA_ONEVISION_VIDEO, model, [(3, [(3, 40, 48)], 4)])

    class Pairs(FramePairMerge):
        def _pairs(self, view):
            return True

    with vtok.apply(model, Pairs(k=1)), torch.no_grad(), pytest.raises(ValueError, match="not a multiple of 2"):
        model(**batch)


def test_tome_then_holitom_on_onevision_videos(ov_video):
    """ToMe merges in every frame of the tower; HoliTom gets every frame's pooled grid (the model's own 2x2
    pooling of the unmerged patches), segments and merges; batch == one by one, generate, remove() exact."""
    model, batch, singles, refs = ov_video
    m = Seeing(retain=0.5, tau=0.3, inner_layer=2)
    with vtok.apply(model, ["tome", m], tome={"r": 4}) as h, torch.no_grad():
        out = model(**batch).logits
        tokens, probe = m.handed
        vit = [r for r in h.stats if r.stage == "in_vit"]
        assert len(vit[0].units) == 8 + 12 and vit[0].tokens_in == [8 * 36, 12 * 36]  # per frame, per sample
        assert tokens.counts().tolist() == [8 * 9, 12 * 9]  # full pooled 3x3 grids per frame
        assert [r.stage for r in h.stats if r.method == "holitom"] == ["before_llm", "in_llm"]
        _batch_equals_one_by_one(model, batch, singles, out)
    with vtok.apply(model, Seeing(retain=0.5, tau=0.3, inner_layer=2)) as h2, torch.no_grad():
        model(**batch)
        plain = h2.methods[0].handed[0]
    assert not torch.allclose(plain.features, tokens.features)  # the tower did merge
    assert _untouched(model, singles, refs)


def test_a_plan_that_is_not_a_vitmerge_is_refused_at_either_merge_point():
    model = tiny_hf_vision("clip", seed=0).eval()

    class Wrong(FramePairMerge):
        def in_vit_pre(self, view):
            return (view.x, None)

    with vtok.apply(model, Wrong(k=1)), torch.no_grad(), pytest.raises(TypeError, match="must return a vtok.vit.ViTMerge"):
        model(pixel_values=torch.randn(2, 3, 32, 32))

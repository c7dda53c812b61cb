"""Native grids and the projector stage on LLaVA-NeXT / LLaVA-OneVision (``vtok.adapters.anyres_stages``).

A native-grid before_llm method sees every AnyRes crop / video frame before the model's own unpadding and
pooling; the model's packing applies to what it returns when it keeps every native token in order, else the
method declares the layout. The projector stage gets every crop's tower grid and the projector; the adapter
stitches and unpads the reduced crops as the model does, the prompt span resized."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
from conftest import tiny_model, tiny_processor
from test_projector_stage import tokenflex_trains_saves_and_reloads

import vtok
from vtok.method import get_method_class, keep_count
from vtok.methods.quota import frame_budgets, frame_weights, v1_grid
from vtok.testing import LLAVA_ONEVISION_VIDEO, TINY_CASES


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _case(name):
    case = TINY_CASES[name]
    model = tiny_model(name)
    return case, model, case.make_samples(model, case.specs, 0)


def _video_case():
    case = LLAVA_ONEVISION_VIDEO
    model = tiny_model("llava_onevision")
    return case, model, case.make_samples(model, case.specs, 0)


@dataclass
class _NativeScale(vtok.Method):
    """Every native token kept, in order, features times ``factor``: the model's own packing applies."""

    name = "t_native_scale"
    stages = ("before_llm",)
    native_grids = True
    factor: float = 1.0

    def before_llm(self, tokens, probes):
        self.seen = tokens
        return tokens if self.factor == 1.0 else replace(tokens, features=tokens.features * self.factor)


@dataclass
class _NativeFullGrids(vtok.Method):
    """Every native token, laid out by the method: each crop / frame as its own grid (newline per row)."""

    name = "t_native_grids"
    stages = ("before_llm",)
    native_grids = True
    declare: bool = True

    def before_llm(self, tokens, probes):
        return replace(tokens, layout=[list(g) for g in tokens.unit_grids()]) if self.declare else tokens


@dataclass
class _NativeHalf(vtok.Method):
    name = "t_native_half"
    stages = ("before_llm",)
    native_grids = True

    def before_llm(self, tokens, probes):
        keep = tokens.mask & (tokens.positions % 2 == 0)
        return tokens.select(keep)


# ------------------------------------------------------------------ native grids


def test_native_keep_all_on_llava_next_is_the_untouched_model_and_the_model_packs_what_it_returns():
    case, model, samples = _case("llava_next")
    batch = case.batch(samples)
    ref = _logits(model, batch)
    m = _NativeScale()
    with vtok.apply(model, m) as h:
        assert torch.equal(_logits(model, batch), ref)
    crops = [len(g) for g in m.seen.grids]
    assert m.seen.grids == [[(4, 4)] * c for c in crops] and max(crops) > 1  # base + AnyRes crops, before unpadding
    assert torch.equal(m.seen.extra["crop"][0, : 16 * crops[0]], torch.arange(crops[0]).repeat_interleave(16))
    assert h.stats[0].tokens_in == h.stats[0].tokens_out
    assert sum(h.stats[0].tokens_in) == 16 * sum(crops)  # budgets count native tokens
    # features changed, layout kept: the model's own unpadding/newlines apply to them, i.e. the untouched model
    # with a projector whose output is doubled
    with vtok.apply(model, _NativeScale(factor=2.0)):
        doubled = _logits(model, batch)
    hook = model.model.multi_modal_projector.register_forward_hook(lambda mod, a, out: out * 2.0)
    try:
        ref2 = _logits(model, batch)
    finally:
        hook.remove()
    assert not torch.allclose(doubled, ref, atol=1e-3)
    assert torch.allclose(doubled, ref2, atol=1e-5), (doubled - ref2).abs().max()


def test_native_keep_all_on_a_onevision_video_batch_of_different_frame_counts_equals_each_video_alone():
    case, model, samples = _video_case()
    batch = case.batch(samples)
    m = _NativeScale()
    with vtok.apply(model, m):
        both = _logits(model, batch)
        gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert not {"pack_image_features", "apply_pooling"} & set(vars(model.model))  # the wrappers are gone
    assert [len(g) for g in m.seen.grids] == [8, 12] and m.seen.grid == (6, 6)  # 6x6 frames before 3x3 pooling
    assert int(m.seen.frames[1, 12 * 36 - 1]) == 11
    n = batch["input_ids"].shape[1]
    for i, s in enumerate(samples):
        single = case.batch([s])
        alone = _logits(model, single)  # the untouched model on the video alone
        valid = batch["attention_mask"][i].bool()
        assert torch.allclose(both[i][valid], alone[0], atol=1e-5), (both[i][valid] - alone[0]).abs().max()
        ref = model.generate(**single, max_new_tokens=3, do_sample=False)
        assert torch.equal(gen[i, n:], ref[0, single["input_ids"].shape[1] :])


def _frame_features(model, pixels):
    """Each frame's projected 6x6 grid, by hand from the tower (no pooling)."""
    core = model.model
    with torch.no_grad():
        hidden = core.vision_tower(pixels, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
        return core.multi_modal_projector(hidden)


def test_a_declared_native_layout_equals_the_prompt_built_by_hand():
    """Each frame's unpooled 6x6 grid, a newline after each row: the model on that prompt, built by hand."""
    case, model, samples = _video_case()
    single = case.batch(samples[:1])
    with vtok.apply(model, _NativeFullGrids()) as h:
        got = _logits(model, single)[0, -1]
    assert h.stats[0].tokens_out == [8 * 36]
    pix = single["pixel_values_videos"][0]  # [8, C, H, W]
    frames = _frame_features(model, pix)  # [8, 36, D]
    nl = model.model.image_newline
    rows = frames.reshape(8, 6, 6, -1)
    video = torch.cat([torch.cat([rows, nl.expand(8, 6, 1, -1)], 2).reshape(-1, nl.shape[0])])  # 8 x 6 x (6 + 1)
    ids = single["input_ids"][0]
    vid = ids == model.config.video_token_id
    first = int(vid.nonzero()[0])
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
        prompt = torch.cat([emb[:first], video.to(emb.dtype), emb[first + int(vid.sum()) :]])
        ref = model.model.language_model(inputs_embeds=prompt[None]).last_hidden_state
        ref = model.lm_head(ref)[0, -1]
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


@dataclass
class _BaseCropOnly(vtok.Method):
    """The base image's native grid only (the AnyRes crops dropped), declared as one grid."""

    name = "t_native_base"
    stages = ("before_llm",)
    native_grids = True

    def before_llm(self, tokens, probes):
        out = tokens.select(tokens.mask & (tokens.extra["crop"] == 0))
        return replace(out, layout=[gs[:1] for gs in tokens.unit_grids()])


def test_a_declared_native_layout_on_llava_next_equals_the_prompt_built_by_hand():
    """Crop 0 of the native units is the base image: its 4x4 grid, a newline after each row."""
    case, model, samples = _case("llava_next")
    single = case.batch(samples[:1])
    with vtok.apply(model, _BaseCropOnly()) as h:
        got = _logits(model, single)[0, -1]
    assert h.stats[0].tokens_out == [16]
    core = model.model
    with torch.no_grad():
        hidden = core.vision_tower(single["pixel_values"][0, :1], output_hidden_states=True).hidden_states
        base = core.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 1:])[0]  # CLS dropped
        nl = core.image_newline
        image = torch.cat([base.reshape(4, 4, -1), nl.expand(4, 1, -1)], 1).reshape(-1, nl.shape[0])
        ids = single["input_ids"][0]
        img = ids == model.config.image_token_id
        first = int(img.nonzero()[0])
        emb = model.get_input_embeddings()(ids)
        prompt = torch.cat([emb[:first], image.to(emb.dtype), emb[first + int(img.sum()) :]])
        ref = model.lm_head(core.language_model(inputs_embeds=prompt[None]).last_hidden_state)[0, -1]
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


def test_what_native_grids_cannot_serve_is_refused():
    case, model, samples = _case("llava_next")
    batch = case.batch(samples[:1])
    with vtok.apply(model, _NativeHalf()), pytest.raises(ValueError, match="without declaring how they go into the prompt"):
        _logits(model, batch)
    with pytest.raises(ValueError, match="only the first before_llm method of a chain sees"):
        vtok.apply(model, ["pool", _NativeScale()])
    with pytest.raises(ValueError, match="reads ViT attention probes, which vtok does not align with the native grids"):
        vtok.apply(model, [_NativeScale(), "hiprune"])
    # pre-computed video features the tower produced without the method: their layout is known (from their
    # length), their native grids are not
    vcase, vmodel, vsamples = _video_case()
    vbatch = vcase.batch(vsamples[:1])
    with torch.no_grad():
        feats = vmodel.model.get_video_features(vbatch["pixel_values_videos"])
    kw = {k: v for k, v in vbatch.items() if k != "pixel_values_videos"}
    with vtok.apply(vmodel, _NativeScale()), pytest.raises(ValueError, match="these features were pre-computed without it"):
        with torch.no_grad():
            vmodel(**kw, mm_encoder_outputs={"video": feats})


def test_quota_native_on_onevision_videos_splits_the_budget_over_native_frames_and_batches():
    case, model, samples = _video_case()
    batch = case.batch(samples)
    scores = {8: torch.linspace(0.1, 1.0, 8), 12: torch.linspace(1.0, 0.0, 12)}
    scorer = lambda frames, questions, ask: [scores[f.shape[0]] for f in frames]  # noqa: E731
    q = get_method_class("quota")(retain=0.3, native=True, scorer=scorer)
    assert q.native_grids and not get_method_class("quota")().native_grids
    with vtok.apply(model, q) as h:
        both = _logits(model, batch)
        gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
        e = h.stats[0]
    assert e.tokens_in == [8 * 36, 12 * 36]  # native 6x6 frames (the model pools them to 3x3)
    expect = []
    for t in (8, 12):
        total = keep_count(t * 36, 0.3)
        budgets = frame_budgets(total, [36] * t, frame_weights(scores[t], 2.0))
        assert sum(budgets) == total and max(budgets) > 9  # a relevant frame gets more than a pooled 3x3 frame
        expect.append(sum(a * b for a, b in (v1_grid(c, 6, 6) for c in budgets)))
    assert e.tokens_out == expect
    n = batch["input_ids"].shape[1]
    for i, s in enumerate(samples):
        single = case.batch([s])
        with vtok.apply(model, q):
            alone = _logits(model, single)
            ref = model.generate(**single, max_new_tokens=3, do_sample=False)
        valid = batch["attention_mask"][i].bool()
        k = int(valid.sum())
        assert torch.allclose(both[i][-1], alone[0][-1], atol=1e-5) and k == alone.shape[1]
        assert torch.equal(gen[i, n:], ref[0, single["input_ids"].shape[1] :])
    # retain=1.0 hands every native token back: the model pools them as usual (the untouched model)
    single = case.batch(samples[:1])
    untouched = _logits(model, single)
    with vtok.apply(model, get_method_class("quota")(retain=1.0, native=True, scorer=scorer)):
        assert torch.equal(_logits(model, single), untouched)


def test_quota_native_with_its_default_scorer_generates():
    case, model, samples = _video_case()
    batch = case.batch(samples)
    with vtok.apply(model, "quota", retain=0.25, native=True, processor=tiny_processor("llava_onevision")) as h:
        out = model.generate(**batch, max_new_tokens=2, do_sample=False)
        assert h.stats[0].tokens_in == [8 * 36, 12 * 36]
        assert all(0 < o <= keep_count(i, 0.25) for i, o in zip(h.stats[0].tokens_in, h.stats[0].tokens_out))
    assert out.shape == (2, batch["input_ids"].shape[1] + 2)


# ------------------------------------------------------------------ projector stage


def test_m3_full_scale_on_llava_next_is_the_untouched_model_bit_for_bit():
    for name in ("llava_next", "llava_onevision"):
        case, model, samples = _case(name)
        batch = case.batch(samples)
        ref = _logits(model, batch)
        with vtok.apply(model, "matryoshka", scale="full") as h:
            assert torch.equal(_logits(model, batch), ref), name
            assert h.stats[0].stage == "projector" and h.stats[0].tokens_in == h.stats[0].tokens_out


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
def test_the_reduced_layout_at_full_scale_is_the_models_own_packing(name):
    """The stitching, the model's unpad_image (and OneVision's anyres_max down-scaling) at side s, checked where
    the model's own packing exists: s = g."""
    model = tiny_model(name)
    cfg = model.config
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    hf = __import__(type(model).__module__, fromlist=["get_anyres_image_grid_shape"])
    nl = model.model.image_newline
    with vtok.apply(model, "matryoshka", scale="full") as h:
        adapter = h.adapter
        torch.manual_seed(0)
        cut = 0
        for size in ([40, 70], [60, 30], [50, 50], [30, 80], [20, 90], [90, 25], [90, 85]):
            sizes = torch.tensor([size])
            crops = adapter.num_patches(sizes)[0]
            feats = torch.randn(crops, g * g, nl.shape[0])
            aspect = getattr(cfg, "vision_aspect_ratio", None)
            seq, n_tok = adapter._stitch(feats, g, sizes[0], aspect)
            opts = {"vision_aspect_ratio": aspect} if aspect else {"vision_feature_select_strategy": "default"}
            own = model.model.pack_image_features([feats], sizes, image_newline=nl, **opts)[0][0]
            assert torch.equal(seq, own), size
            assert n_tok == int((~(own == nl).all(-1)).sum())
            rows, cols = hf.get_anyres_image_grid_shape(sizes[0], cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            cut += n_tok < (1 + rows * cols) * g * g
        assert cut >= 2  # some of these images are really unpadded (or down-scaled)


@pytest.mark.filterwarnings("ignore:tokenflex. n=")
@pytest.mark.parametrize("name,key,values", [("matryoshka", "scale", [4, 1, 16]), ("tokenflex", "n", [2, 1, 3])])
def test_a_projector_setting_per_sample_on_llava_next_equals_each_sample_alone(name, key, values, tmp_path):
    case, model, samples = _case("llava_next")
    batch = case.batch(samples)
    weights = tmp_path / "w.safetensors"
    with vtok.apply(model, name) as h:
        h.save(weights)
    with vtok.apply(model, name, weights=weights, **{key: values}) as h:
        both = _logits(model, batch)
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        e = h.stats[0]
    assert e.stage == "projector" and e.tokens_out[1] < e.tokens_out[0] < e.tokens_in[0]
    n = batch["input_ids"].shape[1]
    for i, s in enumerate(samples):
        single = case.batch([s])
        with vtok.apply(model, name, weights=weights, **{key: values[i]}) as h:
            alone = _logits(model, single)
            gen = model.generate(**single, max_new_tokens=3, do_sample=False)
            assert h.stats[0].tokens_out == [e.tokens_out[i]]
        valid = batch["attention_mask"][i].bool()
        assert torch.allclose(both[i][valid], alone[0], atol=1e-5), (both[i][valid] - alone[0]).abs().max()
        assert torch.equal(out[i, n:], gen[0, single["input_ids"].shape[1] :])


def test_m3_scale_on_llava_next_is_per_crop_pooling_before_unpadding():
    """The base grid and every crop pooled 4x4 -> 2x2 by the method, stitched, unpadded at 2x2 per crop."""
    case, model, samples = _case("llava_next")
    single = case.batch(samples[:1])  # a 40x70 image: base + 1x2 crops
    seen = {}
    with vtok.apply(model, "matryoshka", scale=4) as h:
        hook = model.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True
        )
        try:
            _logits(model, single)
        finally:
            hook.remove()
        out = h.stats[0].tokens_out
    proj_in = []
    hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: proj_in.append(a[0]))
    try:
        _logits(model, single)
    finally:
        hook.remove()
    with torch.no_grad():
        y = model.model.multi_modal_projector(proj_in[0])  # [crops, 16, D]
        k, d = y.shape[0], y.shape[-1]
        pooled = torch.nn.functional.adaptive_avg_pool2d(y.transpose(1, 2).reshape(k, d, 4, 4), 2).reshape(k, d, 2, 2)
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    size = single["image_sizes"][0]
    rows, cols = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, 32)
    assert (rows, cols) == (2, 2) and k == 5  # 40x70 -> 64x64: base + 2x2 crops
    base = pooled[0].flatten(1).T
    hi = torch.cat([torch.cat(list(pooled[1 + i * cols : 1 + (i + 1) * cols]), -1) for i in range(rows)], 1)  # 4 x 4
    hi = unpad_image(hi, size)
    r, c = hi.shape[1:]
    assert out == [4 + r * c] and (r, c) == (2, 4)  # unpadded at side 2: 2 of 4 rows
    nl = model.model.image_newline
    hi = torch.cat([hi, nl[:, None, None].expand(d, r, 1)], -1).flatten(1).T
    emb = seen["embeds"][0]  # one sample: no padding
    ids = single["input_ids"][0]
    first = int((ids == model.config.image_token_id).nonzero()[0])
    assert torch.allclose(emb[first : first + 4 + hi.shape[0]], torch.cat([base, hi]), atol=1e-6)
    assert not torch.equal(emb[first + 4 + hi.shape[0]], nl)  # the text follows


@dataclass
class _SeeCrops(vtok.Method):
    name = "t_see_crops"
    stages = ("projector",)

    def projector(self, tokens, project):
        self.seen = tokens
        return vtok.VisualTokens.from_features(project(tokens.features), tokens.owner, grid=tokens.grid)


def test_the_projector_stage_gets_one_unit_per_crop_with_its_image_and_crop():
    case, model, samples = _case("llava_next")
    batch = case.batch(samples)
    ref = _logits(model, batch)
    m = _SeeCrops()
    with vtok.apply(model, m):
        assert torch.equal(_logits(model, batch), ref)  # the model's projector on every full grid: untouched
    t = m.seen
    assert t.grid == (4, 4) and t.features.shape[-1] == model.config.vision_config.hidden_size
    image, crop = t.extra["image"][:, 0], t.extra["crop"][:, 0]
    counts = torch.bincount(image).tolist()
    assert len(counts) == 4 and torch.equal(crop, torch.cat([torch.arange(c) for c in counts]))
    assert torch.equal(t.owner, torch.tensor([0, 1, 2, 2]).repeat_interleave(torch.tensor(counts)))
    assert bool((t.extra["frame"] == -1).all())


def test_tokenflex_trains_on_llava_next_saves_reloads_and_leaves_the_model_untouched(tmp_path):
    case = TINY_CASES["llava_next"]
    model = case.build()
    batch = case.batch(case.make_samples(model, case.specs[:2], 0))
    tokenflex_trains_saves_and_reloads(model, batch, tmp_path, steps=10)


def test_what_the_projector_stage_cannot_serve_on_next_and_onevision_is_refused():
    case, model, samples = _case("llava_next")
    batch = case.batch(samples[:1])
    with pytest.raises(ValueError, match="a before_llm method \\(pool\\) cannot follow it"):
        vtok.apply(model, ["matryoshka", "pool"])
    with vtok.apply(model, "matryoshka", scale=4), pytest.raises(ValueError, match="call the model .*forward or generate"):
        model.model.get_image_features(batch["pixel_values"], batch["image_sizes"])
    vcase, vmodel, vsamples = _video_case()
    pix = vcase.batch(vsamples[:1])["pixel_values_videos"]
    with vtok.apply(vmodel, "matryoshka", scale=9), pytest.raises(ValueError, match="call the model"):
        vmodel.model.get_video_features(pix)


def test_m3_on_onevision_videos_pools_each_frame_in_place_of_the_models_pooling():
    """Full scale: the model's own 2x2 bilinear pooling (the untouched model). Scale 9 (3x3 per 6x6 frame):
    M3's average pooling of each frame laid out as the model lays out a video, which for an exact halving
    is what the model's bilinear pooling computes too."""
    case, model, samples = _video_case()
    batch = case.batch(samples)
    refs = [_logits(model, case.batch([s])) for s in samples]
    for scale, exact in (("full", True), (9, False)):
        with vtok.apply(model, "matryoshka", scale=scale) as h:
            both = _logits(model, batch)
            assert h.stats[0].tokens_out == [8 * 9, 12 * 9] and h.stats[0].stage == "projector"
            for i, s in enumerate(samples):
                alone = _logits(model, case.batch([s]))
                if exact:
                    assert torch.equal(alone, refs[i])
                assert torch.allclose(alone, refs[i], atol=1e-5), (alone - refs[i]).abs().max()
                valid = batch["attention_mask"][i].bool()
                assert torch.allclose(both[i][valid], alone[0], atol=1e-5)
    with vtok.apply(model, "matryoshka", scale=1) as h:
        out = model.generate(**{k: v for k, v in batch.items() if k != "position_ids"}, max_new_tokens=2, do_sample=False)
        assert h.stats[0].tokens_out == [8, 12]
    assert out.shape[0] == 2


def test_the_readme_snippet_runs_and_prints_what_it_says(capsys):
    import re
    from pathlib import Path

    from vtok.method import _REGISTRY

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    part = text[text.index("### Native grids and the projector stage") :]
    code = re.findall(r"```python\n(.*?)```", part, flags=re.S)[0]
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own code
    _REGISTRY.pop("every_other_frame", None)
    printed = capsys.readouterr().out
    assert "[288, 432] -> [144, 216]" in printed and "[72, 108] -> [72, 12]" in printed


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
def test_quota_native_on_anyres_images_resizes_each_crop_and_batches(name):
    """Images have no time: every native crop grid is scaled by sqrt(retain) and laid out by QuoTA."""
    case, model, samples = _case(name)
    batch = case.batch(samples)
    q = get_method_class("quota")(retain=0.25, native=True, images_as_frames=False)  # no time between images
    with vtok.apply(model, q, processor=tiny_processor(name)) as h:
        both = _logits(model, batch)
        gen = model.generate(**{k: v for k, v in batch.items() if k != "position_ids"}, max_new_tokens=3, do_sample=False)
        e = h.stats[0]
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    half = round(side * 0.5)
    assert [o * side * side for o in e.tokens_out] == [i * half * half for i in e.tokens_in]  # each crop: side/2 squared
    n = batch["input_ids"].shape[1]
    for i, s in enumerate(samples):
        single = case.batch([s])
        with vtok.apply(model, q, processor=tiny_processor(name)):
            alone = _logits(model, single)
            ref = model.generate(**{k: v for k, v in single.items() if k != "position_ids"}, max_new_tokens=3, do_sample=False)
        assert torch.allclose(both[i][-1], alone[0][-1], atol=1e-5), (both[i][-1] - alone[0][-1]).abs().max()
        assert torch.equal(gen[i, n:], ref[0, single["input_ids"].shape[1] :])

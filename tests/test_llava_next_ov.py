"""LLaVA-NeXT (AnyRes) and LLaVA-OneVision (AnyRes images, videos).

Units and their bookkeeping against the model's own packed features, newline re-insertion, ``pool``
on video frames against the model run on 2x-pooled frames, ViT probes against eager attention maps,
and the invariants on a batch of two videos of 8 and 12 frames (which the untouched transformers
model cannot run as one batch: references are per sample). The invariant suite
(test_invariants.py) covers the image cases ``llava_next`` and ``llava_onevision`` of TINY_CASES.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

import vtok
from vtok.adapters import find_adapter
from vtok.method import Method, ViTAttention, get_method_class
from vtok.testing import LLAVA_ONEVISION_VIDEO, TINY_CASES, tiny_llava_onevision

# ------------------------------------------------------------------ helpers


def fwd(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def example(name, **override):
    cls = get_method_class(name)
    return cls(**{**cls.example, **override})


def setup(case, model, seed=0):
    samples = case.make_samples(model, case.specs, seed)
    return samples, case.batch(samples)


def hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


@dataclass
class Spy(Method):
    """Keeps everything; records the tokens and probes it was handed."""

    name = "spy"
    stages = ("before_llm",)
    position_policy: str = "compact"
    wanted: tuple = ()

    def probes(self):
        return list(self.wanted)

    def before_llm(self, tokens, probes):
        self.tokens, self.seen = tokens, probes
        return tokens


@dataclass
class Keep(Method):
    """Keeps the tokens where ``rule(tokens)`` is True (all by default) and pads one empty slot, so
    the adapter always splices (even when nothing is removed)."""

    name = "keep"
    stages = ("before_llm",)
    position_policy: str = "compact"
    rule: object = None
    collapse: bool = False  # give every token its row's first position (repeated positions, like new tokens)

    def before_llm(self, tokens, probes):
        keep = tokens.mask if self.rule is None else self.rule(tokens) & tokens.mask
        out = tokens.select(keep)
        if self.collapse:
            out = replace(out, positions=out.positions - out.extra["col"])
        pad = lambda x: torch.cat([x, torch.zeros_like(x[:, :1])], 1)  # noqa: E731
        return replace(
            out,
            features=pad(out.features),
            mask=pad(out.mask),
            positions=pad(out.positions),
            sizes=pad(out.sizes),
            frames=None if out.frames is None else pad(out.frames),
            extra={k: pad(v) for k, v in out.extra.items()},
        )


class LMInput:
    """Records what the language model receives (register inside ``vtok.apply``: runs after vtok)."""

    def __init__(self, model):
        self.lm = model.model.language_model

    def __enter__(self):
        self.h = self.lm.register_forward_pre_hook(self.pre, with_kwargs=True)
        self.calls = []
        return self

    def __exit__(self, *a):
        self.h.remove()

    def pre(self, module, args, kwargs):
        self.calls.append({k: kwargs[k] for k in ("inputs_embeds", "attention_mask", "position_ids")})

    def valid(self, i, call=0):
        c = self.calls[call]
        return c["inputs_embeds"][i][c["attention_mask"][i].bool()]


def packed_features(model, batch):
    """Untouched per-image packed features (newlines included) and the projector's per-crop output."""
    crops = []
    h = model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: crops.append(o))
    try:
        with torch.no_grad():
            kw = {k: batch[k] for k in ("image_sizes", "batch_num_images") if k in batch}
            packed = model.model.get_image_features(batch["pixel_values"], **kw).pooler_output
    finally:
        h.remove()
    return list(packed), crops[0]


def expected_lm_input(model, batch, token_id, per_unit, keep_tokens):
    """The untouched prompt embeddings with only the kept visual tokens and the newlines of rows that
    keep a token, derived independently from the packed features (a newline is found by value)."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
    nl = model.model.image_newline.to(emb.dtype)
    g2 = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    emb = emb.masked_scatter((ids == token_id).unsqueeze(-1), torch.cat(per_unit).to(emb.dtype))
    keep = mask & (ids != token_id)
    slots = (ids == token_id).nonzero()
    off = 0
    for feats, kt in zip(per_unit, keep_tokens):
        is_nl = (feats == nl).all(-1)
        start_rows = g2 if feats.shape[0] > g2 + 1 else 0  # AnyRes: the base grid has no newline
        row_has, j = False, 0
        for s in range(feats.shape[0]):
            b, pos = slots[off + s].tolist()
            if is_nl[s]:
                keep[b, pos] = row_has
                row_has = False
            else:
                keep[b, pos] = bool(kt[j])
                row_has |= s >= start_rows and bool(kt[j])
                j += 1
        off += feats.shape[0]
    return [emb[i][keep[i]] for i in range(ids.shape[0])]


@pytest.fixture(scope="module")
def video():
    """The OneVision model, the 8/12-frame video batch, per-sample batches and untouched per-sample logits."""
    model = tiny_model("llava_onevision")
    samples, batch = setup(LLAVA_ONEVISION_VIDEO, model)
    singles = [LLAVA_ONEVISION_VIDEO.batch([s]) for s in samples]
    return model, batch, singles, [fwd(model, s) for s in singles]


# ------------------------------------------------------------------ layouts


@pytest.mark.parametrize("case_name", ["llava_next", "llava_onevision"])
def test_image_units_follow_the_models_packing(case_name):
    model = tiny_model(case_name)
    samples, batch = setup(TINY_CASES[case_name], model)
    packed, crops = packed_features(model, batch)
    spy = Spy()
    with vtok.apply(model, spy) as h:
        fwd(model, batch)
    assert h.adapter.name == case_name
    t, nl = spy.tokens, model.model.image_newline
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    adapter = find_adapter(model)(model, {}, None)
    starts = torch.tensor([0] + adapter.num_patches(**batch))[:-1].cumsum(0)
    assert t.num_units == len(packed) == 4 and t.owner.tolist() == [0, 1, 2, 2]
    assert t.grid is None and t.frames is None
    grids = t.unit_grids()
    for u, feats in enumerate(packed):
        is_nl = (feats == nl).all(-1)
        n = int(t.counts()[u])
        assert torch.equal(t.features[u, :n], feats[~is_nl])  # newlines are layout, not tokens
        assert sum(h * w for h, w in grids[u]) == n and grids[u][0] == (g, g)
        crop, patch, block, row = (t.extra[k][u, :n] for k in ("crop", "patch", "block", "row"))
        if len(grids[u]) == 2:  # base + unpadded high-res grid, one newline per high-res row
            rows, cols = grids[u][1]
            assert int(is_nl.sum()) == rows and torch.equal(row[g * g :], torch.arange(rows).repeat_interleave(cols))
            assert torch.equal(block, (torch.arange(n) >= g * g).long())
            assert bool((crop[: g * g] == 0).all()) and bool((crop[g * g :] >= 1).all())
        else:  # several images in a OneVision prompt: base image only, closed by one newline
            assert int(is_nl.sum()) == 1 and bool(is_nl[-1]) and bool((crop == 0).all())
        if case_name == "llava_next" or u != 1:  # unit 1 of OneVision is down-scaled (anyres_max_2)
            # every token is the projected feature of the crop and patch it says it comes from
            assert torch.equal(t.features[u, :n], crops[starts[u] + crop, patch])
    # different aspect ratios: different unpadded grids
    assert grids[0][1] != grids[1][1]


def test_video_units_pool_factor_two_and_trailing_newline(video):
    model, batch, singles, _ = video
    videos = batch["pixel_values_videos"]
    assert isinstance(videos, list) and [v.shape[0] for v in videos] == [8, 12]
    with torch.no_grad():
        ref = [model.model.get_video_features(v[None]).pooler_output[0] for v in videos]  # [T*3*3 + 1, D]
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        att = eager.model.vision_tower(torch.cat(videos), output_attentions=True).attentions[1].mean(1)
    probe = ViTAttention(layer=1, kind="colmean")
    spy = Spy(wanted=(probe,))
    with vtok.apply(model, spy):
        fwd(model, batch)
    t = spy.tokens
    assert t.grid == (3, 3) and t.unit_grids() == [[(3, 3)] * 8, [(3, 3)] * 12]
    pooled_att = model.model.apply_pooling(att.mean(1).unsqueeze(-1))[..., 0]  # the model's pooling, on stats
    for u, (r, n_frames) in enumerate(zip(ref, [8, 12])):
        n = n_frames * 9
        assert int(t.counts()[u]) == n
        assert torch.equal(t.features[u, :n], r[:-1])
        assert torch.equal(r[-1], model.model.image_newline.to(r.dtype))
        assert torch.equal(t.frames[u, :n], torch.arange(n_frames).repeat_interleave(9))
        rows = slice(0, 8) if u == 0 else slice(8, 20)
        torch.testing.assert_close(spy.seen[probe][u, :n], pooled_att[rows].reshape(-1), atol=1e-5, rtol=1e-4)

    # pool factor 2: the token count the model itself produces from 2x-pooled frames
    half = tiny_llava_onevision(image_size=24)
    with torch.no_grad():
        expected = [half.model.get_video_features(F.avg_pool2d(v, 2)[None]).pooler_output.shape[1] for v in videos]
    assert expected == [8 * 4 + 1, 12 * 4 + 1]
    with vtok.apply(model, "pool", factor=2) as h, LMInput(model) as cap:
        fwd(model, batch)
    assert [r.tokens_out for r in h.stats] == [[8 * 4, 12 * 4]]
    vid = model.config.video_token_id
    text = ((batch["input_ids"] != vid) & batch["attention_mask"].bool()).sum(1)
    assert (cap.calls[0]["attention_mask"].sum(1) - text).tolist() == expected
    # and the values: each frame's 3x3 grid pooled in ceil-mode 2x2 windows, the newline after the last frame
    for i, (r, n_frames) in enumerate(zip(ref, [8, 12])):
        grid = r[:-1].view(n_frames, 3, 3, -1).float()
        win = [(0, 2), (2, 3)]
        pooled = torch.stack([grid[:, a:b, c:d].mean((1, 2)) for a, b in win for c, d in win], 1).flatten(0, 1)
        got = cap.valid(i)
        before = int((batch["input_ids"][i] == vid).nonzero()[0]) - int((batch["attention_mask"][i] == 0).sum())
        torch.testing.assert_close(got[before : before + pooled.shape[0]], pooled.to(got.dtype))
        assert torch.equal(got[before + pooled.shape[0]], model.model.image_newline.to(got.dtype))


# ------------------------------------------------------------------ newlines


@pytest.mark.parametrize("case_name", ["llava_next", "llava_onevision", "llava_onevision_video"])
def test_newline_layout_is_the_models_when_nothing_is_removed(case_name, video):
    if case_name == "llava_onevision_video":
        model, batch, singles, refs = video
    else:
        model = tiny_model(case_name)
        _, batch = setup(TINY_CASES[case_name], model)
        singles, refs = [batch], [fwd(model, batch)]
    for policy, collapse in (("keep", False), ("compact", False), ("keep", True)):
        with vtok.apply(model, Keep(position_policy=policy, collapse=collapse)) as h:
            out = fwd(model, batch)
        assert h.stats and all(r.tokens_in == r.tokens_out for r in h.stats)
        if len(singles) == 1:
            torch.testing.assert_close(out, refs[0], atol=1e-6, rtol=1e-6)
        else:
            for i, ref in enumerate(refs):
                torch.testing.assert_close(out[i, -ref.shape[1] :], ref[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "rule",
    [
        pytest.param(lambda t: ~((t.extra["block"] == 1) & (t.extra["row"] % 3 == 0)), id="drop-rows"),
        pytest.param(lambda t: t.extra["crop"] % 2 == 0, id="per-crop"),
        pytest.param(lambda t: (t.extra["row"] + t.extra["col"]) % 2 == 0, id="checkerboard"),
    ],
)
def test_rows_keep_their_newline_iff_a_token_survives(rule):
    model = tiny_model("llava_next")
    _, batch = setup(TINY_CASES["llava_next"], model)
    packed, _ = packed_features(model, batch)
    spy = Spy()
    with vtok.apply(model, spy):
        fwd(model, batch)
    t = spy.tokens
    keep = rule(t) & t.mask
    kept = [keep[u, : int(t.counts()[u])] for u in range(t.num_units)]
    assert any(not k.all() for k in kept)
    want = expected_lm_input(model, batch, model.config.image_token_id, packed, kept)
    for policy, collapse in (("keep", False), ("compact", False), ("compact", True)):
        with vtok.apply(model, Keep(position_policy=policy, rule=rule, collapse=collapse)), LMInput(model) as cap:
            fwd(model, batch)
        for i, w in enumerate(want):
            torch.testing.assert_close(cap.valid(i), w, atol=0, rtol=0)
            pos = cap.calls[0]["position_ids"][i][cap.calls[0]["attention_mask"][i].bool()]
            if policy == "compact":
                assert torch.equal(pos, torch.arange(w.shape[0]))
            else:
                assert bool((pos[1:] > pos[:-1]).all()) and int(pos[-1]) == int(batch["attention_mask"][i].sum()) - 1


def test_mixed_images_and_videos_in_one_batch(video):
    """A OneVision prompt with an image and a 4-frame video beside one with a 6-frame video."""
    model = video[0]
    case = LLAVA_ONEVISION_VIDEO
    samples = case.make_samples(model, [(3, [(40, 90), (4, 40, 48)], 4), (9, [(6, 40, 48)], 2)], 4)
    batch = case.batch(samples)
    with vtok.apply(model, "pool", factor=2) as h:
        out = fwd(model, batch)
        # image: 6x6 -> 3x3 and 6x12 -> 3x6; videos: 3x3 -> 2x2 per frame
        assert [(r.tokens_in, r.tokens_out) for r in h.stats] == [([36 + 72 + 4 * 9, 6 * 9], [9 + 18 + 4 * 4, 6 * 4])]
        for i, s in enumerate(samples):
            one = fwd(model, case.batch([s]))
            torch.testing.assert_close(out[i, -one.shape[1] :], one[0], atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------ probes


def test_vit_probes_follow_crops_and_patches():
    model = tiny_model("llava_next")
    _, batch = setup(TINY_CASES["llava_next"], model)
    probes = (ViTAttention(layer=0, kind="cls"), ViTAttention(layer=1, kind="colmean"))
    spy = Spy(wanted=probes)
    with vtok.apply(model, spy):
        fwd(model, batch)
    t = spy.tokens
    adapter = find_adapter(model)(model, {}, None)
    n_patches = adapter.num_patches(**batch)
    pixels = torch.cat([p[:k] for p, k in zip(batch["pixel_values"], n_patches)])
    starts = torch.tensor([0] + n_patches)[:-1].cumsum(0)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        att = eager.model.vision_tower(pixels, output_attentions=True).attentions
    ref = {probes[0]: att[0].mean(1)[:, 0, 1:], probes[1]: att[1].mean(1).mean(1)[:, 1:]}  # CLS dropped
    for p in probes:
        for u in range(t.num_units):
            n = int(t.counts()[u])
            want = ref[p][starts[u] + t.extra["crop"][u, :n], t.extra["patch"][u, :n]]
            torch.testing.assert_close(spy.seen[p][u, :n], want, atol=1e-5, rtol=1e-4)
    assert model.config.text_config._attn_implementation == "sdpa"


# ------------------------------------------------------------------ invariants on the 8/12-frame batch


def _supported(case_name):
    adapter = find_adapter(tiny_model(case_name))
    return [n for n in vtok.list_methods() if set(get_method_class(n).stages) <= set(adapter.stages)]


@pytest.mark.parametrize("method", _supported("llava_onevision"))
def test_ragged_video_batch_invariants(method, video):
    model, batch, singles, refs = video
    hooks_before = hook_counts(model)
    impl = model.config.text_config._attn_implementation
    gen_batch = {k: v for k, v in batch.items() if k != "position_ids"}
    proc = LLAVA_ONEVISION_VIDEO.make_processor(model)  # methods may read the question
    with vtok.apply(model, example(method), processor=proc) as h:
        out = fwd(model, batch)
        stats = [(r.tokens_in, r.tokens_out) for r in h.stats]
        assert any(sum(o) < sum(i) for i, o in stats), h.stats
        assert torch.equal(fwd(model, batch), out)  # deterministic
        assert model.config.text_config._attn_implementation == impl == "sdpa"
        for i, s in enumerate(singles):
            one = fwd(model, s)
            assert [(r.tokens_in, r.tokens_out) for r in h.stats] == [([a[i]], [b[i]]) for a, b in stats]
            torch.testing.assert_close(out[i, -one.shape[1] :], one[0], atol=2e-5, rtol=1e-4)
        gen = model.generate(**gen_batch, max_new_tokens=8, do_sample=False)
        assert any(sum(r.tokens_out) < sum(r.tokens_in) for r in h.stats)  # generate's pre-encoding path
        s_len = gen_batch["input_ids"].shape[1]
        for i, s in enumerate(singles):
            one = model.generate(**{k: v for k, v in s.items() if k != "position_ids"}, max_new_tokens=8, do_sample=False)
            new_one = one[0, s["input_ids"].shape[1] :]  # a single run may stop early at EOS
            assert torch.equal(gen[i, s_len : s_len + new_one.numel()], new_one)
    assert hook_counts(model) == hooks_before
    assert "get_video_features" not in vars(model.model) and "get_image_features" not in vars(model.model)
    for s, ref in zip(singles, refs):
        assert torch.equal(fwd(model, s), ref)  # remove() is exact
    cls = get_method_class(method)
    if cls.noop is not None:
        with vtok.apply(model, cls(**{**cls.example, **cls.noop}), processor=proc):
            out = fwd(model, batch)
        for i, ref in enumerate(refs):
            torch.testing.assert_close(out[i, -ref.shape[1] :], ref[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("policy", ["keep", "compact"])
def test_fastv_on_stacked_videos_drops_equal_masks_and_generates(policy, video):
    """Two 8-frame videos (one stacked tensor, which the untouched model runs too): in-LLM pruning
    equals the untouched model with the pruned tokens masked from layer K on; generate matches."""
    from test_invariants import MaskedReference, pruned_schedule

    model = video[0]
    case = LLAVA_ONEVISION_VIDEO
    batch = case.batch(case.make_samples(model, [(3, [(8, 40, 48)], 4), (9, [(8, 40, 48)], 2)], 3))
    assert batch["pixel_values_videos"].shape[:2] == (2, 8)
    gen_batch = {k: v for k, v in batch.items() if k != "position_ids"}
    with vtok.apply(model, example("fastv", position_policy=policy)) as h:
        out = fwd(model, batch)
        (stage,) = [r for r in h.stats if r.stage == "in_llm"]
        generated = model.generate(**gen_batch, max_new_tokens=8, do_sample=False)
    schedule = pruned_schedule(batch, [stage], model.config.video_token_id)
    pruned = schedule[stage.layer]
    assert bool(pruned.any())
    with MaskedReference(model, schedule, policy):
        ref = fwd(model, batch)
        ref_gen = model.generate(**gen_batch, max_new_tokens=8, do_sample=False)
    keep = batch["attention_mask"].bool() & ~pruned
    torch.testing.assert_close(out[keep], ref[keep], atol=2e-5, rtol=1e-4)
    assert torch.equal(generated, ref_gen)


def test_frame_grid_of_a_large_patch_grid():
    """27 x 27 patches (OneVision-7B's SigLIP at 384 px) pool to 14 x 14 per frame; counting distinct
    interpolated row coordinates once gave 24 rows (float noise)."""
    model = tiny_llava_onevision(image_size=54, patch=2)
    assert find_adapter(model)(model, {}, None).frame_grid() == (14, 14)


# ------------------------------------------------------------------ pre-computed features


def test_layout_store_finds_a_tensor_by_identity_only():
    from vtok.adapters.anyres import LayoutStore

    store = LayoutStore()
    a = torch.zeros(4)
    store.put(a, "layout")
    assert store.get(a) == "layout"
    assert store.get(a.clone()) is None and store.get(a.view(2, 2)) is None  # equal values are not enough
    del a  # the entry goes with its tensor: a recycled id() finds nothing
    assert store._items == {}


@pytest.mark.parametrize("case_name", ["llava_next", "llava_onevision"])
def test_precomputed_features_find_their_layouts_and_stay_plain(case_name):
    """Features the tower produced while vtok was attached (what generate pre-computes) give the same
    prefill as pixel values, and nothing of vtok is written onto them."""
    model = tiny_model(case_name)
    _, batch = setup(TINY_CASES[case_name], model)
    batch = {k: v for k, v in batch.items() if k != "position_ids"}
    pixels = {k: batch.pop(k) for k in ("pixel_values", "image_sizes", "batch_num_images") if k in batch}
    with vtok.apply(model, "pool", factor=2):
        ref = fwd(model, {**batch, **pixels})
        with torch.no_grad():
            image = model.model.get_image_features(**pixels)
        assert all(not vars(t) for t in image.pooler_output)
        out = fwd(model, {**batch, "mm_encoder_outputs": {"image": image}})
    assert torch.equal(out, ref)


# ------------------------------------------------------------------ errors


def test_clear_errors(video):
    model = tiny_model("llava_next")
    _, batch = setup(TINY_CASES["llava_next"], model)
    with torch.no_grad():
        mm = {"image": model.model.get_image_features(batch["pixel_values"], batch["image_sizes"])}
    with vtok.apply(model, "pool"):
        with pytest.raises(ValueError, match="cannot tell how the image features of this prompt were laid out"):
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], mm_encoder_outputs=mm)
    ov, vbatch, _, _ = video
    bad = dict(vbatch, pixel_values_videos=[torch.stack(vbatch["pixel_values_videos"][:1] * 2)])
    with vtok.apply(ov, "pool"):
        with pytest.raises(ValueError, match=r"one tensor \[frames, channels, height, width\] per video"):
            fwd(ov, bad)

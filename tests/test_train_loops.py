"""The training entry points of the vision-side methods: TempMe's retrieval proxy (windows split by time, an unseen
caption frame, recall), and the shared loop (saves, logs, leaves the model)."""

from __future__ import annotations

import json

import numpy as np
import torch

import vtok
from vtok.eval.train import step_loop
from vtok.eval.train_tempme import Windows, _recall
from vtok.methods.tempme import info_nce, video_embeddings
from vtok.testing import tiny_hf_vision


def test_windows_train_on_the_first_70_percent_test_on_the_rest_and_caption_an_unseen_frame():
    lengths = [100, 44, 250, 20]  # test part of clip 1: 14 frames (stride 1 only); of clip 3: 6 (too short)
    rng = np.random.default_rng(0)
    for part in ("train", "test"):
        w = Windows.sample(lengths, 300, 12, part, rng)
        assert (3 in w.clip) == (part == "train") and 1 in w.clip
        for c, f, cap in zip(w.clip, w.frames, w.caption):
            cut = int(0.7 * lengths[c])
            lo, hi = (0, cut) if part == "train" else (cut, lengths[c])
            assert len(f) == 12 and f == sorted(f) and len(set(f)) == 12
            assert lo <= min(f) and max(f) < hi and lo <= cap < hi
            assert cap not in f  # a frame of the part the video does not hold
            if f[1] - f[0] >= 2:
                assert f[0] < cap < f[-1]  # between two of its frames


def test_recall_and_clip_at_1():
    video = torch.eye(4)
    text = torch.eye(4)[[0, 2, 1, 3]]  # captions 1 and 2 point at each other's video
    r = _recall(video, text, clip=[0, 0, 0, 1])
    assert r == {"R@1": 0.5, "R@5": 1.0, "clip@1": 1.0}  # the swapped pair is from the same clip


def test_the_shared_loop_trains_saves_logs_and_takes_the_method_off(tmp_path):
    model = tiny_hf_vision("clip", seed=0).eval()
    px = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        frame = torch.nn.functional.normalize(model(pixel_values=px).pooler_output, dim=-1)
        target = torch.nn.functional.normalize(frame.view(2, 4, -1).mean(1), dim=-1)
    handle = vtok.apply(model, "tempme", frames=4, merge_frames=(2,), img_r=1)
    handle.train()
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2)

    def loss_of(step):
        with handle.context(frames=[4, 4]):
            model(pixel_values=px)
            return info_nce(video_embeddings(handle), target, scale=20.0)

    out, log = tmp_path / "w.safetensors", tmp_path / "log.jsonl"
    rec = step_loop(handle, opt, loss_of, steps=4, lr=1e-2, out=out, log=log, log_every=2, desc="test")
    assert rec["event"] == "end" and out.is_file() and not handle.attached
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()[:2]] == [2, 4]
    with vtok.apply(model, "tempme", frames=4, merge_frames=(2,), img_r=1, weights=out) as h:
        assert any(bool((p != 0).any()) for n, p in h.modules.named_parameters() if n.endswith(".B"))

"""Per-call context: a method reads the raw video of each sample (``CallVideos``) that the caller hands over
with ``handle.context(videos=...)``; without it the method is refused with the way out."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import vtok
from vtok.method import CallVideos
from vtok.testing import left_pad_batch, llava_samples, tiny_llava
from vtok.video import Frames


@dataclass
class _SeesVideos(vtok.Method):
    name = "t_sees_videos"
    stages = ("before_llm",)

    def probes(self):
        return [CallVideos()]

    def before_llm(self, tokens, probes):
        self.seen = probes[CallVideos()]
        return tokens


def test_a_method_reads_each_samples_video_from_the_call_context():
    model = tiny_llava(seed=1).eval()
    batch = left_pad_batch(llava_samples(model, [(3, 1, 4), (2, 1, 5)], seed=0))
    clip = Frames(np.zeros((4, 8, 8, 3), dtype=np.uint8), np.array([0.0, 0.5, 1.0, 1.5]))
    m = _SeesVideos()
    with vtok.apply(model, m) as h, torch.no_grad():
        with h.context(videos=[clip, None]):
            model.generate(**batch, max_new_tokens=2, do_sample=False)
        assert m.seen[0] is clip and m.seen[1] is None
        assert h.call_context() == {}  # the block ended
        with pytest.raises(ValueError, match=r"wrap the call in `with handle.context\(videos=\[...\]\):`.*2 here, none given"):
            model(**batch)
        seen = {}

        def other_thread():  # the context is per thread: another thread's call does not see it
            try:
                model(**batch)
            except ValueError as e:
                seen["error"] = str(e)

        with h.context(videos=[clip, clip]):
            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
        assert "wrap the call" in seen["error"]

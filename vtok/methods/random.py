"""`random`: keep a seeded random subset of each image's visual tokens (before the LLM)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..method import POSITION_POLICIES, Method, hparam, keep_count, register
from ..tokens import VisualTokens, seeded_generator


@register
@dataclass
class RandomPrune(Method):
    """Keep a seeded random subset of each image's tokens, in their original order."""

    name = "random"
    stages = ("before_llm",)
    noop = {"retain": 1.0}
    example = {"retain": 0.5}
    paper = "a baseline: a uniform random subset at the compared method's budget"

    retain: float = hparam(0.25, "fraction of each image's visual tokens kept", type=float, range="(0, 1]")
    seed: int = hparam(
        0, "random seed; image j of a sample draws from seed and j, so batching does not change it",
        type=int, range="[0, 9e12]",
    )
    position_policy: str = hparam(
        "compact", "'compact' renumbers RoPE positions, 'keep' keeps the original ones", choices=POSITION_POLICIES
    )

    def before_llm(self, tokens: VisualTokens, probes: dict) -> VisualTokens:
        keep = torch.zeros_like(tokens.mask)
        counts = tokens.counts().tolist()
        for u, j in enumerate(tokens.image_index()):
            gen = seeded_generator(self.seed, j)
            n = counts[u]
            perm = torch.randperm(n, generator=gen)[: keep_count(n, self.retain)]
            valid_idx = tokens.mask[u].nonzero().squeeze(1)
            keep[u, valid_idx[perm.to(valid_idx.device)]] = True
        return tokens.select(keep)

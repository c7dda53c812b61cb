"""`fastv`: drop the visual tokens least attended by the last prompt token, at decoder layer K."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..method import LLMAttention, LLMView, Method, check_retain, hparam, keep_count, register


@register
@dataclass
class FastV(Method):
    """FastV (ECCV 2024): at layer K keep the visual tokens with the most attention from the query."""

    name = "fastv"
    stages = ("in_llm",)
    noop = {"retain": 1.0}
    example = {"layer": 2, "retain": 0.5}
    needs_scores = True

    layer: int = hparam(2, "decoder layer K (0-based) from which the pruned tokens are gone; scores come from layer K-1")
    retain: float = hparam(0.5, "fraction of each sample's visual tokens kept (paper: R=50% removed -> retain=0.5)")
    query: str = hparam("last", "'last': attention of the last prompt token (official code); 'mean': over all rows")
    position_policy: str = hparam("keep", "'keep' original RoPE positions of kept tokens (official), 'compact' renumber")

    def validate(self):
        check_retain(self.name, self.retain)
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 1:
            raise ValueError(f"fastv: layer={self.layer!r} must be an int >= 1 (scores come from layer K-1)")
        if self.query not in ("last", "mean"):
            raise ValueError(f"fastv: query={self.query!r} must be 'last' or 'mean'")

    def probes(self):
        return [LLMAttention(layer=self.layer - 1, query=self.query)]

    def llm_layers(self):
        return [self.layer]

    def in_llm(self, view: LLMView) -> list[torch.Tensor]:
        attn = view.probes[LLMAttention(layer=self.layer - 1, query=self.query)]  # [B, S]
        kept = []
        for b, idx in enumerate(view.visual_index):
            n = idx.numel()
            k = keep_count(n, self.retain)
            scores = attn[b, idx].float()
            # top-k with ties broken by the lower index: stable sort on descending score
            order = torch.sort(-scores, stable=True).indices[:k]
            kept.append(order.sort().values)
        return kept

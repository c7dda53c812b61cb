"""`fastv`: drop the visual tokens least attended by the last prompt token, at decoder layer K."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..method import POSITION_POLICIES, QUERY_SETS, LLMAttention, LLMView, Method, hparam, keep_count, register


@register
@dataclass
class FastV(Method):
    """FastV (ECCV 2024): at layer K keep the visual tokens with the most attention from the query."""

    name = "fastv"
    stages = ("in_llm",)
    noop = {"retain": 1.0}
    example = {"layer": 2, "retain": 0.5}
    needs_scores = True
    paper = "K = 2, R = 50% (retain 0.5), last-token attention, original positions"

    layer: int = hparam(
        2, "decoder layer K (0-based) from which the pruned tokens are gone; scores come from layer K-1",
        type=int, range="[1, inf)",
    )
    retain: float = hparam(
        0.5, "fraction of each sample's visual tokens kept (paper: R=50% removed -> retain=0.5)", type=float, range="(0, 1]"
    )
    query: str = hparam(
        "last", "query rows whose attention ranks the visual tokens: 'last' prompt token (official code), 'mean' of "
        "all rows, 'text', 'instruction' (text after the image), 'visual'", choices=QUERY_SETS,
    )
    position_policy: str = hparam(
        "keep", "'keep' original RoPE positions of kept tokens (official), 'compact' renumber", choices=POSITION_POLICIES
    )

    @classmethod
    def settings_for_budget(cls, budget, context):
        return {"layer": 2, "retain": budget}  # K = 2, the paper's setting, named in comparison tables

    def probes(self):
        return [LLMAttention(layer=self.layer - 1, query=self.query)]

    def llm_layers(self):
        return [self.layer]

    def in_llm(self, view: LLMView) -> list[torch.Tensor]:
        attn = view.probes[LLMAttention(layer=self.layer - 1, query=self.query)].at(view)  # [B, S]
        kept = []
        for b, idx in enumerate(view.visual_index):
            n = idx.numel()
            k = keep_count(n, self.retain)
            scores = attn[b, idx].float()
            # top-k with ties broken by the lower index: stable sort on descending score
            order = torch.sort(-scores, stable=True).indices[:k]
            kept.append(order.sort().values)
        return kept

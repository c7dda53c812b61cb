"""`todre`: diverse tokens before the LLM, then drop them all once text stops looking at them (ToDRE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..method import (
    POSITION_POLICIES,
    LLMAttention,
    LLMView,
    Method,
    ViTAttention,
    hparam,
    keep_count,
    register,
)
from ..tokens import VisualTokens, seeded_generator

_TEXT_SETS = {"question": "instruction", "question+system": "text"}


@register
@dataclass
class ToDRE(Method):
    """ToDRE (Li et al., arXiv 2505.18757 v2): greedy diversity selection, then relevance-driven removal.

    Stage 1 (before the LLM, on the projected tokens): from a pivot, greedily pick the token least
    similar to those picked so far: ``diversity="maxsum"`` (v2, default) adds the token with the least
    *cumulative* cosine similarity to the set; ``"kcenter"`` (v1) the one farthest from its nearest
    selected token. One pass per image over all its tokens (AnyRes: base image and every crop
    together; the paper implies a global pass). ``retain`` of each image's tokens are kept, in their
    original order (sorted), with contiguous positions (``stage1_position_policy``).

    Pivot (``pivot="auto"``): the token the CLS query of the tower's last block attends to most,
    head-averaged, among the base image's tokens (AnyRes: the thumbnail, as the paper); a tower
    without CLS (SigLIP), or whose tokens an ``in_vit`` method merged first (``["tome", "todre"]``: the
    CLS row no longer lines up with them), gets a seeded random token of the base image (the paper's
    ablation: a random pivot costs 0.2 points). ``"cls"`` insists on the CLS row (refused on a tower without one);
    ``"random"`` always draws.

    Stage 2 (inside the LLM, prefill): at check layer ℓ (default ⌊7L/8⌋ of L decoder layers, at most
    L-2 so a later layer exists) the head-averaged attention gives α_t→v, the mean share of attention
    the text queries put on the visual tokens, and α_v→t, the mean share the visual queries put on
    the text keys. A sample whose α_t→v and α_v→t are both below ``tau`` (0.10) loses every visual
    token from layer ℓ+1 on (its cache keeps them in layers ≤ ℓ); a sample whose share is still high
    keeps its tokens, and with ``recheck`` (default) is checked again at each later layer up to L-2
    (the paper checks "a few selected layers ... starting from 7L/8"; vtok drops at the first layer
    that passes). Text keeps its original RoPE positions after the drop (``position_policy``).
    ``text_set="question"`` (default): the text queries are the question after the image; with the
    LLaVA order (system, image, question) the causal mask makes α_v→t over the question 0, so the test
    is α_t→v < τ; ``"question+system"`` counts the system prompt as text too.

    Paper defaults: retain 0.25 / 0.10 of LLaVA-NeXT's tokens, max-sum, τ = 0.10, ℓ = ⌊7L/8⌋.
    """

    name = "todre"
    stages = ("before_llm", "in_llm")
    noop = {"retain": 1.0, "tau": 0.0}
    stage_off = {"before_llm": {"retain": 1.0}, "in_llm": {"tau": 0.0}}
    example = {"retain": 0.5, "check_layer": 1, "tau": 1.0}
    needs_scores = True
    paper = "retain 0.25 / 0.10 of LLaVA-NeXT's 2880 tokens, max-sum from the CLS pivot, tau 0.10 from layer 7L/8"

    retain: float = hparam(0.25, "fraction of each image's visual tokens stage 1 keeps (paper: 0.25, 0.10)", type=float, range="(0, 1]")
    diversity: str = hparam("maxsum", "'maxsum' (v2: least cumulative similarity) or 'kcenter' (v1: farthest point)", choices=("maxsum", "kcenter"))
    pivot: str = hparam(
        "auto", "first token: 'cls' (the last tower block's CLS row argmax over the base image), 'random' (seeded), "
        "'auto' (cls where the tower has a CLS token, else random)", choices=("auto", "cls", "random"),
    )  # fmt: skip
    seed: int = hparam(0, "seed of the random pivot (image j of a sample draws from seed and j)", type=int, range="[0, 9e12]")
    tau: float = hparam(0.10, "stage 2 threshold on the attention shares (0 disables stage 2)", type=float, range="[0, 1]")
    check_layer: int | None = hparam(
        None, "stage 2 check layer ℓ (0-based; tokens are gone from ℓ+1); None: ⌊7L/8⌋, at most L-2", type=int, range="[0, inf)"
    )
    recheck: bool = hparam(True, "check again at every later layer up to L-2 while a sample keeps its tokens", type=bool)
    text_set: str = hparam("question", "text queries/keys of the shares: 'question' or 'question+system'", choices=tuple(_TEXT_SETS))
    position_policy: str = hparam("keep", "positions after a stage-2 drop (paper: the original ones)", choices=POSITION_POLICIES)
    stage1_position_policy: str = hparam("compact", "positions after stage 1 (paper: contiguous)", choices=POSITION_POLICIES)

    def position_policy_at(self, stage: str) -> str:
        return self.position_policy if stage == "in_llm" else self.stage1_position_policy

    # model facts -------------------------------------------------------------------------------
    def bind(self, dims: dict) -> None:
        super().bind(dims)
        n = dims.get("llm_layers")
        if n is not None and self.check_layer is not None and self.check_layer > n - 2:
            raise ValueError(
                f"todre: check_layer={self.check_layer} leaves no later layer to drop from in a {n}-layer language "
                f"model; use a layer in 0..{n - 2} (or None for ⌊7L/8⌋)"
            )

    def _check_layers(self) -> list[int]:
        n = self.dims.get("llm_layers")
        if n is None or n < 2:
            raise ValueError("todre: stage 2 needs a language model of at least 2 layers (apply it to a VLM)")
        first = self.check_layer if self.check_layer is not None else min(7 * n // 8, n - 2)
        return list(range(first, n - 1)) if self.recheck else [first]

    def _pivot_kind(self) -> str:
        if self.pivot == "auto":  # the CLS row is not aligned with tokens an in_vit method merged
            return "cls" if self.dims.get("vision_cls", True) and not self.dims.get("in_vit") else "random"
        return self.pivot

    def probes(self):
        out = [ViTAttention(layer=-1, kind="cls")] if self._pivot_kind() == "cls" else []
        for layer in self._check_layers():
            out += [LLMAttention(layer, _TEXT_SETS[self.text_set]), LLMAttention(layer, "visual")]
        return out

    def llm_layers(self):
        return [layer + 1 for layer in self._check_layers()]

    # stage 1 ------------------------------------------------------------------------------------
    def _pivots(self, tokens: VisualTokens, probes: dict) -> torch.Tensor:
        base = tokens.mask.clone()
        if "crop" in tokens.extra:  # AnyRes: the pivot comes from the base image (thumbnail)
            base &= tokens.extra["crop"] == 0
        base = torch.where(base.any(1, keepdim=True), base, tokens.mask)
        if self._pivot_kind() == "cls":
            score = probes[ViTAttention(layer=-1, kind="cls")].float().masked_fill(~base, float("-inf"))
            return score.argmax(1)
        out = []
        for u, j in enumerate(tokens.image_index()):
            gen = seeded_generator(self.seed, j)
            cand = base[u].nonzero().squeeze(1)
            out.append(cand[int(torch.randint(cand.numel(), (1,), generator=gen))])
        return torch.stack(out)

    def before_llm(self, tokens: VisualTokens, probes: dict) -> VisualTokens:
        from vtok.kernels import greedy_select

        counts = tokens.counts().tolist()
        ks = [keep_count(n, self.retain) for n in counts]
        if ks == counts:
            return tokens
        idx = greedy_select(tokens.features, max(ks), mode=self.diversity, pivot=self._pivots(tokens, probes), mask=tokens.mask)
        return tokens.select_indices([row[:k][row[:k] >= 0] for row, k in zip(idx, ks)])

    # stage 2 ------------------------------------------------------------------------------------
    def in_llm(self, view: LLMView) -> list[torch.Tensor]:
        layer = view.layer - 1
        t2v = view.probes[LLMAttention(layer, _TEXT_SETS[self.text_set])].visual_mass
        text_keys = view.text_after if self.text_set == "question" else view.valid & ~view.visual
        v2t = (view.probes[LLMAttention(layer, "visual")].at(view) * text_keys).sum(1)
        # a sample with no text queries (nothing after the image) has no evidence either way: it keeps its tokens
        drop = (t2v < self.tau) & (v2t < self.tau) & text_keys.any(1)
        dev = view.hidden.device
        return [
            torch.zeros(0, dtype=torch.long, device=dev) if bool(d) else torch.arange(idx.numel(), device=dev)
            for d, idx in zip(drop.tolist(), view.visual_index)
        ]

    # budgets and costs --------------------------------------------------------------------------
    def overhead_flops(self, event, spec, units=None) -> int:
        """Stage 1's greedy loop: each of the k - 1 steps compares every token with the newest pick
        (a [n, d] x [d] product), run batched over the units padded to the largest (as recorded in the
        event; per sample when simulated); stage 2 reads only probes (counted by the adapter)."""
        if event.stage != "before_llm" or spec.llm is None:
            return 0
        d = spec.llm.hidden
        if event.units:
            n, k = max(u[0] for u in event.units), max(u[1] for u in event.units)
            return 2 * len(event.units) * n * d * max(k - 1, 0)
        return sum(2 * n * d * max(k - 1, 0) for n, k in zip(event.tokens_in, event.tokens_out))

    def token_schedule(self, visual_tokens: int, units: list[int]) -> list:
        """Stage 1 only: whether stage 2 drops depends on the attention it measures (an upper bound)."""
        from vtok.stats import Reduction

        out = sum(keep_count(u, self.retain) for u in units)
        return [Reduction(self.name, "before_llm", None, [visual_tokens], [out], None)]

"""`transprune`: prune visual tokens in stages inside the LLM by how much each layer changes them
(token transition variation) and by how much the instruction attends to them (TransPrune)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..method import POSITION_POLICIES, LLMView, Method, Transition, hparam, keep_count, register


def transition_variation(stats: torch.Tensor, over: torch.Tensor) -> torch.Tensor:
    """TTV of one sub-block from its per-token (‖x‖², ‖y‖², x·y) [B, S, 3]: magnitude ‖y‖/‖x‖ times
    the softmax of the direction change 1 − cos(x, y), the softmax taken per sample over the tokens
    ``over`` [B, S] (0 elsewhere)."""
    xx, yy, xy = stats.unbind(-1)
    eps = torch.finfo(torch.float32).tiny
    magnitude = (yy.clamp_min(0).sqrt() / xx.clamp_min(eps).sqrt())
    cos = xy / (xx * yy).clamp_min(eps).sqrt()
    weight = torch.softmax((1 - cos).masked_fill(~over, float("-inf")), dim=1).nan_to_num(0.0)
    return magnitude * weight


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return x / (x.sum() + 1e-8)


@register
@dataclass
class TransPrune(Method):
    """TransPrune (Li et al., CVPR 2026, arXiv 2507.20630): token transition variation + instruction-guided attention.

    For every sub-block F (attention, MLP) of the accumulation layers, per token: magnitude
    m = ‖y‖/‖x‖ and direction d = cos(x, y) of its input x (after the layer norm) and output y (before
    the residual add); TTV_F = m · softmax(1 − d), the softmax per sample over all its tokens, text
    included (``ttv_softmax="sample"``, the paper's wording and the single-sample official code; the
    official code's softmax over the whole batch couples samples and is not reproduced) or over its
    visual tokens (``"visual"``). TTV_l = TTV_attn + TTV_mlp, summed over the accumulation layers that ran
    before a pruning stage, restricted to the visual tokens and normalised to sum 1. The direction
    term is 1 − cos without an absolute value, as the official code (the paper writes 1 − |cos|).

    IGA: the head-averaged attention (GQA-aware) of the instruction rows (every token after the
    visual span: question and answer template) over all keys, with the next layer's norm, q/k
    projections and RoPE at the current positions — the stage layer's own, since a stage at layer p
    runs before it — restricted to the visual tokens, normalised to sum 1 (no instruction: 0).

    Score = α·TTV + (1 − α)·IGA (α = 0.5); the top n₀·ρᵢ visual tokens survive at stage i, n₀ being
    the sample's visual tokens entering the LLM (ties: lower index; rounded half up like every vtok
    budget, where the official code floors: the same counts at the paper's 576), kept in order; positions are
    renumbered contiguously (``position_policy="compact"``, official) and decode positions follow.

    Layers are 0-based here: ``layers=(7, 9, 12)`` means the pruned tokens are gone from layers 7, 9
    and 12 on, i.e. pruning after the paper's 1-based layers 7, 9 and 12; ``accumulate=(6, 11)`` are the
    paper's 1-based layers 7–12. The defaults (None) are exactly these on a 32-layer model and scale
    with depth elsewhere (round(x·L/32), kept increasing: 7, 8, 11 and 6–10 on 30 layers). ``retain`` is the final ratio ρ₃ (paper: 0.125, TransPrune-High);
    ``ratios`` are the earlier stages' (paper: 0.875, 0.625), each raised to ``retain`` if below it.
    Paper defaults on LLaVA-1.5-7B: 576 → 504 → 360 → 72 visual tokens, 40.8% of the TFLOPs.
    """

    name = "transprune"
    stages = ("in_llm",)
    noop = {"retain": 1.0, "ratios": (1.0, 1.0)}
    example = {"layers": (1, 2, 3), "ratios": (0.75, 0.5), "retain": 0.25, "accumulate": (0, 2)}
    needs_scores = True
    paper = "TransPrune-High: 87.5 / 62.5 / 12.5 % of the visual tokens after 1-based layers 7 / 9 / 12 of 32, TTV over 7-12, alpha 0.5"

    retain: float = hparam(0.125, "fraction of each sample's visual tokens left after the last stage (paper: 0.125)", type=float, range="(0, 1]")
    ratios: tuple = hparam((0.875, 0.625), "fractions of the original visual tokens left after the earlier stages", type=(tuple, list))
    layers: tuple | None = hparam(
        None, "0-based decoder layers from which each stage's pruned tokens are gone; None: the paper's (7, 9, 12) "
        "of 32 layers, scaled to the model's depth", type=(tuple, list),
    )  # fmt: skip
    accumulate: tuple | None = hparam(
        None, "first and last 0-based decoder layer whose transitions are accumulated; None: the paper's (6, 11) "
        "of 32 layers, scaled", type=(tuple, list),
    )  # fmt: skip
    alpha: float = hparam(0.5, "weight of TTV against instruction-guided attention", type=float, range="[0, 1]")
    ttv_softmax: str = hparam("sample", "softmax of 1 - cos over the sample's tokens ('sample') or its visual tokens ('visual')", choices=("sample", "visual"))
    position_policy: str = hparam("compact", "'compact' renumbers positions (official), 'keep' keeps them", choices=POSITION_POLICIES)

    PAPER_LAYERS: ClassVar[tuple] = (7, 9, 12)  # of a 32-layer LLaMA (LLaVA-1.5-7B)
    PAPER_ACCUMULATE: ClassVar[tuple] = (6, 11)

    def validate(self) -> None:
        for f in ("layers", "ratios", "accumulate"):  # lists (a config file, the CLI) are kept as tuples
            if getattr(self, f) is not None:
                object.__setattr__(self, f, tuple(getattr(self, f)))
        n_stages = len(self.layers) if self.layers is not None else len(self.PAPER_LAYERS)
        if self.layers is not None:
            layers = self.layers
            if not layers or any(not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in layers) or list(layers) != sorted(set(layers)):
                raise ValueError(f"transprune: layers={self.layers!r} must be increasing ints >= 1")
        ratios = self.ratios
        if len(ratios) != n_stages - 1 or any(not isinstance(r, (int, float)) or not 0 < r <= 1 for r in ratios):
            raise ValueError(
                f"transprune: ratios={self.ratios!r} must give one fraction in (0, 1] per stage before the last "
                f"({n_stages - 1} for {n_stages} stages); the last stage keeps retain"
            )
        acc = self.accumulate
        if acc is not None and (len(acc) != 2 or any(not isinstance(x, int) or x < 0 for x in acc) or acc[0] > acc[1]):
            raise ValueError(f"transprune: accumulate={self.accumulate!r} must be (first, last) 0-based layers, first <= last")

    def bind(self, dims: dict) -> None:
        super().bind(dims)
        n = dims.get("llm_layers")
        if n is not None and self._accumulate()[0] >= n:
            raise ValueError(f"transprune: accumulate={self._accumulate()} starts past the language model's {n} layers")

    def _scaled(self, paper: tuple, lowest: int = 0) -> list[int]:
        """The paper's layers of 32 scaled to this model's depth (round), at least ``lowest``, kept increasing."""
        n = self.dims.get("llm_layers") or 32
        out = []
        for x in paper:
            out.append(max(round(x * n / 32), out[-1] + 1 if out else lowest))
        return out

    def _layers(self) -> tuple:
        if self.layers is not None:
            return self.layers
        n = self.dims.get("llm_layers") or 32
        layers = self._scaled(self.PAPER_LAYERS, lowest=1)
        if layers[-1] > n - 1:
            raise ValueError(f"transprune: a {n}-layer language model is too shallow for {len(layers)} stages; give layers=")
        return tuple(layers)

    def _accumulate(self) -> tuple:
        if self.accumulate is not None:
            return self.accumulate
        first, last = self._scaled(self.PAPER_ACCUMULATE)
        return (min(first, self._layers()[0] - 1), last)

    def schedule(self) -> list[float]:
        """Fraction of the original visual tokens left after each stage."""
        return [max(float(r), self.retain) for r in self.ratios] + [self.retain]

    def _acc_layers(self) -> list[int]:
        first, last = self._accumulate()
        last = min(last, max(self._layers()) - 1, self.dims.get("llm_layers", 10**9) - 1)
        return list(range(first, last + 1))

    def probes(self):
        return [Transition(layer, stats=True) for layer in self._acc_layers()]

    def llm_layers(self):
        return list(self._layers())

    def in_llm(self, view: LLMView) -> list[torch.Tensor]:
        state = view.state
        if "n0" not in state:  # the first stage of this prefill sees the original visual tokens
            state["n0"] = [idx.numel() for idx in view.visual_index]
        ratio = self.schedule()[list(self._layers()).index(view.layer)]
        ttv = torch.zeros(view.hidden.shape[:2], dtype=torch.float32, device=view.hidden.device)
        for layer in self._acc_layers():
            if layer >= view.layer:
                break
            st = view.probes[Transition(layer, stats=True)]
            over = st.valid if self.ttv_softmax == "sample" else st.valid & st.visual
            per_token = transition_variation(st.attn, over) + transition_variation(st.mlp, over)
            ttv += st.at(view, per_token).to(ttv.device)
        iga = view.attention("instruction").at(view).to(ttv.device)
        kept = []
        for b, idx in enumerate(view.visual_index):
            n = idx.numel()
            k = min(n, keep_count(state["n0"][b], ratio))
            score = self.alpha * _normalised(ttv[b, idx]) + (1 - self.alpha) * _normalised(iga[b, idx])
            order = torch.sort(-score, stable=True).indices[:k]  # ties: the lower index first
            kept.append(order.sort().values)
        return kept

    def token_schedule(self, visual_tokens: int, units: list[int]) -> list:
        from vtok.stats import Reduction

        events, n = [], visual_tokens
        for layer, ratio in zip(self._layers(), self.schedule()):
            out = min(n, keep_count(visual_tokens, ratio))
            events.append(Reduction(self.name, "in_llm", layer, [n], [out], None))
            n = out
        return events

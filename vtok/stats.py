"""Records of what a method did in the last prefill."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Reduction"]


@dataclass
class Reduction:
    """One reduction event of the last prefill.

    method, stage ('in_vit', 'before_llm', 'in_llm', 'projector'), layer (or None);
    tokens_in / tokens_out: visual tokens per sample before and after; kept: per sample, the sorted
    positions (within the visual tokens that entered the stage) of the tokens that survive as
    themselves or as merge destinations, or None where that has no meaning (pooling).
    """

    method: str
    stage: str
    layer: int | None
    tokens_in: list[int]
    tokens_out: list[int]
    kept: list[torch.Tensor] | None
    #: before_llm: (tokens in, tokens out) of each unit (image, crop group, video) the stage reduced, in
    #: the order the method saw them batched; None where not recorded
    units: list[tuple[int, int]] | None = None
    #: the language-model forwards the method ran itself for this step (``AskModel``: QuoTA's frame scorer),
    #: (rows, query length, key length, LM-head rows) each; a method's ``overhead_flops`` counts them
    nested: list[tuple[int, int, int, int]] | None = None
    #: FLOPs of the method's own matrix products in this step that depend on the data (k-means iterations),
    #: counted by the method as it ran (``Method.step_flops``); its ``overhead_flops`` reports them
    flops: int | None = None
    #: in_vit in towers that run many rows per sample (AnyRes crops, video frames): where in the block the
    #: merge ran ("attn": the block's input, before attention; "mlp": before the MLP); ``units`` then holds
    #: (tokens in, tokens out) of every tower row of the block (rows of concatenated frames count once)
    point: str | None = None

    def __repr__(self) -> str:
        where = f" layer {self.layer}" if self.layer is not None else ""
        return f"Reduction({self.method} @ {self.stage}{where}: {self.tokens_in} -> {self.tokens_out})"

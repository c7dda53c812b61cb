"""What a method asks the adapter for (probes: ViT and LLM attention, sub-block transitions, the question)
and what an in_llm stage sees and returns (``LLMView``, ``LLMStep``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = [
    "Probe", "ViTAttention", "ViTKeyCorrelation", "LLMAttention", "Transition", "AttentionScores", "Transitions",
    "TransitionStats", "Question", "CallVideos", "TextQuery", "AskModel", "LLMView", "LLMStep", "LLM_PROBES",
    "QUERY_SETS",
]

#: query rows of an LLM attention probe: the last prompt token, every valid row, the text tokens,
#: the instruction (text after the visual span), the visual tokens
QUERY_SETS = ("last", "mean", "text", "instruction", "visual")


# ---------------------------------------------------------------- probes


@dataclass(frozen=True)
class Probe:
    """Something a method needs from the adapter, computed as a side computation."""


@dataclass(frozen=True)
class ViTAttention(Probe):
    """Attention statistics of vision-encoder block ``layer`` (0-based, negative from the end).

    kind="cls": the CLS query's attention row over the tokens, head-averaged.
    kind="colmean": attention received by each token, averaged over all queries and heads.
    kind="cls_or_colmean": "cls" where the tower has a CLS token, "colmean" where it has none (SigLIP).
    The result is aligned with the visual tokens handed to the method: [U, N].
    """

    layer: int = -2
    kind: str = "cls"

    def kind_for(self, has_cls: bool) -> str:
        """The statistic this probe computes on a tower with (or without) a CLS token."""
        if self.kind == "cls_or_colmean":
            return "cls" if has_cls else "colmean"
        return self.kind


@dataclass(frozen=True)
class ViTKeyCorrelation(ViTAttention):
    """Patch-patch key correlation of vision-encoder block ``layer``: per token, the share of the other
    patch tokens *of the same tower image* (a LLaVA image, one AnyRes crop or the base image of
    LLaVA-NeXT/OneVision, a video frame) whose key has cosine similarity > ``threshold`` with its own.

    Keys are the block's own k projection of its attention input (all heads concatenated, fp32), taken in
    the same pre-hook as ``ViTAttention``; the similarity is computed in row chunks and only the count is
    kept, so no [N, N] map is stored and the result is aligned like ``ViTAttention``: [U, N] fp32 in
    [0, 1]. Prefix tokens (CLS) are neither counted nor scored (their value is 0). Per-crop values are
    computed over the crop's full tower grid (before LLaVA-NeXT's unpadding) and follow the tokens, so a
    method groups them by ``VisualTokens.extra["crop"]``. Video frames pooled by the model (OneVision)
    carry the model's pooling of the shares.

    A subclass of ``ViTAttention`` (``kind="keycorr"``), so every adapter that serves ViT attention
    probes from its tower's pre-hooks serves this one the same way.
    """

    kind: str = "keycorr"
    threshold: float = 0.9

    def __post_init__(self):
        if self.kind != "keycorr":
            raise ValueError(f"ViTKeyCorrelation: kind is always 'keycorr', got {self.kind!r}")
        if not -1.0 <= float(self.threshold) < 1.0:
            raise ValueError(f"ViTKeyCorrelation: threshold={self.threshold!r} must be a cosine in [-1, 1)")


@dataclass(frozen=True)
class LLMAttention(Probe):
    """Head-averaged attention of a query set of decoder layer ``layer`` (prefill), computed when that
    layer runs and handed to the method's in_llm stages at later layers.

    query (see ``QUERY_SETS``): "last" prompt token of each sample; "mean" of all valid rows; "text"
    tokens; "instruction" (text after the visual span); "visual" tokens. Result: ``AttentionScores``.
    At a stage, ``LLMView.attention(query)`` computes the same at the stage's own layer (any boolean
    mask as the query set too).
    """

    layer: int
    query: str = "last"

    def __post_init__(self):
        if self.query not in QUERY_SETS:
            raise ValueError(f"LLMAttention: query={self.query!r} is not one of {QUERY_SETS}")


@dataclass(frozen=True)
class Transition(Probe):
    """Input and output of decoder layer ``layer``'s attention and MLP sub-blocks at the visual tokens
    (prefill), taken from the model's own forward (attention: its normed input and its output before
    the residual add; MLP the same). Result: ``Transitions``, handed to stages at later layers.

    ``stats=True``: instead of the vectors, per token of the whole sequence (text included) the fp32
    reductions ‖x‖², ‖y‖² and x·y of each sub-block's input x and output y (``TransitionStats``): what
    magnitude/direction scores need, at a few floats per token."""

    layer: int
    stats: bool = False


@dataclass
class AttentionScores:
    """Result of an LLM attention probe over the keys of the layout it was computed in.

    per_key [B, S] fp32: attention each key received, averaged over heads and the query rows
    (each row sums to 1 over its keys, so ``per_key`` of a sample sums to 1); visual_mass [B]: its sum
    over the visual keys; orig_index / valid [B, S]: where each key sits in the user's sequence.
    """

    per_key: torch.Tensor
    visual_mass: torch.Tensor
    orig_index: torch.Tensor
    valid: torch.Tensor

    def at(self, view: "LLMView") -> torch.Tensor:
        """``per_key`` laid out as ``view``'s sequence [B, S_view] (later stages may have removed tokens)."""
        return _realign(self.per_key, self.orig_index, self.valid, view)


@dataclass
class Transitions:
    """Sub-block inputs/outputs at the visual tokens of one layer: per sample [n_b, D] tensors, with the
    original sequence index of each of those tokens (``orig_index``)."""

    attn_in: list
    attn_out: list
    mlp_in: list
    mlp_out: list
    orig_index: list

    def rows_for(self, view: "LLMView") -> list[torch.Tensor]:
        """Per sample, the rows of these tensors that hold ``view``'s visual tokens, in the view's order."""
        out = []
        for b, idx in enumerate(view.visual_index):
            want = view.orig_index[b, idx]
            have = self.orig_index[b].to(want.device)
            order = torch.argsort(have)
            out.append(order[torch.searchsorted(have[order], want)])
        return out


@dataclass
class TransitionStats:
    """``Transition(layer, stats=True)``: per token of the layout the layer ran on, [B, S, 3] fp32
    (‖x‖², ‖y‖², x·y) of the attention (``attn``) and MLP (``mlp``) sub-blocks; ``valid``, ``visual``
    and ``orig_index`` [B, S] describe that layout (later stages may have removed tokens since)."""

    attn: torch.Tensor
    mlp: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor
    orig_index: torch.Tensor

    def at(self, view: "LLMView", values: torch.Tensor) -> torch.Tensor:
        """``values`` [B, S] computed over this layout, laid out as ``view``'s sequence (0 elsewhere)."""
        return _realign(values, self.orig_index, self.valid, view)


def _realign(values, orig_index, valid, view) -> torch.Tensor:
    b, s0 = values.shape
    n = int(max(int(orig_index.max()) if orig_index.numel() else 0, int(view.orig_index.max()))) + 2
    full = values.new_zeros(b, n)
    full.scatter_(1, torch.where(valid, orig_index, n - 1), values * valid)
    return full.gather(1, torch.where(view.valid, view.orig_index, n - 1)) * view.valid


LLM_PROBES = (LLMAttention, Transition)


@dataclass(frozen=True)
class Question(Probe):
    """The call's question per sample: its text after the visual span (the instruction), decoded with the
    tokenizer of the processor given to ``vtok.apply(..., processor=...)``. Result: a list of str.
    Without a processor the method is refused at apply, unless ``optional=True`` (the result is then None:
    for methods that need the question only for some inputs, e.g. QuoTA for videos)."""

    optional: bool = False


@dataclass(frozen=True)
class CallVideos(Probe):
    """Per sample, the raw video the call is about -- ``vtok.video.Frames`` (uint8 ``(T, H, W, 3)`` frames and
    their timestamps in seconds, as ``vtok.video.load`` returns them) -- handed over by the caller with
    ``with handle.context(videos=[...]):`` around the call (None for a sample without one). Result: a list."""


@dataclass(frozen=True)
class TextQuery(Probe):
    """The prompt's text tokens per sample: ids and input embeddings (visual tokens excluded)."""


@dataclass(frozen=True)
class AskModel(Probe):
    """The attached model as a judge of visual items (QuoTA's frame scorer), through the tokenizer of the
    processor given to ``vtok.apply(..., processor=...)``. Result: a callable

    ``ask(visual, prompts, answer="Yes") -> Tensor [n] fp32``: for item i, the probability (softmax over the
    full vocabulary, fp32) that the language model's next token is the first token of ``answer`` after the
    item's visual tokens ``visual[i]`` ([k_i, D], LLM width: what the before_llm stage holds) followed by
    ``prompts[i]``, in the tokenizer's chat template (the visual tokens open the user turn; without a
    template: ``<bos> <visual> prompt``). Items run ``chunk`` at a time, left-padded.

    ``ask.generate(prompts, max_new_tokens=64) -> list[str]``: text-only greedy answers of the same model.

    Both run the untouched language model (every vtok hook passes through, the call's state is kept) under
    ``torch.no_grad``; ``ask.forwards`` lists what they ran, (rows, query length, key length, LM-head rows)
    per forward, for the FLOPs count. Without a processor the method is refused at apply, unless
    ``optional=True`` (the result is then None).
    """

    chunk: int = 16
    optional: bool = False

    def __post_init__(self):
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise ValueError(f"AskModel: chunk={self.chunk!r} must be an int >= 1 (items per forward)")


# ---------------------------------------------------------------- in-LLM view


@dataclass
class LLMView:
    """What an ``in_llm`` stage sees at one of its decoder layers during prefill.

    hidden [B, S, D]: hidden states entering the layer; valid [B, S]: real (non-pad) tokens;
    visual [B, S]: visual tokens; visual_index: per sample, the sequence indices of its visual tokens,
    in order; probes: the method's probes computed so far (LLM probes of earlier layers, ViT probes,
    the text query); positions [B, S]: current RoPE position ids; orig_index [B, S]: index of each token
    in the user's sequence; text_before / text_after [B, S]: text tokens before the visual span and
    after it (the instruction); last [B]: index of the last prompt token; state: a dict the method
    keeps across its stage layers within one prefill (fresh for every prefill).
    """

    layer: int
    hidden: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor
    visual_index: list
    probes: dict
    positions: torch.Tensor | None = None
    orig_index: torch.Tensor | None = None
    text_before: torch.Tensor | None = None
    text_after: torch.Tensor | None = None
    last: torch.Tensor | None = None
    state: dict = field(default_factory=dict)
    attend: object = field(default=None, repr=False)

    @property
    def instruction(self) -> torch.Tensor:
        return self.text_after

    def attention(self, query="last") -> AttentionScores:
        """Attention of a query set (a name of ``QUERY_SETS`` or a [B, S] bool mask) at this layer,
        from the hidden states entering it (the layer's own norm, q/k projections and RoPE; only the
        needed rows; never eager, no full attention map)."""
        if self.attend is None:
            raise RuntimeError("this LLMView was not made by an adapter; it cannot compute attention")
        return self.attend(query)


@dataclass
class LLMStep:
    """What an ``in_llm`` stage returns when it merges: the kept visual tokens per sample (positions among
    the visual tokens entering the layer, as a plain list return) and, optionally, replacement hidden
    states [k_b, D] for those kept tokens, one row per entry of ``kept``, in the same order."""

    kept: list
    hidden: list | None = None

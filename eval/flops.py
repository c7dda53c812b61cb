"""FLOPs of a forward pass, computed from the model config and the per-layer token counts.

    report = vtok.eval.flops.count(model, handle, **inputs)    # one forward on those inputs
    report.total, report.parts            # {'vision', 'projector', 'method', 'prefill', 'lm_head', 'decode'}
    vtok.eval.flops.estimate("llava-1.5-7b", method=("fastv", {"layer": 2, "retain": 0.5}))

How the count is made
---------------------
``count`` runs the forward once (``torch.no_grad``) with light shape hooks on the vision tower, the
projector and the model itself. They record *token counts only*: how many images/crops entered the tower
(and at what resolution), how many rows entered the projector, the padded prompt length, each sample's
valid length (``attention_mask``) and ``logits_to_keep``. The reductions come from ``handle.stats``
(``before_llm``/``projector`` events shorten the LLM entry, an ``in_llm`` event at layer K shortens layers
K..L-1, ``in_vit`` events at layer l shorten vision blocks l.. of each image). The FLOPs are then computed
analytically from the config: nothing is timed or traced. ``Tracker`` does the same around any code
(``generate`` included: every decode step is counted with its KV length). ``estimate`` needs no model and
no weights: it takes a config (or the name of a full-size config, see ``FULL_SIZE``) and a token budget.

Conventions
-----------
``convention="exact"`` (default) counts every matrix multiply the model runs as ``2*M*N*K``, which is the
rule of ``torch.utils.flop_counter.FlopCounterMode`` (the tests check equality with it on tiny models):

* linear layers: ``2 * rows * in * out`` (biases, norms, activations, RoPE, softmax are not counted);
  GQA: q/o at ``num_attention_heads * head_dim``, k/v at ``num_key_value_heads * head_dim``;
  SwiGLU MLPs count their three matrices;
* attention: ``QK^T`` and ``AV``, i.e. ``4 * heads * q_len * kv_len * head_dim``, with the *full*
  ``q_len x kv_len`` rectangle even when it is causal, as dense attention kernels (eager, SDPA math) and
  FlopCounterMode count it. ``causal_skip=True`` counts only the causal triangle ``q(q+1)/2`` of the LLM
  prefill instead (what block-skipping FlashAttention kernels compute, roughly);
* patch embedding convolution ``2 * patches * C * p^2 * d``; the LM head on the rows whose logits are
  computed (all rows, or ``logits_to_keep``);
* method overhead: the side computations vtok's adapters run for a method's probes (LLM attention rows as
  the adapter logged them in ``handle.probe_costs``, ViT attention statistics), plus what each method
  reports for its own scoring (``Method.overhead_flops``), in ``parts['method']``.

``padded=True`` (default) counts what ran: every sample of a batch at the padded length of each layer's
layout (FlopCounterMode sees these shapes). ``report.per_sample`` always holds each sample's useful work
(its own lengths; the vision tower and projector split over samples in proportion to their visual tokens,
exact when images have equal token counts); ``padded=False`` makes ``total`` their sum.

``convention="fastv"`` is the formula papers use (FastV, HoliTom, DyCoke): LLM only, per sample and
decoder layer ``4nd^2 + 2n^2d + 2ndm`` (n tokens entering the layer, d hidden width, m FFN width: MACs of
q/k/v/o, attention and a two-matrix FFN; GQA and the SwiGLU gate are ignored), so prefill is
``K*f(n) + (L-K)*f(n_hat)`` for FastV, and decode for R output tokens
``sum_layers R*(4d^2 + 2dm) + 2d*(R*n + R(R+1)/2)`` (HoliTom issue #2).

Decode (``output_tokens=R``, exact convention): the R-1 one-token forwards that ``generate`` runs after
the prefill to produce R tokens (the first comes from the prefill's logits); step j attends over the
layer's prefill KV length + j, at the reduced per-layer KV lengths. Pass ``logits_to_keep=1`` to count
the prefill as ``generate`` runs it.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from vtok.hf_compat import cache_from_kwargs

__all__ = [
    "Stack",
    "VisionSpec",
    "ModelSpec",
    "FlopsReport",
    "UnsupportedModel",
    "model_spec",
    "count",
    "Tracker",
    "estimate",
    "full_size_config",
    "meta_model",
    "FULL_SIZE",
    "counted",
    "reductions_for",
    "visual_layout",
    "spec_mismatches",
    "analyse",
]

PARTS = ("vision", "projector", "method", "prefill", "lm_head", "decode")
CONVENTIONS = ("exact", "fastv")


class UnsupportedModel(ValueError):
    """vtok.eval.flops has no formula for this model family."""


# ----------------------------------------------------------------------------- shapes of the parts


@dataclass(frozen=True)
class Stack:
    """Shapes of a stack of transformer blocks (attention + MLP).

    ``attn_w`` / ``mlp_w``: multiply-accumulates per token of the block's attention linears (q, k, v, o)
    and MLP linears; 0 derives them from the dims (GQA q/o at ``heads``, k/v at ``kv_heads``;
    ``ffn_mats`` matrices of width ``ffn``).
    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    ffn_mats: int = 2  # 2: fc1/fc2; 3: SwiGLU gate/up/down
    causal: bool = False
    attn_w: int = 0
    mlp_w: int = 0

    @property
    def attn_macs(self) -> int:
        if self.attn_w:
            return self.attn_w
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return d * q + 2 * d * kv + q * d

    @property
    def mlp_macs(self) -> int:
        return self.mlp_w or self.ffn_mats * self.hidden * self.ffn

    @property
    def weights_per_layer(self) -> int:
        """Multiply-accumulates per token per block in its linear layers (its weight count, no biases)."""
        return self.attn_macs + self.mlp_macs

    def linear(self, rows: int) -> int:
        return 2 * rows * self.weights_per_layer

    def attention(self, q: int, kv: int) -> int:
        """QK^T and AV for q query rows over kv keys, all query heads (the full rectangle)."""
        return 4 * self.heads * q * kv * self.head_dim

    def attention_causal(self, q: int) -> int:
        """QK^T and AV over the causal triangle of a q x q prefill."""
        return 4 * self.heads * (q * (q + 1) // 2) * self.head_dim

    def block(self, n: int, n_mlp: int | None = None, causal_skip: bool = False) -> int:
        """One block on one sequence: attention (and its linears) on n tokens, the MLP on n_mlp (default n)."""
        n_mlp = n if n_mlp is None else n_mlp
        att = self.attention_causal(n) if (causal_skip and self.causal) else self.attention(n, n)
        return 2 * n * self.attn_macs + att + 2 * n_mlp * self.mlp_macs

    def fastv_layer(self, n: int) -> int:
        d, m = self.hidden, self.ffn
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


@dataclass(frozen=True)
class VisionSpec:
    """A ViT: patch embedding, blocks, prefix tokens (CLS, registers), what runs after the blocks.

    head: "map" (SigLIP attention-pooling head), or None; pooled_linears: (in, out) of linears applied
    to one pooled row per image (timm classifier, open_clip projection). probe: how the adapters compute
    ViT attention probes -- "qk" (q and k projections of the needed rows), "qkv" (a fused qkv projection
    of every token). mha_keys: ToMe's keys cost an extra key projection (``nn.MultiheadAttention``).
    """

    stack: Stack
    channels: int
    patch: int
    image_size: int
    prefix: int
    head: str | None = None
    pooled_linears: tuple[tuple[int, int], ...] = ()
    probe: str = "qk"
    mha_keys: bool = False

    def grid(self, h: int, w: int) -> tuple[int, int]:
        return h // self.patch, w // self.patch

    def tokens(self, h: int | None = None, w: int | None = None) -> int:
        gh, gw = self.grid(h or self.image_size, w or self.image_size)
        return gh * gw + self.prefix

    def patch_embed(self, images: int, h: int, w: int) -> int:
        gh, gw = self.grid(h, w)
        return 2 * images * gh * gw * self.channels * self.patch * self.patch * self.stack.hidden

    def after_blocks(self, n: int) -> int:
        """FLOPs after the blocks for one image whose last block left n tokens."""
        s, d = self.stack, self.stack.hidden
        t = sum(2 * a * o for a, o in self.pooled_linears)
        if self.head == "map":  # nn.MultiheadAttention(probe, x, x): q 1 row, k/v n rows, out_proj, MLP on 1 row
            t += 2 * d * d + 4 * n * d * d + s.attention(1, n) + 2 * d * d + 4 * d * s.ffn
        return t

    def probe_flops(self, n: int, rows: int) -> int:
        """A ViT attention probe of ``rows`` query rows over n tokens, for one image."""
        s, d = self.stack, self.stack.hidden
        proj = 2 * n * s.attn_macs * 3 // 4 if self.probe == "qkv" else 2 * n * d * d + 2 * rows * d * d
        return proj + 2 * s.heads * rows * n * s.head_dim


@dataclass(frozen=True)
class ModelSpec:
    """Everything the count needs to know about a model, read from its config (or its modules)."""

    family: str
    vision: VisionSpec | None = None
    projector: tuple[tuple[int, int], ...] = ()  # (in, out) of each projector linear, in order
    llm: Stack | None = None
    vocab: int = 0
    drop_cls: bool = False  # LLaVA "default" strategy: the projector sees tokens 1..N-1
    placeholder_ids: tuple[int, ...] = ()


# ----------------------------------------------------------------------------- config / modules -> spec

_GATED_LLMS = {
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "granite",
    "olmo", "olmo2", "smollm3", "cohere", "starcoder2", "internlm2",
}  # fmt: skip
_NON_GATED_LLMS = {"gpt2", "opt", "gpt_neox", "phi", "falcon", "bloom"}


def _llm_stack(tc) -> Stack:
    mt = getattr(tc, "model_type", "")
    if mt in _NON_GATED_LLMS:
        raise UnsupportedModel(f"vtok.eval.flops counts gated (SwiGLU) decoder LMs; {mt!r} is not one")
    if mt not in _GATED_LLMS:
        warnings.warn(f"vtok.eval.flops: assuming a Llama-style decoder (GQA, SwiGLU) for text model {mt!r}")
    d, h = tc.hidden_size, tc.num_attention_heads
    return Stack(
        layers=tc.num_hidden_layers,
        hidden=d,
        heads=h,
        kv_heads=getattr(tc, "num_key_value_heads", None) or h,
        head_dim=getattr(tc, "head_dim", None) or d // h,
        ffn=tc.intermediate_size,
        ffn_mats=3,
        causal=True,
    )


_HF_VISION = ("clip_vision_model", "siglip_vision_model", "dinov2", "dinov2_with_registers")


def _vision_spec(vc) -> VisionSpec:
    mt = getattr(vc, "model_type", "")
    d, h = vc.hidden_size, vc.num_attention_heads
    common = dict(layers=vc.num_hidden_layers, hidden=d, heads=h, kv_heads=h, head_dim=d // h, causal=False)
    if mt == "clip_vision_model":
        return VisionSpec(Stack(ffn=vc.intermediate_size, **common), vc.num_channels, vc.patch_size, vc.image_size, 1)
    if mt == "siglip_vision_model":
        head = "map" if getattr(vc, "vision_use_head", True) else None
        stack = Stack(ffn=vc.intermediate_size, **common)
        return VisionSpec(stack, vc.num_channels, vc.patch_size, vc.image_size, 0, head=head)
    if mt in ("dinov2", "dinov2_with_registers"):
        m = int(d * vc.mlp_ratio)
        if getattr(vc, "use_swiglu_ffn", False):
            m = (int(m * 2 / 3) + 7) // 8 * 8
            stack = Stack(ffn=m, ffn_mats=3, **common)
        else:
            stack = Stack(ffn=m, **common)
        prefix = 1 + int(getattr(vc, "num_register_tokens", 0) or 0)
        return VisionSpec(stack, vc.num_channels, vc.patch_size, vc.image_size, prefix)
    raise UnsupportedModel(
        f"vtok.eval.flops has no formula for vision tower {mt!r}; supported: {', '.join(_HF_VISION)}, "
        "timm and open_clip VisionTransformer"
    )


def _linear_macs(module) -> int:
    from torch import nn

    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _timm_spec(model) -> ModelSpec:
    blk = model.blocks[0]
    attn = blk.attn
    proj = model.patch_embed.proj
    pool = getattr(model, "global_pool", "token")
    if pool == "map" or getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModel("vtok.eval.flops does not count timm attention pooling (global_pool='map') yet")
    head = model.head
    pooled = ((head.in_features, head.out_features),) if hasattr(head, "in_features") else ()
    if not pool:
        raise UnsupportedModel("vtok.eval.flops counts timm ViTs with a pooled head (global_pool != '')")
    stack = Stack(
        layers=len(model.blocks), hidden=model.embed_dim, heads=attn.num_heads, kv_heads=attn.num_heads,
        head_dim=attn.head_dim, ffn=0, attn_w=_linear_macs(attn), mlp_w=_linear_macs(blk.mlp),
    )  # fmt: skip
    size = model.patch_embed.img_size
    vision = VisionSpec(stack, proj.in_channels, proj.kernel_size[0], size[0] if isinstance(size, tuple) else size,
                        prefix=int(model.num_prefix_tokens), pooled_linears=pooled, probe="qkv")  # fmt: skip
    return ModelSpec(family="timm_vit", vision=vision)


def _open_clip_spec(visual) -> ModelSpec:
    from torch import nn

    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedModel("vtok.eval.flops does not count open_clip attentional pooling yet")
    blocks = visual.transformer.resblocks
    blk = blocks[0]
    attn = blk.attn
    d = visual.transformer.width
    w_in = getattr(attn, "in_proj_weight", None)
    attn_w = (w_in.numel() if w_in is not None else 0) + _linear_macs(attn)
    mha = isinstance(attn, nn.MultiheadAttention)
    stack = Stack(layers=len(blocks), hidden=d, heads=attn.num_heads, kv_heads=attn.num_heads,
                  head_dim=d // attn.num_heads, ffn=0, attn_w=attn_w, mlp_w=_linear_macs(blk.mlp))  # fmt: skip
    proj = getattr(visual, "proj", None)
    pooled = (tuple(proj.shape),) if isinstance(proj, torch.Tensor) else ()
    size = visual.image_size
    vision = VisionSpec(stack, visual.conv1.in_channels, visual.conv1.kernel_size[0],
                        size[0] if isinstance(size, tuple) else size, prefix=1, pooled_linears=pooled,
                        probe="qk" if mha else "qkv", mha_keys=mha)  # fmt: skip
    return ModelSpec(family="open_clip_vit", vision=vision)


_VLM_TYPES = ("llava", "llava_next", "llava_onevision")


def model_spec(model_or_config) -> ModelSpec:
    """Shapes the count needs: from an HF config (LLaVA family, HF vision towers) or a timm/open_clip ViT."""
    if isinstance(model_or_config, torch.nn.Module):
        mod = model_or_config
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "model_type"):
            return model_spec(cfg)
        cls = type(mod)
        if cls.__module__.startswith("timm.") and hasattr(mod, "blocks") and hasattr(mod, "patch_embed"):
            return _timm_spec(mod)
        visual = getattr(mod, "visual", mod)
        if type(visual).__module__.startswith("open_clip") and hasattr(visual, "transformer"):
            return _open_clip_spec(visual)
        raise UnsupportedModel(
            f"vtok.eval.flops has no formula for {cls.__name__}; supported: HF {', '.join(_VLM_TYPES)}, HF vision "
            "towers (CLIP, SigLIP, DINOv2), timm and open_clip VisionTransformer"
        )
    config = model_or_config
    mt = getattr(config, "model_type", None)
    if mt in _VLM_TYPES:
        vision = _vision_spec(config.vision_config)
        tc = config.text_config
        layers = config.vision_feature_layer
        d_in = vision.stack.hidden * (1 if isinstance(layers, int) else len(layers))
        ids = [getattr(config, a, None) for a in ("image_token_id", "image_token_index", "video_token_id",
                                                     "video_token_index")]  # fmt: skip
        return ModelSpec(
            family=mt,
            vision=vision,
            projector=((d_in, tc.hidden_size), (tc.hidden_size, tc.hidden_size)),
            llm=_llm_stack(tc),
            vocab=tc.vocab_size,
            drop_cls=config.vision_feature_select_strategy == "default",
            placeholder_ids=tuple(dict.fromkeys(int(i) for i in ids if i is not None)),
        )
    if mt in _HF_VISION:
        return ModelSpec(family=mt, vision=_vision_spec(config))
    raise UnsupportedModel(
        f"vtok.eval.flops has no formula for model type {mt!r}; supported: {', '.join(_VLM_TYPES)}, "
        f"{', '.join(_HF_VISION)}, timm and open_clip VisionTransformer"
    )


# ----------------------------------------------------------------------------- what one forward ran


@dataclass
class ForwardShapes:
    """Token counts of one prefill (and of the decode steps that followed it)."""

    batch: int
    seq_len: int  # padded prompt length entering the LLM (0: a vision-only model)
    lengths: list  # valid prompt tokens per sample
    visual: list  # visual placeholder tokens per sample
    vision_calls: list = field(default_factory=list)  # (images, H, W) per tower call
    projector_rows: int = 0
    logits_to_keep: int = 0  # 0: all rows
    events: list = field(default_factory=list)  # vtok.stats.Reduction of this prefill
    methods: list = field(default_factory=list)  # the attached vtok methods
    decode_steps: list = field(default_factory=list)  # query tokens of each decode forward
    entry: tuple | None = None  # (padded length, per-sample lengths) read at the LM's input, if recorded
    probe_costs: list | None = None  # the LLM probe computations the adapter logged (handle.probe_costs)


@dataclass
class FlopsReport:
    """FLOPs of one forward (a batch), per part; ``total`` is their sum.

    parts: batch totals (padded layouts if ``padded``, else the per-sample sums); per_sample: each
    sample's useful work per part; llm_tokens: per decoder layer, tokens of each sample entering it;
    llm_padded: per decoder layer, the padded layout length; vision_tokens: per vision block, the tokens
    entering its attention (first image).
    """

    convention: str
    padded: bool
    parts: dict
    per_sample: list
    llm_tokens: list
    llm_padded: list
    vision_tokens: list
    batch: int
    causal_skip: bool = False
    visual_final: list = field(default_factory=list)  # per sample: visual tokens left at the last LLM layer
    visual_entry: list = field(default_factory=list)  # per sample: visual tokens of the prompt (placeholders)

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))

    @property
    def sample_totals(self) -> list:
        return [int(sum(p.values())) for p in self.per_sample]

    def to_dict(self) -> dict:
        return {
            "convention": self.convention,
            "padded": self.padded,
            "total": self.total,
            "parts": dict(self.parts),
            "per_sample": [dict(p) for p in self.per_sample],
            "llm_tokens": self.llm_tokens,
            "llm_padded": self.llm_padded,
            "vision_tokens": self.vision_tokens,
            "visual_entry": self.visual_entry,
            "visual_final": self.visual_final,
        }

    def __str__(self) -> str:
        mode = "padded batch" if self.padded else "sum of samples"
        unit, scale = next(((u, s) for u, s in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)) if self.total >= s), ("", 1))
        lines = [f"FLOPs ({self.convention}, {mode}, batch {self.batch}):"]
        for k, v in self.parts.items():
            if v:
                lines.append(f"  {k:<10} {v / scale:12.4f} {unit}  ({100 * v / max(self.total, 1):5.1f}%)")
        lines.append(f"  {'total':<10} {self.total / scale:12.4f} {unit}")
        return "\n".join(lines)


def _shares(amount, weights):
    tot = sum(weights)
    return [amount * w / tot if tot else amount / len(weights) for w in weights]


def _images_per_sample(spec: ModelSpec, shapes: ForwardShapes, n_img: int) -> list:
    v = spec.vision
    if spec.llm is None:
        return [1] * shapes.batch
    h, w = (shapes.vision_calls[0][1], shapes.vision_calls[0][2]) if shapes.vision_calls else (None, None)
    per_img = v.tokens(h, w) - (1 if spec.drop_cls else 0)
    out = [x // per_img for x in shapes.visual]
    if sum(out) != n_img:
        raise ValueError(
            f"cannot tell which images belong to which sample ({shapes.visual} placeholders, {n_img} images of "
            f"{per_img} tokens); in_vit reductions are counted for one crop per image (LLaVA-1.5 style)"
        )
    return out


def _vision_schedule(spec: ModelSpec, shapes: ForwardShapes, n: int, n_img: int):
    """Per vision block and image: (tokens at its attention, tokens at its MLP). ToMe's placement: a block
    with an in_vit reduction runs its attention on the tokens entering it and its MLP on the tokens left."""
    events = sorted((e for e in shapes.events if e.stage == "in_vit"), key=lambda e: e.layer)
    per_img = [1] * n_img
    if events and len(events[0].tokens_in) != n_img:
        per_img = _images_per_sample(spec, shapes, n_img)
    by_layer = {e.layer: e for e in events}
    cur = [n] * n_img
    out = []
    for layer in range(spec.vision.stack.layers):
        e = by_layer.get(layer)
        if e is None:
            out.append([(c, c) for c in cur])
            continue
        if len(e.tokens_in) == n_img:
            tin, tout = list(e.tokens_in), list(e.tokens_out)
        else:
            tin, tout = [], []
            for k, cnt in enumerate(per_img):
                tin += [e.tokens_in[k] // cnt] * cnt if cnt else []
                tout += [e.tokens_out[k] // cnt] * cnt if cnt else []
        out.append(list(zip(tin, tout)))
        cur = tout
    return out, per_img


def _llm_schedule(spec: ModelSpec, shapes: ForwardShapes):
    """Per decoder layer: (padded length, tokens of each sample)."""
    lens = list(shapes.lengths)
    padded = shapes.seq_len
    entry = [e for e in shapes.events if e.stage in ("in_vit", "before_llm", "projector")]
    if shapes.entry is not None:
        padded, lens = shapes.entry[0], list(shapes.entry[1])
    elif entry:
        for e in entry:
            lens = [n - (a - o) for n, a, o in zip(lens, e.tokens_in, e.tokens_out)]
        if any(a != o for e in entry for a, o in zip(e.tokens_in, e.tokens_out)):
            padded = max(lens)
    stages: dict = {}  # layer -> its in_llm events in the order they ran (a chain may share a layer)
    for e in shapes.events:
        if e.stage == "in_llm":
            stages.setdefault(e.layer, []).append(e)
    cur = (padded, lens)
    out = []
    for layer in range(spec.llm.layers):
        for e in stages.get(layer, []):
            lens = [n - (a - o) for n, a, o in zip(cur[1], e.tokens_in, e.tokens_out)]
            changed = any(a != o for a, o in zip(e.tokens_in, e.tokens_out))
            cur = (max(lens) if changed else cur[0], lens)
        out.append(cur)
    return out


def analyse(spec: ModelSpec, shapes: ForwardShapes, *, convention: str = "exact", padded: bool = True,
            causal_skip: bool = False, output_tokens: int = 0) -> FlopsReport:  # fmt: skip
    """FLOPs of one recorded forward (``ForwardShapes``) of a model described by ``spec``."""
    from vtok.method import LLMAttention, ViTAttention

    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r} is not one of {CONVENTIONS}")
    if isinstance(output_tokens, bool) or not isinstance(output_tokens, int) or output_tokens < 0:
        raise ValueError(f"output_tokens={output_tokens!r} must be an int >= 0")
    b = shapes.batch
    parts = dict.fromkeys(PARTS, 0)
    per = [dict.fromkeys(PARTS, 0) for _ in range(b)]
    weights = shapes.visual if any(shapes.visual) else [1] * b
    sched = _llm_schedule(spec, shapes) if spec.llm is not None and shapes.seq_len else []
    vis_tokens: list = []
    vis_last: list = []

    if convention == "fastv":
        s = spec.llm
        if s is None:
            raise UnsupportedModel("the fastv convention counts an LLM; this model has none")
        r = output_tokens
        d, m = s.hidden, s.ffn
        for i in range(b):
            per[i]["prefill"] = sum(s.fastv_layer(lens[i]) for _, lens in sched)
            if r:
                per[i]["decode"] = sum(r * (4 * d * d + 2 * d * m) + 2 * d * (r * lens[i] + r * (r + 1) / 2)
                                       for _, lens in sched)  # fmt: skip
        parts = {k: sum(p[k] for p in per) for k in PARTS}
        return _report(convention, False, parts, per, sched, vis_tokens, b, causal_skip, shapes, None)

    def add(part, total, per_values):
        parts[part] += total
        for i, x in enumerate(per_values):
            per[i][part] += x

    probes = [p for m in shapes.methods for p in m.probes()]
    # vision tower (and the methods' in-ViT overhead and ViT probes)
    if spec.vision is not None:
        v = spec.vision
        for k, (images, h, w) in enumerate(shapes.vision_calls):
            n = v.tokens(h, w)
            sched_v, img_owner = _vision_schedule(spec, shapes, n, images) if k == 0 else ([[(n, n)] * images] * v.stack.layers, None)  # noqa: E501
            if k == 0:
                vis_tokens = [blk[0][0] for blk in sched_v]
                vis_last = [nm for _, nm in sched_v[-1]]
            t = v.patch_embed(images, h, w)
            t += sum(v.stack.block(na, nm) for blk in sched_v for na, nm in blk)
            t += sum(v.after_blocks(nm) for _, nm in sched_v[-1])
            add("vision", t, _shares(t, weights))
            if k == 0:
                over = 0
                for m in shapes.methods:
                    for e in shapes.events:
                        if e.stage == "in_vit" and e.method == m.name:
                            over += int(m.overhead_flops(e, spec, sched_v[e.layer]))
                for p in probes:
                    if isinstance(p, ViTAttention):
                        rows = 1 if p.kind == "cls" else None
                        over += sum(v.probe_flops(na, rows or na) for na, _ in sched_v[p.layer % v.stack.layers])
                add("method", over, _shares(over, weights))
    # projector
    if spec.projector and shapes.projector_rows:
        t = sum(2 * shapes.projector_rows * a * o for a, o in spec.projector)
        add("projector", t, _shares(t, weights))
    # LLM prefill, LM head, decode
    if sched:
        s = spec.llm
        for padded_len, lens in sched:
            add("prefill", b * s.block(padded_len, causal_skip=causal_skip), [s.block(x, causal_skip=causal_skip) for x in lens])
        final_pad, final_lens = sched[-1]
        keep = shapes.logits_to_keep
        head = 2 * s.hidden * spec.vocab
        add("lm_head", b * (min(keep, final_pad) if keep else final_pad) * head,
            [(min(keep, x) if keep else x) * head for x in final_lens])  # fmt: skip
        steps = list(shapes.decode_steps) or [1] * max(output_tokens - 1, 0)
        done = 0
        for q in steps:
            for padded_len, lens in sched:
                add("decode", b * (s.linear(q) + s.attention(q, padded_len + done + q)),
                    [s.linear(q) + s.attention(q, x + done + q) for x in lens])  # fmt: skip
            add("decode", b * q * head, [q * head] * b)
            done += q
        # LLM attention probes (side computations): as the adapter logged them, else from the declared probes
        d, qo, kvo = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim

        def probe(rows, keys):
            return 2 * keys * d * kvo + 2 * rows * d * qo + 2 * s.heads * rows * keys * s.head_dim

        if shapes.probe_costs is not None:
            for c in shapes.probe_costs:
                add("method", c["batch"] * probe(c["padded_rows"], c["padded_keys"]),
                    [probe(r, k) for r, k in zip(c["rows"], c["keys"])])  # fmt: skip
        else:
            for p in probes:
                if isinstance(p, LLMAttention) and any(shapes.visual):
                    padded_len, lens = sched[p.layer]
                    rows = (lambda n: 1) if p.query == "last" else (lambda n: n)
                    add("method", b * probe(rows(padded_len), padded_len), [probe(rows(x), x) for x in lens])
    # the methods' own computations beyond probes (in_llm / before_llm)
    for m in shapes.methods:
        for e in shapes.events:
            if e.method == m.name and e.stage != "in_vit":
                extra = int(m.overhead_flops(e, spec))
                add("method", extra, _shares(extra, weights))
    if not padded:
        parts = {k: sum(p[k] for p in per) for k in PARTS}
    return _report(convention, padded, parts, per, sched, vis_tokens, b, causal_skip, shapes, vis_last)


def _report(convention, padded, parts, per, sched, vis_tokens, b, causal_skip, shapes, vis_last):
    if sched:
        entry = list(shapes.visual)
        final = [n - (length - v) for n, length, v in zip(sched[-1][1], shapes.lengths, shapes.visual)]
    else:
        entry = [vis_tokens[0] if vis_tokens else 0] * b
        final = list(vis_last) if vis_last else list(entry)
    return FlopsReport(
        visual_entry=[int(x) for x in entry],
        visual_final=[int(x) for x in final],
        convention=convention,
        padded=padded,
        parts={k: int(round(v)) for k, v in parts.items()},
        per_sample=[{k: int(round(v)) for k, v in p.items()} for p in per],
        llm_tokens=[list(lens) for _, lens in sched],
        llm_padded=[p for p, _ in sched],
        vision_tokens=list(vis_tokens),
        batch=b,
        causal_skip=causal_skip,
    )


# ----------------------------------------------------------------------------- recording a real forward


def _get(obj, path):
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _handle_of(model, handle):
    if handle is None:
        handle = getattr(model, "_vtok_handle", None)
    if handle is not None and not getattr(handle, "attached", True):
        handle = None
    return handle


def _pixels(args, kwargs):
    for x in list(args) + [kwargs.get(k) for k in ("pixel_values", "x", "pixel_values_videos")]:
        if isinstance(x, torch.Tensor) and x.dim() >= 4:
            return x
    return None


class Tracker:
    """Record the token counts of every forward of ``model`` while active; ``reports()`` turns them into FLOPs.

    >>> with Tracker(model, handle) as t:
    ...     model.generate(**inputs, max_new_tokens=8)
    >>> t.reports()[0].total        # prefill + the 7 decode steps, as they ran

    Each prefill (a forward without a filled KV cache) starts a record; later forwards with a cache add
    decode steps to it. The vision tower may run inside the forward or before it (``generate`` encodes
    the images first): its calls since the last record belong to the next prefill.
    """

    def __init__(self, model, handle=None):
        self.model = model
        self.handle = _handle_of(model, handle)
        self.spec = model_spec(model)
        self.records: list[ForwardShapes] = []
        self._hooks: list = []
        self._cur: ForwardShapes | None = None
        self._calls: list = []
        self._rows = 0
        self._before: set = set()
        self._before_events: list = []

    def __enter__(self) -> "Tracker":
        m = self.model
        if self.spec.llm is not None:
            tower = _get(m, "model.vision_tower") or _get(m, "vision_tower")
            proj = _get(m, "model.multi_modal_projector") or _get(m, "multi_modal_projector")
            lm = _get(m, "model.language_model") or _get(m, "language_model")
            if tower is None or proj is None or lm is None:
                raise UnsupportedModel(f"cannot find the vision tower, projector and LM of {type(m).__name__}")
            self._hooks += [
                lm.register_forward_hook(self._lm_post, with_kwargs=True),
                m.register_forward_pre_hook(self._top_pre, with_kwargs=True),
                m.register_forward_hook(self._top_post, with_kwargs=True),
                tower.register_forward_pre_hook(self._tower_pre, with_kwargs=True),
                proj.register_forward_pre_hook(self._proj_pre, with_kwargs=True),
            ]
        else:
            self._hooks += [
                m.register_forward_pre_hook(self._vit_pre, with_kwargs=True),
                m.register_forward_hook(self._top_post, with_kwargs=True),
            ]
        return self

    def __exit__(self, *exc) -> None:
        while self._hooks:
            self._hooks.pop().remove()

    def _methods(self):
        return list(self.handle.methods) if self.handle is not None else []

    def _snapshot(self):
        # Hold the old events while their ids are compared: once the handle drops an old event, CPython
        # may give a new one the same id, and it would be taken for an old one (seen: ToMe's in_vit
        # events missing at random from the second batch on, so the vision FLOPs varied run to run).
        self._before_events = list(self.handle.stats) if self.handle is not None else []
        self._before = {id(e) for e in self._before_events}

    def _top_pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = cache_from_kwargs(kwargs)
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        if past and self.records:
            q = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
            self.records[-1].decode_steps.append(int(q))
            return None
        if ids is None:
            raise ValueError("vtok.eval.flops needs input_ids (visual spans and lengths come from them)")
        b, s = ids.shape
        mask = kwargs.get("attention_mask")
        two_d = mask is not None and mask.dim() == 2
        visual = torch.isin(ids, torch.tensor(self.spec.placeholder_ids or (-1,), device=ids.device))
        if two_d:
            visual &= mask.bool()
        keep = kwargs.get("logits_to_keep", 0)
        if isinstance(keep, torch.Tensor):
            raise ValueError("vtok.eval.flops counts logits_to_keep given as an int")
        self._cur = ForwardShapes(
            batch=b,
            seq_len=s,
            lengths=[int(x) for x in (mask.sum(1).tolist() if two_d else [s] * b)],
            visual=[int(x) for x in visual.sum(1).tolist()],
            logits_to_keep=int(keep or 0),
            methods=self._methods() if bool(visual.any()) else [],
        )
        self._snapshot()
        return None

    def _vit_pre(self, module, args, kwargs):
        pix = _pixels(args, kwargs)
        if pix is None:
            raise ValueError(f"vtok.eval.flops found no image tensor in the inputs of {type(module).__name__}")
        n = int(pix.shape[0])
        self._cur = ForwardShapes(batch=n, seq_len=0, lengths=[0] * n, visual=[0] * n, methods=self._methods())
        self._calls = [(n, int(pix.shape[-2]), int(pix.shape[-1]))]
        self._snapshot()
        return None

    def _tower_pre(self, module, args, kwargs):
        pix = _pixels(args, kwargs)
        if pix is not None:
            self._calls.append((int(pix.shape[0]), int(pix.shape[-2]), int(pix.shape[-1])))
        return None

    def _proj_pre(self, module, args, kwargs):
        x = kwargs.get("image_features", args[0] if args else None)
        if x is not None:
            self._rows += int(x.numel() // x.shape[-1])
        return None

    def _lm_post(self, module, args, kwargs, output):
        # the LM's real input, after any splice (AnyRes newline tokens shrink with pooled grids)
        cur = self._cur
        if cur is None:
            return None
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        b, s = x.shape[:2]
        mask = kwargs.get("attention_mask")
        lens = mask.sum(1).tolist() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else [s] * b
        cur.entry = (int(s), [int(v) for v in lens])
        return None

    def _top_post(self, module, args, kwargs, output):
        cur, self._cur = self._cur, None
        if cur is None:
            return None
        cur.vision_calls, cur.projector_rows = self._calls, self._rows
        self._calls, self._rows = [], 0
        if self.handle is not None:
            cur.events = [e for e in self.handle.stats if id(e) not in self._before]
            if cur.seq_len and hasattr(self.handle, "probe_costs"):
                cur.probe_costs = list(self.handle.probe_costs)
        self.records.append(cur)
        return None

    def reports(self, **kw) -> list:
        """One report per recorded prefill (with its decode steps); keywords as for ``analyse``."""
        return [analyse(self.spec, r, **kw) for r in self.records]


def count(model, handle=None, *, convention: str = "exact", padded: bool = True, causal_skip: bool = False,
          output_tokens: int = 0, **inputs) -> FlopsReport:  # fmt: skip
    """FLOPs of one forward of ``model`` on ``inputs`` (the keyword arguments its forward takes).

    The forward runs once under ``torch.no_grad`` to learn the token counts (with a vtok handle attached,
    its ``stats`` give the reductions); the FLOPs are then computed from the config. ``handle`` defaults
    to the one attached to ``model``. ``output_tokens=R`` adds the decode of R output tokens.
    """
    if not inputs:
        raise ValueError("count(model, handle, **inputs) needs the model's inputs, e.g. input_ids=..., pixel_values=...")
    with torch.no_grad(), Tracker(model, handle) as t:
        model(**inputs)
    if not t.records:
        raise RuntimeError("the forward did not reach the model's top-level module; nothing was recorded")
    return analyse(t.spec, t.records[-1], convention=convention, padded=padded, causal_skip=causal_skip,
                   output_tokens=output_tokens)  # fmt: skip


# ----------------------------------------------------------------------------- FlopCounterMode reference


@contextmanager
def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    aten = torch.ops.aten

    def cpu_flash(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def native_mha(query, key, value, embed_dim, num_head, *args, out_shape=None, **kwargs):
        b, nq, e = query
        nk = key[1]
        return 2 * b * nq * e * e + 4 * b * nk * e * e + 4 * b * nq * nk * e + 2 * b * nq * e * e

    mapping = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", cpu_flash), ("_native_multi_head_attention", native_mha)):
        op = getattr(aten, name, None)
        if op is not None:
            mapping[op] = fn
    fc = FlopCounterMode(display=False, custom_mapping=mapping)
    with fc:
        yield fc


def counted(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` under ``torch.utils.flop_counter.FlopCounterMode``; return (result, flops).

    Two kernels FlopCounterMode has no formula for are added: the CPU SDPA kernel
    (``_scaled_dot_product_flash_attention_for_cpu``, counted like the CUDA SDPA kernels) and the fused
    ``nn.MultiheadAttention`` fast path (``_native_multi_head_attention``: q/k/v and output projections
    plus QK^T and AV), which it would otherwise count as zero.
    """
    with torch.no_grad(), _flop_counter() as fc:
        out = fn(*args, **kwargs)
    return out, int(fc.get_total_flops())


# ----------------------------------------------------------------------------- full-size configs, no weights


def _llama7b_text(vocab=32064):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, pad_token_id=0)  # fmt: skip


def _clip_l336():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")  # fmt: skip


def _llava15_7b():
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 (feature layer -2, CLS dropped) + Vicuna-7B (Llama-2-7B)."""
    from transformers import LlavaConfig

    return LlavaConfig(vision_config=_clip_l336(), text_config=_llama7b_text(), image_token_id=32000,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", image_seq_length=576)  # fmt: skip


def _llava_next_7b():
    """llava-hf/llava-v1.6-vicuna-7b-hf: as LLaVA-1.5 plus AnyRes (base + up to 4 crops of 336^2)."""
    from transformers import LlavaNextConfig

    return LlavaNextConfig(vision_config=_clip_l336(), text_config=_llama7b_text(), image_token_id=32000,
                           vision_feature_layer=-2, vision_feature_select_strategy="default",
                           projector_hidden_act="gelu", image_seq_length=576,
                           image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])  # fmt: skip


def _llava_ov_7b():
    """llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP-so400m/14-384 (26 blocks, no head) + Qwen2-7B."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                                image_size=384, patch_size=14, vision_use_head=False)  # fmt: skip
    text = Qwen2Config(vocab_size=152128, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                       rope_theta=1000000.0)  # fmt: skip
    return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=151646,
                                video_token_index=151647, vision_feature_layer=-1,
                                vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")  # fmt: skip


#: full-size configs ``estimate`` and ``meta_model`` know by name (no download, no weights)
FULL_SIZE = {
    "llava-1.5-7b": _llava15_7b,
    "llava-next-7b": _llava_next_7b,
    "llava-onevision-7b": _llava_ov_7b,
}


def full_size_config(name: str):
    """The HF config of a full-size model by name (see ``FULL_SIZE``), built locally."""
    key = name.lower()
    if key not in FULL_SIZE:
        raise ValueError(f"unknown full-size config {name!r}; known: {', '.join(FULL_SIZE)}")
    return FULL_SIZE[key]()


def meta_model(config_or_name):
    """The HF model of a config, built on the meta device: real module shapes, no weights, no memory."""
    from transformers import AutoModelForImageTextToText, AutoModel

    cfg = full_size_config(config_or_name) if isinstance(config_or_name, str) else config_or_name
    with torch.device("meta"):
        if getattr(cfg, "model_type", "") in _VLM_TYPES:
            return AutoModelForImageTextToText.from_config(cfg)
        return AutoModel.from_config(cfg)


# ----------------------------------------------------------------------------- token layouts from a config


def _unpad(cur_h: int, cur_w: int, orig_h: int, orig_w: int) -> tuple[int, int]:
    """Grid left after HF ``unpad_image`` (LLaVA-NeXT/OneVision)."""
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        return cur_h - 2 * ((cur_h - new_h) // 2), cur_w
    new_w = int(round(orig_w * (cur_h / orig_h), 7))
    return cur_h, cur_w - 2 * ((cur_w - new_w) // 2)


def visual_layout(config, image_size=None, images: int = 1, frames: int = 0):
    """What the vision side runs for ``images`` images (of ``image_size`` (H, W)) and/or one video of ``frames``.

    Returns (tower crops, projector rows, visual tokens entering the LLM). LLaVA: one crop per image.
    LLaVA-NeXT: base + AnyRes crops, unpadded grid with a newline token per row. LLaVA-OneVision: the same
    with ``anyres_max_9`` downscaling for one image (several images: one crop each plus a newline); a video
    is pooled 2x2 per frame plus one newline.
    """
    spec = model_spec(config)
    v = spec.vision
    n_sel = v.tokens() - (1 if spec.drop_cls else 0)
    g = v.image_size // v.patch
    mt = config.model_type
    crops = rows = tokens = 0
    if images:
        if mt == "llava":
            crops, tokens = images, images * n_sel
        else:
            from vtok.hf_compat import select_best_resolution

            h, w = image_size or (v.image_size * 2, v.image_size * 2)
            if mt == "llava_onevision" and images > 1:
                crops, tokens = images, images * (n_sel + 1)
            else:
                bh, bw = select_best_resolution((h, w), config.image_grid_pinpoints)
                nph, npw = bh // v.image_size, bw // v.image_size
                cur_h, cur_w = _unpad(nph * g, npw * g, h, w)
                if mt == "llava_onevision":
                    max_n = int(config.vision_aspect_ratio.strip("anyres_max_"))
                    ratio = math.sqrt(cur_h * cur_w / (max_n * g * g))
                    if ratio > 1.1:
                        cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
                crops = images * (nph * npw + 1)
                tokens = images * (cur_h * (cur_w + 1) + n_sel)
        rows = crops * n_sel
    if frames:
        if mt != "llava_onevision":
            raise ValueError(f"video layout is known for llava_onevision only, not {mt!r}")
        crops += frames
        rows += frames * n_sel
        tokens += frames * math.ceil(g / 2) ** 2 + 1
    return crops, rows, tokens


def reductions_for(method, hparams: dict | None, visual_tokens: int, config=None, units: list[int] | None = None):
    """The ``Reduction`` events a method would record for one sample with ``visual_tokens`` visual tokens.

    The method says it (``Method.token_schedule``; ``units`` = tokens per image, default one unit); methods
    that cannot tell without running raise, and ``estimate`` then takes ``reductions=``.
    """
    from vtok.method import Method, get_method_class

    m = method if isinstance(method, Method) else get_method_class(method)(**(hparams or {}))
    return m, m.token_schedule(visual_tokens, units or [visual_tokens])


def estimate(config_or_name, *, text_tokens: int = 64, images: int = 1, image_size=None, frames: int = 0,
             method=None, reductions=None, output_tokens: int = 0, convention: str = "exact",
             causal_skip: bool = False, logits_to_keep: int = 1) -> FlopsReport:  # fmt: skip
    """FLOPs of one sample from a config alone (no weights): ``text_tokens`` text tokens plus the visual tokens of
    ``images`` images (``image_size`` (H, W) for AnyRes models) and/or a video of ``frames`` frames.

    ``method``: a name, (name, hparams) or Method instance whose reductions follow from its budget
    (``reductions_for``); or give ``reductions`` (a list of ``vtok.Reduction``) directly.
    ``logits_to_keep=1`` counts the LM head on the last row, as ``generate`` does.
    """
    cfg = full_size_config(config_or_name) if isinstance(config_or_name, str) else config_or_name
    spec = model_spec(cfg)
    crops, rows, vis = visual_layout(cfg, image_size=image_size, images=images, frames=frames)
    methods, events = [], list(reductions or [])
    if method is not None:
        if reductions is not None:
            raise ValueError("give either method= or reductions=, not both")
        name, hp = (method, None) if not isinstance(method, tuple) else method
        units = None
        if cfg.model_type == "llava" and images:
            units = [vis // images] * images
        m, events = reductions_for(name, hp, vis, cfg, units)
        methods = [m]
    v = spec.vision
    h = w = v.image_size
    shapes = ForwardShapes(
        batch=1,
        seq_len=text_tokens + vis,
        lengths=[text_tokens + vis],
        visual=[vis],
        vision_calls=[(crops, h, w)] if crops else [],
        projector_rows=rows,
        logits_to_keep=logits_to_keep,
        events=events,
        methods=methods,
    )
    return analyse(spec, shapes, convention=convention, padded=True, causal_skip=causal_skip,
                   output_tokens=output_tokens)  # fmt: skip


def spec_mismatches(model) -> list[str]:
    """Differences between the config-derived weights per block and the model's real Linear shapes (tests)."""
    from torch import nn

    spec = model_spec(model.config)
    problems = []

    def linear_macs(block):
        return sum(m.in_features * m.out_features for m in block.modules() if isinstance(m, nn.Linear))

    if spec.llm is not None:
        lm = _get(model, "model.language_model")
        got = linear_macs(lm.layers[0])
        if got != spec.llm.weights_per_layer:
            problems.append(f"llm block: config {spec.llm.weights_per_layer} vs modules {got}")
        proj = _get(model, "model.multi_modal_projector")
        lin = [(m.in_features, m.out_features) for m in proj.modules() if isinstance(m, nn.Linear)]
        if tuple(lin) != spec.projector:
            problems.append(f"projector: config {spec.projector} vs modules {lin}")
        tower = _get(model, "model.vision_tower")
    else:
        tower = model
    from vtok.adapters.hf_vision import vision_blocks

    got = linear_macs(vision_blocks(tower)[0])
    if got != spec.vision.stack.weights_per_layer:
        problems.append(f"vision block: config {spec.vision.stack.weights_per_layer} vs modules {got}")
    return problems

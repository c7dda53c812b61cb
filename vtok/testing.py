"""Tiny random models of every adapter family (real transformers/timm/open_clip classes) and their inputs.

``TINY_CASES``: one ``TinyCase`` per adapter, used by the test suite, the synthetic eval dataset and
quick CPU examples. ``vtok.testing_processor`` saves a tiny LLaVA with a real processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = [
    "TinyCase",
    "TINY_CASES",
    "tiny_llava",
    "tiny_llava_tower",
    "tiny_hf_vision",
    "tiny_timm_vit",
    "tiny_open_clip_vit",
    "left_pad_batch",
    "tiny_llava_next",
    "tiny_llava_onevision",
    "anyres_processor",
    "tiny_tokenizer",
    "anyres_samples",
    "anyres_collate",
    "LLAVA_ONEVISION_VIDEO",
    "vision_samples",
    "vision_batch",
]


@dataclass
class TinyCase:
    """A tiny model of one adapter family and a way to make prompts for it."""

    name: str
    build: Callable[[], torch.nn.Module]
    #: (model, prompt_spec list, seed) -> list of per-sample dicts of unbatched inputs
    make_samples: Callable
    #: "vlm" (prompts with visual placeholders; generate works) or "vision" (a vision encoder)
    kind: str = "vlm"
    #: list of per-sample dicts -> one batch (left padding for VLMs)
    collate: Callable = None
    #: three prompt specs of different lengths for make_samples (the invariant suite's batch)
    specs: list = None
    #: model -> the processor (or tokenizer) a user would pass as ``vtok.apply(..., processor=...)``, for
    #: methods that read the question or ask the model (None: the case has none, e.g. vision encoders)
    processor: Callable = None

    def make_processor(self, model):
        """The case's processor for ``model`` (None if it has none)."""
        return self.processor(model) if self.processor is not None else None

    def batch(self, samples, side: str = "left"):
        collate = self.collate or left_pad_batch
        return collate(samples, side=side) if self.kind == "vlm" else collate(samples)


def _text_config(family: str = "llama", vocab: int = 160, layers: int = 4):
    """A tiny decoder config (GQA: 4 query heads, 2 key/value heads) of a real transformers family."""
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    return cls(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _llama_text_config(vocab=160, layers=4):
    return _text_config("llama", vocab, layers)


def tiny_llava(seed: int = 0, attn_implementation: str = "sdpa", image_size: int = 32, patch: int = 8, layers: int = 4):
    """A LlavaForConditionalGeneration with a 2-block CLIP tower (16 patches) and a 4-layer Llama
    (``image_size``/``patch`` and ``layers`` shape other grids and depths, e.g. LLaVA-1.5's 24x24 and 32)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        vision_config=_tiny_vision_config("clip", image_size, patch),
        text_config=_llama_text_config(layers=layers),
        image_token_id=150,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    return _build(LlavaForConditionalGeneration, cfg, seed, attn_implementation)


def _build(cls, cfg, seed: int, attn_implementation: str):
    """``cls(cfg)`` in eval mode, weights drawn after ``torch.manual_seed(seed)``, with that attention."""
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def llava_samples(model, specs, seed=0):
    """specs: list of (n_text_before, n_images, n_text_after). One unbatched sample per spec."""
    cfg = model.config
    vc = cfg.vision_config
    n_tok = (vc.image_size // vc.patch_size) ** 2
    g = torch.Generator().manual_seed(seed)
    out = []
    for before, n_img, after in specs:
        ids = [1] + torch.randint(3, 140, (before,), generator=g).tolist()
        for _ in range(n_img):
            ids += [cfg.image_token_id] * n_tok + torch.randint(3, 140, (1,), generator=g).tolist()
        ids += torch.randint(3, 140, (after,), generator=g).tolist()
        pix = torch.randn(n_img, 3, vc.image_size, vc.image_size, generator=g)
        out.append({"input_ids": torch.tensor(ids), "pixel_values": pix})
    return out


def left_pad_batch(samples, pad_id: int = 0, side: str = "left"):
    """Batch unbatched samples with padding; position_ids as generate computes them."""
    n = max(s["input_ids"].numel() for s in samples)
    ids, mask = [], []
    for s in samples:
        t = s["input_ids"]
        p = n - t.numel()
        pad = torch.full((p,), pad_id, dtype=t.dtype)
        ids.append(torch.cat([pad, t]) if side == "left" else torch.cat([t, pad]))
        m = torch.cat([torch.zeros(p), torch.ones(t.numel())]) if side == "left" else torch.cat(
            [torch.ones(t.numel()), torch.zeros(p)]
        )
        mask.append(m.long())
    mask = torch.stack(mask)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    batch = {"input_ids": torch.stack(ids), "attention_mask": mask, "position_ids": pos}
    pix = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
    if pix:
        batch["pixel_values"] = torch.cat(pix)
    return batch


# ---------------------------------------------------------------- vision encoders


def _tiny_vision_config(kind: str, image_size: int = 32, patch: int = 8):
    from transformers import CLIPVisionConfig, Dinov2Config, SiglipVisionConfig

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=image_size, patch_size=patch)
    if kind == "clip":
        return CLIPVisionConfig(intermediate_size=64, **common)
    if kind == "siglip":
        return SiglipVisionConfig(intermediate_size=64, **common)
    if kind == "dinov2":
        return Dinov2Config(mlp_ratio=2, **common)
    raise ValueError(f"unknown tiny vision tower {kind!r}; use 'clip', 'siglip' or 'dinov2'")


def tiny_hf_vision(kind: str = "clip", seed: int = 0, attn_implementation: str = "sdpa"):
    """A 2-block HF vision encoder (CLIPVisionModel, SiglipVisionModel or Dinov2Model), 4x4 patches."""
    from transformers import CLIPVisionModel, Dinov2Model, SiglipVisionModel

    cls = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel, "dinov2": Dinov2Model}[kind]
    return _build(cls, _tiny_vision_config(kind), seed, attn_implementation)


def tiny_timm_vit(seed: int = 0, **kw):
    """A 2-block timm VisionTransformer (32x32 images, 8x8 patches, CLS token, 10 classes)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10)
    return VisionTransformer(**{**cfg, **kw}).eval()


def tiny_open_clip_vit(seed: int = 0, **kw):
    """A 2-block open_clip VisionTransformer (nn.MultiheadAttention blocks unless e.g. qk_norm=True)."""
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(seed)
    cfg = dict(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=2.0, output_dim=16)
    return VisionTransformer(**{**cfg, **kw}).eval()


def tiny_llava_tower(kind: str = "siglip", seed: int = 0, attn_implementation: str = "sdpa"):
    """``tiny_llava`` with a SigLIP tower (no CLS, strategy 'full') or a DINOv2 tower (CLS, 'default')."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        vision_config=_tiny_vision_config(kind),
        text_config=_llama_text_config(),
        image_token_id=150,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full" if kind == "siglip" else "default",
        projector_hidden_act="gelu",
    )
    return _build(LlavaForConditionalGeneration, cfg, seed, attn_implementation)


def vision_samples(key: str = "pixel_values"):
    """make_samples for a vision encoder: one random image per spec, as {key: [1, 3, H, W]}."""

    def make(model, specs, seed=0):
        cfg = getattr(model, "config", None)
        size = getattr(cfg, "image_size", None)
        if size is None:  # timm / open_clip
            size = getattr(model, "image_size", None) or model.patch_embed.img_size
            size = size[0] if isinstance(size, (tuple, list)) else size
        g = torch.Generator().manual_seed(seed)
        return [{key: torch.randn(1, 3, size, size, generator=g)} for _ in specs]

    return make


def vision_batch(samples):
    """Stack per-sample image dicts into one batch."""
    return {k: torch.cat([s[k] for s in samples]) for k in samples[0]}


def _vision_case(name, build, key="pixel_values"):
    return TinyCase(name, build, vision_samples(key), kind="vision", collate=vision_batch, specs=[0, 1, 2])


# ---------------------------------------------------------------- LLaVA-NeXT / LLaVA-OneVision
# Inputs come from the real transformers processors (image/video processors and a word-level tokenizer
# built offline over the tiny model's vocabulary), so placeholder counts, AnyRes crops and padding are
# exactly what a user's processor produces.


def _word_tokenizer(vocab: int, special: dict):
    """A fast word-level tokenizer over ids 0..vocab-1: 'w<i>' for plain ids, ``special`` name -> id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {0: "<pad>", 1: "<s>", 2: "</s>", 3: "<unk>", **{i: n for n, i in special.items()}}
    tk = Tokenizer(models.WordLevel({names.get(i, f"w{i}"): i for i in range(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={f"{n[1:-1]}_token": n for n in special},
    )


#: a chat template for the tiny tokenizers (a user turn, then the assistant's turn to answer)
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_tokenizer(model, chat_template: str | None = TINY_CHAT_TEMPLATE):
    """A word-level tokenizer over a tiny LLaVA's vocabulary ('w<i>', ``<image>`` at its image token id) with
    a small chat template: what ``vtok.apply(..., processor=...)`` needs to read questions and ask the model."""
    cfg = model.config
    tok = _word_tokenizer(cfg.text_config.vocab_size, {"<image>": cfg.image_token_id})
    tok.chat_template = chat_template
    return tok


def tiny_llava_next(seed: int = 0, attn_implementation: str = "sdpa", image_size: int = 32, patch: int = 8):
    """A LlavaNextForConditionalGeneration: 2-block CLIP tower (4x4 patches per crop, CLS dropped),
    AnyRes pinpoints of 1x2, 2x1 and 2x2 crops, a 4-layer Llama."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    cfg = LlavaNextConfig(
        vision_config=_tiny_vision_config("clip", image_size, patch),
        text_config=_llama_text_config(),
        image_token_id=150,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=_pinpoints(image_size),
        projector_hidden_act="gelu",
    )
    return _build(LlavaNextForConditionalGeneration, cfg, seed, attn_implementation)


def _pinpoints(s: int) -> list:
    """AnyRes resolutions of 1x2, 2x1 and 2x2 crops of s x s."""
    return [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]


def tiny_llava_onevision(seed: int = 0, attn_implementation: str = "sdpa", image_size: int = 48, patch: int = 8):
    """A LlavaOnevisionForConditionalGeneration: 2-block SigLIP tower (6x6 patches, 3x3 per video frame
    after the model's pooling), AnyRes pinpoints of 1x2, 2x1, 2x2 crops with ``anyres_max_2`` (2x2 crops
    are down-scaled), a 4-layer Qwen2."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    cfg = LlavaOnevisionConfig(
        vision_config=_tiny_vision_config("siglip", image_size, patch),
        text_config=_text_config("qwen2"),
        image_token_id=151,
        video_token_id=152,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_2",
        image_grid_pinpoints=_pinpoints(image_size),
        projector_hidden_act="gelu",
    )
    return _build(LlavaOnevisionForConditionalGeneration, cfg, seed, attn_implementation)


def anyres_processor(model):
    """The real LlavaNextProcessor / LlavaOnevisionProcessor for a tiny model (built offline)."""
    from transformers import LlavaNextForConditionalGeneration

    cfg = model.config
    vc = cfg.vision_config
    s = vc.image_size
    if isinstance(model, LlavaNextForConditionalGeneration):
        from transformers import LlavaNextImageProcessor, LlavaNextProcessor

        image_proc = LlavaNextImageProcessor(
            size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_grid_pinpoints=cfg.image_grid_pinpoints
        )
        tok = _word_tokenizer(cfg.text_config.vocab_size, {"<image>": cfg.image_token_id})
        return LlavaNextProcessor(
            image_processor=image_proc,
            tokenizer=tok,
            patch_size=vc.patch_size,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            num_additional_image_tokens=1 if cfg.vision_feature_select_strategy == "default" else 0,
        )
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    image_proc = LlavaOnevisionImageProcessor(size={"height": s, "width": s}, image_grid_pinpoints=cfg.image_grid_pinpoints)
    tok = _word_tokenizer(cfg.text_config.vocab_size, {"<image>": cfg.image_token_id, "<video>": cfg.video_token_id})
    return LlavaOnevisionProcessor(
        image_processor=image_proc,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": s, "width": s}),
        tokenizer=tok,
        num_image_tokens=(s // vc.patch_size) ** 2,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        vision_aspect_ratio=cfg.vision_aspect_ratio,
    )


def anyres_samples(model, specs, seed=0):
    """specs: list of (n_words_before, visuals, n_words_after); a visual is (H, W) for an image or
    (frames, H, W) for a video (random RGB pixels). One sample per spec: the prompt text, its images
    and videos, and the real processor (``anyres_collate`` runs it on the batch)."""
    import numpy as np

    proc = anyres_processor(model)
    rng = np.random.default_rng(seed)
    words = lambda k: [f"w{i}" for i in rng.integers(5, 140, k)]  # noqa: E731
    out = []
    for before, visuals, after in specs:
        text, images, videos = ["<s>"] + words(before), [], []
        for v in visuals:
            if len(v) == 2:
                images.append(rng.integers(0, 256, (*v, 3), dtype=np.uint8))
                text.append("<image>")
            else:
                videos.append(rng.integers(0, 256, (*v, 3), dtype=np.uint8))
                text.append("<video>")
            text += words(1)
        text += words(after)
        out.append({"text": " ".join(text), "images": images, "videos": videos, "processor": proc})
    return out


def anyres_collate(samples, side: str = "left"):
    """Run the real processor on a batch of ``anyres_samples``: its outputs as they are, plus position_ids
    as generate computes them. Videos of different frame counts cannot be stacked: the processor then
    returns ``pixel_values_videos`` as a list of per-video tensors, which is passed on unchanged."""
    proc = samples[0]["processor"]
    proc.tokenizer.padding_side = side
    kw = {"text": [s["text"] for s in samples], "padding": True}
    if any(s["images"] for s in samples):
        kw["images"] = [s["images"] for s in samples]
    videos = [v for s in samples for v in s["videos"]]
    if videos:
        kw["videos"] = videos
    ragged = len({v.shape[0] for v in videos}) > 1
    out = dict(proc(**kw, return_tensors=None if ragged else "pt"))
    if ragged:  # what a user does with return_tensors=None: tensors for the rest, the video list as is
        pix = out.pop("pixel_values", None)
        out = {k: v if k == "pixel_values_videos" else torch.as_tensor(v) for k, v in out.items()}
        if pix is not None:  # per-image [patches, C, H, W]: the model takes them concatenated
            out["pixel_values"] = torch.cat(list(pix))
    mask = out["attention_mask"]
    out["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return out


TINY_CASES: dict[str, TinyCase] = {
    "llava": TinyCase(
        "llava", tiny_llava, llava_samples, specs=[(3, 1, 4), (9, 1, 2), (1, 2, 6)], processor=tiny_tokenizer
    ),
    "llava_siglip": TinyCase(
        "llava_siglip", lambda: tiny_llava_tower("siglip"), llava_samples, specs=[(3, 1, 4), (9, 1, 2), (1, 2, 6)],
        processor=tiny_tokenizer,
    ),  # fmt: skip
    "clip_vision": _vision_case("clip_vision", lambda: tiny_hf_vision("clip")),
    "siglip_vision": _vision_case("siglip_vision", lambda: tiny_hf_vision("siglip")),
    "dinov2": _vision_case("dinov2", lambda: tiny_hf_vision("dinov2")),
    "timm_vit": _vision_case("timm_vit", tiny_timm_vit, key="x"),
    "open_clip_vit": _vision_case("open_clip_vit", tiny_open_clip_vit, key="x"),
    "llava_next": TinyCase(
        "llava_next", tiny_llava_next, anyres_samples, collate=anyres_collate,
        specs=[(3, [(40, 70)], 4), (9, [(60, 30)], 2), (1, [(50, 50), (30, 80)], 6)], processor=anyres_processor,
    ),  # fmt: skip
    "llava_onevision": TinyCase(
        "llava_onevision", tiny_llava_onevision, anyres_samples, collate=anyres_collate,
        specs=[(3, [(40, 90)], 4), (9, [(90, 85)], 2), (1, [(50, 50), (30, 80)], 6)], processor=anyres_processor,
    ),  # fmt: skip
}

#: LLaVA-OneVision with a batch of two videos of 8 and 12 frames (different prompt lengths). Not in
#: TINY_CASES: the untouched transformers model cannot run a batch of videos with different frame
#: counts (only vtok's adapter can), and its placeholders are video tokens, not image tokens.
LLAVA_ONEVISION_VIDEO = TinyCase(
    "llava_onevision_video",
    tiny_llava_onevision,
    anyres_samples,
    collate=anyres_collate,
    specs=[(3, [(8, 40, 48)], 4), (9, [(12, 40, 48)], 2)],
    processor=anyres_processor,
)

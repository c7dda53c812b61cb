"""Tiny random models built from the real transformers classes, with matching inputs.

Used by the test suite (every adapter registers a factory here) and by quick CPU examples.
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

    def batch(self, samples, side: str = "left"):
        collate = self.collate or left_pad_batch
        return collate(samples, side=side) if self.kind == "vlm" else collate(samples)


def _llama_text_config(vocab=160, layers=4):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_llava(seed: int = 0, attn_implementation: str = "sdpa", image_size: int = 32, patch: int = 8):
    """A LlavaForConditionalGeneration with a 2-block CLIP tower (16 patches) and a 4-layer Llama."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=_llama_text_config(),
        image_token_id=150,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(cfg).eval()
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
    torch.manual_seed(seed)
    model = cls(_tiny_vision_config(kind)).eval()
    model.set_attn_implementation(attn_implementation)
    return model


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

    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=_tiny_vision_config(kind),
        text_config=_llama_text_config(),
        image_token_id=150,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full" if kind == "siglip" else "default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(attn_implementation)
    return model


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


TINY_CASES: dict[str, TinyCase] = {
    "llava": TinyCase("llava", tiny_llava, llava_samples, specs=[(3, 1, 4), (9, 1, 2), (1, 2, 6)]),
    "llava_siglip": TinyCase(
        "llava_siglip", lambda: tiny_llava_tower("siglip"), llava_samples, specs=[(3, 1, 4), (9, 1, 2), (1, 2, 6)]
    ),
    "clip_vision": _vision_case("clip_vision", lambda: tiny_hf_vision("clip")),
    "siglip_vision": _vision_case("siglip_vision", lambda: tiny_hf_vision("siglip")),
    "dinov2": _vision_case("dinov2", lambda: tiny_hf_vision("dinov2")),
    "timm_vit": _vision_case("timm_vit", tiny_timm_vit, key="x"),
    "open_clip_vit": _vision_case("open_clip_vit", tiny_open_clip_vit, key="x"),
}

"""Full-size model configs by name (LLaVA-1.5-7B, LLaVA-NeXT-7B, LLaVA-OneVision-7B), built locally without
a download, and ``meta_model``: the HF model of a config on the meta device (real shapes, no weights).
"""

from __future__ import annotations

import torch

from .model_spec import VLM_TYPES

__all__ = ["FULL_SIZE", "full_size_config", "meta_model"]

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
        if getattr(cfg, "model_type", "") in VLM_TYPES:
            return AutoModelForImageTextToText.from_config(cfg)
        return AutoModel.from_config(cfg)

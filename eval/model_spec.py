"""Model shapes for the FLOPs count (``ModelSpec``), read from an HF config (LLaVA family, HF vision towers)
or from the modules of a timm / open_clip ViT; ``spec_mismatches`` checks them against a model's real layers.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .cost_model import ModelSpec, Stack, UnsupportedModel, VisionSpec

__all__ = ["model_spec", "spec_mismatches", "VLM_TYPES", "get_path"]

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


VLM_TYPES = ("llava", "llava_next", "llava_onevision")


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
            f"vtok.eval.flops has no formula for {cls.__name__}; supported: HF {', '.join(VLM_TYPES)}, HF vision "
            "towers (CLIP, SigLIP, DINOv2), timm and open_clip VisionTransformer"
        )
    config = model_or_config
    mt = getattr(config, "model_type", None)
    if mt in VLM_TYPES:
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
        f"vtok.eval.flops has no formula for model type {mt!r}; supported: {', '.join(VLM_TYPES)}, "
        f"{', '.join(_HF_VISION)}, timm and open_clip VisionTransformer"
    )


def get_path(obj, path: str):
    """``obj.a.b`` for ``path="a.b"``, or None where an attribute is missing."""
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def spec_mismatches(model) -> list[str]:
    """Differences between the config-derived weights per block and the model's real Linear shapes (tests)."""
    from vtok.adapters.hf_vision import vision_blocks

    spec = model_spec(model.config)
    problems = []
    if spec.llm is not None:
        lm = get_path(model, "model.language_model")
        got = _linear_macs(lm.layers[0])
        if got != spec.llm.weights_per_layer:
            problems.append(f"llm block: config {spec.llm.weights_per_layer} vs modules {got}")
        proj = get_path(model, "model.multi_modal_projector")
        lin = [(m.in_features, m.out_features) for m in proj.modules() if isinstance(m, nn.Linear)]
        if tuple(lin) != spec.projector:
            problems.append(f"projector: config {spec.projector} vs modules {lin}")
        tower = get_path(model, "model.vision_tower")
    else:
        tower = model
    got = _linear_macs(vision_blocks(tower)[0])
    if got != spec.vision.stack.weights_per_layer:
        problems.append(f"vision block: config {spec.vision.stack.weights_per_layer} vs modules {got}")
    return problems

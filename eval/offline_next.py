"""The offline VLM in LLaVA-NeXT shape: the same DINOv2 ViT-S/14, SmolLM2-135M-Instruct and trained projector
as ``vtok.eval.offline``, in a stock ``LlavaNextForConditionalGeneration`` with AnyRes crops (what differs from the
LLaVA-1.5 assembly, and why: ``assemble_llava_next``). It answers easy-VQA-like questions about shapes only and
cannot read text: harnesses on it measure fidelity to the uncompressed model, not accuracy.
"""

from __future__ import annotations

import time
import warnings

import torch

from . import offline
from .offline_assets import DINO_DIR, LM_DIR, _log, build_cache

__all__ = ["PINPOINTS", "CROP", "make_llava_next_config", "assemble_llava_next", "load_vlm_next", "next_processor"]

CROP = offline.IMAGE_SIZE  # 224: each crop and the base image
#: AnyRes resolutions (height, width) in px: 2x2, 3x2, 2x3, 4x2, 2x4, 3x3 crops of 224
PINPOINTS = [[2 * CROP, 2 * CROP], [3 * CROP, 2 * CROP], [2 * CROP, 3 * CROP], [4 * CROP, 2 * CROP],
             [2 * CROP, 4 * CROP], [3 * CROP, 3 * CROP]]  # fmt: skip


def make_llava_next_config(vision_config, text_config, image_token_id: int, pinpoints=None):
    """LLaVA-NeXT config of the offline VLM: the LLaVA-1.5 choices of ``offline.make_llava_config``
    (last block's output, CLS dropped, GELU projector with bias, tied LM head) plus AnyRes pinpoints, with a
    224 px tower (``image_size`` is the crop size for LLaVA-NeXT)."""
    from transformers import LlavaNextConfig

    vc = vision_config.to_dict()
    vc["image_size"] = CROP
    return LlavaNextConfig(
        vision_config=vc,
        text_config=text_config.to_dict(),
        image_token_id=image_token_id,
        image_grid_pinpoints=pinpoints or PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=True,
    )


def _tower_state_at_crop(vision_model) -> dict:
    """The tower's weights with the position embeddings resampled to the crop's 16 x 16 grid by the tower's
    own interpolation (what it computes at run time for a 224 px input)."""
    sd = dict(vision_model.state_dict())
    emb = vision_model.embeddings
    g = CROP // vision_model.config.patch_size
    with torch.no_grad():
        dummy = torch.zeros(1, g * g + 1, emb.position_embeddings.shape[-1], dtype=emb.position_embeddings.dtype)
        sd["embeddings.position_embeddings"] = emb.interpolate_pos_encoding(dummy, CROP, CROP).clone()
    return sd


def assemble_llava_next(vision_model, lm, tokenizer, dtype=torch.float32, pinpoints=None):
    """Stock ``LlavaNextForConditionalGeneration`` around a Dinov2Model and a LlamaForCausalLM (weights copied);
    projector initialised at random (seed 0) until ``offline.load_projector`` loads the trained one.

    What differs from the LLaVA-1.5 assembly, and why:

    - Each AnyRes crop and the base (thumbnail) image go through the tower at 224 px (16 x 16 patches, the
      resolution the projector was trained at). The tower's config says ``image_size=224`` because LLaVA-NeXT
      takes the crop size from it; its position embeddings are the checkpoint's 37 x 37 grid resampled to
      16 x 16 by DINOv2's own ``interpolate_pos_encoding``, i.e. exactly what the 224 px LLaVA-1.5 model
      computes at run time, so a crop's features equal the offline VLM's features of that crop.
    - ``image_grid_pinpoints`` (``PINPOINTS``, H x W in px): grids of 2 x 2 up to 4 x 2 crops (portrait and
      landscape), so a document page at 150 dpi is split into several crops (a portrait page: 3 x 2).
    - ``image_newline`` (LLaVA-NeXT's row separator, which the LLaVA-1.5 projector never saw) is SmolLM2's
      input embedding of "\\n": the nearest meaning the LM knows.
    - Prompt: ``<image>`` (the processor expands it to base + crops + newlines) then ``Question: {q} Answer:``.
    """
    from transformers import LlavaNextForConditionalGeneration

    image_token_id = offline.add_image_token(tokenizer)
    if lm.get_input_embeddings().weight.shape[0] < len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            emb = lm.get_input_embeddings().weight
            emb[image_token_id] = emb[:image_token_id].mean(0)
    cfg = make_llava_next_config(vision_model.config, lm.config, image_token_id, pinpoints)
    cfg.text_config.vocab_size = lm.get_input_embeddings().weight.shape[0]
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(cfg)
    model.to_empty(device="cpu")
    model.model.vision_tower.load_state_dict(_tower_state_at_crop(vision_model), strict=True)
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    for dst, src in ((model.model.vision_tower, vision_model), (model.model.language_model, lm.model)):
        src_bufs = dict(src.named_buffers())
        for name, buf in dst.named_buffers():  # non-persistent buffers (RoPE inv_freq) are left empty by to_empty
            buf.data.copy_(src_bufs[name].to(buf.dtype))
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    model.model.vision_tower.embeddings.mask_token.data.zero_()
    with torch.no_grad():
        offline.init_projector(model.model.multi_modal_projector, seed=0)
        nl = tokenizer("\n", add_special_tokens=False)["input_ids"]
        model.model.image_newline.copy_(lm.get_input_embeddings().weight[nl[0]].to(model.model.image_newline.dtype))
    model.to(dtype)
    model.eval()
    return model


def next_processor(tokenizer, model):
    """The real ``LlavaNextProcessor`` for this model: ImageNet mean/std, bilinear resize, 224 px crops and
    base image, the model's pinpoints; expands ``<image>`` to base + crops + newlines."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    cfg = model.config
    image_proc = LlavaNextImageProcessor(
        size={"shortest_edge": CROP},
        crop_size={"height": CROP, "width": CROP},
        image_grid_pinpoints=cfg.image_grid_pinpoints,
        image_mean=list(offline.IMAGENET_MEAN),
        image_std=list(offline.IMAGENET_STD),
        resample=2,  # PIL bilinear, as the offline VLM's preprocessing
        do_convert_rgb=True,
    )
    offline.add_image_token(tokenizer)
    return LlavaNextProcessor(
        image_processor=image_proc,
        tokenizer=tokenizer,
        patch_size=cfg.vision_config.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        image_token=offline.IMAGE_TOKEN,
    )


def load_vlm_next(cache_dir=None, projector="default", dtype=torch.float32, device="cpu", pinpoints=None):
    """Return ``(model, processor)`` of the NeXT-shaped offline VLM; builds the weight cache on first use.
    ``projector`` as in ``offline.load_vlm``."""
    from transformers import AutoTokenizer, Dinov2Model, LlamaForCausalLM

    root = build_cache(cache_dir)
    t0 = time.time()
    vision = Dinov2Model.from_pretrained(root / DINO_DIR, dtype=torch.float32)
    lm = LlamaForCausalLM.from_pretrained(root / LM_DIR, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(root / LM_DIR)
    model = assemble_llava_next(vision, lm, tok, dtype=dtype, pinpoints=pinpoints)
    del vision, lm
    if projector == "default":
        if offline.DEFAULT_PROJECTOR.exists():
            offline.load_projector(model, offline.DEFAULT_PROJECTOR)
        else:
            warnings.warn(f"no trained projector at {offline.DEFAULT_PROJECTOR}: the projector is UNTRAINED (random)",
                          stacklevel=2)
    elif projector is not None:
        offline.load_projector(model, projector)
    model.to(device)
    _log(f"NeXT VLM assembled in {time.time() - t0:.1f} s")
    return model, next_processor(tok, model)

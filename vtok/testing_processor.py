"""A real HF LlavaProcessor for the tiny LLaVA model, built offline (word-level tokenizer)."""

from __future__ import annotations

from pathlib import Path


def save_tiny_llava_checkpoint(path, seed: int = 0) -> Path:
    """Save a tiny LlavaForConditionalGeneration and a matching LlavaProcessor to ``path``.

    The tokenizer is a word-level ``tokenizers`` model over a small vocabulary with ``<image>``
    mapped to the model's image token id, so ``AutoProcessor.from_pretrained(path)`` expands
    ``<image>`` into the right number of placeholders exactly as for a real checkpoint.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    from vtok.testing import tiny_llava

    path = Path(path)
    model = tiny_llava(seed)
    cfg = model.config
    words = ["<pad>", "<s>", "</s>", "<unk>", "USER:", "ASSISTANT:", "what", "is", "in", "the", "image", "?"]
    words += [f"w{i}" for i in range(len(words), cfg.image_token_id)]
    vocab = {w: i for i, w in enumerate(words)}
    vocab["<image>"] = cfg.image_token_id
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left", extra_special_tokens={"image_token": "<image>"},
    )
    vc = cfg.vision_config
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": vc.image_size}, crop_size={"height": vc.image_size, "width": vc.image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=fast,
        patch_size=vc.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path

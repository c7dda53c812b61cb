"""easy-VQA on the offline VLM: the 13 answers, the questions, scoring by first tokens, accuracy.

The model's own code (``offline.py``) takes the answer set from here and re-exports these names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from .offline import VLMHelper

# easy-VQA's 13 answers (shapes, colours, yes/no; easy_vqa.get_answers() holds the same set in another order)
EASY_VQA_ANSWERS = (
    "circle", "rectangle", "triangle", "green", "red", "gray", "teal",
    "black", "yellow", "brown", "blue", "yes", "no",
)


def answer_first_token_ids(tokenizer, answers: Sequence[str] = EASY_VQA_ANSWERS) -> torch.Tensor:
    """First token of `` {answer}`` for each answer; raises if two answers share a first token."""
    ids = [tokenizer(" " + a, add_special_tokens=False)["input_ids"][0] for a in answers]
    if len(set(ids)) != len(ids):
        raise ValueError(f"answers' first tokens are not distinct: {dict(zip(answers, ids))}")
    return torch.tensor(ids, dtype=torch.long)


def score_answers(last_logits: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """Index (into the answer list) of the highest-scoring answer first token, per row of ``[B, V]`` logits."""
    return last_logits[:, answer_ids.to(last_logits.device)].argmax(-1)


def easy_vqa_split(split: str = "test"):
    """``(questions, answers, image_ids, image_paths)`` of easy-VQA (needs ``pip install easy-vqa``)."""
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover
        raise ImportError("easy-VQA data needs `pip install easy-vqa==1.0`") from e
    if split == "train":
        qs, ans, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        qs, ans, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if sorted(easy_vqa.get_answers()) != sorted(EASY_VQA_ANSWERS):
        raise RuntimeError(f"easy-VQA answers changed: {easy_vqa.get_answers()}")
    return list(qs), list(ans), list(ids), paths

@torch.no_grad()
def evaluate_easy_vqa(model, helper: VLMHelper, n: int = 300, batch_size: int = 16, pool: int = 1,
                      split: str = "test", seed: int = 0, progress: bool = True) -> dict:
    """Accuracy on ``n`` random easy-VQA questions (seeded), scored by the answers' first tokens.

    ``pool == 1`` runs the stock HF LLaVA forward on ``pixel_values`` (end to end); ``pool > 1`` average-pools
    the vision features before the projector (via :func:`forward_with_features`).
    """
    from PIL import Image

    from .offline import forward_with_features, vision_features  # offline.py imports this module

    qs, ans, img_ids, paths = easy_vqa_split(split)
    order = np.random.default_rng(seed).permutation(len(qs))[:n]
    answer_ids = helper.answer_token_ids()
    dev = next(model.parameters()).device
    correct = 0
    it = range(0, len(order), batch_size)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"eval pool={pool}", unit="batch")
    for s in it:
        idx = order[s:s + batch_size]
        images = [Image.open(paths[img_ids[i]]) for i in idx]
        batch = helper(images, [qs[i] for i in idx], pool=pool)
        batch = {k: v.to(dev) for k, v in batch.items()}
        if pool == 1:
            out = model(**batch, logits_to_keep=1, use_cache=False)
        else:
            feats = vision_features(model, batch["pixel_values"])
            out = forward_with_features(model, batch["input_ids"], batch["attention_mask"], feats, pool=pool,
                                        logits_to_keep=1, position_ids=batch["position_ids"])
        pred = score_answers(out.logits[:, -1].float(), answer_ids).cpu()
        gold = torch.tensor([EASY_VQA_ANSWERS.index(ans[i]) for i in idx])
        correct += int((pred == gold).sum())
    return {"n": len(order), "correct": correct, "accuracy": correct / max(1, len(order)), "pool": pool,
            "split": split}

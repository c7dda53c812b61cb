"""A local lmms-eval task shipped by vtok: ``vtok_easy_vqa``, easy-VQA on the offline demo VLM (``vtok demo --export``).

This folder is what ``--include_path`` names (``TASK_DIR``; from a clone: ``eval/lmms_tasks``); the command is in
the README's lmms-eval section. The functions are the YAML's ``!function`` hooks (questions, image, prompt, score).
"""

from __future__ import annotations

import json
from pathlib import Path

TASK_DIR = str(Path(__file__).resolve().parent)
#: the task's questions (``dataset_kwargs.data_files`` of the YAML, read through ``!function``): 200 test questions
#: in the order ``vtok eval --dataset easy-vqa`` draws them (seed 0), so ``--limit n`` asks the same questions as
#: ``vtok eval --n n`` (``write_data_file``)
DATA_FILE = str(Path(TASK_DIR) / "easy_vqa_test.jsonl")

_PATHS: dict = {}


def _image_paths() -> dict:
    """easy-VQA's test images by id (``easy_vqa.get_test_image_paths()``), looked up once."""
    if not _PATHS:
        import easy_vqa

        _PATHS.update(easy_vqa.get_test_image_paths())
    return _PATHS


def doc_to_visual(doc) -> list:
    """The question's image, opened from the ``easy-vqa`` package."""
    from PIL import Image

    return [Image.open(_image_paths()[int(doc["image_id"])]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None) -> str:
    """The question alone: lmms-eval asks ``<image>`` + it, and the exported checkpoint's chat template
    (``vtok.eval.offline.CHAT_TEMPLATE``) turns that into the training prompt
    ``<image> x 256 Question: {q} Answer:``."""
    return doc["question"]


def doc_to_target(doc) -> str:
    return doc["answer"]


def normalize_answer(text: str) -> str:
    """The first word of a generated answer, lower case, without punctuation (`` Circle.`` -> ``circle``)."""
    words = text.strip().lower().split()
    return words[0].strip(".,;:!?\"'") if words else ""


def process_results(doc, results) -> dict:
    """Exact match of the greedy answer's first word, lower case (``normalize_answer``), with the question's
    answer (one of easy-VQA's 13)."""
    return {"exact_match": float(normalize_answer(results[0]) == doc["answer"])}


def write_data_file(n: int = 200, seed: int = 0, path: str = DATA_FILE) -> None:
    """(Re)write the task's questions: the first ``n`` of ``harnesses.EasyVQA``'s seeded order of the test split."""
    import numpy as np

    from vtok.eval.offline import easy_vqa_split

    qs, ans, img_ids, _ = easy_vqa_split("test")
    order = np.random.default_rng(seed).permutation(len(qs))[:n]
    with open(path, "w") as f:
        for k, i in enumerate(order):
            f.write(json.dumps({"id": k, "question": qs[i], "answer": ans[i], "image_id": int(img_ids[i])}) + "\n")

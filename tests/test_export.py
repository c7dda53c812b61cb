"""The offline demo VLM as a standard HF checkpoint (``offline.export_vlm``, ``vtok demo --export``): its processor
equals vtok's own preprocessing, ``from_pretrained`` / ``AutoProcessor`` / ``pipeline`` load it as it is, a method
attaches to the pipeline's model, and lmms-eval's evaluator runs the plugin on vtok's local task.

One export per module (~400 MB, removed at teardown); skipped where the offline weight cache is not built."""

from __future__ import annotations

import json
import shutil
from importlib.util import find_spec

import pytest
import torch

from vtok.eval import lmms_tasks, offline

pytestmark = pytest.mark.skipif(not offline.is_built(), reason="offline VLM cache not built (python -m vtok.eval.offline)")
needs_lmms = pytest.mark.skipif(find_spec("lmms_eval") is None, reason="lmms-eval is not installed (pip install vtok[lmms])")


@pytest.fixture(scope="module")
def vlm():
    return offline.load_vlm()


@pytest.fixture(scope="module")
def exported(vlm, tmp_path_factory):
    model, _, helper = vlm
    out = tmp_path_factory.mktemp("vlm")
    offline.export_vlm(out, model=model, processor=helper.processor)
    yield out
    shutil.rmtree(out, ignore_errors=True)  # pytest keeps old tmp dirs; this one is large


def _samples(n):
    from PIL import Image

    qs, ans, ids, paths = offline.easy_vqa_split("test")
    return [Image.open(paths[ids[i]]).convert("RGB") for i in range(n)], qs[:n], ans[:n]


def _messages(image, question, with_image=False):
    part = {"type": "image", "image": image} if with_image else {"type": "image"}
    return [{"role": "user", "content": [part, {"type": "text", "text": question}]}]


def test_processor_gives_the_helpers_inputs(vlm):
    """The LlavaProcessor (chat template -> text, images) gives exactly vtok's input_ids, mask and pixel values."""
    model, tok, helper = vlm
    proc = helper.processor
    images, questions, _ = _samples(4)
    texts = [proc.apply_chat_template(_messages(None, q), add_generation_prompt=True) for q in questions]
    assert texts[0] == f"<image>Question: {questions[0]} Answer:"
    # lmms-eval's llava_hf sends a string with the marker in front: the same prompt
    assert tok.apply_chat_template([{"role": "user", "content": f"<image>\n{questions[0]}"}], tokenize=False,
                                   add_generation_prompt=True) == texts[0]  # fmt: skip
    got = proc(images=images, text=texts, return_tensors="pt", padding=True)
    ref = helper(images, questions)
    for k in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(got[k], ref[k]), k
    # an assistant turn is " answer" + EOS, as in training
    ids, n_ans = offline.build_prompt_ids(tok, questions[0], 256, model.config.image_token_id, answer="yes")
    chat = proc.apply_chat_template(_messages(None, questions[0]) + [{"role": "assistant", "content": "yes"}])
    assert proc(images=images[:1], text=[chat], return_tensors="pt")["input_ids"][0].tolist() == ids


def test_exported_checkpoint_loads_with_plain_hf(vlm, exported):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, _, helper = vlm
    loaded = LlavaForConditionalGeneration.from_pretrained(exported)
    assert loaded.dtype == torch.float32
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)  # bit-identical
    assert loaded.generation_config.eos_token_id == helper.tokenizer.eos_token_id
    images, questions, _ = _samples(3)
    ref = helper(images, questions)
    texts = [f"<image>Question: {q} Answer:" for q in questions]
    try:
        pil = AutoProcessor.from_pretrained(exported, backend="pil")
    except TypeError:  # transformers without image-processor backends: the default is the PIL one
        pil = AutoProcessor.from_pretrained(exported)
    got = pil(images=images, text=texts, return_tensors="pt", padding=True)
    assert torch.equal(got["input_ids"], ref["input_ids"]) and torch.equal(got["pixel_values"], ref["pixel_values"])
    # transformers' default (torchvision) backend: the same ids, pixels within one grey level
    default = AutoProcessor.from_pretrained(exported)(images=images, text=texts, return_tensors="pt", padding=True)
    assert torch.equal(default["input_ids"], ref["input_ids"])
    std = torch.tensor(offline.IMAGENET_STD).view(1, 3, 1, 1)
    assert ((default["pixel_values"] - ref["pixel_values"]).abs() * std * 255).max() <= 1.0 + 1e-3
    with torch.no_grad():  # the helper also gives position_ids, processors do not (generate derives them)
        a = model(**{k: v for k, v in ref.items() if k != "position_ids"}, logits_to_keep=1).logits
        b = loaded(**got, logits_to_keep=1).logits
    assert torch.equal(a, b)


def test_pipeline_with_a_method_attached(exported):
    """pipeline("image-text-to-text") on the export: batched calls with fastv attached equal one-by-one calls, the
    answers are easy-VQA answers, and remove() gives back the untouched model's outputs exactly."""
    from transformers import pipeline

    import vtok

    pipe = pipeline("image-text-to-text", model=str(exported))
    images, questions, _ = _samples(4)
    chats = [_messages(im, q, with_image=True) for im, q in zip(images, questions)]
    kw = dict(max_new_tokens=3, return_full_text=False)

    def run(batch_size):
        return [o[0]["generated_text"] for o in pipe(text=chats, batch_size=batch_size, **kw)]

    def logits():
        proc = pipe.processor
        texts = [proc.apply_chat_template(c, add_generation_prompt=True) for c in chats]
        inputs = proc(images=images, text=texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            return pipe.model(**inputs).logits

    before, before_logits = run(4), logits()
    assert all(t.strip().split()[0].strip(".") in offline.EASY_VQA_ANSWERS for t in before), before
    handle = vtok.apply(pipe.model, "fastv", retain=0.5)
    batched = run(4)
    assert [r.tokens_out for r in handle.stats] == [[128] * 4]  # the batch of 4 went through the method
    assert run(1) == batched
    handle.remove()
    assert run(4) == before
    assert torch.equal(logits(), before_logits)


def test_task_asks_the_questions_vtok_eval_asks(vlm):
    """The task's questions are EasyVQA(seed=0)'s, in order: --limit n in lmms-eval == vtok eval --n n."""
    pytest.importorskip("easy_vqa")
    from vtok.eval.harnesses import EasyVQA

    rows = [json.loads(line) for line in open(lmms_tasks.DATA_FILE)]
    assert len(rows) == 200
    ds = EasyVQA(vlm[2], n=20, seed=0)
    assert [(r["question"], r["answer"]) for r in rows[:20]] == [(q, a) for q, a, _ in ds.items]
    assert lmms_tasks.normalize_answer(" Circle.\n") == "circle" and lmms_tasks.normalize_answer("") == ""
    assert lmms_tasks.process_results(rows[0], [" " + rows[0]["answer"]]) == {"exact_match": 1.0}


@needs_lmms
def test_lmms_eval_runs_the_plugin_on_the_local_task(exported):
    """lmms-eval's own evaluator, the vtok model from its registry, vtok's task through include_path: 2 questions
    with fastv; the visual tokens before/after land in the results."""
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    results = evaluator.simple_evaluate(
        model="vtok",
        model_args=f"pretrained={exported},vtok_method=fastv,vtok_retain=0.5",
        tasks=["vtok_easy_vqa"],
        limit=2,
        batch_size=1,
        device="cpu",
        task_manager=TaskManager(include_path=lmms_tasks.TASK_DIR),
    )
    score = results["results"]["vtok_easy_vqa"]["exact_match,none"]
    assert score in (0.0, 0.5, 1.0)
    thr = results["throughput"]
    assert thr["avg_vtok_visual_tokens_in"] == 256 and thr["avg_vtok_visual_tokens_out"] == 128
    assert thr["avg_vtok_requests"] == 2


def test_readme_pipeline_snippet_runs_as_written(exported, capsys):
    """The README's pipeline example, with its checkpoint folder pointed at this module's export."""
    import re
    from pathlib import Path

    pytest.importorskip("easy_vqa")
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    part = text[text.index("An HF pipeline with a method attached") :]
    code = re.search(r"```python\n(.*?)```", part, flags=re.S).group(1)
    assert 'model="vtok-vlm"' in code
    exec(compile(code.replace('"vtok-vlm"', repr(str(exported))), "README.md", "exec"), {})  # noqa: S102
    out = capsys.readouterr().out
    assert out.count("| expected:") == 4 and "-> [128, 128, 128, 128]" in out

"""Video QA with a visual-token method: a clip, a question and a method in; the answer, the visual tokens
before and after, FLOPs, wall time and time to first token out, untouched model beside the method.

    # any local LLaVA-OneVision checkpoint directory (no download: local files only)
    python examples/video_qa.py clip.mp4 --model ~/ckpt/llava-onevision-qwen2-0.5b-ov-hf \
        --question "What is happening in this video?" --method pool:factor=2 --frames 16
    # the offline demo VLM (vtok demo's model): it answers easy-VQA questions, so an easy-VQA test image
    # is put among the clip's frames (as the video-needle harness does) and its question is asked
    python examples/video_qa.py clip.mp4 --model offline --needle 7 --method random:retain=0.25 --frames 8

Frames come from ``vtok.video.load`` (decord, uniform sampling); the demo VLM sees each frame as an image
(256 tokens each), a OneVision checkpoint gets them as one video through its processor.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from vtok.eval.flops import Tracker
from vtok.eval.latency import Timer
from vtok.eval.runner import parse_method

import vtok
from vtok import video


def offline_inputs(frames, needle: int, seed: int = 0):
    """The demo VLM, its inputs (each frame an image, an easy-VQA test image inserted) and the gold answer."""
    from PIL import Image
    from vtok.eval import offline

    model, tok, helper = offline.load_vlm()
    qs, answers, image_ids, paths = offline.easy_vqa_split("test")
    images = [Image.fromarray(f) for f in frames]
    images.insert(random.Random(seed).randrange(len(images) + 1), Image.open(paths[image_ids[needle]]))
    n_tok = offline.num_image_tokens()
    ids, _ = offline.build_prompt_ids(tok, qs[needle], n_tok, helper.image_token_id)
    ids = torch.tensor([[helper.image_token_id] * n_tok * (len(images) - 1) + ids])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": offline.preprocess_images(images)}
    return model, tok, inputs, qs[needle], answers[needle]


def onevision_inputs(path: str, frames, question: str):
    """A local LLaVA-OneVision checkpoint, its processor's inputs for one video and the question."""
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, local_files_only=True).eval()
    conv = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    if getattr(processor, "chat_template", None):
        text = processor.apply_chat_template(conv, add_generation_prompt=True)
    else:  # a checkpoint saved without a chat template
        text = f"<video> {question}"
    inputs = processor(text=text, videos=[frames], return_tensors="pt")
    return model, processor.tokenizer, dict(inputs), question


def run(model, tok, inputs: dict, max_new_tokens: int) -> dict:
    """One greedy generate (answer, wall time, FLOPs, visual tokens) and one timed run for TTFT."""
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id or 0)
    with torch.no_grad(), Tracker(model) as tracker:
        t0 = time.perf_counter()
        out = model.generate(**inputs, **kw)
        wall = time.perf_counter() - t0
    report = tracker.reports()[0]
    ttft = Timer(model, inputs, max_new_tokens=1, pad_token_id=kw["pad_token_id"]).run().ttft_ms
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return {
        "answer": answer,
        "visual_in": sum(report.visual_entry),  # the prompt's visual placeholders (layout tokens included)
        "visual_out": sum(report.visual_final),
        "tflops": report.total / 1e12,
        "wall_s": wall,
        "ttft_ms": ttft,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", help="a video file decord can read")
    p.add_argument("--model", default="offline", help="'offline' (the demo VLM) or a local LLaVA-OneVision checkpoint directory")
    p.add_argument("--question", default=None, help="the question (a OneVision checkpoint)")
    p.add_argument("--needle", type=int, default=0, help="offline model: the easy-VQA test question to insert and ask")
    p.add_argument("--method", default="pool:factor=2", help="NAME[:K=V,...], as vtok eval takes it")
    p.add_argument("--frames", type=int, default=8, help="frames sampled uniformly from the clip")
    p.add_argument("--max-new-tokens", type=int, default=16)
    a = p.parse_args(argv)
    if a.model == "offline":
        frames, times = video.load(a.video, num_frames=max(1, a.frames - 1))
        model, tok, inputs, question, gold = offline_inputs(frames, a.needle)
    else:
        if not a.question:
            p.error("--question is needed with a OneVision checkpoint")
        frames, times = video.load(a.video, num_frames=a.frames)
        model, tok, inputs, question = onevision_inputs(a.model, frames, a.question)
        gold = None
    name, hparams = parse_method(a.method)
    rows = {"untouched": run(model, tok, inputs, a.max_new_tokens)}
    with vtok.apply(model, name, **hparams):
        rows[a.method] = run(model, tok, inputs, a.max_new_tokens)
    extra = " + the easy-VQA frame" if a.model == "offline" else ""
    print(f"video: {a.video} ({len(frames)} frames at {', '.join(f'{t:.1f}' for t in times[:6])}{' ...' if len(times) > 6 else ''} s{extra})")
    print(f"question: {question}" + (f"  (gold: {gold})" if gold is not None else ""))
    print("| setting | answer | visual tokens in -> LLM | TFLOPs | wall s | TTFT ms |")
    print("|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['answer']} | {r['visual_in']} -> {r['visual_out']} | {r['tflops']:.3f} | {r['wall_s']:.2f} | {r['ttft_ms']:.0f} |")
    return rows


if __name__ == "__main__":
    main()

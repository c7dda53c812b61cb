"""HiPrune: spec tests on hand-made tokens and scores (grid-aware buffers, -inf registers, per-image budgets,
per-crop split) and on the tiny VLMs (layers on a 2-block tower, SigLIP, NeXT crops, composition)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import vtok
from vtok.method import ViTAttention, keep_count
from vtok.methods.hiprune import (
    HiPrune,
    grid_coords,
    neighbours,
    object_layer_default,
    select_group,
    split_budget,
)
from vtok.testing import TINY_CASES
from vtok.tokens import VisualTokens

DIMS = {"vit_blocks": 24, "vit_feature_block": 22, "vision_cls": True}


def method(**kw):
    m = HiPrune(**kw)
    m.bind(DIMS)
    return m


def probes_for(m, obj, deep):
    o, d = m.layers()
    return {ViTAttention(o, "colmean"): obj, ViTAttention(d, "colmean"): deep}


def kept_positions(out: VisualTokens, u: int = 0) -> list[int]:
    return out.positions[u, out.mask[u]].tolist()


def grid_tokens(units: int, h: int, w: int, d: int = 3) -> VisualTokens:
    feats = torch.randn(units, h * w, d, generator=torch.Generator().manual_seed(0))
    return VisualTokens.from_features(feats, torch.arange(units), grid=(h, w))


# ---------------------------------------------------------------------------- pieces


def test_object_layer_scales_the_papers_9_of_24():
    assert object_layer_default(24) == 8  # the paper's 9th block (1-based)
    assert [object_layer_default(n) for n in (1, 2, 12, 27, 32)] == [0, 0, 4, 9, 11]


def test_split_budget_proportional_and_exact():
    assert split_budget(20, [16, 12, 12]) == [8, 6, 6]
    assert split_budget(7, [16, 12, 12]) == [3, 2, 2]  # 2.8, 2.1, 2.1: the remainder to the largest fraction
    assert split_budget(5, [4, 4, 4, 4, 4]) == [1, 1, 1, 1, 1]
    assert split_budget(3, [4, 4, 4, 4, 4]) == [1, 1, 1, 0, 0]  # ties to the lower group
    assert split_budget(10, [10, 0]) == [10, 0]


def test_neighbours_never_wrap_across_rows():
    rows, cols = torch.arange(16) // 4, torch.arange(16) % 4
    up, left, right, down = neighbours(rows, cols, torch.tensor([3])).squeeze(0).tolist()
    assert (up, left, right, down) == (-1, 2, -1, 7)  # not 4, the next row's first token
    up, left, right, down = neighbours(rows, cols, torch.tensor([4])).squeeze(0).tolist()
    assert (up, left, right, down) == (0, -1, 5, 8)  # not 3, the previous row's last token
    assert neighbours(rows, cols, torch.tensor([15])).squeeze(0).tolist() == [11, 14, -1, -1]


def test_neighbours_skip_missing_tokens():
    keep = torch.tensor([i for i in range(16) if i not in (2, 7)])
    rows, cols = keep // 4, keep % 4
    a = (keep == 3).nonzero().item()
    assert neighbours(rows, cols, torch.tensor([a])).squeeze(0).tolist() == [-1, -1, -1, -1]


def test_grid_coords_of_an_anyres_unit():
    # base 2x2 grid, then a 2x4 high-res grid stitched from two 2x2 crops
    grids = [(2, 2), (2, 4)]
    pos = torch.arange(12)
    crop = torch.tensor([0] * 4 + [1, 1, 2, 2] * 2)
    group, rows, cols = grid_coords(pos, grids, crop)
    assert rows.tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]
    assert cols.tolist() == [0, 1, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3]
    assert len(set(group[:4].tolist())) == 1 and group[4].item() != group[6].item() != group[0].item()


# ---------------------------------------------------------------------------- selection


def test_anchor_at_row_end_gets_no_buffer_from_next_row():
    m = method(retain=0.5, alpha=0.5)  # budget 8 of 16, floor(8 * 0.5 / 5 + 0.5) = 1 anchor
    obj = torch.zeros(1, 16)
    obj[0, 3] = 1.0  # anchor: the last token of row 0
    deep = torch.linspace(1.0, 0.0, 16).unsqueeze(0)
    deep[0, 4] = -1.0  # the next row's first token would only come in as a wrapped buffer
    deep[0, 3] = deep[0, 2] = deep[0, 7] = -1.0  # buffers must come from the grid, not from deep scores
    out = m.before_llm(grid_tokens(1, 4, 4), probes_for(m, obj, deep))
    kept = kept_positions(out)
    assert {3, 2, 7} <= set(kept) and 4 not in kept
    assert kept == sorted(kept) and len(kept) == 8
    # registers: the 5 best deep scores among the others
    assert set(kept) - {2, 3, 7} == {0, 1, 5, 6, 8}


def test_registers_exclude_chosen_tokens_with_large_scores():
    # column sums can exceed 1: subtracting 1 from chosen tokens would re-select them; -inf never does
    n = 16
    obj = torch.zeros(n)
    obj[5] = 1.0
    deep = torch.arange(n, dtype=torch.float32) / 10
    deep[[5, 1, 4, 6, 9]] = 50.0  # the anchor and its 4 neighbours have the highest deep scores
    rows, cols = torch.arange(n) // 4, torch.arange(n) % 4
    picked = select_group(obj, deep, rows, cols, budget=8, alpha=0.5)
    assert picked.tolist() == sorted(picked.tolist()) and picked.unique().numel() == 8
    assert set(picked.tolist()) == {1, 4, 5, 6, 9, 15, 14, 13}


def test_anchors_and_buffers_capped_at_the_budget():
    rows, cols = torch.arange(16) // 4, torch.arange(16) % 4
    obj = torch.arange(16, dtype=torch.float32)  # anchor 15: a corner, 2 neighbours
    picked = select_group(obj, torch.zeros(16), rows, cols, budget=4, alpha=1.0)  # floor(0.8 + 0.5) = 1 anchor
    assert picked.tolist() == [0, 11, 14, 15]  # anchor 15, buffers 11, 14; one register (ties -> index 0)
    obj = torch.zeros(16)
    obj[5] = 1.0  # an inner anchor: 4 neighbours, but a budget of 3
    picked = select_group(obj, torch.zeros(16), rows, cols, budget=3, alpha=1.0)
    assert picked.tolist() == [1, 4, 5]  # the anchor, then its neighbours up, left (right, down cut)


def test_no_anchor_below_the_rounding_threshold_is_deep_top_k():
    obj, deep = torch.rand(16), torch.rand(16)
    rows, cols = torch.arange(16) // 4, torch.arange(16) % 4
    picked = select_group(obj, deep, rows, cols, budget=8, alpha=0.1)  # 8 * 0.1 / 5 = 0.16 -> 0 anchors
    assert picked.tolist() == torch.topk(deep, 8).indices.sort().values.tolist()


@pytest.mark.parametrize("retain", [1.0, 0.5, 1 / 3, 0.2, 0.01])
def test_kept_count_is_the_budget(retain):
    m = method(retain=retain, alpha=0.5)
    g = torch.Generator().manual_seed(1)
    obj, deep = torch.rand(3, 36, generator=g), torch.rand(3, 36, generator=g)
    out = m.before_llm(grid_tokens(3, 6, 6), probes_for(m, obj, deep))
    assert out.counts().tolist() == [keep_count(36, retain)] * 3
    for u in range(3):
        assert kept_positions(out, u) == sorted(kept_positions(out, u))


def test_budget_per_image_does_not_depend_on_the_batch():
    m = method(retain=1 / 3, alpha=0.5)
    g = torch.Generator().manual_seed(2)
    obj, deep = torch.rand(2, 36, generator=g), torch.rand(2, 36, generator=g)
    both = m.before_llm(grid_tokens(2, 6, 6), probes_for(m, obj, deep))
    for u in range(2):
        alone = m.before_llm(grid_tokens(1, 6, 6), probes_for(m, obj[u : u + 1], deep[u : u + 1]))
        assert kept_positions(alone) == kept_positions(both, u)
        assert len(kept_positions(alone)) == 12  # 1/3 of 36, not divided by the 2 images


def anyres_unit():
    """One AnyRes image: base 4x4 grid, then a 4x6 high-res grid of two crops (cols 0-2 crop 1, 3-5 crop 2;
    unpadding left 3 of each crop's 4 columns)."""
    n = 16 + 24
    feats = torch.randn(1, n, 3, generator=torch.Generator().manual_seed(0))
    crop = torch.tensor([0] * 16 + [1, 1, 1, 2, 2, 2] * 4).unsqueeze(0)
    toks = VisualTokens.from_features(feats, torch.tensor([0]))
    toks.grids = [[(4, 4), (4, 6)]]
    toks.extra = {"crop": crop}
    return toks


def test_anyres_budget_split_over_crops_and_buffers_stay_in_their_crop():
    m = method(retain=0.5, alpha=1.0)  # 20 of 40: base 8, crops 6 + 6 (proportional to 16, 12, 12)
    obj = torch.zeros(1, 40)
    obj[0, 16 + 2] = 1.0  # crop 1's anchor at its right edge (row 0, col 2): col 3 is crop 2's
    obj[0, 16 + 5] = 1.0  # crop 2's anchor at the end of the row (col 5)
    deep = torch.zeros(1, 40)
    deep[0, 16 + 3] = -1.0  # crop 2's token right of crop 1's anchor: only a cross-crop buffer would keep it
    out = m.before_llm(anyres_unit(), probes_for(m, obj, deep))
    kept = kept_positions(out)
    crop = anyres_unit().extra["crop"][0]
    assert len(kept) == 20 and [sum(1 for p in kept if crop[p] == c) for c in range(3)] == [8, 6, 6]
    # crop 1 (floor(6 * 1.0 / 5 + 0.5) = 1 anchor): 18 with its in-crop neighbours 17 (left) and 24 (down);
    # registers (deep ties -> lower index) 16, 22, 23
    assert sorted(p for p in kept if crop[p] == 1) == [16, 17, 18, 22, 23, 24]
    # crop 2: anchor 21, buffers 20 (left) and 27 (down); registers 25, 26, 31 -- never 19
    assert sorted(p for p in kept if crop[p] == 2) == [20, 21, 25, 26, 27, 31]


def test_layers_on_a_two_block_tower_and_errors():
    m = HiPrune()
    m.bind({"vit_blocks": 2, "vit_feature_block": 1})
    assert m.layers() == (0, 1) and len(m.probes()) == 2
    m.bind({"vit_blocks": 2, "vit_feature_block": 0})
    assert m.layers() == (0, 0) and m.probes() == [ViTAttention(0, "colmean")]  # one probe serves both
    m = HiPrune()
    m.bind({"vit_blocks": 24, "vit_feature_block": 22})
    assert m.layers() == (8, 22)
    with pytest.raises(ValueError, match="outside the vision tower's blocks"):
        HiPrune(object_layer=5).bind({"vit_blocks": 2, "vit_feature_block": 1})
    with pytest.raises(ValueError, match="patch embeddings"):
        HiPrune().bind({"vit_blocks": 2, "vit_feature_block": None})
    assert HiPrune().layers() == (8, 22)  # not applied yet (a FLOPs estimate of a config): the paper's CLIP-L
    with pytest.raises(ValueError, match="alpha"):
        HiPrune(alpha=2.0)


# ---------------------------------------------------------------------------- on the tiny VLMs


def run(case_name, methods):
    case = TINY_CASES[case_name]
    model = tiny_model(case_name)
    batch = case.batch(case.make_samples(model, case.specs, 0))
    with vtok.apply(model, methods) as h, torch.no_grad():
        model(**batch)
    return h


def test_siglip_tower_without_cls():
    h = run("llava_siglip", [HiPrune(retain=0.5)])
    assert h.adapter.dims()["vision_cls"] is False
    (r,) = h.stats
    assert r.tokens_out == [n // 16 * keep_count(16, 0.5) for n in r.tokens_in]  # per image of 16 tokens


@pytest.mark.parametrize("case_name", ["llava_next", "llava_onevision"])
def test_anyres_every_crop_gets_its_share(case_name, monkeypatch):
    seen = []
    orig = HiPrune.before_llm

    def spy(self, tokens, probes):
        out = orig(self, tokens, probes)
        seen.append((tokens, out))
        return out

    monkeypatch.setattr(HiPrune, "before_llm", spy)
    h = run(case_name, [HiPrune(retain=0.5, alpha=0.5)])
    (tokens, out), = seen
    crop_in, crop_out = tokens.extra["crop"], out.extra["crop"]
    with_crops = 0
    for u in range(tokens.num_units):
        ids = crop_in[u, tokens.mask[u]]
        crops = sorted(set(ids.tolist()))
        with_crops += len(crops) > 1
        want = split_budget(keep_count(len(ids), 0.5), [int((ids == c).sum()) for c in crops])
        got = [int((crop_out[u, out.mask[u]] == c).sum()) for c in crops]
        assert got == want
    assert with_crops >= 2  # most of the tiny cases' images have crops
    assert sum(sum(r.tokens_out) for r in h.stats) < sum(sum(r.tokens_in) for r in h.stats)


def test_composes_with_fastv():
    h = run("llava", ["hiprune", "fastv"])
    steps = [(r.method, r.stage) for r in h.stats]
    assert steps == [("hiprune", "before_llm"), ("fastv", "in_llm")]
    hip, fv = h.stats
    assert hip.tokens_out == [n // 16 * keep_count(16, 1 / 3) for n in hip.tokens_in]  # per image of 16
    assert fv.tokens_in == hip.tokens_out and sum(fv.tokens_out) < sum(fv.tokens_in)


def test_flops_estimate_of_a_full_size_config():
    from vtok.eval import flops

    full = flops.estimate("llava-1.5-7b")
    hip = flops.estimate("llava-1.5-7b", method=("hiprune", {"retain": 1 / 3}))  # 576 -> 192, paper's layers
    assert hip.total < 0.5 * full.total

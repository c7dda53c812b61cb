"""DocCorr: the key-correlation probe (against a brute-force [N, N] reference on LLaVA and per AnyRes crop on
LLaVA-NeXT), the method's steps, and its spec: a repetitive crop gets fewer tokens than a busy one."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_model

import vtok
from vtok.method import Method, ViTKeyCorrelation
from vtok.methods.doccorr import DocCorr, allocate, fold_into_kept, gumbel_top, iqr_outliers
from vtok.testing import TINY_CASES
from vtok.tokens import VisualTokens
from vtok.adapters.hf_vision import key_correlation, vision_blocks


@dataclass
class Recorder(Method):
    """Keeps everything; records the tokens and probes it was served."""

    name = "doccorr-recorder"
    stages = ("before_llm",)
    wanted: tuple = ()

    def probes(self):
        return list(self.wanted)

    def before_llm(self, tokens, probes):
        self.seen = (tokens, probes)
        return tokens


def brute_keycorr(keys: torch.Tensor, threshold: float) -> torch.Tensor:
    """[U, N, d] keys without prefix -> share of the other tokens with cosine > threshold (full [N, N] map)."""
    k = torch.nn.functional.normalize(keys.float(), dim=-1)
    s = k @ k.transpose(1, 2)
    eye = torch.eye(s.shape[1], dtype=torch.bool)
    return ((s > threshold) & ~eye).sum(-1).float() / (s.shape[1] - 1)


def clip_keys(tower, pixel_values, layer):
    """Keys of block ``layer`` of a CLIP tower (its own layer norm and k projection), CLS dropped."""
    with torch.no_grad():
        hs = tower(pixel_values, output_hidden_states=True).hidden_states[layer]
        blk = vision_blocks(tower)[layer]
        return blk.self_attn.k_proj(blk.layer_norm1(hs))[:, 1:]


def test_key_correlation_counts_duplicates_without_the_map():
    torch.manual_seed(0)
    keys = torch.randn(2, 9, 8)
    keys[0, 1:5] = keys[0, 1]  # four identical patch keys (index 0 is the CLS prefix)
    out = key_correlation(keys, 0.9, prefix=1, row_chunk=3)
    assert out.shape == (2, 9) and float(out[:, 0].abs().max()) == 0.0
    torch.testing.assert_close(out[:, 1:], brute_keycorr(keys[:, 1:], 0.9))
    assert torch.allclose(out[0, 1:5], torch.full((4,), 3 / 7))


def test_probe_on_llava_matches_brute_force():
    model = tiny_model("llava")
    case = TINY_CASES["llava"]
    batch = case.batch(case.make_samples(model, [(3, 2, 4)], 0))
    probe = ViTKeyCorrelation(layer=0, threshold=0.0)
    rec = Recorder(wanted=(probe,))
    with vtok.apply(model, rec), torch.no_grad():
        model(**batch)
    got = rec.seen[1][probe]
    ref = brute_keycorr(clip_keys(model.model.vision_tower, batch["pixel_values"], 0), 0.0)
    assert got.shape == (2, 16)
    torch.testing.assert_close(got, ref)


def test_probe_on_llava_next_is_per_crop_and_aligned():
    model = tiny_model("llava_next")
    case = TINY_CASES["llava_next"]
    batch = case.batch(case.make_samples(model, [(3, [(40, 70)], 4)], 0))
    probe = ViTKeyCorrelation(layer=0, threshold=0.0)
    rec = Recorder(wanted=(probe,))
    with vtok.apply(model, rec), torch.no_grad():
        model(**batch)
    tokens, probes = rec.seen
    got = probes[probe][0]
    ref = brute_keycorr(clip_keys(model.model.vision_tower, batch["pixel_values"][0], 0), 0.0)  # one row per crop
    n = int(tokens.counts()[0])
    crop, patch = tokens.extra["crop"][0, :n], tokens.extra["patch"][0, :n]
    assert int(crop.max()) >= 2  # base image + at least two crops
    torch.testing.assert_close(got[:n], ref[crop, patch])


# ---------------------------------------------------------------------------------------- method steps


def test_allocate_follows_weights_caps_and_floor():
    assert allocate(10, [8, 8], [0.0, 8.0]) == [2, 8]  # the dense group fills up; the rest goes to the blank one
    assert allocate(6, [8, 8], [0.0, 8.0]) == [1, 5]  # the blank one keeps only its floor
    assert allocate(6, [8, 8], [4.0, 4.0]) == [3, 3]
    assert allocate(5, [4, 4, 4], [0.0, 0.0, 0.0]) == [2, 2, 1]  # no density anywhere: by size
    assert allocate(2, [4, 4, 4], [1.0, 3.0, 2.0]) == [0, 1, 1]  # fewer tokens than groups: heaviest first
    assert sum(allocate(37, [10, 20, 30], [0.3, 5.0, 2.0])) == 37


def test_iqr_outliers_and_gumbel_sampling():
    s = torch.tensor([1.0, 1.1, 0.9, 1.0, 5.0, 1.05, 4.0, 0.95])
    assert iqr_outliers(s, 1.5).tolist() == [4, 6]
    w = torch.tensor([1e-6, 1.0, 1e-6, 1.0])
    g = torch.Generator().manual_seed(0)
    assert sorted(gumbel_top(w, 2, g).tolist()) == [1, 3]
    assert gumbel_top(torch.tensor([0.1, 0.3, 0.2]), 2, None).tolist() == [1, 2]


def test_fold_is_size_weighted_into_the_most_similar_kept():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.1], [0.1, 3.0]])
    sizes = torch.tensor([1.0, 1.0, 3.0, 1.0])
    f, s = fold_into_kept(x, sizes, torch.tensor([0, 1]), torch.tensor([2, 3]))
    assert s.tolist() == [4.0, 2.0]
    torch.testing.assert_close(f[0], (x[0] + 3 * x[2]) / 4)
    torch.testing.assert_close(f[1], (x[1] + x[3]) / 2)


def _two_crops(n_per=16, d=8, seed=0):
    """One image, crop 0 and crop 1 of n_per tokens each; features random."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * n_per
    tokens = VisualTokens.from_features(torch.randn(1, n, d, generator=g), torch.zeros(1, dtype=torch.long))
    tokens.extra["crop"] = torch.arange(n).div(n_per, rounding_mode="floor").unsqueeze(0)
    return tokens


def test_spec_repetitive_crop_gets_fewer_tokens_hand_made():
    """A blank crop (every patch a near-duplicate of most others) gets fewer tokens than a busy one."""
    m = DocCorr(retain=0.5)
    m.bind({"vit_blocks": 12, "vit_feature_block": 11, "vision_cls": True})
    tokens = _two_crops()
    dup = torch.cat([torch.full((16,), 0.8), torch.full((16,), 0.01)]).unsqueeze(0)  # crop 0 blank, crop 1 busy
    score = torch.rand(1, 32, generator=torch.Generator().manual_seed(1)) + 0.1
    p_key, p_cls, p_samp = m.probes()
    out = m.before_llm(tokens, {p_key: dup, p_cls: score, p_samp: score})
    crop = out.extra["crop"][0, : int(out.counts()[0])]
    kept_blank, kept_busy = int((crop == 0).sum()), int((crop == 1).sum())
    assert kept_blank + kept_busy == 16 and kept_blank < kept_busy
    assert kept_blank == 1  # density 0: only the floor
    assert float(out.sizes[0, out.mask[0]].sum()) == 32.0  # every patch folded into a kept token
    # swapping which crop is blank swaps the budgets
    out2 = m.before_llm(tokens, {p_key: dup.flip(1), p_cls: score, p_samp: score})
    crop2 = out2.extra["crop"][0, : int(out2.counts()[0])]
    assert int((crop2 == 1).sum()) == kept_blank and int((crop2 == 0).sum()) == kept_busy


def test_density_budget_and_determinism():
    m = DocCorr(budget="density", merge=False)
    m.bind({"vit_blocks": 12, "vit_feature_block": 11, "vision_cls": True})
    tokens = _two_crops()
    dup = torch.cat([torch.full((16,), 0.8), torch.tensor([0.9] * 4 + [0.0] * 12)]).unsqueeze(0)
    score = torch.rand(1, 32, generator=torch.Generator().manual_seed(1)) + 0.1
    probes = dict(zip(m.probes(), (dup, score, score)))
    out = m.before_llm(tokens, probes)
    crop = out.extra["crop"][0, : int(out.counts()[0])]
    assert int((crop == 0).sum()) == 1 and int((crop == 1).sum()) == 12  # ceil(density x 16)
    assert torch.equal(m.before_llm(tokens, probes).positions, out.positions)


def test_no_cls_tower_falls_back_to_colmean():
    m = DocCorr()
    m.bind({"vit_blocks": 2, "vit_feature_block": 1, "vision_cls": False})
    assert [p.kind for p in m.probes()] == ["keycorr", "colmean", "colmean"]
    m.bind({"vit_blocks": 24, "vit_feature_block": 22, "vision_cls": True})
    assert [(p.layer, p.kind) for p in m.probes()] == [(11, "keycorr"), (22, "cls"), (5, "cls")]
    assert "towers without CLS" in vtok.describe("doccorr")


def test_standalone_vit_refuses_key_correlation():
    model = tiny_model("clip_vision")

    @dataclass
    class Wants(Method):
        name = "wants-keycorr"
        stages = ("in_vit",)

        def probes(self):
            return [ViTKeyCorrelation(layer=0)]

        def vit_schedule(self, n):
            return [0] * n

    with pytest.raises(ValueError, match="ViTKeyCorrelation"):
        vtok.apply(model, Wants())

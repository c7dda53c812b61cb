"""HoliTom's spec: the window gain and the DP segmentation against brute force, static tokens of identical
frames, the DPC-kNN merge, the closed-form inner merge against the official loop, and the method on the
tiny OneVision video batch and on LLaVA with a sample's images as frames."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import vtok
from vtok.method import LLMAttention
from vtok.methods.holitom import (
    HoliTom,
    adjacent_similarity,
    best_partition_brute_force,
    dpc_knn_merge,
    halving_merge,
    halving_merge_loop,
    segment_frames,
    window_gain,
)
from vtok.testing import LLAVA_ONEVISION_VIDEO, TINY_CASES


@pytest.mark.parametrize("seed", range(6))
def test_window_gain_and_dp_equal_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    for t in range(1, 9):
        static = torch.rand(max(t - 1, 0), 6, generator=g) > 0.35
        gain = window_gain(static)
        for i in range(t):
            for j in range(t):
                want = (j - i) * int(static[i:j].all(0).sum()) if j > i else 0
                assert float(gain[i, j]) == want
        for w in (2, 3, 1024):
            segs, saved = segment_frames(gain, w)
            assert saved == best_partition_brute_force(gain, w)
            assert [s for s, _ in segs] == [0] + [e + 1 for _, e in segs[:-1]] and segs[-1][1] == t - 1
            assert all(e - s + 1 <= w for s, e in segs)
            assert saved == sum(float(gain[s, e]) for s, e in segs)


def test_identical_frames_form_one_segment():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 16, 8, generator=g)
    x[1:8] = x[0]
    segs, saved = segment_frames(window_gain(adjacent_similarity(x) > 0.8), 1024)
    assert segs[0] == (0, 7)
    assert saved >= 7 * 16
    segs, _ = segment_frames(window_gain(adjacent_similarity(x) > 0.8), 4)  # the window bounds a segment
    assert segs[0] == (0, 3) and segs[1] == (4, 7)


def test_similarity_is_fp32_whatever_the_input_dtype():
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    s = adjacent_similarity(x)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, torch.nn.functional.cosine_similarity(x[:-1].float(), x[1:].float(), dim=-1))


def test_dpc_knn_merge():
    g = torch.Generator().manual_seed(1)
    centres_true = torch.randn(3, 6, generator=g) * 10
    x = torch.cat([c + 0.01 * torch.randn(5, 6, generator=g) for c in centres_true])  # 3 tight clusters of 5
    centres, merged, members = dpc_knn_merge(x, 3, 7, 0.6)
    assert torch.equal(centres, centres.sort().values)
    assert sorted((centres // 5).tolist()) == [0, 1, 2]  # one centre per cluster
    assert members.tolist() == [4.0, 4.0, 4.0]
    for c, m in zip(centres.tolist(), merged):
        others = [i for i in range(c // 5 * 5, c // 5 * 5 + 5) if i != c]
        torch.testing.assert_close(m, 0.6 * x[c] + 0.4 * x[others].mean(0))
    c_all, m_all, mem = dpc_knn_merge(x, 15, 7, 0.6)  # as many centres as tokens: nothing merges
    assert c_all.tolist() == list(range(15)) and torch.equal(m_all, x) and not bool(mem.any())
    again = dpc_knn_merge(x, 3, 7, 0.6)
    assert torch.equal(again[0], centres) and torch.equal(again[1], merged)  # deterministic (no jitter)


@pytest.mark.parametrize("seed", range(4))
def test_closed_form_inner_merge_equals_the_sequential_loop(seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(40, 16, generator=g, dtype=torch.float64)
    perm = torch.randperm(40, generator=g)
    kept, dropped = perm[:15].sort().values, perm[15:].sort().values
    dest = torch.randint(0, 15, (25,), generator=g)
    torch.testing.assert_close(halving_merge(h, kept, dest, dropped).double(), halving_merge_loop(h, kept, dest, dropped).double())


class Recording(HoliTom):
    """HoliTom that keeps what its in_llm stage saw and returned."""

    def in_llm(self, view):
        step = super().in_llm(view)
        self.seen = (view, step, view.probes[LLMAttention(layer=self.layer() - 1, query="last")].at(view))
        return step


def test_inner_stage_merges_by_attention_and_similarity():
    case = TINY_CASES["llava"]
    model = tiny_model("llava")
    batch = case.batch(case.make_samples(model, case.specs, 0))
    m = Recording(retain=1.0, tau=1.0, inner_layer=2, inner_drop=0.5)
    with vtok.apply(model, m), torch.no_grad():
        model(**batch)
    view, step, attn = m.seen
    for b, idx in enumerate(view.visual_index):
        n = idx.numel()
        scores = attn[b, idx].float()
        kept = torch.sort(-scores, stable=True).indices[: round(n * 0.5)].sort().values
        assert torch.equal(step.kept[b], kept)
        h = view.hidden[b, idx]
        dropped = torch.tensor([i for i in range(n) if i not in set(kept.tolist())])
        hn = torch.nn.functional.normalize(h.float(), dim=-1)
        dest = (hn[dropped] @ hn[kept].T).argmax(1)
        torch.testing.assert_close(step.hidden[b].float(), halving_merge_loop(h, kept, dest, dropped).to(h.dtype).float())


def _identical_frames_batch(model):
    """One OneVision video of 12 frames whose first 8 are identical."""
    import numpy as np

    case = LLAVA_ONEVISION_VIDEO
    samples = case.make_samples(model, [(3, [(12, 40, 48)], 4)], 0)
    v = samples[0]["videos"][0]
    v[1:8] = v[0]
    samples[0]["videos"][0] = np.ascontiguousarray(v)
    return case.batch(samples)


def test_static_tokens_of_identical_frames_on_onevision():
    model = tiny_model("llava_onevision")
    batch = _identical_frames_batch(model)
    m = HoliTom(retain=1.0, tau=0.99, inner_drop=0.0)
    with vtok.apply(model, m) as h, torch.no_grad():
        model(**batch)
    (split,) = m.last_split
    assert split["segments"][0] == (0, 7)
    n = 9  # 3 x 3 pooled tokens per frame
    assert split["static_tokens"] == n  # one token per position over the 8 identical frames
    assert split["segments"][1:] == [(8, 8), (9, 9), (10, 10), (11, 11)]  # random frames: no static position
    (red,) = h.stats
    assert red.tokens_in == [12 * n] and red.tokens_out == [n + 4 * n]
    m2 = HoliTom(retain=0.25, tau=0.99, inner_drop=0.0)
    with vtok.apply(model, m2) as h2, torch.no_grad():
        model(**batch)
    assert m2.last_split[0]["segments"][0] == (0, 7)
    assert h2.stats[0].tokens_out[0] <= round(0.25 * 12 * n) + len(m2.last_split[0]["segments"])  # ceil per frame


def test_images_of_one_prompt_are_frames_on_llava():
    """LLaVA-1.5 (the demo VLM's family): a sample's images form one video; identical images are static."""
    case = TINY_CASES["llava"]
    model = tiny_model("llava")
    samples = case.make_samples(model, [(1, 3, 4)], 0)
    samples[0]["pixel_values"][1:] = samples[0]["pixel_values"][0]
    batch = case.batch(samples)
    m = HoliTom(retain=1.0, tau=0.99, inner_drop=0.0)
    with vtok.apply(model, m) as h, torch.no_grad():
        model(**batch)
    assert m.last_split[0]["segments"] == [(0, 2)]
    (red,) = h.stats
    assert red.tokens_out == [red.tokens_in[0] // 3]  # every position static: one token each
    m.images_as_frames = False
    with vtok.apply(model, m) as h, torch.no_grad():
        model(**batch)
    assert m.last_split == [None, None, None] and h.stats[0].tokens_out == h.stats[0].tokens_in


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="retain"):
        HoliTom(retain=0.0)
    with pytest.raises(ValueError, match="inner_drop"):
        HoliTom(inner_drop=1.0)
    model = tiny_model("llava")
    with pytest.raises(ValueError, match="inner_layer=9 must be in 1..3"):
        vtok.apply(model, HoliTom(inner_layer=9))


class Seeing(HoliTom):
    """HoliTom that keeps the tokens and the ViT probe its before_llm stage was handed."""

    def before_llm(self, tokens, probes):
        self.handed = (tokens, probes[self._vit_probe()])
        return super().before_llm(tokens, probes)


def test_tome_then_holitom_on_llava():
    """ToMe merges in the tower; HoliTom gets every image's full grid back (each patch = its merged token) with
    the ViT probe unmerged the same way; batch == one by one, generate included, and remove() is exact."""
    case = TINY_CASES["llava"]
    model = tiny_model("llava")
    samples = case.make_samples(model, [(1, 3, 4), (2, 2, 3)], 0)
    batch = case.batch(samples)
    with torch.no_grad():
        ref = model(**batch).logits
    m = Seeing(retain=0.5, tau=0.3, inner_layer=2)
    gen_kw = dict(max_new_tokens=4, do_sample=False)
    with vtok.apply(model, ["tome", m], tome={"r": 2}) as h, torch.no_grad():
        out = model(**batch).logits
        vit = [r for r in h.stats if r.stage == "in_vit"]
        tokens, probe = m.handed
        assert tokens.counts().tolist() == [16] * 5  # full 4x4 grids
        merged = vit[-1].tokens_out  # per sample, CLS included per image
        assert [r.layer for r in vit] == [0, 1]  # r=2 in each of the 2 blocks
        for u in range(tokens.num_units):  # as many distinct values as the tower left tokens (CLS dropped)
            assert torch.unique(tokens.features[u], dim=0).shape[0] == 16 - 2 - 2
            # the probe of the feature block (1) holds the tokens entering it: block 0's merge only
            assert torch.unique(probe[u]).numel() == 16 - 2
        assert sum(merged) < sum(vit[0].tokens_in)
        for i, s in enumerate(samples):
            one = model(**case.batch([s])).logits
            torch.testing.assert_close(out[i, -one.shape[1] :], one[0], atol=2e-5, rtol=1e-4)
        gen = model.generate(**{k: v for k, v in batch.items() if k != "position_ids"}, **gen_kw)
        s_len = batch["input_ids"].shape[1]
        for i, s in enumerate(samples):
            single = case.batch([s])
            one = model.generate(**{k: v for k, v in single.items() if k != "position_ids"}, **gen_kw)
            new = one[0, single["input_ids"].shape[1] :]
            assert torch.equal(gen[i, s_len : s_len + new.numel()], new)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)


def test_last_split_is_each_threads_own_call():
    """A model served from two threads: each thread reads the split of its own call, not the other's."""
    import threading

    case = TINY_CASES["llava"]
    model = tiny_model("llava")
    samples = case.make_samples(model, [(1, 3, 4)], 0)
    same = [dict(s) for s in samples]
    same[0]["pixel_values"] = samples[0]["pixel_values"].clone()
    same[0]["pixel_values"][1:] = same[0]["pixel_values"][0]  # identical frames: one static segment
    m = HoliTom(retain=1.0, tau=0.99, inner_drop=0.0)
    seen = {}
    with vtok.apply(model, m), torch.no_grad():
        model(**case.batch(same))
        mine = m.last_split

        def other():
            seen["before"] = m.last_split
            model(**case.batch(samples))  # random frames: no static positions
            seen["after"] = m.last_split

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert m.last_split is mine and mine[0]["segments"] == [(0, 2)]
    assert seen["before"] is None and seen["after"] is not mine and seen["after"][0]["segments"] != [(0, 2)]

"""VQToken's spec: k-means (fixed K works, which crashes in the official code), the elbow, fp32 counts, the
codebook and index map, placement of codes, determinism across batching, and the VQ-attention module."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import vtok
from vtok.methods.vqtoken import VQToken, codebook, elbow_k, kmeans, tokdense
from vtok.testing import LLAVA_ONEVISION_VIDEO, TINY_CASES


def _blobs(k=5, per=40, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 5
    x = torch.cat([c + 0.05 * torch.randn(per, d, generator=g) for c in centres])
    return x, torch.arange(k).repeat_interleave(per)


def _same_partition(a, b):
    return all(len(set(b[a == v].tolist())) == 1 for v in a.unique()) and len(a.unique()) == len(b.unique())


def test_kmeans_recovers_separated_clusters_and_is_seeded():
    x, truth = _blobs()
    c, labels, dist, _ = kmeans(x, 5, torch.Generator().manual_seed(3))
    assert c.dtype == torch.float32 and _same_partition(labels, truth)
    c2, labels2, dist2, _ = kmeans(x, 5, torch.Generator().manual_seed(3))
    assert torch.equal(c, c2) and torch.equal(labels, labels2) and dist == dist2
    _, _, d32, _ = kmeans(torch.cat([x] * 4), 32, torch.Generator().manual_seed(0))  # the fixed-K (32) path
    assert d32 >= 0


def test_elbow_finds_the_number_of_blobs():
    x, _ = _blobs(k=6, per=30)
    dist = [kmeans(x, k, torch.Generator().manual_seed(k))[2] for k in range(2, 13)]
    assert elbow_k(dist, 2) == 6
    assert elbow_k([5.0, 1.0], 12) == 12  # too few points for a second difference


def test_codebook_counts_are_fp32_and_exact_beyond_bf16():
    x = torch.randn(1000, 8).to(torch.bfloat16)
    labels = torch.zeros(1000, dtype=torch.long)
    labels[700:] = 1
    codes, counts = codebook(x, labels, 2)
    assert counts.dtype == torch.float32 and counts.tolist() == [700.0, 300.0]  # bf16 cannot hold 700 + 1
    want = torch.nn.functional.normalize(x.float(), dim=1)[:700].mean(0)
    torch.testing.assert_close(codes[0], want)
    assert tokdense(80.0, 16) == 5.0


def test_codes_on_onevision_videos_and_the_index_map():
    model = tiny_model("llava_onevision")
    case = LLAVA_ONEVISION_VIDEO
    batch = case.batch(case.make_samples(model, case.specs, 0))
    m = VQToken(k_min=2, k_max=8)
    with vtok.apply(model, m, processor=case.processor(model) if case.processor else None) as h, torch.no_grad():
        model(**batch)
    (red,) = h.stats
    assert red.tokens_in == [72, 108]
    assert [len(lab) for lab in m.last_index_map] == [72, 108]
    for lab, out in zip(m.last_index_map, red.tokens_out):
        assert 2 <= out <= 8 and out == lab.unique().numel()  # one token per used code


def test_images_of_a_prompt_are_one_video_on_llava_and_batching_does_not_change_the_draw():
    case = TINY_CASES["llava"]
    model = tiny_model("llava")
    samples = case.make_samples(model, [(1, 3, 4), (2, 2, 3)], 0)
    m = VQToken(k=5)
    with vtok.apply(model, m) as h, torch.no_grad():
        out = model(**case.batch(samples)).logits
        assert h.stats[0].tokens_out == [5, 5]  # 5 codes per sample, spread over its images
        for i, s in enumerate(samples):
            one = model(**case.batch([s])).logits
            torch.testing.assert_close(out[i, -one.shape[1] :], one[0], atol=2e-5, rtol=1e-4)


def test_vq_attention_module_starts_as_identity_and_needs_weights():
    case = TINY_CASES["llava"]
    model = tiny_model("llava")
    batch = case.batch(case.make_samples(model, [(1, 3, 4)], 0))
    with vtok.apply(model, VQToken(k=4)), torch.no_grad():
        ref = model(**batch).logits
    with vtok.apply(model, VQToken(k=4, attn=True), weights="untrained") as h, torch.no_grad():
        assert sum(p.numel() for p in h.parameters()) > 0
        torch.testing.assert_close(model(**batch).logits, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="k_min=9 is larger than k_max=8"):
        VQToken(k_min=9, k_max=8)


@pytest.mark.weights_guard
def test_vq_attention_untrained_is_refused_in_eval_mode():
    case = TINY_CASES["llava"]
    model = tiny_model("llava")
    batch = case.batch(case.make_samples(model, [(1, 3, 4)], 0))
    with vtok.apply(model, VQToken(k=4, attn=True)), torch.no_grad(), pytest.raises(ValueError, match="weights"):
        model(**batch)
    with vtok.apply(model, VQToken(k=4)), torch.no_grad():
        model(**batch)  # the codebook alone has nothing to train


def test_native_codes_cluster_the_unpooled_frames_on_onevision_and_batching_does_not_change_them():
    """native=True: k-means over every frame's 6x6 tower grid (before the model's 2x2 pooling to 3x3), the codes go
    to the LLM as a sequence; batch == each video alone, generate runs."""
    model = tiny_model("llava_onevision")
    case = LLAVA_ONEVISION_VIDEO
    samples = case.make_samples(model, case.specs, 0)
    batch = case.batch(samples)
    m = VQToken(k=4, native=True)
    with vtok.apply(model, m) as h, torch.no_grad():
        out = model(**batch).logits
        (red,) = h.stats
        assert red.tokens_in == [8 * 36, 12 * 36] and red.tokens_out == [4, 4]
        assert [len(lab) for lab in m.last_index_map] == [8 * 36, 12 * 36]
        for i, s in enumerate(samples):
            one = model(**case.batch([s])).logits
            torch.testing.assert_close(out[i, -one.shape[1] :], one[0], atol=2e-5, rtol=1e-4)
        gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == batch["input_ids"].shape[1] + 3

"""ToMe: agreement with a reference written from the paper, no-op exactness, proportional attention,
schedules, matching and hyper-parameter checks."""

from __future__ import annotations

import pytest
import torch

import vtok
from vtok.methods.tome import ToMe, bipartite_soft_matching, parse_r, tome_order
from vtok.testing import tiny_hf_vision, tiny_open_clip_vit, tiny_timm_vit

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


# ----------------------------------------------------------------------------- the reference
# Written from the ToMe paper (arXiv 2210.09461, Sec. 3 and Alg. 1), independently of vtok:
# per block x = x + attn(norm1(x)) with proportional attention softmax(qk^T/sqrt(d) + log s);
# metric = keys averaged over heads; A = even tokens, B = odd tokens, the class token (index 0)
# never a source; the r A-tokens with the most similar B partner merge into it by a size-weighted
# average; output [unmerged A (index order), B]; then x = x + mlp(norm2(x)).


def ref_match_and_merge(x, metric, size, source, r):
    n = x.shape[1]
    r = min(r, (n - 1) // 2)
    if r <= 0:
        return x, size, source
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[:, ::2], m[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    scores[:, 0, :] = -float("inf")  # the class token is never merged
    best, partner = scores.max(dim=-1)
    ranked = torch.sort(best, dim=-1, descending=True, stable=True).indices
    src, unm = ranked[:, :r], ranked[:, r:].sort(dim=-1).values
    dst = partner.gather(1, src)

    def merge(t, mode):
        ta, tb = t[:, ::2], t[:, 1::2]
        c = t.shape[-1]
        kept_a = ta.gather(1, unm[..., None].expand(-1, -1, c))
        moved = ta.gather(1, src[..., None].expand(-1, -1, c))
        tb = tb.scatter_reduce(1, dst[..., None].expand(-1, -1, c), moved, reduce=mode)
        return torch.cat([kept_a, tb], dim=1)

    xs = merge(x * size, "sum")
    new_size = merge(size, "sum")
    return xs / new_size, new_size, merge(source, "amax")


def ref_attention(q, k, v, size, scale):
    logits = q @ k.transpose(-1, -2) * scale + size.log()[:, None, None, :, 0]
    return logits.softmax(-1) @ v


def ref_timm(model, img, schedule):
    x = model.norm_pre(model._pos_embed(model.patch_embed(img)))
    b, n, _ = x.shape
    size = torch.ones(b, n, 1)
    source = torch.eye(n).expand(b, n, n)
    for blk, r in zip(model.blocks, schedule):
        at = blk.attn
        h = blk.norm1(x)
        qkv = at.qkv(h).reshape(b, x.shape[1], 3, at.num_heads, at.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        o = ref_attention(q, k, v, size, at.scale).transpose(1, 2).reshape(b, x.shape[1], -1)
        x = x + at.proj(o)
        x, size, source = ref_match_and_merge(x, k.mean(1), size, source, r)
        x = x + blk.mlp(blk.norm2(x))
    return model.norm(x), size[..., 0], source


def ref_clip(model, img, schedule):
    vm = getattr(model, "vision_model", model)
    x = vm.pre_layrnorm(vm.embeddings(img))
    b, n, _ = x.shape
    size = torch.ones(b, n, 1)
    source = torch.eye(n).expand(b, n, n)
    for layer, r in zip(vm.encoder.layers, schedule):
        at = layer.self_attn
        h = layer.layer_norm1(x)
        heads = lambda t: t.view(b, t.shape[1], at.num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = heads(at.q_proj(h)), heads(at.k_proj(h)), heads(at.v_proj(h))
        o = ref_attention(q, k, v, size, at.scale).transpose(1, 2).reshape(b, x.shape[1], -1)
        x = x + at.out_proj(o)
        x, size, source = ref_match_and_merge(x, k.mean(1), size, source, r)
        x = x + layer.mlp(layer.layer_norm2(x))
    return x, size[..., 0], source


def ref_open_clip(model, img, schedule):
    x = model._embeds(img)
    b, n, _ = x.shape
    size = torch.ones(b, n, 1)
    source = torch.eye(n).expand(b, n, n)
    for blk, r in zip(model.transformer.resblocks, schedule):
        mha = blk.attn
        h = blk.ln_1(x)
        heads = lambda t: t.view(b, t.shape[1], mha.num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = (heads(t) for t in torch.nn.functional.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1))
        o = ref_attention(q, k, v, size, q.shape[-1] ** -0.5).transpose(1, 2).reshape(b, x.shape[1], -1)
        x = x + blk.ls_1(mha.out_proj(o))
        x, size, source = ref_match_and_merge(x, k.mean(1), size, source, r)
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return x, size[..., 0], source


def canonical(x, size, source):
    """Order tokens by their first original token (ToMe's [A, B] order and vtok's index order differ)."""
    first = torch.where(source.bool(), torch.arange(source.shape[-1]), source.shape[-1]).min(-1).values
    order = first.argsort(dim=1)
    return (
        x.gather(1, order[..., None].expand(-1, -1, x.shape[-1])),
        size.gather(1, order),
        source.gather(1, order[..., None].expand(-1, -1, source.shape[-1])).bool(),
    )


def check_against_reference(out, handle, ref):
    src = handle.adapter.source
    mine = canonical(out, src.sizes, src.matrix().float())
    theirs = canonical(*ref)
    assert torch.equal(mine[2], theirs[2]), "different surviving tokens / sources"
    assert torch.equal(mine[1], theirs[1]), "different sizes"
    torch.testing.assert_close(mine[0], theirs[0], atol=2e-6, rtol=2e-5)
    assert torch.equal(mine[2].sum(-1).float(), mine[1])


@pytest.mark.parametrize("r", [3, (3, -0.5), [5, 0, 4, 2]])
def test_timm_agrees_with_paper_reference(r):
    model = tiny_timm_vit(seed=1, depth=4)
    img = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    schedule = parse_r(4, r)
    with torch.no_grad():
        ref = ref_timm(model, img, schedule)
        with vtok.apply(model, "tome", r=r) as h:
            out = model.forward_features(img)
            check_against_reference(out, h, ref)
            assert [s.tokens_in[0] - s.tokens_out[0] for s in h.stats] == [v for v in schedule if v]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_clip_agrees_with_paper_reference(impl):
    model = tiny_hf_vision("clip", seed=2, attn_implementation=impl)
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ref_clip(model, img, [4, 3])
        with vtok.apply(model, "tome", r=[4, 3]) as h:
            out = model(pixel_values=img).last_hidden_state
            check_against_reference(out, h, ref)
        assert model.config._attn_implementation == impl


def test_open_clip_multihead_attention_agrees_with_paper_reference():
    # nn.MultiheadAttention takes the size bias as a [B*H, N, N] float mask (a stride-0 view)
    model = tiny_open_clip_vit(seed=3, layers=3)
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = ref_open_clip(model, img, [3, 3, 2])
        with vtok.apply(model, "tome", r=[3, 3, 2]) as h:
            out = model.transformer(model._embeds(img))
            check_against_reference(out, h, ref)


# ----------------------------------------------------------------------------- no-op and prop_attn


def _all_hidden(model, img):
    return model(pixel_values=img, output_hidden_states=True).hidden_states


def test_r0_is_bit_identical():
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for model in (tiny_hf_vision("clip"), tiny_hf_vision("dinov2")):
            ref = _all_hidden(model, img)
            for r in (0, [0, 0], (0, 0.5)):
                with vtok.apply(model, "tome", r=r) as h:
                    out = _all_hidden(model, img)
                assert h.stats == []
                assert all(torch.equal(a, b) for a, b in zip(out, ref))
        model = tiny_timm_vit()
        ref = model.forward_features(img)
        with vtok.apply(model, "tome", r=0):
            assert torch.equal(model.forward_features(img), ref)


class NoMerge(ToMe):
    """ToMe's hooks (proportional attention from block 0 on) but no merge: all sizes stay 1."""

    def in_vit(self, view):
        return None


def _spy_masks(attn_modules, key):
    seen = []

    def pre(module, args, kwargs):
        seen.append(kwargs.get(key))

    return seen, [m.register_forward_pre_hook(pre, with_kwargs=True) for m in attn_modules]


@pytest.mark.parametrize("family", ["clip", "dinov2", "timm", "open_clip", "open_clip_custom"])
def test_prop_attn_with_unit_sizes_equals_untouched(family):
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    if family in ("clip", "dinov2"):
        model = tiny_hf_vision(family)
        run = lambda: model(pixel_values=img).last_hidden_state  # noqa: E731
        blocks = model.encoder.layer if family == "dinov2" else model.encoder.layers
        attns = [b.attention if family == "dinov2" else b.self_attn for b in blocks]
        key = "attention_mask"
    elif family == "timm":
        model = tiny_timm_vit()
        run, attns, key = (lambda: model.forward_features(img)), [b.attn for b in model.blocks], "attn_mask"
    else:
        model = tiny_open_clip_vit(output_tokens=True, qk_norm=family == "open_clip_custom")
        run = lambda: model(img)[1]  # noqa: E731  (the tokens)
        attns, key = [b.attn for b in model.transformer.resblocks], "attn_mask"
    with torch.no_grad():
        ref = run()
        with vtok.apply(model, NoMerge(r=2, prop_attn=True)):
            seen, spies = _spy_masks(attns, key)  # registered after vtok's hooks: sees their mask
            out = run()
            for s in spies:
                s.remove()
    masks = [m for m in seen if m is not None]
    assert masks and all(bool((m == 0).all()) for m in masks), "the size bias (log 1 = 0) was not passed"
    assert not torch.equal(masks[0], torch.ones(1)) and masks[0].is_floating_point()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_prop_attn_changes_outputs_after_merges():
    model = tiny_timm_vit(depth=3)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with vtok.apply(model, "tome", r=3, prop_attn=True):
            a = model.forward_features(img)
        with vtok.apply(model, "tome", r=3, prop_attn=False):
            b = model.forward_features(img)
    assert a.shape == b.shape and not torch.allclose(a, b)


# ----------------------------------------------------------------------------- pieces


def test_parse_r_schedules():
    assert parse_r(4, 3) == [3, 3, 3, 3]
    assert parse_r(3, [1, 2]) == [1, 2, 0]
    dec = parse_r(5, (4, -1.0))
    assert dec[0] == 8 and dec[-1] == 0 and dec == sorted(dec, reverse=True)
    inc = parse_r(5, (4, 1.0))
    assert inc[0] == 0 and inc[-1] == 8
    assert parse_r(1, (4, 0.5)) == [4]
    with pytest.raises(ValueError, match="at most 2"):
        parse_r(2, [1, 1, 1])


@pytest.mark.parametrize(
    "bad,err",
    [
        (-1, ValueError),
        ((2, 3.0), ValueError),
        ((2,), ValueError),
        ([1, -2], ValueError),
        ("4", TypeError),
        (True, TypeError),
    ],
)
def test_bad_r_is_a_clear_error(bad, err):
    with pytest.raises(err, match="tome: r"):
        ToMe(r=bad)


def test_schedule_longer_than_encoder_is_a_clear_error():
    with pytest.raises(ValueError, match="encoder blocks"):
        vtok.apply(tiny_timm_vit(), "tome", r=[1, 1, 1])


def test_matching_protects_prefix_and_clamps():
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 11, 8, generator=g)
    for protected in (0, 1, 2, 3):
        src, dst, unm = bipartite_soft_matching(metric, 100, protected)
        assert src.shape == dst.shape == (2, (11 - protected) // 2)
        assert bool((src >= protected).all() and (dst >= protected).all())
        assert bool((src % 2 == 0).all() and (dst % 2 == 1).all())  # A = even, B = odd positions
        order = tome_order(unm, 11, protected)
        for b in range(2):  # every token is either a source or a survivor, exactly once
            assert sorted(src[b].tolist() + order[b].tolist()) == list(range(11))
            assert order[b, :protected].tolist() == list(range(protected))
    src, dst, unm = bipartite_soft_matching(metric, 0, 1)
    assert src.shape == (2, 0)
    # ties: identical tokens -> lowest indices first, deterministically
    same = torch.ones(1, 6, 4)
    src, dst, unm = bipartite_soft_matching(same, 2, 0)
    assert src.tolist() == [[0, 2]] and dst.tolist() == [[1, 1]] and unm.tolist() == [[4]]


def test_source_map_and_stats_kept():
    model = tiny_hf_vision("siglip")  # no class token: nothing protected
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), vtok.apply(model, "tome", r=3) as h:
        out = model(pixel_values=img).last_hidden_state
        src = h.adapter.source
    assert out.shape[1] == 16 - 6 == src.num_tokens
    assert src.assign.shape == (2, 16) and int(src.assign.max()) < out.shape[1]
    assert torch.equal(src.matrix().sum(-1).float(), src.sizes)
    assert src.sizes.sum(1).tolist() == [16.0, 16.0]
    first = src.first()
    assert sorted(first[0].tolist()) == sorted(set(first[0].tolist()))  # one first patch per token
    for rec in h.stats:
        assert rec.stage == "in_vit" and rec.method == "tome"
        assert all(k.numel() == o for k, o in zip(rec.kept, rec.tokens_out))
    with vtok.apply(model, "tome", r=3, trace_source=False) as h2:
        model(pixel_values=img)
        assert h2.adapter.source is None


def test_vit_merge_kept_on_long_sequences():
    from vtok.vit import ViTMerge

    n = 300  # beyond what a small integer sort key can hold
    src = torch.tensor([[3, 200, 299]])
    kept = ViTMerge(src=src, dst=torch.tensor([[4, 201, 0]])).kept(n)
    expect = [i for i in range(n) if i not in (3, 200, 299)]
    assert kept[0].tolist() == expect


# ----------------------------------------------------------------------------- kernel dispatch


def oracle_matching(metric, r, protected):
    """Brute force: the full cosine matrix in float64, max / first argmax, stable sort."""
    b, n, _ = metric.shape
    r = max(0, min(r, (n - protected) // 2))
    m = metric.double()
    inv = 1.0 / m.norm(dim=-1)
    cos = (m @ m.transpose(-1, -2)) * inv[:, :, None] * inv[:, None, :]  # [B, N, N]
    a_idx = torch.tensor([i for i in range(protected, n) if i % 2 == 0])
    b_idx = torch.tensor([j for j in range(protected, n) if j % 2 == 1])
    s = cos[:, a_idx][:, :, b_idx]
    best = s.max(dim=-1).values
    first = torch.where(s == best[..., None], torch.arange(len(b_idx)), len(b_idx)).min(dim=-1).values
    ranked = torch.sort(best, dim=-1, descending=True, stable=True).indices
    src, unm = ranked[:, :r], ranked[:, r:]
    if protected:
        unm = unm.sort(dim=-1).values
    return a_idx[src], b_idx[first.gather(1, src)], a_idx[unm]


def _metric_with_ties(seed, n, c=16):
    # Small integers: every dot product is exact in fp32 and fp64, so duplicated tokens tie exactly
    # in both (a tie the kernel must break towards the lower token index), and distinct scores are
    # far apart compared with fp32 rounding.
    g = torch.Generator().manual_seed(seed)
    m = torch.randint(-9, 10, (3, n, c), generator=g).float()
    m[:, 7] = m[:, 1]  # two B tokens alike (1 is protected when protected=2)
    m[:, 10] = m[:, 1]  # ... and an A token equal to them: cosine 1
    m[:, 12] = m[:, 4]  # duplicated A tokens: equal best scores
    m[:, 6] = m[:, 0]  # duplicate of token 0 (protected when protected >= 1)
    m[:, 9] = m[:, 3]  # duplicated B tokens: equal partners
    m[1, 14] = m[1, 8]
    return m


@pytest.mark.parametrize("n", [15, 16, 23])
@pytest.mark.parametrize("protected", [0, 1, 2])
def test_matching_equals_bruteforce_oracle_with_ties(n, protected):
    for seed in range(4):
        metric = _metric_with_ties(seed, n)
        for r in (1, 3, 5, 100):
            got = bipartite_soft_matching(metric, r, protected)
            want = oracle_matching(metric, r, protected)
            for name, a, b in zip(("src", "dst", "unm"), got, want):
                assert a.dtype == torch.long and torch.equal(a, b), (name, seed, r, a.tolist(), b.tolist())
    # the ties really are exercised: the protected partner is skipped, duplicates go low-index first
    src, dst, _ = bipartite_soft_matching(metric, 100, protected)
    pairs = dict(zip(src[0].tolist(), dst[0].tolist()))
    assert pairs[10] == (1 if protected < 2 else 7)
    assert pairs[4] == pairs[12] and src[0].tolist().index(4) < src[0].tolist().index(12)


def test_tome_goes_through_vtok_kernels(monkeypatch):
    import vtok.kernels as K

    calls = {"bipartite_match": 0, "merge_weighted": 0}

    def counting(name):
        fn = getattr(K, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name in calls:
        monkeypatch.setattr(K, name, counting(name))
    model = tiny_timm_vit(seed=1, depth=4)
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), vtok.apply(model, "tome", r=[3, 0, 2, 2]) as h:
        model.forward_features(img)
        merges = len(h.stats)
    assert merges == 3
    assert calls == {"bipartite_match": merges, "merge_weighted": merges}


# ----------------------------------------------------------------------------- retain (a token budget)


def test_retain_is_the_r_of_settings_for_budget():
    from vtok.method import BudgetContext

    for n, blocks in ((16, 2), (576, 23), (256, 12)):
        for budget in (0.9, 0.5, 0.25, 0.1):
            m = ToMe(retain=budget)
            m.bind({"vit_blocks": blocks, "vit_tokens": n})
            want = ToMe.settings_for_budget(budget, BudgetContext(n, blocks))
            assert m.vit_schedule(blocks) == parse_r(blocks, want["r"])
    m = ToMe(retain=1.0)
    m.bind({"vit_blocks": 2, "vit_tokens": 16})
    assert m.vit_schedule(2) == [0, 0]  # retain 1 merges nothing


def test_retain_half_on_tiny_llava_and_tiny_vit():
    from vtok.testing import TINY_CASES

    case = TINY_CASES["llava"]
    model = case.build()
    batch = case.batch(case.make_samples(model, case.specs, 0))
    with torch.no_grad(), vtok.apply(model, "tome", retain=0.5) as h:
        model(**batch)
    last = [r for r in h.stats if r.stage == "in_vit"][-1]
    images = [1, 1, 2]  # the tiny cases' images per sample, 16 patches + CLS each
    assert last.tokens_in[0] < 17 and [o - i for o, i in zip(last.tokens_out, images)] == [8 * i for i in images]
    model = tiny_timm_vit()
    with torch.no_grad(), vtok.apply(model, "tome", retain=0.5) as h:
        out = model.forward_features(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert out.shape[1] == 1 + 8  # CLS + half of the 16 patches
    assert h.adapter.dims()["vit_tokens"] == 16


def test_retain_one_is_bit_identical():
    model = tiny_timm_vit()
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(img)
        with vtok.apply(model, "tome", retain=1.0) as h:
            out = model(img)
    assert torch.equal(out, ref) and not h.stats


def test_retain_errors_and_describe():
    with pytest.raises(ValueError, match="not both"):
        ToMe(r=4, retain=0.5)
    with pytest.raises(ValueError, match="range"):
        ToMe(retain=0.0)
    with pytest.raises(ValueError, match="vit_tokens"):
        ToMe(retain=0.5).vit_schedule(2)  # not applied: the patch count is unknown
    assert "retain = None" in vtok.describe("tome")


def test_retain_follows_the_patches_the_tower_really_gets():
    """A tower configured for larger images than it is fed (the demo's DINOv2: 518 px config, 224 px
    inputs) gets r from the run's patch count, not the config's (which would merge nearly everything)."""
    from vtok.testing import tiny_llava_tower

    model = tiny_llava_tower("dinov2")
    model.config.vision_config.image_size = 64  # the config claims 8x8 patches; images stay 32 px (4x4)
    pixel = torch.randn(2, 3, 32, 32)
    with vtok.apply(model, "tome", retain=0.5) as h:
        assert h.dims["vit_tokens"] == 64
        model.model.get_image_features(pixel_values=pixel)
        src = h.adapter.source
    # 16 patches + CLS, 2 blocks: r = round(16 * 0.5 / 2) = 4 per block -> 8 patches + CLS remain
    assert src.sizes.shape == (2, 9) and src.sizes.sum(1).tolist() == [17.0, 17.0]

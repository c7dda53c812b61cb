"""The invariants README's "What vtok guarantees" lists, for every registered method x every adapter that supports it.

New methods (registry) and new adapters (vtok.testing.TINY_CASES) are picked up automatically.
"""

from __future__ import annotations

import pytest
import torch
from conftest import supported_pairs, tiny_model, tiny_processor

import vtok
from vtok.hf_compat import output_cache
from vtok.method import get_method_class
from vtok.testing import TINY_CASES


def forward(model, batch):
    with torch.no_grad():
        out = model(**batch)
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    return out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out[0]


def attn_impls(model):
    """The attention implementation markers of a model: HF configs' and timm/open_clip's fused flags."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(getattr(mod, "config", None), "_attn_implementation"):
            out[name] = mod.config._attn_implementation
        for flag in ("fused_attn", "batch_first"):
            if isinstance(getattr(mod, flag, None), bool):
                out[f"{name}.{flag}"] = getattr(mod, flag)
    return out


def hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def setup(case_name, seed=0):
    case = TINY_CASES[case_name]
    model = tiny_model(case_name)
    samples = case.make_samples(model, case.specs, seed)
    return case, model, samples


def attach(case, model, method):
    """``vtok.apply`` as a user of the case calls it: with the case's processor (methods may read the question)."""
    return vtok.apply(model, method, processor=tiny_processor(case.name))


def example(name, **override):
    cls = get_method_class(name)
    return cls(**{**cls.example, **override})


# ------------------------------------------------------------------ 1. remove() is exact


@pytest.mark.parametrize("case_name,method", supported_pairs())
def test_remove_is_exact(case_name, method):
    case, model, samples = setup(case_name)
    batch = case.batch(samples)
    ref = forward(model, batch)
    hooks_before = hook_counts(model)
    handle = attach(case, model, example(method))
    reduced = forward(model, batch)
    assert handle.stats, f"{method} recorded no reduction on {case_name}"
    handle.remove()
    handle.remove()  # idempotent
    assert torch.equal(forward(model, batch), ref)
    assert not hasattr(model, "_vtok_handle")
    assert hook_counts(model) == hooks_before
    assert reduced.shape[0] == ref.shape[0]


# ------------------------------------------------------------------ 2. no-op setting


@pytest.mark.parametrize("case_name,method", supported_pairs())
def test_noop_setting_gives_untouched_outputs(case_name, method):
    cls = get_method_class(method)
    if cls.noop is None:
        pytest.skip(f"{method} has no no-op setting (declared noop=None)")
    case, model, samples = setup(case_name)
    batch = case.batch(samples)
    ref = forward(model, batch)
    with attach(case, model, cls(**{**cls.example, **cls.noop})) as h:
        out = forward(model, batch)
    assert all(r.tokens_in == r.tokens_out for r in h.stats)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ 3. attention implementation


@pytest.mark.parametrize("case_name,method", supported_pairs())
def test_attention_implementation_unchanged(case_name, method):
    case, model, samples = setup(case_name)
    before = attn_impls(model)
    assert before, f"{case_name}: no attention implementation marker found"
    if case.kind == "vlm":
        assert "sdpa" in set(before.values())
    with attach(case, model, example(method)):
        forward(model, case.batch(samples))
        assert attn_impls(model) == before
    assert attn_impls(model) == before


# ------------------------------------------------------------------ 4. batch invariance


@pytest.mark.parametrize("case_name,method", supported_pairs())
def test_left_padded_batch_equals_one_by_one(case_name, method):
    case, model, samples = setup(case_name, seed=1)
    batch = case.batch(samples)
    with attach(case, model, example(method)) as h:
        out = forward(model, batch)
        stats = [(r.tokens_in, r.tokens_out) for r in h.stats]
        for i, s in enumerate(samples):
            single = forward(model, case.batch([s]))
            assert [(r.tokens_in, r.tokens_out) for r in h.stats] == [([a[i]], [b[i]]) for a, b in stats]
            if case.kind == "vlm":
                n = single.shape[1]
                torch.testing.assert_close(out[i, -n:], single[0], atol=2e-5, rtol=1e-4)
            else:
                torch.testing.assert_close(out[i : i + 1], single, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case_name,method", supported_pairs(kind="vlm"))
def test_generate_batch_equals_one_by_one(case_name, method):
    case, model, samples = setup(case_name, seed=2)
    batch = case.batch(samples)
    batch.pop("position_ids")
    with attach(case, model, example(method)) as h:
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
        # generate pre-computes the visual features before its prefill: the reduction must still happen
        assert any(sum(r.tokens_out) < sum(r.tokens_in) for r in h.stats), h.stats
        s_len = batch["input_ids"].shape[1]
        for i, s in enumerate(samples):
            b1 = case.batch([s])
            b1.pop("position_ids")
            one = model.generate(**b1, max_new_tokens=8, do_sample=False)
            new_one = one[0, b1["input_ids"].shape[1] :]  # may stop early at EOS; the batch row then pads
            assert torch.equal(out[i, s_len : s_len + new_one.numel()], new_one)


# ------------------------------------------------------------------ 5./6. in-LLM: drop equals mask, generate


class MaskedReference:
    """The untouched model with given tokens masked out as keys from the layer that drops them on (and,
    for the 'compact' policy, the later layers' RoPE positions renumbered) -- written from the definition.

    ``schedule``: {layer: [B, S] tokens dropped at that layer}; a layer masks every token dropped at it
    or before it.
    """

    def __init__(self, model, schedule, policy):
        self.model, self.policy = model, policy
        self.schedule = dict(sorted(schedule.items()))
        self.lm = model.model.language_model
        self.hooks = []

    def pruned_at(self, layer):
        acc = None
        for k, m in self.schedule.items():
            if k <= layer:
                acc = m.clone() if acc is None else acc | m
        return acc

    def __enter__(self):
        first = min(self.schedule)
        for layer_idx in range(first, len(self.lm.layers)):
            self.hooks.append(
                self.lm.layers[layer_idx].register_forward_pre_hook(self._pre(layer_idx), with_kwargs=True)
            )
        self.hooks.append(self.lm.register_forward_pre_hook(self.lm_pre, with_kwargs=True))
        return self

    def __exit__(self, *a):
        for h in self.hooks:
            h.remove()

    def lm_pre(self, module, args, kwargs):
        self.mask2d = kwargs["attention_mask"].bool()
        self.pos = kwargs["position_ids"]

    def _pre(self, layer):
        def pre(module, args, kwargs):
            hidden = args[0]
            q = hidden.shape[1]
            kv = self.mask2d.shape[1]
            dropped = self.pruned_at(layer)
            s0 = dropped.shape[1]
            pruned = torch.zeros_like(self.mask2d)
            pruned[:, :s0] = dropped
            keys = self.mask2d & ~pruned
            qi = torch.arange(kv - q, kv)
            allowed = keys[:, None, :] & (torch.arange(kv)[None, None, :] <= qi[None, :, None])
            allowed |= torch.eye(kv, dtype=torch.bool)[kv - q :][None]  # masked rows see themselves
            kwargs["attention_mask"] = allowed[:, None]
            if self.policy == "compact":
                removed = pruned.long()
                if q > 1:
                    pos = self.pos - removed.cumsum(1)[:, kv - q :]
                else:
                    pos = self.pos - removed.sum(1, keepdim=True)
                kwargs["position_embeddings"] = self.lm.rotary_emb(hidden, pos)
            return args, kwargs

        return pre


def pruned_schedule(batch, stats, image_token_id):
    """{layer: [B, S] True at the visual tokens the in_llm stage(s) of that layer dropped}, from stats
    (each stage's kept positions index the visual tokens that entered it)."""
    visual = batch["input_ids"] == image_token_id
    alive = [visual[b].nonzero().squeeze(1) for b in range(visual.shape[0])]
    out = {}
    for r in stats:
        if r.stage != "in_llm":
            continue
        dropped = out.setdefault(r.layer, torch.zeros_like(visual))
        for b in range(visual.shape[0]):
            keep = torch.zeros(alive[b].numel(), dtype=torch.bool)
            keep[r.kept[b]] = True
            dropped[b, alive[b][~keep]] = True
            alive[b] = alive[b][keep]
    return out


IN_LLM = [p for p in supported_pairs(kind="vlm", stage="in_llm")]


def in_llm_only(method, **override):
    """The method's example with its other stages turned off (``Method.stage_off``), so the checks below
    see its in_llm stage alone; a method of several stages without such settings is skipped, saying so."""
    cls = get_method_class(method)
    others = [s for s in cls.stages if s != "in_llm"]
    if any(s not in cls.stage_off for s in others):
        pytest.skip(f"{method} has stages {others} besides in_llm and no stage_off setting to isolate its in_llm stage")
    return example(method, **{k: v for s in others for k, v in cls.stage_off[s].items()}, **override)


@pytest.mark.parametrize("policy", ["keep", "compact"])
@pytest.mark.parametrize("case_name,method", IN_LLM)
def test_in_llm_drop_equals_mask_and_generate(case_name, method, policy):
    case, model, samples = setup(case_name, seed=3)
    if not hasattr(model, "model") or not hasattr(model.model, "language_model"):
        pytest.skip("masked reference is written for HF LLaVA-family models")
    if get_method_class(method).in_llm_merges:
        where = {"holitom": "test_holitom.py"}.get(method, "test_capabilities.py")
        pytest.skip(f"{method} merges hidden states in the LLM (in_llm_merges): drop == mask does not hold; "
                    f"{where} checks its merge against the same merge done by hand")  # fmt: skip
    batch = case.batch(samples)
    gen_batch = {k: v for k, v in batch.items() if k != "position_ids"}
    m = in_llm_only(method, position_policy=policy)  # the reference masks the in_llm drops only
    with attach(case, model, m) as h:
        out = forward(model, batch)
        stages = [r for r in h.stats if r.stage == "in_llm"]
        generated = model.generate(**gen_batch, max_new_tokens=8, do_sample=False)
    assert any(a > b for r in stages for a, b in zip(r.tokens_in, r.tokens_out)), "nothing was pruned"
    schedule = pruned_schedule(batch, stages, model.config.image_token_id)
    with MaskedReference(model, schedule, policy) as ref_model:
        ref = forward(model, batch)
        ref_gen = model.generate(**gen_batch, max_new_tokens=8, do_sample=False)
    keep = batch["attention_mask"].bool() & ~ref_model.pruned_at(10**9)
    torch.testing.assert_close(out[keep], ref[keep], atol=2e-5, rtol=1e-4)
    assert torch.equal(generated, ref_gen)
    # the decode steps ran against per-layer cache lengths: layers >= K hold fewer entries
    cache = model.generate(**gen_batch, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    assert cache.sequences.shape[1] == gen_batch["input_ids"].shape[1] + 1


@pytest.mark.parametrize("case_name,method", IN_LLM)
def test_in_llm_cache_lengths_per_layer(case_name, method):
    case, model, samples = setup(case_name, seed=4)
    batch = case.batch(samples)
    batch.pop("position_ids")
    with attach(case, model, in_llm_only(method)) as h:
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        stages = [r for r in h.stats if r.stage == "in_llm"]
    cache = output_cache(out)
    lens = [cache.layers[i].get_seq_length() for i in range(len(cache.layers))]
    s = batch["input_ids"].shape[1]
    first = stages[0].layer
    assert lens[:first] == [s + 2] * first
    removed = 0
    for r in stages:  # each stage's layers hold the padded length left after it (at most s + 2 - removed)
        removed += min(a - b for a, b in zip(r.tokens_in, r.tokens_out))
        later = [x.layer for x in stages if x.layer > r.layer]
        upto = later[0] if later else len(lens)
        assert all(n == lens[r.layer] for n in lens[r.layer : upto])
        assert lens[r.layer] <= s + 2 - removed


# ------------------------------------------------------------------ 7. determinism


@pytest.mark.parametrize("case_name,method", supported_pairs())
def test_deterministic(case_name, method):
    case, model, samples = setup(case_name, seed=5)
    batch = case.batch(samples)
    with attach(case, model, example(method)) as h:
        a = forward(model, batch)
        ka = [None if r.kept is None else [k.tolist() for k in r.kept] for r in h.stats]
        b = forward(model, batch)
        kb = [None if r.kept is None else [k.tolist() for k in r.kept] for r in h.stats]
    assert torch.equal(a, b)
    assert ka == kb


# ------------------------------------------------------------------ stats semantics


@pytest.mark.parametrize("case_name,method", supported_pairs())
def test_stats_records(case_name, method):
    case, model, samples = setup(case_name)
    with attach(case, model, example(method)) as h:
        forward(model, case.batch(samples))
    for r in h.stats:
        assert r.method == method and r.stage in vtok.method.STAGES
        assert len(r.tokens_in) == len(r.tokens_out) == len(samples)
        assert all(o <= i for i, o in zip(r.tokens_in, r.tokens_out))
        if r.kept is not None:
            for k, n_in, n_out in zip(r.kept, r.tokens_in, r.tokens_out):
                assert k.numel() == n_out and k.dtype == torch.long
                assert torch.equal(k, k.sort().values) and (k.numel() == 0 or int(k.max()) < n_in)
                assert k.unique().numel() == k.numel()

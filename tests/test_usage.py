"""What users and HF's own code do with an attached model beyond the invariant suite: threads, losses,
returned layouts, multi-turn caches, removal mid-generation. Each either works or is refused clearly."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch
from conftest import tiny_model

import vtok
from vtok.testing import TINY_CASES
from vtok.hf_compat import cache_kwarg, output_cache
from vtok.method import get_method_class

VLMS = ["llava", "llava_next", "llava_onevision"]


def _batch(case_name, seed=0, specs=None):
    case, model = TINY_CASES[case_name], tiny_model(case_name)
    batch = case.batch(case.make_samples(model, specs or case.specs, seed))
    batch.pop("position_ids", None)
    return model, batch


def _method(name, **kw):
    cls = get_method_class(name)
    return cls(**{**cls.example, **kw})


# ------------------------------------------------------------------ threads


@pytest.mark.parametrize(
    "case_name,method",
    [(c, m) for c in VLMS for m in ("fastv", "random")] + [("llava", "tome"), ("llava", "hiprune"), ("llava", "todre")],
)
def test_threads_do_not_share_per_call_state(method, case_name):
    """One attached model called from 4 threads at once gives each call its own (correct) result."""
    model = tiny_model(case_name)
    batches = [_batch(case_name, seed=s)[1] for s in range(4)]
    with vtok.apply(model, _method(method)), torch.no_grad():
        want = [model(**b).logits for b in batches]
        got, errors = {}, []
        start = threading.Barrier(4)

        def work(i):
            try:
                start.wait()
                for _ in range(5):
                    out = model(**batches[i]).logits
                    if not torch.equal(out, want[i]):
                        errors.append(f"thread {i}: different logits")
                got[i] = True
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"thread {i}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[:4]
    assert len(got) == 4


# ------------------------------------------------------------------ loss


@pytest.mark.parametrize("case_name", VLMS)
def test_loss_is_the_loss_of_the_shorter_prompt(case_name):
    """random before the LLM (compact positions): the loss with labels equals the untouched model's loss on
    the shorter prompt the method produced, with the labels of the kept tokens."""
    model, batch = _batch(case_name, seed=1)
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), -100)
    seen = []
    lm = model.model.language_model

    def capture(module, args, kwargs):
        if not seen:
            seen.append({k: kwargs[k].clone() for k in ("inputs_embeds", "attention_mask")})

    with vtok.apply(model, _method("random", retain=0.5)) as h, torch.no_grad():
        hook = lm.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            out = model(**batch, labels=labels)
        finally:
            hook.remove()
        kept_counts = h.stats[0].tokens_out
    short = seen[0]
    s0 = batch["input_ids"].shape[1]
    # which original tokens survived: text + the kept placeholders (from the nonzero logits rows)
    alive = out.logits.abs().sum(-1) > 0
    short_labels = torch.full(short["attention_mask"].shape, -100)
    for b in range(labels.shape[0]):
        lab = labels[b][alive[b]]
        short_labels[b, short_labels.shape[1] - lab.numel() :] = lab
    assert int(alive.sum()) == int(short["attention_mask"].sum()) and sum(kept_counts) > 0
    with torch.no_grad():
        ref = model(inputs_embeds=short["inputs_embeds"], attention_mask=short["attention_mask"], labels=short_labels)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    assert out.logits.shape[1] == s0


@pytest.mark.parametrize("method", ["random", "fastv", "tome"])
def test_noop_loss_is_the_models_own_with_its_arguments(method):
    """At a no-op setting the loss is the model's own, num_items_in_batch (gradient accumulation) and
    shift_labels included."""
    model, batch = _batch("llava", seed=2)
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), -100)
    cls = get_method_class(method)
    with torch.no_grad():
        ref = model(**batch, labels=labels, num_items_in_batch=torch.tensor(7))
        ref_shift = model(**batch, labels=labels, shift_labels=torch.roll(labels, -1, 1))
        with vtok.apply(model, cls(**{**cls.example, **cls.noop})):
            got = model(**batch, labels=labels, num_items_in_batch=torch.tensor(7))
            got_shift = model(**batch, labels=labels, shift_labels=torch.roll(labels, -1, 1))
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_shift.loss, ref_shift.loss, atol=1e-6, rtol=1e-6)


def test_shift_labels_give_the_same_loss_as_labels():
    model, batch = _batch("llava", seed=3)
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), -100)
    shift = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    with vtok.apply(model, _method("random", retain=0.5)), torch.no_grad():
        a = model(**batch, labels=labels).loss
        b = model(**batch, labels=labels, shift_labels=shift).loss
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ returned layouts


@pytest.mark.parametrize("method", ["random", "fastv"])
def test_every_output_path_returns_the_callers_layout(method):
    """return_dict=False, labels with it, and logits_to_keep all give the caller's layout: the same rows as
    the full logits (zeros at removed tokens)."""
    model, batch = _batch("llava", seed=4)
    s0 = batch["input_ids"].shape[1]
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), -100)
    with vtok.apply(model, _method(method)), torch.no_grad():
        full = model(**batch)
        tup = model(**batch, return_dict=False)
        with_loss = model(**batch, labels=labels, return_dict=False)
        last5 = model(**batch, logits_to_keep=5)
        last1 = model(**batch, logits_to_keep=1)
    assert full.logits.shape[1] == s0
    assert isinstance(tup, tuple) and torch.equal(tup[0], full.logits)
    assert with_loss[0].dim() == 0 and torch.equal(with_loss[1], full.logits)
    # the LM head on fewer rows may round differently in the last bit
    torch.testing.assert_close(last5.logits, full.logits[:, -5:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(last1.logits, full.logits[:, -1:], atol=1e-6, rtol=1e-5)
    assert last5.logits.shape[1] == 5


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hidden_states_and_attentions_come_back_in_the_callers_layout(impl):
    """Per layer, the caller's positions: zeros where that layer had no token (removed before the LLM or at
    an in_llm stage), the layer's own values elsewhere; attentions (eager) likewise on both axes."""
    model, batch = _batch("llava", seed=4)
    s0 = batch["input_ids"].shape[1]
    model.set_attn_implementation(impl)
    try:
        kw = dict(output_hidden_states=True, output_attentions=impl == "eager")
        with vtok.apply(model, ["random", "fastv"], random={"retain": 0.75}, fastv={"layer": 2, "retain": 0.5}) as h, torch.no_grad():
            out = model(**batch, **kw)
            before, at2 = (r for r in h.stats)
    finally:
        model.set_attn_implementation("sdpa")
    assert len(out.hidden_states) == 5 and all(x.shape[1] == s0 for x in out.hidden_states)
    alive = [x.abs().sum(-1) > 0 for x in out.hidden_states]
    removed_first = (alive[0] == 0).sum(1)
    removed_at2 = (alive[3] == 0).sum(1) - removed_first  # hidden_states[3] is layer 2's output
    pad = (batch["attention_mask"] == 0).sum(1)
    assert (removed_first - pad).tolist() == [a - b for a, b in zip(before.tokens_in, before.tokens_out)]
    assert removed_at2.tolist() == [a - b for a, b in zip(at2.tokens_in, at2.tokens_out)]
    assert torch.equal(alive[1], alive[0]) and torch.equal(alive[2], alive[0]) and torch.equal(alive[4], alive[3])
    if impl == "eager":
        assert all(a.shape[-2:] == (s0, s0) for a in out.attentions)
        rows = out.attentions[3].sum(-1)[:, 0]  # each kept row of layer 3 sums to 1 over the kept keys
        torch.testing.assert_close(rows[alive[3] & batch["attention_mask"].bool()], torch.ones_like(rows[alive[3] & batch["attention_mask"].bool()]))


# ------------------------------------------------------------------ multi-turn and removal


@pytest.mark.parametrize("method", ["random", "fastv"])
def test_multi_turn_generate_reusing_the_cache(method):
    """Chat UIs continue a conversation with the cache of the last turn (as HF serves it: the whole
    conversation's ids, the cache, no pixel values): the continuation equals a run that re-encodes the
    whole conversation with the method attached."""
    model, batch = _batch("llava", seed=5, specs=[(3, 1, 4)])
    new_turn = torch.tensor([[7, 8, 9]])
    with vtok.apply(model, _method(method)), torch.no_grad():
        o = model.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        seq = torch.cat([o.sequences, new_turn], dim=1)
        mask = torch.ones_like(seq)
        cont = model.generate(
            input_ids=seq, attention_mask=mask, max_new_tokens=4, do_sample=False, **{cache_kwarg(model): output_cache(o)}
        )
        fresh = model.generate(
            input_ids=seq, attention_mask=mask, pixel_values=batch["pixel_values"], max_new_tokens=4, do_sample=False
        )
    assert torch.equal(cont[:, seq.shape[1] :], fresh[:, seq.shape[1] :])


def test_remove_between_prefill_and_decode_is_refused_clearly():
    """The untouched model cannot continue a pruned cache: after remove() the next step says so."""
    model, batch = _batch("llava", seed=6)
    h = vtok.apply(model, _method("random"))
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    h.remove()
    step = {"input_ids": torch.full((batch["input_ids"].shape[0], 1), 5),
            "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(batch["attention_mask"][:, :1])], 1)}  # fmt: skip
    with pytest.raises(ValueError, match="vtok handle that pruned it was removed"), torch.no_grad():
        model(**step, **{cache_kwarg(model): output_cache(out)})


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("case_name", VLMS)
def test_noop_in_llm_on_a_padded_batch_is_exact_everywhere(case_name, side):
    """fastv at retain 1.0 on a padded batch: logits equal the untouched model's at every position (pads
    included) and the cache keeps every position at every layer."""
    case, model = TINY_CASES[case_name], tiny_model(case_name)
    batch = case.batch(case.make_samples(model, case.specs, 1), side=side)
    batch.pop("position_ids", None)
    with torch.no_grad():
        ref = model(**batch)
        with vtok.apply(model, _method("fastv", retain=1.0)):
            out = model(**batch)
    assert torch.equal(out.logits, ref.logits)
    lens = {output_cache(out).layers[i].get_seq_length() for i in range(len(output_cache(out).layers))}
    assert lens == {batch["input_ids"].shape[1]}


# ------------------------------------------------------------------ calls HF serves that vtok cannot reduce


@pytest.mark.parametrize("call", ["embeds_forward", "embeds_generate", "ids_without_pixels", "static_cache"])
def test_calls_vtok_cannot_reduce_run_untouched_and_say_so(call):
    """Where HF serves a call vtok cannot reduce, the untouched model runs (same result as without vtok),
    handle.passthrough says why, and a warning says it once."""
    model, batch = _batch("llava", seed=7)
    emb = model.get_input_embeddings()(batch["input_ids"])
    mask = batch["attention_mask"]

    def run():
        with torch.no_grad():
            if call == "embeds_forward":
                return model(inputs_embeds=emb, attention_mask=mask, pixel_values=batch["pixel_values"]).logits
            if call == "embeds_generate":
                return model.generate(inputs_embeds=emb, attention_mask=mask, pixel_values=batch["pixel_values"],
                                      max_new_tokens=3, do_sample=False)  # fmt: skip
            if call == "ids_without_pixels":
                return model(input_ids=batch["input_ids"], attention_mask=mask).logits
            return model.generate(**batch, max_new_tokens=3, do_sample=False, cache_implementation="static")

    want = run()
    with vtok.apply(model, _method("random")) as h:
        with pytest.warns(UserWarning, match="vtok: this call runs the untouched model"):
            got = run()
        assert h.passthrough is not None and not h.stats
        model(**batch)  # an ordinary call afterwards is reduced again
        assert h.passthrough is None and h.stats
    assert torch.equal(got, want)


@pytest.mark.parametrize("case_name", VLMS)
def test_a_static_cache_runs_untouched_on_every_vlm(case_name):
    """generate(cache_implementation="static") prepares the mask itself: 4-D on LLaVA, a dict of masks per
    attention type on LLaVA-NeXT/OneVision (which used to fail with "'dict' object has no attribute 'dim'")."""
    model, batch = _batch(case_name, seed=3)
    with torch.no_grad():
        want = model.generate(**batch, max_new_tokens=3, do_sample=False, cache_implementation="static")
        with vtok.apply(model, _method("random")) as h:
            with pytest.warns(UserWarning, match="prepared attention mask"):
                got = model.generate(**batch, max_new_tokens=3, do_sample=False, cache_implementation="static")
            assert "prepared attention mask" in h.passthrough
    assert torch.equal(got, want)


# ------------------------------------------------------------------ torch.compile


def test_compiled_models_are_not_silently_unreduced():
    """torch.compile'd code does not see hooks added later: a compiled wrapper is refused, and compile ->
    run -> apply warns; apply -> compile reduces."""
    import torch._dynamo

    model = tiny_llava_fresh()
    _, batch = _batch("llava", seed=8)
    cm = torch.compile(model, backend="eager")
    with pytest.raises(ValueError, match="attach to the original model first"):
        vtok.apply(cm, "random")
    with torch.no_grad():
        cm(**batch)
    with pytest.warns(UserWarning, match="compiled version does not see vtok's hooks"):
        vtok.apply(model, "random").remove()
    torch._dynamo.reset()
    with vtok.apply(model, _method("random")) as h, torch.no_grad():
        out = torch.compile(model, backend="eager")(**batch)
        assert h.stats and sum(h.stats[0].tokens_out) < sum(h.stats[0].tokens_in)
    torch._dynamo.reset()
    assert out.logits.shape[1] == batch["input_ids"].shape[1]


@pytest.mark.parametrize("case_name,method", [("llava", "random"), ("llava", "tome"), ("llava", "fastv")])
def test_apply_then_compile_gives_the_uncompiled_results(case_name, method):
    """apply -> torch.compile(model) (no fullgraph): the model's modules are compiled, vtok's hooks run
    eagerly between the graphs, and the logits and stats are exactly the uncompiled attached model's."""
    import torch._dynamo

    model = tiny_llava_fresh()
    _, batch = _batch(case_name, seed=8)
    torch._dynamo.reset()
    try:
        with vtok.apply(model, _method(method)) as h, torch.no_grad():
            want, want_stats = model(**batch).logits, list(h.stats)
            got = torch.compile(model, backend="eager")(**batch).logits
            assert [(r.tokens_in, r.tokens_out) for r in h.stats] == [(r.tokens_in, r.tokens_out) for r in want_stats]
            assert sum(h.stats[0].tokens_out) < sum(h.stats[0].tokens_in)
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, want)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor needs a C++ compiler on CPU")
def test_apply_then_compile_with_inductor_gives_the_uncompiled_results():
    """The same with torch.compile's default backend (inductor, ~50 s here): the merges are the uncompiled
    ones and the logits equal them up to inductor's float reordering."""
    import torch._dynamo

    model = tiny_llava_fresh()
    _, batch = _batch("llava", seed=8)
    torch._dynamo.reset()
    try:
        with vtok.apply(model, _method("tome")) as h, torch.no_grad():
            want, want_kept = model(**batch).logits, [r.kept for r in h.stats]
            got = torch.compile(model)(**batch).logits
            assert len(h.stats) == len(want_kept) > 0
            assert all(torch.equal(a, b) for r, k in zip(h.stats, want_kept) for a, b in zip(r.kept, k))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case_name,method", [("llava", "random"), ("llava", "tome"), ("timm_vit", "tome")])
def test_compile_fullgraph_of_an_attached_model_is_refused_with_the_way_out(case_name, method):
    """vtok's hooks choose tokens from the data and run outside the compiled graph, so
    torch.compile(model, fullgraph=True) cannot capture an attached model: compilation stops at the first
    hook with vtok's reason (the problem and the way out), not at an arbitrary data-dependent line."""
    import inspect

    import torch._dynamo

    if "reason" not in inspect.signature(torch.compiler.disable).parameters:
        pytest.skip("torch < 2.8 shows no reason for a torch.compiler.disable'd function")
    model = tiny_llava_fresh() if case_name == "llava" else TINY_CASES[case_name].build()
    case = TINY_CASES[case_name]
    batch = case.batch(case.make_samples(model, case.specs, 8))
    batch.pop("position_ids", None)
    torch._dynamo.reset()
    try:
        with vtok.apply(model, _method(method)), torch.no_grad():
            with pytest.raises(RuntimeError, match=r"(?s)fullgraph=True.*Compile without fullgraph \(torch.compile\(model\)\)"):
                torch.compile(model, backend="eager", fullgraph=True)(**batch)
    finally:
        torch._dynamo.reset()
    torch._dynamo.reset()
    with torch.no_grad():  # removed: the untouched model compiles in one graph again
        want = model(**batch)
        got = torch.compile(model, backend="eager", fullgraph=True)(**batch)
    torch._dynamo.reset()
    want, got = (o if isinstance(o, torch.Tensor) else o[0] for o in (want, got))
    assert torch.equal(got, want)


def tiny_llava_fresh():
    from vtok.testing import tiny_llava

    return tiny_llava(seed=0)


# ------------------------------------------------------------------ NaN inputs


def _kernel_backend(monkeypatch, backend):
    """Run vtok's kernels on ``backend``: the torch references, or the Triton kernels (what a GPU runs)
    under Triton's interpreter."""
    from vtok.kernels import _common

    if backend == "triton":
        if not _common.HAS_TRITON:
            pytest.skip("triton is not installed")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VTOK_KERNELS", backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_nan_pixel_gives_nan_in_its_sample_and_leaves_the_others_alone(backend, monkeypatch):
    """tome on LLaVA, a batch of two prompts whose second image has one NaN pixel: as in the untouched
    model, the NaN reaches that sample's prediction (every row of its reduced sequence is NaN; rows of
    tokens it dropped hold zeros, as always); the other sample's logits and merges are bit-identical to
    the same batch without the NaN, and equal its own unbatched run. The match ranks NaN similarities
    below every number on both kernel backends, so the merge stays a valid one (no protected token, no
    index out of range) whatever the NaN does."""
    _kernel_backend(monkeypatch, backend)
    model = tiny_llava_fresh()
    case = TINY_CASES["llava"]
    clean = case.make_samples(model, case.specs[:2], 8)
    bad = [dict(s) for s in clean]
    bad[1]["pixel_values"] = bad[1]["pixel_values"].clone()
    bad[1]["pixel_values"][0, 0, 5, 7] = float("nan")

    def run(samples):
        b = case.batch(samples)
        b.pop("position_ids", None)
        return model(**b).logits

    with torch.no_grad():
        untouched = run(bad)
        with vtok.apply(model, _method("tome")) as h:
            want, want_kept = run(clean), [r.kept[0] for r in h.stats]
            got, got_kept = run(bad), [r.kept[0] for r in h.stats]
            solo = run(clean[:1])
    n0 = clean[0]["input_ids"].numel()
    assert torch.equal(got[0], want[0])  # the clean sample: as if the NaN were not there
    assert all(torch.equal(a, b) for a, b in zip(got_kept, want_kept))
    torch.testing.assert_close(got[0, -n0:], solo[0], rtol=1e-4, atol=1e-5)  # batch invariance
    assert torch.isnan(untouched[1, -1]).all() and torch.isnan(got[1, -1]).all()  # NaN in -> NaN out
    nan_rows = torch.isnan(got[1]).all(-1)
    assert bool((got[1][~nan_rows] == 0).all())  # the other rows: tokens the reduced sequence did not have


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case_name", ["clip_vision", "timm_vit", "open_clip_vit"])
def test_a_nan_image_in_a_vit_batch_gives_nan_in_its_row_only(case_name, backend, monkeypatch):
    """tome on a standalone ViT, a batch of three images, the middle one with a NaN pixel: its output is
    NaN, as the untouched encoder's; the other images' outputs and merges are bit-identical to the batch
    without the NaN."""
    _kernel_backend(monkeypatch, backend)
    case = TINY_CASES[case_name]
    model = case.build()
    batch = case.batch(case.make_samples(model, case.specs, 3))
    key = next(iter(batch))
    bad = dict(batch)
    bad[key] = batch[key].clone()
    bad[key][1, 0, 5, 7] = float("nan")

    def out(o):
        return o if isinstance(o, torch.Tensor) else o[0]

    with torch.no_grad():
        untouched = out(model(**bad))
        with vtok.apply(model, _method("tome", r=3)) as h:
            want, want_kept = out(model(**batch)), [r.kept for r in h.stats]
            got, got_kept = out(model(**bad)), [r.kept for r in h.stats]
    assert torch.isnan(untouched[1]).all() and torch.isnan(got[1]).all()
    keep = [0, 2]
    assert torch.equal(got[keep], want[keep])
    assert all(torch.equal(a[i], b[i]) for a, b in zip(got_kept, want_kept) for i in keep)


# ------------------------------------------------------------------ copies


@pytest.mark.parametrize("case_name", VLMS)
@pytest.mark.parametrize("method", ["fastv", "pool"])
def test_deepcopy_of_an_attached_model_is_an_untouched_copy(method, case_name):
    import copy

    model, batch = _batch(case_name)
    full = model(**batch).logits
    with vtok.apply(model, _method(method)) as h:
        reduced = model(**batch).logits
        twin = copy.deepcopy(model)
        assert not hasattr(twin, "_vtok_handle")
        torch.testing.assert_close(twin(**batch).logits, full, rtol=0, atol=0)  # no hook came along
        assert torch.equal(model(**batch).logits, reduced) and h.stats  # the original is still attached
        with vtok.apply(twin, _method(method)):  # the copy takes its own attachment
            assert torch.equal(twin(**batch).logits, reduced)
    assert torch.equal(model(**batch).logits, full)


def test_pickling_or_shallow_copying_an_attached_model_is_refused_clearly():
    import copy
    import io

    model, _ = _batch("llava")
    with vtok.apply(model, _method("random")):
        for attempt in (lambda: torch.save(model, io.BytesIO()), lambda: copy.copy(model)):
            with pytest.raises(TypeError, match="has vtok methods attached.*state_dict"):
                attempt()
    assert not {"__reduce_ex__", "__deepcopy__"} & set(vars(model))  # removed: pickling is the model's own again


@pytest.mark.parametrize("method", ["tome", "random"])
def test_generate_without_cache_gives_the_cached_tokens(method):
    """use_cache=False runs a full prefill at every step on features generate computed once: a method
    before the LLM gives the same tokens as the cached run (in_llm methods that read the last prompt
    token, like fastv, select again at every such prefill: that is a different prompt each step)."""
    model, batch = _batch("llava")
    with vtok.apply(model, _method(method)) as h:
        cached = model.generate(**batch, max_new_tokens=4, do_sample=False)
        uncached = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
        assert h.stats  # the last prefill was reduced too
    assert torch.equal(cached, uncached)


def test_every_builtin_method_states_its_paper_default_in_describe():
    from vtok.method import describe, get_method_class

    for name in vtok.list_methods():
        cls = get_method_class(name)
        if not cls.__module__.startswith("vtok.methods."):
            continue  # test methods registered by the suite
        assert cls.paper, f"{name} has no paper default"
        assert f"paper default: {cls.paper}" in describe(name)


def test_assisted_decoding_equals_greedy_or_is_refused_for_in_llm_methods():
    """The main model's first forward holds prompt + candidates: methods before the LLM are unaffected
    (assisted == greedy), an in_llm method would rank with candidate rows and is refused (at its no-op
    setting it runs)."""
    import copy

    model, batch = _batch("llava")
    one = {k: v[:1] for k, v in batch.items()}
    real = one["attention_mask"][0].bool()
    one = {k: v[:, real] if k in ("input_ids", "attention_mask") else v for k, v in one.items()}
    assistant = copy.deepcopy(model)
    for method in (_method("random"), _method("tome"), _method("fastv", retain=1.0)):
        with vtok.apply(model, method):
            greedy = model.generate(**one, max_new_tokens=5, do_sample=False)
            assisted = model.generate(**one, max_new_tokens=5, do_sample=False, assistant_model=assistant)
        assert torch.equal(greedy, assisted), method.name
    with vtok.apply(model, _method("fastv")):
        with pytest.raises(ValueError, match="assisted decoding"):
            model.generate(**one, max_new_tokens=5, do_sample=False, assistant_model=assistant)
        with pytest.raises(ValueError, match="assisted decoding"):
            model.generate(**one, max_new_tokens=5, do_sample=False, prompt_lookup_num_tokens=2)


def test_get_image_features_while_tome_is_attached_gives_the_merged_tokens():
    """A direct call returns the merged tokens (no zero rows); the model's own forward and generate still
    splice them into the placeholders."""
    model, batch = _batch("llava")
    with vtok.apply(model, _method("tome", r=2)) as h:
        out = model.get_image_features(pixel_values=batch["pixel_values"])
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        assert all(f.shape[0] == 12 and bool((f.abs().sum(-1) > 0).all()) for f in feats)  # 16 + CLS - 2 x 2, CLS dropped
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
        assert [r.tokens_out for r in h.stats if r.stage == "in_vit"][-1] == [13, 13, 26]
    with vtok.apply(model, _method("tome", r=2)):
        assert torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False), generated)


def test_every_builtin_method_has_a_row_in_the_readme_methods_table():
    from pathlib import Path

    from vtok.method import get_method_class

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("## Methods") : readme.index("### Write your own method")]
    for name in vtok.list_methods():
        if get_method_class(name).__module__.startswith("vtok.methods."):
            assert f"| `{name}` |" in table, name


@pytest.mark.parametrize("case_name", VLMS)
def test_a_custom_4d_attention_mask_runs_untouched_and_says_so(case_name):
    """HF's models take a prepared 4-D additive mask; vtok shortens sequences from a 2-D one, so such a call
    runs the untouched model (the same logits as without vtok) and handle.passthrough names why."""
    model, batch = _batch(case_name)
    s = batch["input_ids"].shape[1]
    keep = batch["attention_mask"].bool()[:, None, None, :] & torch.ones(s, s, dtype=torch.bool).tril()[None, None]
    mask4 = (~keep).float() * torch.finfo(torch.float32).min
    with torch.no_grad():
        want = model(**{**batch, "attention_mask": mask4}).logits
        with vtok.apply(model, _method("random")) as h, pytest.warns(UserWarning, match="untouched model"):
            got = model(**{**batch, "attention_mask": mask4}).logits
            assert "prepared attention mask (4-D" in h.passthrough and not h.stats
    assert torch.equal(got, want)

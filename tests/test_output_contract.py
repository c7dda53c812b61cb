"""The before_llm output contract, one rule on every VLM adapter: a method returns fewer or more tokens than
it got, in its own order when it declares ``layout="sequence"`` or a grid layout, and the adapter lays them
out (newline tokens after each row of a declared grid on LLaVA-NeXT/OneVision), resizing the prompt."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
from conftest import tiny_model

import vtok
from vtok.testing import (
    LLAVA_ONEVISION_VIDEO,
    TINY_CASES,
    left_pad_batch,
    llava_samples,
)


def _cat(tokens, idx):
    """The tokens of every unit at indices ``idx`` (a function of the unit's count), same count for all units."""
    out = []
    for u, n in enumerate(tokens.counts().tolist()):
        out.append(idx(n).to(tokens.features.device))
    k = max(i.numel() for i in out)
    sel = torch.stack([torch.nn.functional.pad(i, (0, k - i.numel())) for i in out])
    valid = torch.arange(k).unsqueeze(0) < torch.tensor([i.numel() for i in out]).unsqueeze(1)
    g = lambda t: None if t is None else t.gather(1, sel) if t.dim() == 2 else t.gather(1, sel.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
    return replace(tokens, features=g(tokens.features) * valid.unsqueeze(-1), mask=valid, positions=g(tokens.positions),
                   sizes=g(tokens.sizes), frames=g(tokens.frames), extra={k_: g(v) for k_, v in tokens.extra.items()})


@dataclass
class _Double(vtok.Method):
    name = "t_double"
    stages = ("before_llm",)

    def before_llm(self, tokens, probes):  # every token twice in a row: 2n tokens, no declared layout
        return _cat(tokens, lambda n: torch.arange(n).repeat_interleave(2))


@dataclass
class _Reverse(vtok.Method):
    name = "t_reverse"
    stages = ("before_llm",)
    declare: bool = True

    def before_llm(self, tokens, probes):
        out = _cat(tokens, lambda n: torch.arange(n - 1, -1, -1))
        return replace(out, layout="sequence") if self.declare else out


def _reference_logits(model, sample, transform):
    """The untouched LLaVA on the prompt a before_llm output stands for: its projected features transformed,
    one placeholder per token."""
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=sample["pixel_values"])
        feats = torch.stack(list(getattr(feats, "pooler_output", feats)))
        new = [transform(f) for f in feats]
        img = model.config.image_token_id
        ids, out = sample["input_ids"].tolist(), []
        j = 0
        i = 0
        while i < len(ids):
            if ids[i] == img:
                out += [img] * new[j].shape[0]
                i += feats.shape[1]
                j += 1
            else:
                out.append(ids[i])
                i += 1
        ids = torch.tensor([out])
        emb = model.get_input_embeddings()(ids)
        emb = emb.masked_scatter((ids == img).unsqueeze(-1), torch.cat(new).to(emb.dtype))
        return model(inputs_embeds=emb).logits[0, -1]


@pytest.mark.parametrize("method,transform", [
    (_Double(), lambda f: f.repeat_interleave(2, 0)),
    (_Reverse(), lambda f: f.flip(0)),
])
def test_more_tokens_and_an_own_order_equal_the_prompt_they_stand_for(method, transform):
    model = tiny_model("llava")
    samples = llava_samples(model, [(3, 1, 4), (2, 2, 5)], seed=2)
    batch = left_pad_batch(samples)
    with vtok.apply(model, method) as h, torch.no_grad():
        logits = model(**batch).logits
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    n = 16
    factor = 2 if isinstance(method, _Double) else 1
    assert [(e.tokens_in, e.tokens_out) for e in h.stats] == [([n, 2 * n], [factor * n, factor * 2 * n])]
    for i, s in enumerate(samples):
        ref = _reference_logits(model, s, transform)
        assert torch.allclose(logits[i, -1], ref, atol=1e-5), (logits[i, -1] - ref).abs().max()
        with vtok.apply(model, method), torch.no_grad():
            alone = model.generate(**left_pad_batch([s]), max_new_tokens=3, do_sample=False)
        assert torch.equal(out[i, batch["input_ids"].shape[1]:], alone[0, s["input_ids"].numel():])


def test_an_undeclared_reordering_keeps_the_placeholders_order():
    """Without a declared layout, tokens go to the placeholder of their position: a reversed output is the
    untouched model (the contract says so; a method that wants its order declares it)."""
    model = tiny_model("llava")
    batch = left_pad_batch(llava_samples(model, [(3, 1, 4)], seed=2))
    with torch.no_grad():
        ref = model(**batch).logits
    with vtok.apply(model, _Reverse(declare=False)), torch.no_grad():
        assert torch.allclose(model(**batch).logits, ref, atol=1e-6)


@pytest.mark.parametrize("method", [_Double(), _Reverse()])
def test_doubled_and_reversed_video_tokens_generate_on_a_onevision_batch_of_different_frame_counts(method):
    model = tiny_model("llava_onevision")
    case = LLAVA_ONEVISION_VIDEO
    samples = case.make_samples(model, case.specs, 0)
    batch = case.batch(samples)
    with vtok.apply(model, method) as h, torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        e = h.stats[0]
    factor = 2 if isinstance(method, _Double) else 1
    assert e.tokens_out == [factor * t for t in e.tokens_in] and e.tokens_in[0] != e.tokens_in[1]
    for i, s in enumerate(samples):
        single = case.batch([s])
        with vtok.apply(model, method), torch.no_grad():
            alone = model.generate(**single, max_new_tokens=3, do_sample=False)
        assert torch.equal(out[i, batch["input_ids"].shape[1]:], alone[0, single["input_ids"].shape[1]:])


@dataclass
class _FirstRowsAsGrid(vtok.Method):
    name = "t_grid"
    stages = ("before_llm",)

    def before_llm(self, tokens, probes):  # the first 6 tokens of each unit, declared as a 2 x 3 grid
        return replace(_cat(tokens, lambda n: torch.arange(6)), layout=[(2, 3)])


def test_a_declared_grid_gets_a_newline_after_each_row_on_llava_next():
    model = tiny_model("llava_next")
    case = TINY_CASES["llava_next"]
    batch = case.batch(case.make_samples(model, case.specs[:1], 0))
    seen = {}
    with vtok.apply(model, _FirstRowsAsGrid()), torch.no_grad():
        handle = model.model.language_model.register_forward_pre_hook(  # after vtok's: sees what the LM gets
            lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True
        )
        try:
            model(**batch)
        finally:
            handle.remove()
    text = int((batch["input_ids"] != model.config.image_token_id).sum())
    emb = seen["embeds"][0]
    assert emb.shape[0] == text + 6 + 2  # 6 tokens + one newline per row
    nl = model.model.image_newline
    assert int((emb == nl).all(-1).sum()) == 2


def test_a_layout_that_does_not_hold_the_tokens_is_refused():
    @dataclass
    class _Bad(vtok.Method):
        name = "t_bad_layout"
        stages = ("before_llm",)

        def before_llm(self, tokens, probes):
            return replace(tokens, layout=[(3, 3)])

    model = tiny_model("llava")
    batch = left_pad_batch(llava_samples(model, [(3, 1, 4)], seed=2))
    with vtok.apply(model, _Bad()), pytest.raises(ValueError, match=r"declared the layout \[\(3, 3\)\] for unit 0, which does not hold its 16"):
        model(**batch)

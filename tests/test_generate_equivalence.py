"""Several generated tokens with every registered method on every VLM adapter equal the equivalent
untouched run.

* Methods that shorten the prompt before the LLM (before_llm, in_vit; on LLaVA-NeXT/OneVision in_vit keeps
  the length and changes the features): the untouched model fed the prompt the method produced (its embeddings, mask and positions, 'compact' policy), decoded
  by the untouched model's own ``generate``. This is the test that catches a transformers release
  in which vtok takes decode steps for prefills (5.24 renamed the cache keyword: generate then
  returned the right first token and degenerate text after it, in silence).
* in_llm methods: drop == mask, with ``generate``, in ``test_invariants.test_in_llm_drop_equals_mask_and_generate``;
  ``test_every_vlm_pair_is_covered`` checks that the two lists together hold every pair.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import supported_pairs, tiny_model, tiny_processor
from test_invariants import IN_LLM

import vtok
from vtok.method import get_method_class
from vtok.testing import TINY_CASES

SHORTER_PROMPT = [
    p for p in supported_pairs(kind="vlm") if "in_llm" not in get_method_class(p.values[1]).stages
]
NEW = 6


def _compact(name: str) -> vtok.Method:
    cls = get_method_class(name)
    kw = dict(cls.example)
    if "position_policy" in {f.name for f in dataclasses.fields(cls)}:
        kw["position_policy"] = "compact"
    return cls(**kw)


def _new_tokens(seq: torch.Tensor, start: int) -> list[list[int]]:
    return [row[start:].tolist() for row in seq]


@pytest.mark.parametrize("case_name,method", SHORTER_PROMPT)
def test_generate_equals_untouched_shorter_prompt(case_name, method):
    case, model = TINY_CASES[case_name], tiny_model(case_name)
    samples = case.make_samples(model, case.specs, 11)
    batch = case.batch(samples)
    batch.pop("position_ids", None)
    lm = model.model.language_model
    seen = []

    def capture(module, args, kwargs):  # registered after vtok's own hook: sees the shortened prompt
        if not seen and not h.adapter.in_hook():  # a method's own nested call to the model is not the prompt
            seen.append({k: kwargs[k].clone() for k in ("inputs_embeds", "attention_mask", "position_ids")})

    with vtok.apply(model, _compact(method), processor=tiny_processor(case_name)) as h:
        hook = lm.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            out = model.generate(**batch, max_new_tokens=NEW, do_sample=False)
        finally:
            hook.remove()
        stats = list(h.stats)
    assert stats and any(sum(r.tokens_out) < sum(r.tokens_in) for r in stats), f"no reduction recorded: {stats}"
    short = seen[0]
    if get_method_class(method).stages == ("in_vit",) and not h.adapter.in_vit_shortens_prompt:
        # the tower's merges are undone for the model's own packing (NeXT/OneVision): the tower ran on fewer
        # tokens, the prompt keeps its length and holds the unmerged features
        assert short["inputs_embeds"].shape[1] == batch["input_ids"].shape[1]
    else:
        assert short["inputs_embeds"].shape[1] < batch["input_ids"].shape[1]
    # the untouched model on the shorter prompt, positions renumbered over real tokens (compact)
    ref = model.generate(
        inputs_embeds=short["inputs_embeds"], attention_mask=short["attention_mask"], max_new_tokens=NEW, do_sample=False
    )
    got = _new_tokens(out, batch["input_ids"].shape[1])
    want = _new_tokens(ref, 0)
    assert got == want, f"{method} on {case_name}: generated {got}, the untouched shorter prompt gives {want}"
    assert all(len(g) == NEW for g in got)


def test_every_vlm_pair_is_covered():
    covered = {tuple(p.values) for p in SHORTER_PROMPT} | {tuple(p.values) for p in IN_LLM}
    assert covered == {tuple(p.values) for p in supported_pairs(kind="vlm")}

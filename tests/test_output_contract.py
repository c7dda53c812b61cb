"""The before_llm output rule, the same on every VLM adapter: at most one token per placeholder of the
unit, and one unit per unit; a longer output is refused with the reason (LLaVA-NeXT used to cut it
silently while the stats reported the full count, LLaVA raised a shape error)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
from conftest import tiny_model

import vtok
from vtok.testing import TINY_CASES


@dataclass
class _Double(vtok.Method):
    name = "t_double"
    stages = ("before_llm",)

    def before_llm(self, tokens, probes):
        cat = lambda t: torch.cat([t, t], 1)  # noqa: E731
        return replace(tokens, features=cat(tokens.features), mask=cat(tokens.mask), positions=cat(tokens.positions),
                       sizes=cat(tokens.sizes), frames=None if tokens.frames is None else cat(tokens.frames),
                       extra={k: cat(v) for k, v in tokens.extra.items()})


@pytest.mark.parametrize("case_name", ["llava", "llava_next", "llava_onevision"])
def test_more_tokens_than_placeholders_are_refused_on_every_adapter(case_name):
    case, model = TINY_CASES[case_name], tiny_model(case_name)
    batch = case.batch(case.make_samples(model, case.specs, 0))
    with vtok.apply(model, _Double()), torch.no_grad():
        with pytest.raises(ValueError, match=r"t_double.before_llm returned \d+ tokens for unit 0, which has \d+ placeholder"):
            model(**batch)

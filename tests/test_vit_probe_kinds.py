"""ViTAttention(kind="cls_or_colmean"): the CLS row where the tower has a CLS token, the column mean where it
has none (SigLIP), instead of a refusal."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_model

import vtok
from vtok.method import ViTAttention
from vtok.testing import TINY_CASES


@dataclass
class _Seen(vtok.Method):
    name = "t_probe_kind"
    stages = ("before_llm",)
    kind: str = "cls"

    def probes(self):
        return [ViTAttention(layer=-1, kind=self.kind)]

    def before_llm(self, tokens, probes):
        self.seen = probes[ViTAttention(layer=-1, kind=self.kind)].clone()
        return tokens


def _probe(model, batch, kind):
    m = _Seen(kind=kind)
    with vtok.apply(model, m), torch.no_grad():
        model(**batch)
    return m.seen


@pytest.mark.parametrize("case_name,has_cls", [("llava", True), ("llava_onevision", False)])
def test_cls_or_colmean_follows_the_tower(case_name, has_cls):
    case, model = TINY_CASES[case_name], tiny_model(case_name)
    batch = case.batch(case.make_samples(model, case.specs, 0))
    got = _probe(model, batch, "cls_or_colmean")
    assert torch.equal(got, _probe(model, batch, "cls" if has_cls else "colmean"))
    if not has_cls:
        with pytest.raises(ValueError, match="has no CLS token.*use kind='colmean'"):
            vtok.apply(model, _Seen(kind="cls"))

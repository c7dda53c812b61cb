"""Every method x every VLM adapter on CUDA: the Triton dispatch gives what the torch dispatch gives.

The CPU counterparts are test_invariants.py (every method x adapter, torch dispatch) and
test_kernels.py (each Triton kernel against its torch reference under the interpreter). Here the
whole pipeline runs on the GPU with ``VTOK_KERNELS=auto`` (Triton on CUDA) and ``=torch``: the same
kept tokens, so the same greedy continuation and logits up to kernel rounding.
"""

from __future__ import annotations

import pytest
import torch
from conftest import supported_pairs

import vtok
from vtok.method import get_method_class
from vtok.testing import TINY_CASES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CPU counterpart: test_invariants)"),
]


def forward(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("case_name,method", supported_pairs(kind="vlm"))
def test_triton_dispatch_matches_torch_on_cuda(case_name, method, monkeypatch):
    case = TINY_CASES[case_name]
    model = case.build().to("cuda")
    batch = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v
             for k, v in case.batch(case.make_samples(model, case.specs)).items()}
    cls = get_method_class(method)
    results = {}
    for backend in ("torch", "auto"):
        monkeypatch.setenv("VTOK_KERNELS", backend)
        with vtok.apply(model, cls(**cls.example), processor=case.make_processor(model)) as h:
            logits = forward(model, batch)
            kept = [(r.tokens_out, None if r.kept is None else [k.tolist() for k in r.kept]) for r in h.stats]
            gen = model.generate(**batch, max_new_tokens=6, do_sample=False)
        results[backend] = (logits, gen, kept)
    (l_t, g_t, k_t), (l_a, g_a, k_a) = results["torch"], results["auto"]
    assert k_t and k_t == k_a
    assert torch.allclose(l_t, l_a, atol=1e-4, rtol=1e-4), (l_t - l_a).abs().max()
    assert torch.equal(g_t, g_a)

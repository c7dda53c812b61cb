"""Trainable methods: modules on the handle (never on the model), gradients through the hooks, save/load
of only the method's parameters, and a model whose state_dict is untouched after remove()."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn

import vtok
from vtok.testing import llava_samples, left_pad_batch, tiny_llava
from vtok.method import POSITION_POLICIES, Method, hparam, keep_count


@dataclass
class LearnedGate(Method):
    """Test method: a linear scorer over the projected tokens keeps the top ``retain`` of each image and
    scales each kept token by 2*sigmoid(score), so the scorer gets gradients from the LM's loss."""

    name = "t_gate"
    stages = ("before_llm",)
    retain: float = hparam(0.5, "fraction kept", type=float, range="(0, 1]")
    position_policy: str = hparam("compact", "positions", choices=POSITION_POLICIES)

    def build(self, dims, parts):
        return {"score": nn.Linear(dims["llm_hidden"], 1)}

    def before_llm(self, tokens, probes):
        lin = self.modules["score"]
        s = lin(tokens.features.to(lin.weight.dtype)).squeeze(-1).masked_fill(~tokens.mask, -1e4)
        feats = tokens.features * (2 * torch.sigmoid(s)).unsqueeze(-1).to(tokens.features.dtype)
        keep = [s[u, : int(n)].detach().topk(keep_count(int(n), self.retain)).indices for u, n in enumerate(tokens.counts())]
        return replace(tokens, features=feats).select_indices(keep)


@pytest.fixture
def setup():
    model = tiny_llava(seed=3)
    batch = left_pad_batch(llava_samples(model, [(3, 1, 4), (5, 1, 2)], seed=1))
    batch.pop("position_ids", None)
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), -100)
    labels = labels.masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    return model, batch, labels


def test_train_save_load_and_an_untouched_model(setup, tmp_path):
    model, batch, labels = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.requires_grad_(False)
    h = vtok.apply(model, LearnedGate(retain=0.5))
    params = list(h.parameters())
    assert [tuple(p.shape) for p in params] == [(1, 64), (1,)]
    assert not any(p is q for p in params for q in model.parameters())
    assert not any("t_gate" in k or "score" in k for k in model.state_dict())
    h.train()
    assert h.modules.training
    opt = torch.optim.Adam(params, lr=0.05)
    losses = []
    for _ in range(15):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        assert params[0].grad is not None and params[0].grad.abs().sum() > 0  # gradients reach the method
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 1e-3, losses
    h.eval()
    assert not h.modules.training
    with torch.no_grad():
        trained = model(**batch).logits
    path = tmp_path / "gate.safetensors"
    h.save(path)
    h.remove()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # bit-identical
    with vtok.apply(model, LearnedGate(retain=0.5), weights=path) as h2, torch.no_grad():
        assert torch.equal(model(**batch).logits, trained)
        assert h2.modules["t_gate"]["score"].weight.dtype == next(model.parameters()).dtype
    with pytest.raises(ValueError, match="holds weights of the methods \\['t_gate'\\]"):
        vtok.apply(model, "random", weights=path)
    assert not hasattr(model, "_vtok_handle")


def test_save_without_trainable_modules_is_refused(setup, tmp_path):
    model, batch, _ = setup
    with vtok.apply(model, "random") as h:
        with pytest.raises(ValueError, match="has trainable modules"):
            h.save(tmp_path / "x.safetensors")

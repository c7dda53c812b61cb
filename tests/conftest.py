"""Shared fixtures: tiny models per adapter (built once per session) and the method x adapter matrix."""

from __future__ import annotations


import pytest
import torch

import capability_methods  # noqa: F401  (registers the in-LLM capability test methods)

import vtok
from vtok.adapters import find_adapter
from vtok.method import get_method_class
from vtok.testing import TINY_CASES

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

_MODELS: dict = {}


@pytest.fixture(autouse=True)
def _untrained_modules_allowed(request, monkeypatch):
    """Registry-driven tests check the mechanics of every method, trained or not: a method that refuses
    to run untrained (``needs_weights``) runs here with its fresh modules, except in tests marked
    ``weights_guard`` (which check that refusal)."""
    if request.node.get_closest_marker("weights_guard") is None:
        monkeypatch.setattr(vtok.api.Handle, "check_trained", lambda self: None)


def tiny_model(case_name: str):
    if case_name not in _MODELS:
        _MODELS[case_name] = TINY_CASES[case_name].build()
    return _MODELS[case_name]


def tiny_processor(case_name: str):
    """The processor (or tokenizer) a user of the tiny case would pass as ``vtok.apply(..., processor=...)``
    (methods that read the question or ask the model need one), or None; built once per session."""
    key = ("processor", case_name)
    if key not in _MODELS:
        _MODELS[key] = TINY_CASES[case_name].make_processor(tiny_model(case_name))
    return _MODELS[key]


def supported_pairs(kind=None, stage=None):
    """(case, method) pairs where the case's adapter runs every stage of the method."""
    pairs = []
    for case_name, case in TINY_CASES.items():
        if kind is not None and case.kind != kind:
            continue
        adapter = find_adapter(tiny_model(case_name))
        for name in vtok.list_methods():
            cls = get_method_class(name)
            if stage is not None and stage not in cls.stages:
                continue
            if set(cls.stages) <= set(adapter.stages):
                pairs.append(pytest.param(case_name, name, id=f"{case_name}-{name}"))
    return pairs


@pytest.fixture(scope="session", autouse=True)
def _triton_interpreter_any_import_order():
    """CPU kernel tests run under Triton's interpreter in a process that may also compile kernels:
    launch through the test utility that tolerates either import order (see triton_interp.py)."""
    from vtok.kernels import _common

    if not _common.HAS_TRITON:
        yield
        return
    from triton_interp import interpreted_any_import_order

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_common, "interpreted", interpreted_any_import_order)
        yield


@pytest.fixture
def make_method():
    def make(name, **override):
        cls = get_method_class(name)
        return cls(**{**cls.example, **override})

    return make

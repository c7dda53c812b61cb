"""The transformers compatibility policy: one module, a tested lower bound, no deprecated calls."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import supported_pairs, tiny_model, tiny_processor

import vtok
from vtok import hf_compat
from vtok.method import get_method_class
from vtok.testing import TINY_CASES

ROOT = Path(__file__).resolve().parents[1]


def test_lower_bound_is_the_one_pyproject_admits():
    text = (ROOT / "pyproject.toml").read_text()
    (bound,) = re.findall(r'"transformers>=([0-9.]+)', text)
    assert hf_compat.MIN_TRANSFORMERS.startswith(bound), (bound, hf_compat.MIN_TRANSFORMERS)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "MIN_TRANSFORMERS" in ci, ".ci/run must test the oldest admitted transformers"


def test_private_transformers_imports_live_in_the_compat_module():
    """transformers' private modules (masking_utils, modeling_* helpers, ...) are reached only through
    vtok.hf_compat; public classes (configs, models, processors) may be imported anywhere."""
    private = re.compile(r"from transformers\.(masking_utils|cache_utils|integrations|utils|generation|modeling_utils)")
    offenders = []
    for folder in ("vtok", "adapters", "eval", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "hf_compat.py":
                continue
            text = path.read_text()
            if private.search(text) or "sys.modules[type(" in text or re.search(r"\._attn_implementation", text):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


@pytest.mark.parametrize("case_name,method", supported_pairs(kind="vlm"))
def test_generate_with_a_method_warns_nothing(case_name, method):
    """No deprecation warning (FutureWarning, or transformers' own logged one) comes from vtok's calls."""
    case, model = TINY_CASES[case_name], tiny_model(case_name)
    batch = case.batch(case.make_samples(model, case.specs, 0))
    batch.pop("position_ids", None)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            method_ = get_method_class(method)(**get_method_class(method).example)
            with vtok.apply(model, method_, processor=tiny_processor(case_name)):
                with torch.no_grad():
                    model.generate(**batch, max_new_tokens=2, do_sample=False)
    finally:
        logger.removeHandler(handler)
    deprecations = [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]
    assert not deprecations, deprecations

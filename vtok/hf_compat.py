"""Every place vtok depends on transformers internals, in one module; the rest of vtok calls this.

Each helper detects the feature (a keyword in a signature, a field of an output class, an attribute
of a modelling module) rather than reading the version string, and names the releases it covers.
Tested by CI at both ends of the range ``pyproject.toml`` admits (``MIN_TRANSFORMERS`` and newest).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys

import torch

__all__ = [
    "MIN_TRANSFORMERS",
    "cache_from_kwargs",
    "output_cache",
    "cache_kwarg",
    "is_kv_cache",
    "new_kv_cache",
    "causal_mask",
    "rotary_fn",
    "attn_implementation",
    "precomputed_visual_features",
    "family_module",
]

#: The oldest transformers release vtok supports; keep equal to the lower bound in pyproject.toml.
#: Below it: ``create_causal_mask`` has no ``layer_idx`` before 5.14 (after in-LLM pruning the
#: layers from K on hold a shorter KV cache than layer 0, and a decode step's mask must be sized from
#: the cache of the layer it is for), and DINOv2's attention has no ``q_proj``/``k_proj`` before 5.18.
MIN_TRANSFORMERS = "5.18.0"

#: The keyword a model's forward (and generate's calls of it) use for the KV cache:
#: ``past_key_values`` in 5.18-5.23, ``cache`` from 5.24 (where the old name still works, with a warning).
_CACHE_KEYS = ("cache", "past_key_values")


def cache_from_kwargs(kwargs: dict):
    """The KV cache a forward was called with, under either name (5.18-5.23: past_key_values; 5.24+: cache)."""
    for key in _CACHE_KEYS:
        cache = kwargs.get(key)
        if cache is not None:
            return cache
    return None


def cache_kwarg(model) -> str:
    """The keyword ``model.forward`` / ``generate`` take the KV cache by (``cache`` from 5.24)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output):
    """The cache a model output carries (field ``cache`` from 5.24, ``past_key_values`` before).

    Read through the dataclass fields so that 5.24's deprecated ``past_key_values`` property (which
    logs a warning) is never touched.
    """
    names = {f.name for f in dataclasses.fields(output)} if dataclasses.is_dataclass(output) else set()
    for key in _CACHE_KEYS:
        if key in names:
            return getattr(output, key)
    return None


def is_kv_cache(value) -> bool:
    """Whether ``value`` is a transformers KV cache (``transformers.cache_utils.Cache``, 5.18+)."""
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


def new_kv_cache(config):
    """An empty KV cache as a decoder's prefill makes one (``DynamicCache(config=...)``, 5.18+)."""
    from transformers import DynamicCache

    return DynamicCache(config=config)


@functools.cache
def _causal_mask_params() -> frozenset:
    from transformers.masking_utils import create_causal_mask

    return frozenset(inspect.signature(create_causal_mask).parameters)


def causal_mask(config, inputs_embeds, attention_mask, cache, position_ids, layer_idx):
    """transformers' own ``create_causal_mask`` for decoder layer ``layer_idx``, so that the user's
    attention implementation (SDPA, FlashAttention, flex, eager) builds its mask from a 2-D one.

    5.18-5.23 name the cache ``past_key_values``, 5.24+ ``cache`` (the old name is deprecated, removed
    in 5.40); ``layer_idx`` sizes the mask from that layer's cache length.
    """
    from transformers.masking_utils import create_causal_mask

    params = _causal_mask_params()
    kw = dict(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids)
    kw["cache" if "cache" in params else "past_key_values"] = cache
    if "layer_idx" in params:
        kw["layer_idx"] = layer_idx
    return create_causal_mask(**kw)


def family_module(module: torch.nn.Module):
    """The transformers modelling module a model class lives in (its private helpers)."""
    return sys.modules[type(module).__module__]


def rotary_fn(attn_module):
    """The ``apply_rotary_pos_emb(q, k, cos, sin)`` of an attention module's modelling file.

    Every Llama-style family in 5.18+ defines it at module level (the probes reuse the model's own RoPE).
    """
    fn = getattr(family_module(attn_module), "apply_rotary_pos_emb", None)
    if fn is None:
        raise ValueError(
            f"cannot compute attention probes for {type(attn_module).__name__}: its module has no apply_rotary_pos_emb"
        )
    return fn


def attn_implementation(config) -> str | None:
    """The attention implementation a config selected (``config._attn_implementation``, 5.18+)."""
    return getattr(config, "_attn_implementation", None)


def precomputed_visual_features(kwargs: dict):
    """``mm_encoder_outputs``: the visual features ``generate`` computes before the prefill forward
    (5.18+); None when the caller's forward runs the vision tower itself."""
    return kwargs.get("mm_encoder_outputs")


def replace_precomputed_visual_features(kwargs: dict, outputs) -> None:
    """Hand the forward ``outputs`` instead of the pre-computed visual features it was called with."""
    kwargs["mm_encoder_outputs"] = outputs

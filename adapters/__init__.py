"""Model-family adapters. ``find_adapter(model)`` picks the one that knows a model."""

from __future__ import annotations

from .base import Adapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .vit import HFVisionAdapter, OpenClipViTAdapter, TimmViTAdapter

__all__ = ["Adapter", "ADAPTERS", "find_adapter", "list_adapters"]

#: every adapter, most specific first
ADAPTERS: list[type[Adapter]] = [
    LlavaOnevisionAdapter,
    LlavaNextAdapter,
    LlavaAdapter,
    HFVisionAdapter,
    TimmViTAdapter,
    OpenClipViTAdapter,
]


def list_adapters() -> list[str]:
    return [a.name for a in ADAPTERS]


def find_adapter(model) -> type[Adapter]:
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls
    raise ValueError(
        f"vtok has no adapter for {type(model).__name__}; supported model families: "
        + ", ".join(f"{a.name} ({', '.join(a.model_classes)})" for a in ADAPTERS)
    )

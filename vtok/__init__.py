"""vtok: visual-token compression for vision-language models and ViTs.

    handle = vtok.apply(model, "fastv", retain=0.5)   # the model's forward/generate keep working
    handle.stats                                       # what the last prefill reduced
    handle.remove()                                    # the model is exactly as before
"""

from .api import Handle, apply
from .method import (
    LLMAttention,
    LLMView,
    Method,
    Probe,
    TextQuery,
    ViTAttention,
    ViTKeyCorrelation,
    describe,
    hparam,
    list_methods,
    register,
)
from .stats import Reduction
from .tokens import VisualTokens

__version__ = "0.1.0"

__all__ = [
    "apply",
    "Handle",
    "list_methods",
    "describe",
    "register",
    "hparam",
    "Method",
    "Probe",
    "ViTAttention",
    "ViTKeyCorrelation",
    "LLMAttention",
    "TextQuery",
    "LLMView",
    "Reduction",
    "VisualTokens",
]

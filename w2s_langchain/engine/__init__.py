"""The llama.cpp layer: loaded models, contexts of many branches, sampling.

It knows llama.cpp and nothing of search.
"""

from .context import Branch, Context, ContextStats
from .model import LoadSettings, Model, load_model
from .sampling import Distribution, SamplingSettings, log_softmax_at, warp

__all__ = [
    "Branch",
    "Context",
    "ContextStats",
    "Distribution",
    "LoadSettings",
    "Model",
    "SamplingSettings",
    "load_model",
    "log_softmax_at",
    "warp",
]

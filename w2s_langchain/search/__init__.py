"""The search layer: W2S-AlignTree and its baselines over a small model interface
(the engine's contexts and the weak proxy). It knows nothing of LangChain."""

from .proxy import Proxy, ProxyState, WeakScorer
from .result import SearchCost, SearchResult
from .settings import SearchSettings
from .strategies import SearchModels, search
from .strong import Chunk, StrongModel
from .tree import Node

__all__ = [
    "Chunk",
    "Node",
    "Proxy",
    "ProxyState",
    "SearchCost",
    "SearchModels",
    "SearchResult",
    "SearchSettings",
    "StrongModel",
    "WeakScorer",
    "search",
]

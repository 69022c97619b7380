"""w2s_langchain: a strong local model answers the way a small aligned model prefers.

W2S-AlignTree (arXiv 2511.11518) over llama.cpp GGUF models.
"""

import importlib

__version__ = "0.1.0"

__all__ = ["ChatW2SAligned", "W2SAlignedLLM", "W2SAlignedLlamaIndexLLM"]

# Where each component lives. They load on first use, so `import w2s_langchain`
# (and every command and engine module under it) stays cheap, and LlamaIndex is
# imported only by whoever uses its component.
_COMPONENTS = {
    "W2SAlignedLLM": "llms",
    "ChatW2SAligned": "chat_models",
    "W2SAlignedLlamaIndexLLM": "llamaindex_llm",
}


def __getattr__(name: str):
    if name in _COMPONENTS:
        return getattr(importlib.import_module(f".{_COMPONENTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

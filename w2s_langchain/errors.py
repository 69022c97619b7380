"""Exceptions raised by w2s_langchain.

Each one is raised before anything the user owns is touched, and its message says
what to do next. They subclass the built-in exception a caller would catch anyway
(``ValueError`` for bad settings, ``FileNotFoundError`` for missing files, ...).
"""

from __future__ import annotations


class W2SError(Exception):
    """Base class of every error this package raises on purpose."""


# --- models and the registry -------------------------------------------------


class UnknownModelError(W2SError, ValueError):
    """A model name that is neither in the registry nor a path to a file."""


class ModelNotPulledError(W2SError, FileNotFoundError):
    """A registry model whose GGUF file has not been pulled yet."""


class ChecksumMismatchError(W2SError, ValueError):
    """A file whose size or sha256 differs from the registry's."""


class PullError(W2SError, RuntimeError):
    """Fetching, joining or storing a model's weights failed (pip, a full disk, a
    models directory that cannot be written)."""


# --- the engine ----------------------------------------------------------------


class ModelLoadError(W2SError, ValueError):
    """llama.cpp refused a file: not GGUF, truncated, or an unsupported model."""


class ContextOverflowError(W2SError, ValueError):
    """A token sequence longer than the context can hold."""


class ContextCreationError(W2SError, RuntimeError):
    """llama.cpp could not create a context (usually: not enough memory)."""


class ContextFullError(W2SError, RuntimeError):
    """The KV cache has no room left even after evicting every other branch."""


class DecodeError(W2SError, RuntimeError):
    """llama_decode failed for a reason other than a full KV cache."""


class ServerError(W2SError, RuntimeError):
    """A llama-server answered with an error (a refused API key, a bad request)."""


class ServerUnavailableError(ServerError, ConnectionError):
    """A llama-server that cannot be reached, stopped answering, or is still loading."""


# --- the search ------------------------------------------------------------------


class SearchTimeoutError(W2SError, TimeoutError):
    """A search ran past its `timeout` (set `partial_answer` to get the best
    answer found so far instead)."""


class SearchCancelledError(W2SError):
    """A search stopped because its caller cancelled it."""


# --- prompts ---------------------------------------------------------------------


class ChatTemplateError(W2SError, ValueError):
    """A chat template (code inside a model file) that fails, reaches for Python
    internals, or runs too long or builds too much while rendering."""

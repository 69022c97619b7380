"""The search behind every aligned component, whatever the framework.

Shared aligners (models load once per process), one search call with a call's
overrides, cancellation of a search an async caller gave up on, progress as a
plain callback, and a result cut into the pieces a stream hands on. The LangChain
and LlamaIndex components are thin adapters over `AlignedSearch`.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import PrivateAttr

from .fields import AlignedModelSettings, search_overrides
from ..service.aligner import Aligner, AlignerConfig, load_named_model
from ..engine import Model
from ..engine.server import ServerModel
from ..prompts import Prompt
from ..search import SearchResult
from ..search.strategies import Progress

# The cancel event of the async call a worker thread runs for (see `in_thread`).
_cancel_event: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("w2s_cancel", default=None)

_T = TypeVar("_T")


async def in_thread(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run a blocking call (one that searches) in a worker thread without
    blocking the event loop. Cancelling the awaiting task stops the search at
    its next decode step, so it frees its sequences and the models' lock
    instead of running on unseen."""
    cancel = threading.Event()
    token = _cancel_event.set(cancel)  # to_thread copies this context into the thread
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except asyncio.CancelledError:
        cancel.set()
        raise
    finally:
        _cancel_event.reset(token)


# Weak values: an aligner, its contexts and its models live as long as some
# component uses them, and are freed with the last one.
_aligners: weakref.WeakValueDictionary[tuple, Aligner] = weakref.WeakValueDictionary()
_aligners_lock = threading.Lock()


def shared_aligner(config: AlignerConfig) -> Aligner:
    """One aligner (its contexts) per set of models and runtime settings, process-wide."""
    key = (config.strong, config.weak, config.weak_ref, config.runtime)
    with _aligners_lock:
        aligner = _aligners.get(key)
        if aligner is None:
            aligner = _aligners[key] = Aligner(config)
        return aligner


class AlignedSearch(AlignedModelSettings):
    """A component's fields and the search they run."""

    _aligner: Aligner | None = PrivateAttr(default=None)  # keeps the shared models alive

    def get_num_tokens(self, text: str) -> int:
        """Tokens of `text` for the strong model's tokenizer."""
        return len(self._strong_model().tokenize(text))

    def _strong_model(self) -> Model | ServerModel:
        """The strong model (loaded on first use, or asked of its server; shared)."""
        config = self._config
        return load_named_model(config.strong.model, config.runtime)

    def _search(
        self, prompt: Prompt, stop: list[str] | None, overrides: Mapping[str, Any], progress: Progress | None = None
    ) -> SearchResult:
        """One search with a call's settings (`overrides`, and `stop` added to the
        stop strings); `in_thread`'s caller can cancel it."""
        config = self._config
        if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) for s in stop)):
            raise TypeError(f"stop must be a list of strings, got {stop!r}")
        settings = config.search.with_(**search_overrides(overrides))
        if stop:
            settings = settings.with_(stop=tuple(settings.stop) + tuple(stop))
        self._aligner = shared_aligner(config)
        return self._aligner.search(prompt, settings, progress, _cancel_event.get())


def generation_info(result: SearchResult) -> dict[str, Any]:
    """The search's report: the result without the prompt and the answer."""
    info = result.to_dict()
    info.pop("prompt")
    info.pop("text")
    return info


@dataclass(frozen=True)
class StreamPiece:
    """One piece of an answer handed on as a stream."""

    text: str
    """This piece: a few words."""
    answer_so_far: str
    """The answer up to and with this piece."""
    report: dict[str, Any] | None
    """The search's report (`generation_info`), on the last piece only."""

    @property
    def last(self) -> bool:
        return self.report is not None


def stream_pieces(result: SearchResult, words: int = 3) -> list[StreamPiece]:
    """The answer in pieces of a few words, keeping every character (the search
    has to finish before the answer is known, so a stream replays it)."""
    texts, current, count = [], "", 0
    for ch in result.text:
        current += ch
        if ch.isspace() and current.strip():
            count += 1
            if count == words:
                texts.append(current)
                current, count = "", 0
    if current or not texts:
        texts.append(current)
    pieces, so_far = [], ""
    for i, text in enumerate(texts):
        so_far += text
        pieces.append(StreamPiece(text, so_far, generation_info(result) if i == len(texts) - 1 else None))
    return pieces

"""The search behind every aligned component, whatever the framework.

Shared aligners (models load once per process), one search call with a call's
overrides, cancellation of a search an async caller gave up on, progress as a
plain callback, and a result cut into the pieces a stream hands on. The LangChain
and LlamaIndex components are thin adapters over `AlignedSearch`.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import PrivateAttr

from ..engine import Model
from ..engine.server import ServerModel
from ..prompts import Prompt
from ..search import SearchResult
from ..search.strategies import Progress
from ..service.aligner import Aligner, AlignerConfig, prompt_room
from .fields import AlignedModelSettings, search_overrides

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


async def iterate_in_thread(items: Iterator[_T]) -> AsyncIterator[_T]:
    """A blocking iterator (one that searches) as an async one: each item is
    fetched in a worker thread, so the event loop goes on. Cancelling the
    consumer stops the search at its next decode step."""
    cancel = threading.Event()
    context = contextvars.copy_context()  # every fetch runs in it: the search sees this cancel
    context.run(_cancel_event.set, cancel)
    loop = asyncio.get_running_loop()
    try:
        while (item := await loop.run_in_executor(None, context.run, next, items, _END)) is not _END:
            yield item
    except BaseException:
        cancel.set()
        raise


_END: Any = object()


# Weak values: an aligner, its contexts and its models live as long as some
# component uses them, and are freed with the last one.
_aligners: weakref.WeakValueDictionary[tuple, Aligner] = weakref.WeakValueDictionary()
_aligners_lock = threading.Lock()


def shared_aligner(config: AlignerConfig) -> Aligner:
    """One aligner (its contexts) per set of models and runtime settings, process-wide."""
    # Whether the strong address came from a preset file decides which key it gets.
    key = (config.strong, config.weak, config.weak_ref, config.runtime, config.strong_from_preset_file)
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

    def context_window(self) -> int:
        """Tokens a call can really use, prompt and answer together: the longest
        prompt whose search keeps its whole tree resident in every context
        (`aligner.prompt_room`), plus max_new_tokens. Loads the models (or asks
        the strong model's server). A RAG pipeline should fill no more than this
        minus max_new_tokens with retrieved text."""
        config = self._config
        return prompt_room(config) + config.search.max_new_tokens

    def _strong_model(self) -> Model | ServerModel:
        """The strong model (loaded on first use, or asked of its server; shared)."""
        return self._config.strong_model()

    def _search(
        self,
        prompt: Prompt,
        stop: list[str] | None,
        overrides: Mapping[str, Any],
        progress: Progress | None = None,
        on_commit: Callable[[str], None] | None = None,
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
        return self._aligner.search(prompt, settings, progress, _cancel_event.get(), on_commit)

    def _search_pieces(
        self, prompt: Prompt, stop: list[str] | None, overrides: Mapping[str, Any], progress: Progress | None = None
    ) -> Iterator[StreamPiece]:
        """The answer as a stream: a streaming search's (`commit_every`) pieces as
        it commits them, then the rest of the answer in pieces of a few words, the
        last carrying the result. The search runs in a worker thread meanwhile;
        leaving the stream early (or cancelling the async caller) stops it."""
        pieces: queue.Queue[tuple[str, Any]] = queue.Queue()
        cancel = _cancel_event.get() or threading.Event()

        def run() -> None:
            _cancel_event.set(cancel)
            try:
                pieces.put(("result", self._search(prompt, stop, overrides, progress, lambda text: pieces.put(("text", text)))))
            except BaseException as error:  # handed to the consumer, who raises it
                pieces.put(("error", error))

        worker = threading.Thread(target=contextvars.copy_context().run, args=(run,), name="w2s-search", daemon=True)
        worker.start()
        so_far = ""
        try:
            while True:
                kind, value = pieces.get()
                if kind == "error":
                    raise value
                if kind == "result":
                    yield from stream_pieces(value, after=so_far)
                    return
                so_far += value
                yield StreamPiece(value, so_far, None)
        finally:
            cancel.set()  # the search has ended, or nobody reads on: stop it
            worker.join()


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
    """This piece: a few words, or a chunk a streaming search committed."""
    answer_so_far: str
    """The answer up to and with this piece."""
    result: SearchResult | None
    """The search's result, on the last piece only."""

    @property
    def last(self) -> bool:
        return self.result is not None

    @property
    def report(self) -> dict[str, Any] | None:
        """The search's report (`generation_info`), on the last piece only."""
        return generation_info(self.result) if self.result is not None else None


def stream_pieces(result: SearchResult, words: int = 3, after: str = "") -> list[StreamPiece]:
    """The answer past its first `after` characters (what a stream has handed on
    already), in pieces of a few words, keeping every character; the last piece
    (empty when nothing is left) carries the result."""
    texts, current, count = [], "", 0
    for ch in result.text[len(after) :]:
        current += ch
        if ch.isspace() and current.strip():
            count += 1
            if count == words:
                texts.append(current)
                current, count = "", 0
    if current or not texts:
        texts.append(current)
    pieces, so_far = [], after
    for i, text in enumerate(texts):
        so_far += text
        pieces.append(StreamPiece(text, so_far, result if i == len(texts) - 1 else None))
    return pieces

"""What the LangChain components (the LLM and the chat model) share: the search
reporting its progress to a run's callbacks, tracing parameters, and the async
methods, which run the sync ones in a worker thread."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManager, CallbackManagerForLLMRun

from ..prompts import Prompt
from ..search import SearchResult
from ..search.strategies import Progress
from .fields import ALIASES, search_overrides
from .search_call import AlignedSearch, StreamPiece, in_thread, iterate_in_thread


class LangChainAligned(AlignedSearch):
    """The aligned search as a LangChain language model."""

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of `text` for the strong model's tokenizer (not GPT-2's)."""
        return self._strong_model().tokenize(text)

    def configurable_fields(self, **fields: Any) -> Any:
        """LangChain's `configurable_fields`, with a setting's usual name accepted
        (`max_tokens` configures `max_new_tokens`)."""
        return super().configurable_fields(**{ALIASES.get(name, name): field for name, field in fields.items()})

    def _search_for_run(
        self, prompt: Prompt, stop: list[str] | None, run_manager: CallbackManagerForLLMRun | None, kwargs: dict[str, Any]
    ) -> SearchResult:
        """`_search`, its progress sent to the run's callbacks as "w2s_progress"
        custom events (astream_events shows them as "on_custom_event")."""
        return self._search(prompt, stop, kwargs, _progress_events(run_manager))

    def _pieces_for_run(
        self, prompt: Prompt, stop: list[str] | None, run_manager: CallbackManagerForLLMRun | None, kwargs: dict[str, Any]
    ) -> Iterator[StreamPiece]:
        """`_search_pieces` (the answer as the search makes it final), its progress
        sent to the run's callbacks as `_search_for_run` does."""
        return self._search_pieces(prompt, stop, kwargs, _progress_events(run_manager))

    # The search is CPU-bound: each async method runs its sync twin in a worker
    # thread (as langchain-core's defaults do), so the event loop goes on, and
    # cancelling the caller stops the search.

    async def _agenerate(
        self, input: Any, stop=None, run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any
    ) -> Any:
        return await in_thread(self._generate, input, stop, run_manager.get_sync() if run_manager else None, **kwargs)

    async def _astream(
        self, input: Any, stop=None, run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        sync_manager = run_manager.get_sync() if run_manager else None
        async for chunk in iterate_in_thread(self._stream(input, stop, sync_manager, **kwargs)):
            yield chunk

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        """What tracing (LangSmith) records about a call."""
        params = super()._get_ls_params(stop=stop, **kwargs)
        search = self._config.search
        call = search_overrides(kwargs)
        params.update(
            ls_provider="w2s_langchain",
            ls_model_name=kwargs.get("model", self._model_name),  # langchain-tests: a call's `model` wins
            ls_temperature=call.get("temperature", search.temperature),
            ls_max_tokens=call.get("max_new_tokens", search.max_new_tokens),
            # The weak pair that steers it, as the registry names or files they were given as.
            w2s_weak_model=self._config.weak.model,
            w2s_weak_ref_model=self._config.weak_ref.model,
        )
        return params


def _progress_events(run_manager: CallbackManagerForLLMRun | None) -> Progress | None:
    """A search's progress as "w2s_progress" custom events of the run."""
    if run_manager is None:
        return None
    events = CallbackManager(run_manager.handlers, tags=run_manager.tags, metadata=run_manager.metadata)

    def progress(done: int, total: int, what: str) -> None:
        events.on_custom_event("w2s_progress", {"done": done, "total": total, "what": what}, run_id=run_manager.run_id)

    return progress

"""`W2SAlignedLLM`: W2S-AlignTree behind LangChain's `LLM` interface.

    llm = W2SAlignedLLM(iterations=40)             # the "sentiment" preset's models
    llm.invoke("The hotel room was")               # a search; returns the answer
    llm.invoke("The hotel room was", iterations=80, stop=["\\n"])   # per call
    chain = prompt | llm | StrOutputParser()       # LCEL
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from pydantic import ConfigDict

from ._component.search_call import generation_info, shared_aligner, stream_pieces
from ._component.fields import search_overrides
from ._component.langchain_base import LangChainAligned
from .search import SearchResult


class W2SAlignedLLM(LangChainAligned, LLM):
    """A strong local GGUF model whose answers two weak GGUF models steer
    (W2S-AlignTree). See `AlignedModelSettings` for the fields."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @property
    def _llm_type(self) -> str:
        return "w2s-aligned"

    def generate(self, prompts: list[str], stop=None, callbacks=None, **kwargs: Any) -> LLMResult:
        llm, kwargs = self._with_call_settings(kwargs)
        return super(W2SAlignedLLM, llm).generate(prompts, stop, callbacks, **kwargs)

    async def agenerate(self, prompts: list[str], stop=None, callbacks=None, **kwargs: Any) -> LLMResult:
        llm, kwargs = self._with_call_settings(kwargs)
        return await super(W2SAlignedLLM, llm).agenerate(prompts, stop, callbacks, **kwargs)

    def _with_call_settings(self, kwargs: dict[str, Any]) -> tuple[W2SAlignedLLM, dict[str, Any]]:
        """A call's search settings (`invoke(p, iterations=5)`, `.bind(...)`) as the
        fields of a copy of this LLM, and the call's other keywords (tags, metadata,
        run_name, run_id). langchain-core keys its LLM cache on an LLM's fields and
        `stop` only, so a copy that holds them is cached and looked up under its own
        settings, and tracing shows them."""
        settings = {k: v for k, v in kwargs.items() if k not in _GENERATE_KEYWORDS}
        if not settings:
            return self, kwargs
        overrides = search_overrides(settings)
        self._config.search.with_(**overrides)  # checks names and values before anything runs
        # The copy shares this LLM's models, which outlive it.
        self._aligner = shared_aligner(self._config)
        copy = self.model_copy(update=overrides)
        return copy, {k: v for k, v in kwargs.items() if k in _GENERATE_KEYWORDS}

    def _call(self, prompt: str, stop: list[str] | None = None, run_manager=None, **kwargs: Any) -> str:
        return self._search_for_run(prompt, stop, run_manager, kwargs).text

    def _generate(self, prompts: list[str], stop=None, run_manager=None, **kwargs: Any) -> LLMResult:
        results = []
        for prompt in prompts:
            results.append(self._search_for_run(prompt, stop, run_manager, kwargs))
            if self.streaming and run_manager:  # as LangChain's LlamaCpp does: the callbacks get the pieces
                for chunk in _chunks(results[-1]):
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
        return self._llm_result(results)

    def _llm_result(self, results: list[SearchResult]) -> LLMResult:
        """The answers, each with the search's report; `token_usage` counts prompt and
        answer tokens (what each search sampled is in its `generation_info["cost"]`)."""
        usage = {
            "prompt_tokens": sum(r.cost.prompt_tokens for r in results),
            "completion_tokens": sum(r.cost.answer_tokens for r in results),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        generations = [[Generation(text=r.text, generation_info=generation_info(r))] for r in results]
        return LLMResult(generations=generations, llm_output={"token_usage": usage, "model_name": self._model_name})

    def _stream(
        self, prompt: str, stop=None, run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any
    ) -> Iterator[GenerationChunk]:
        """While the search runs, progress goes to the callbacks as "w2s_progress"
        custom events. A streaming search (`commit_every`) hands on each chunk of
        the answer as it commits it; the rest of the answer (all of it, for the
        whole-tree search, which knows it only at its end) comes in pieces of a
        few words, the last one carrying the search's report."""
        for piece in self._pieces_for_run(prompt, stop, run_manager, kwargs):
            chunk = GenerationChunk(text=piece.text, generation_info=piece.report)
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


# The keywords of BaseLLM.generate that are not search settings.
_GENERATE_KEYWORDS = ("tags", "metadata", "run_name", "run_id")


def _chunks(result: SearchResult) -> list[GenerationChunk]:
    """The answer in pieces of a few words; the last carries the search's report."""
    return [GenerationChunk(text=piece.text, generation_info=piece.report) for piece in stream_pieces(result)]

"""`W2SAlignedLLM`: W2S-AlignTree behind LangChain's `LLM` interface.

    llm = W2SAlignedLLM(iterations=40)             # the "sentiment" preset's models
    llm.invoke("The hotel room was")               # a search; returns the answer
    llm.invoke("The hotel room was", iterations=80, stop=["\\n"])   # per call
    chain = prompt | llm | StrOutputParser()       # LCEL
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from pydantic import ConfigDict

from .aligned_settings import LangChainAligned, answer_pieces, generation_info, in_thread
from .search import SearchResult


class W2SAlignedLLM(LangChainAligned, LLM):
    """A strong local GGUF model whose answers two weak GGUF models steer
    (W2S-AlignTree). See `AlignedModelSettings` for the fields."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @property
    def _llm_type(self) -> str:
        return "w2s-aligned"

    def _call(self, prompt: str, stop: list[str] | None = None, run_manager=None, **kwargs: Any) -> str:
        return self._search(prompt, stop, run_manager, kwargs).text

    def _generate(self, prompts: list[str], stop=None, run_manager=None, **kwargs: Any) -> LLMResult:
        generations, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for prompt in prompts:
            result = self._search(prompt, stop, run_manager, kwargs)
            generations.append([Generation(text=result.text, generation_info=generation_info(result))])
            usage["prompt_tokens"] += result.cost.prompt_tokens
            usage["completion_tokens"] += result.cost.strong_tokens_sampled
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return LLMResult(generations=generations, llm_output={"token_usage": usage, "model_name": self.model_name})

    async def _agenerate(
        self, prompts: list[str], stop=None, run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any
    ) -> LLMResult:
        """`_generate` in a worker thread; cancelling the caller stops the search."""
        return await in_thread(self._generate, prompts, stop, run_manager.get_sync() if run_manager else None, **kwargs)

    def _stream(
        self, prompt: str, stop=None, run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any
    ) -> Iterator[GenerationChunk]:
        """The search has to finish before the answer is known; while it runs,
        progress goes to the callbacks as "w2s_progress" custom events. Then the
        answer comes in pieces of a few words."""
        result = self._search(prompt, stop, run_manager, kwargs)
        for chunk in _chunks(result):
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self, prompt: str, stop=None, run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any
    ) -> AsyncIterator[GenerationChunk]:
        result = await in_thread(self._search, prompt, stop, run_manager.get_sync() if run_manager else None, kwargs)
        for chunk in _chunks(result):
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


def _chunks(result: SearchResult) -> list[GenerationChunk]:
    """The answer in pieces of a few words; the last carries the search's report."""
    pieces = answer_pieces(result.text)
    last = len(pieces) - 1
    return [GenerationChunk(text=p, generation_info=generation_info(result) if i == last else None) for i, p in enumerate(pieces)]

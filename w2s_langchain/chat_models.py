"""`ChatW2SAligned`: W2S-AlignTree behind LangChain's chat model interface.

Each model renders the conversation with its own GGUF chat template (or the one a
prompt setting gives); the weak roles put their own system message first. The
strong model must have a chat template: pick an instruct model, e.g.

    chat = ChatW2SAligned(preset="chat")
    chat.invoke([("system", "Answer briefly."), ("human", "Describe your town.")])
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict

from .aligned_settings import LangChainAligned, answer_pieces, generation_info, in_thread
from .prompts import Message
from .search import SearchResult

_ROLE_OF = {SystemMessage: "system", HumanMessage: "user", AIMessage: "assistant"}


def to_conversation(messages: list[BaseMessage]) -> list[Message]:
    """LangChain messages as role/content messages; text content only."""
    conversation = []
    for message in messages:
        role = next((r for kind, r in _ROLE_OF.items() if isinstance(message, kind)), None)
        if role is None:
            raise ValueError(
                f"{type(message).__name__} is not supported: use system, human and AI messages (no tools)"
            )
        if not isinstance(message.content, str):
            text = [p.get("text", "") if isinstance(p, dict) else str(p) for p in message.content]
            if any(isinstance(p, dict) and p.get("type") not in (None, "text") for p in message.content):
                raise ValueError("only text content is supported (no images or other media)")
            conversation.append({"role": role, "content": "".join(text)})
        else:
            conversation.append({"role": role, "content": message.content})
    return conversation


def _usage(result: SearchResult) -> UsageMetadata:
    prompt, answer = result.cost.prompt_tokens, result.cost.strong_tokens_sampled
    return UsageMetadata(input_tokens=prompt, output_tokens=answer, total_tokens=prompt + answer)


class ChatW2SAligned(LangChainAligned, BaseChatModel):
    """A strong local GGUF chat model whose answers two weak GGUF models steer
    (W2S-AlignTree). See `AlignedModelSettings` for the fields."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @property
    def _llm_type(self) -> str:
        return "w2s-aligned-chat"

    def _generate(
        self, messages: list[BaseMessage], stop=None, run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any
    ) -> ChatResult:
        result = self._search(to_conversation(messages), stop, run_manager, kwargs)
        info = generation_info(result)
        message = AIMessage(
            content=result.text,
            usage_metadata=_usage(result),
            response_metadata={"model_name": self.model_name, "finish_reason": result.finish_reason, **info},
        )
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)])

    async def _agenerate(
        self, messages: list[BaseMessage], stop=None, run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any
    ) -> ChatResult:
        """`_generate` in a worker thread; cancelling the caller stops the search."""
        return await in_thread(self._generate, messages, stop, run_manager.get_sync() if run_manager else None, **kwargs)

    def _stream(
        self, messages: list[BaseMessage], stop=None, run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any
    ) -> Iterator[ChatGenerationChunk]:
        """Search progress goes to the callbacks as "w2s_progress" custom events;
        then the answer comes in pieces of a few words, the last one carrying the
        usage and the search's report."""
        result = self._search(to_conversation(messages), stop, run_manager, kwargs)
        for chunk in self._chunks(result):
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self, messages: list[BaseMessage], stop=None, run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any
    ) -> AsyncIterator[ChatGenerationChunk]:
        sync_manager = run_manager.get_sync() if run_manager else None
        result = await in_thread(self._search, to_conversation(messages), stop, sync_manager, kwargs)
        for chunk in self._chunks(result):
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def _chunks(self, result: SearchResult) -> list[ChatGenerationChunk]:
        pieces = answer_pieces(result.text)
        chunks = []
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            message = AIMessageChunk(
                content=piece,
                usage_metadata=_usage(result) if last else None,
                response_metadata={"model_name": self.model_name, "finish_reason": result.finish_reason} if last else {},
                chunk_position="last" if last else None,
            )
            chunks.append(ChatGenerationChunk(message=message, generation_info=generation_info(result) if last else None))
        return chunks

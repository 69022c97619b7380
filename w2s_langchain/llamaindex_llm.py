"""`W2SAlignedLlamaIndexLLM`: W2S-AlignTree as a LlamaIndex LLM.

Needs the optional extra: `pip install "w2s-langchain[llamaindex]"`.

    from llama_index.core import Settings
    Settings.llm = W2SAlignedLlamaIndexLLM(preset="chat", iterations=10)

The fields are the LangChain components' (see `AlignedModelSettings`); the models
and their contexts are shared with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from pydantic import ConfigDict

from .aligned_settings import AlignedModelSettings, answer_pieces, generation_info, in_thread
from .engine import load_model
from .prompts import Message

_ROLES = {MessageRole.SYSTEM: "system", MessageRole.USER: "user", MessageRole.ASSISTANT: "assistant"}


def to_conversation(messages: Sequence[ChatMessage]) -> list[Message]:
    conversation = []
    for message in messages:
        if message.role not in _ROLES:
            raise ValueError(f"messages with role {message.role.value!r} are not supported: use system, user, assistant")
        conversation.append({"role": _ROLES[message.role], "content": message.content or ""})
    return conversation


class W2SAlignedLlamaIndexLLM(AlignedModelSettings, CustomLLM):
    """A strong local GGUF model whose answers two weak GGUF models steer."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, arbitrary_types_allowed=True)

    @property
    def metadata(self) -> LLMMetadata:
        """With the strong model's real context window (loads the model if no n_ctx is set)."""
        config = self._config
        runtime = config.runtime
        n_ctx = runtime.n_ctx or runtime.context_size(load_model(config.strong.model, runtime.load_settings()))
        return LLMMetadata(
            context_window=n_ctx,
            num_output=config.search.max_new_tokens,
            is_chat_model=config.strong.prompt.format == "chat",
            model_name=self.model_name,
        )

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        result = self._search(prompt, None, None, kwargs)
        return CompletionResponse(text=result.text, raw=generation_info(result))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        result = self._search(prompt, None, None, kwargs)

        def pieces():
            text = ""
            for piece in answer_pieces(result.text):
                text += piece
                yield CompletionResponse(text=text, delta=piece)

        return pieces()

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        result = self._search(to_conversation(messages), None, None, kwargs)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=result.text), raw=generation_info(result))

    # The search is CPU-bound: the async methods run it in a thread so the event
    # loop keeps going, and cancelling the caller stops it.
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await in_thread(self.complete, prompt, formatted, **kwargs)

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await in_thread(self.chat, messages, **kwargs)

    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any):
        responses = await in_thread(lambda: list(self.stream_complete(prompt, formatted, **kwargs)))

        async def replay():
            for response in responses:
                yield response

        return replay()

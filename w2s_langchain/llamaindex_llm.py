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
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from pydantic import ConfigDict, Field, SecretStr, field_serializer

from ._component.search_call import AlignedSearch, generation_info, in_thread, iterate_in_thread
from .prompts import Message

_ROLES = {MessageRole.SYSTEM: "system", MessageRole.USER: "user", MessageRole.ASSISTANT: "assistant"}


def to_conversation(messages: Sequence[ChatMessage]) -> list[Message]:
    conversation = []
    for message in messages:
        if message.role not in _ROLES:
            raise ValueError(f"messages with role {message.role.value!r} are not supported: use system, user, assistant")
        conversation.append({"role": _ROLES[message.role], "content": message.content or ""})
    return conversation


class W2SAlignedLlamaIndexLLM(AlignedSearch, CustomLLM):
    """A strong local GGUF model whose answers two weak GGUF models steer."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, arbitrary_types_allowed=True)

    preset: str = Field(
        "chat",
        description="Preset name or path of a preset .json: the base of every setting. Default: \"chat\" "
        "(LlamaIndex's query and chat engines send instructions and conversations).",
    )

    @classmethod
    def class_name(cls) -> str:
        return "W2SAlignedLlamaIndexLLM"

    @field_serializer("api_key")
    def _masked_key(self, key: SecretStr | None) -> str | None:
        """LlamaIndex's to_dict / to_json dump the fields as plain data: the key as stars."""
        return None if key is None else str(key)

    @property
    def metadata(self) -> LLMMetadata:
        """With the context window a search can really use (`context_window()`:
        LlamaIndex takes `num_output` back out of it for the prompt). Loads the
        models, or asks the strong model's server."""
        config = self._config
        return LLMMetadata(
            context_window=self.context_window(),
            num_output=config.search.max_new_tokens,
            is_chat_model=config.strong.prompt.format == "chat",
            model_name=self._model_name,
        )

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        result = self._search(prompt, None, kwargs)
        return CompletionResponse(text=result.text, raw=generation_info(result))

    # The streams hand on the answer as the search makes it final: chunk by chunk
    # as a streaming search (`commit_every`) commits them, the rest at its end.

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        pieces = self._search_pieces(prompt, None, kwargs)
        return (CompletionResponse(text=p.answer_so_far, delta=p.text, raw=p.report) for p in pieces)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        result = self._search(to_conversation(messages), None, kwargs)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=result.text), raw=generation_info(result))

    # LlamaIndex's default stream_chat flattens the conversation into one
    # completion prompt; this keeps its roles for the chat templates, as `chat` does.
    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        pieces = self._search_pieces(to_conversation(messages), None, kwargs)
        return (
            ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=p.answer_so_far), delta=p.text, raw=p.report)
            for p in pieces
        )

    # The search is CPU-bound: each async method runs its sync twin in a worker
    # thread, so the event loop goes on, and cancelling the caller stops the search.

    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await in_thread(self.complete, prompt, formatted, **kwargs)

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await in_thread(self.chat, messages, **kwargs)

    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        return iterate_in_thread(self.stream_complete(prompt, formatted, **kwargs))

    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return iterate_in_thread(self.stream_chat(messages, **kwargs))

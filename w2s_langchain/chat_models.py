"""`ChatW2SAligned`: W2S-AlignTree behind LangChain's chat model interface.

Each model renders the conversation with its own GGUF chat template (or the one a
prompt setting gives); the weak roles put their own system message first. The
strong model must have a chat template: pick an instruct model, e.g.

    chat = ChatW2SAligned(preset="chat")
    chat.invoke([("system", "Answer briefly."), ("human", "Describe your town.")])
"""

from __future__ import annotations

import contextvars
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import CallbackManager, CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage, HumanMessage, SystemMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig, ensure_config
from pydantic import ConfigDict, Field

from ._component.langchain_base import LangChainAligned
from ._component.search_call import StreamPiece, generation_info, stream_pieces
from .prompts import Message, render
from .search import SearchResult

# The run a stream call opened, until its `_stream` takes it (see ChatW2SAligned.stream).
_stream_run: contextvars.ContextVar[CallbackManagerForLLMRun | None] = contextvars.ContextVar("w2s_stream_run", default=None)

_ROLE_OF = {SystemMessage: "system", HumanMessage: "user", AIMessage: "assistant"}
# A ChatMessage's free-form role, under the names other APIs give the three roles a chat template knows.
_CHAT_MESSAGE_ROLES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "ai": "assistant", "model": "assistant",
}


def to_conversation(messages: list[BaseMessage]) -> list[Message]:
    """LangChain messages as role/content messages; text content only."""
    conversation = []
    for message in messages:
        if isinstance(message, ChatMessage):
            role = _CHAT_MESSAGE_ROLES.get(message.role.lower())
            if role is None:
                raise ValueError(
                    f"ChatMessage with role {message.role!r} is not supported: use the roles "
                    f"{', '.join(repr(r) for r in _CHAT_MESSAGE_ROLES)} (no tools)"
                )
        else:
            role = next((r for kind, r in _ROLE_OF.items() if isinstance(message, kind)), None)
        if role is None:
            raise ValueError(
                f"{type(message).__name__} is not supported: use system, human and AI messages (no tools)"
            )
        if not isinstance(message.content, str):
            if any(isinstance(p, dict) and p.get("type") not in (None, "text") for p in message.content):
                raise ValueError("only text content is supported (no images or other media)")
            text = [p.get("text", "") if isinstance(p, dict) else p for p in message.content]
            if not all(isinstance(t, str) for t in text):
                bad = next(t for t in text if not isinstance(t, str))
                raise ValueError(f"a content part's text must be a string, got {type(bad).__name__} {bad!r:.60}")
            conversation.append({"role": role, "content": "".join(text)})
        else:
            conversation.append({"role": role, "content": message.content})
    return conversation


# Why bind_tools and with_structured_output refuse, and what to do instead.
_NO_TOOLS = (
    "{what} is not supported by ChatW2SAligned: the search picks the answer the weak models prefer, and "
    "nothing makes that answer a valid tool call or schema. Use another chat model for tool calls or "
    "structured output (e.g. ChatLlamaCpp or ChatOllama on the same GGUF file), and this one for the "
    "final free-text answer; or ask for JSON in the prompt and parse the answer yourself."
)


class ChatW2SAligned(LangChainAligned, BaseChatModel):
    """A strong local GGUF chat model whose answers two weak GGUF models steer
    (W2S-AlignTree). See `AlignedModelSettings` for the fields."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    preset: str = Field(
        "chat",
        description="Preset name or path of a preset .json: the base of every setting. Default: \"chat\" "
        "(a chat model answers through its chat template).",
    )

    @property
    def _llm_type(self) -> str:
        return "w2s-aligned-chat"

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_NO_TOOLS.format(what="Tool calling"))

    def with_structured_output(self, schema: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_NO_TOOLS.format(what="Structured output"))

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Any = None) -> int:
        """Prompt tokens of the conversation as the strong model reads it: rendered by
        its prompt format (its chat template), as `usage_metadata["input_tokens"]` counts."""
        if tools:
            raise NotImplementedError(_NO_TOOLS.format(what="Tool calling"))
        model = self._strong_model()
        return len(render(model, self._config.strong.prompt, to_conversation(messages)).tokenize_with(model, ""))

    def _usage(self, result: SearchResult) -> UsageMetadata:
        """Prompt and answer tokens; what the search sampled is in the response's `cost`."""
        prompt, answer = result.cost.prompt_tokens, result.cost.answer_tokens
        return UsageMetadata(input_tokens=prompt, output_tokens=answer, total_tokens=prompt + answer)

    # langchain-core runs `_stream` without the run's callback manager (stream and
    # astream, and an invoke it streams: streaming=True, astream_events), so search
    # progress could not reach the callbacks from there. A stream call therefore
    # names its run (its id) and hands `_stream` a manager for it, and an invoke
    # goes through `_generate`, which has the manager and sends the answer's pieces
    # to it where langchain-core would have streamed.

    def stream(self, input: Any, config: RunnableConfig | None = None, *, stop=None, **kwargs: Any) -> Iterator[Any]:
        config = self._open_stream_run(config)
        try:
            yield from super().stream(input, config, stop=stop, **kwargs)
        finally:
            _stream_run.set(None)

    async def astream(self, input: Any, config: RunnableConfig | None = None, *, stop=None, **kwargs: Any) -> AsyncIterator[Any]:
        config = self._open_stream_run(config)
        try:
            async for chunk in super().astream(input, config, stop=stop, **kwargs):
                yield chunk
        finally:
            _stream_run.set(None)

    def _open_stream_run(self, config: RunnableConfig | None) -> RunnableConfig:
        """Fix the id of the run a stream call is about to open, and keep a manager
        for that run (with the handlers langchain-core gives it) for `_stream`."""
        config = ensure_config(config)
        config["run_id"] = config.get("run_id") or uuid.uuid4()
        manager = CallbackManager.configure(
            config.get("callbacks"), self.callbacks, self.verbose,
            config.get("tags"), self.tags, config.get("metadata"), self.metadata,
        )
        _stream_run.set(
            CallbackManagerForLLMRun(
                run_id=config["run_id"], handlers=manager.handlers, inheritable_handlers=manager.inheritable_handlers,
                parent_run_id=manager.parent_run_id, tags=manager.tags, metadata=manager.metadata,
            )
        )
        return config

    def _should_stream(self, *, async_api: bool, run_manager=None, **kwargs: Any) -> bool:
        if run_manager is not None:  # an invoke: `_generate` streams it (see above)
            return False
        return super()._should_stream(async_api=async_api, **kwargs)

    def _streams_invoke(self, run_manager) -> bool:
        """Whether langchain-core would have streamed this invoke to its callbacks."""
        return run_manager is not None and super()._should_stream(async_api=False, run_manager=run_manager)

    def _generate(
        self, messages: list[BaseMessage], stop=None, run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any
    ) -> ChatResult:
        result = self._search_for_run(self._conversation(messages), stop, run_manager, kwargs)
        if self._streams_invoke(run_manager):
            for chunk in self._chunks(result):
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
        return self._chat_result(result)

    def _conversation(self, messages: list[BaseMessage]) -> list[Message]:
        """The messages as a conversation. A strong model that reads plain text (a
        base model's preset, such as "sentiment") gets it as a transcript to
        continue: allowed, since a base model can, but rarely what a chat model's
        user meant, so it is said (once per place in the code, as Python warns)."""
        config = self._config
        if config.strong.prompt.format == "plain":
            warnings.warn(
                f"ChatW2SAligned: the strong model {config.strong.model} reads plain text (the \"plain\" prompt "
                f"format, from preset={self.preset!r} or strong_prompt), so it gets this conversation as a transcript (\"User: ...\\nAssistant:\") to continue, not "
                "through a chat template. For a chat assistant use preset=\"chat\" (the default), or a "
                "strong_prompt {\"format\": \"chat\"} with an instruct model; to continue plain text, use "
                "W2SAlignedLLM.",
                UserWarning,
                stacklevel=4,
            )
        return to_conversation(messages)

    def _chat_result(self, result: SearchResult) -> ChatResult:
        info = generation_info(result)
        message = AIMessage(
            content=result.text,
            usage_metadata=self._usage(result),
            response_metadata={"model_name": self._model_name, "finish_reason": result.finish_reason, **info},
        )
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)])

    def _stream(
        self, messages: list[BaseMessage], stop=None, run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any
    ) -> Iterator[ChatGenerationChunk]:
        """Search progress goes to the callbacks as "w2s_progress" custom events.
        A streaming search (`commit_every`) hands on each chunk of the answer as it
        commits it; the rest (all of it, for the whole-tree search) comes in pieces
        of a few words, the last one carrying the usage and the search's report
        (langchain-core sends them to the callbacks)."""
        run = run_manager or _stream_run.get()
        _stream_run.set(None)  # taken: no later call may report to this run
        for piece in self._pieces_for_run(self._conversation(messages), stop, run, kwargs):
            yield self._chunk(piece)

    def _chunks(self, result: SearchResult) -> list[ChatGenerationChunk]:
        """The answer in pieces of a few words; the last carries the usage and the search's report."""
        return [self._chunk(piece) for piece in stream_pieces(result)]

    def _chunk(self, piece: StreamPiece) -> ChatGenerationChunk:
        result = piece.result
        message = AIMessageChunk(
            content=piece.text,
            usage_metadata=self._usage(result) if result else None,
            response_metadata={"model_name": self._model_name, "finish_reason": result.finish_reason} if result else {},
            chunk_position="last" if result else None,
        )
        return ChatGenerationChunk(message=message, generation_info=piece.report)

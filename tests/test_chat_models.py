"""ChatW2SAligned on the tiny models: conversations, usage, and bad input."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from w2s_langchain.chat_models import ChatW2SAligned, to_conversation

CHAT = {"format": "chat"}


@pytest.fixture
def make_chat(tiny_models):
    def make(**fields):
        settings = dict(
            strong=str(tiny_models.tiny_a), weak=str(tiny_models.tiny_a), weak_ref=str(tiny_models.tiny_a),
            strong_prompt=CHAT, weak_prompt={"format": "chat", "system": "Be warm."},
            weak_ref_prompt={"format": "chat", "system": "Be cold."},
            iterations=4, children=2, chunk_tokens=3, max_tokens=9, n_ctx=512, n_threads=1, seed=2,
        )
        return ChatW2SAligned(**{**settings, **fields})

    return make


CONVERSATION = [
    SystemMessage("Answer briefly."),
    HumanMessage("Hi"),
    AIMessage("Hello!"),
    HumanMessage([{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story"}]),
]


def test_messages_become_a_conversation():
    assert to_conversation(CONVERSATION) == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a story"},
    ]


def test_a_conversation_gets_an_aligned_answer_with_usage(make_chat):
    chat = make_chat()
    message = chat.invoke(CONVERSATION)
    assert isinstance(message, AIMessage) and message.content
    usage = message.usage_metadata
    assert usage["output_tokens"] == message.response_metadata["cost"]["strong_tokens_sampled"]
    assert usage["input_tokens"] > 0 and usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    streamed = list(chat.stream(CONVERSATION))
    assert "".join(c.content for c in streamed) == message.content  # same seed
    assert streamed[-1].usage_metadata == usage


def test_unsupported_messages_and_models_are_clear_errors(make_chat, tiny_models):
    chat = make_chat()
    with pytest.raises(ValueError, match="ToolMessage is not supported"):
        chat.invoke([HumanMessage("x"), ToolMessage("3", tool_call_id="1")])
    with pytest.raises(ValueError, match="only text content"):
        chat.invoke([HumanMessage([{"type": "image_url", "image_url": {"url": "data:,"}}])])
    with pytest.raises(ValueError, match="no chat template"):
        make_chat(strong=str(tiny_models.tiny_b)).invoke("Hi")
    assert chat.invoke("Hi").content  # still usable

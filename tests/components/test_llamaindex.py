"""W2SAlignedLlamaIndexLLM on the tiny models (real llama.cpp)."""

from __future__ import annotations

import pytest
from llama_index.core.llms import ChatMessage
from support.loop_ticker import run_while_ticking

from w2s_langchain.llamaindex_llm import W2SAlignedLlamaIndexLLM

PLAIN = {"format": "plain"}


@pytest.fixture
def llm(tiny_models):
    return W2SAlignedLlamaIndexLLM(
        strong=str(tiny_models.tiny_a), weak=str(tiny_models.tiny_a), weak_ref=str(tiny_models.tiny_b),
        strong_prompt={"format": "chat"}, weak_prompt=PLAIN, weak_ref_prompt=PLAIN,
        iterations=4, chunk_tokens=3, max_tokens=9, n_ctx=512, n_threads=1, seed=4,
    )


def test_metadata_reports_the_context_a_search_can_use_and_chat_format(llm, tiny_models):
    """Of n_ctx=512, the tree takes 4 iterations x 3 children x 3 tokens and the
    "finish" fallback's 3 x 9 (the chat preset's children and fallback), and the
    chat template its own tokens: the rest is the prompt's; LlamaIndex takes the
    answer's 9 back out of the window."""
    from w2s_langchain.engine import load_model
    from w2s_langchain.prompts import PromptFormat, render

    strong = load_model(tiny_models.tiny_a)
    template = len(render(strong, PromptFormat(format="chat"), "").tokenize_with(strong, ""))
    assert llm.metadata.context_window == 512 - 4 * 3 * 3 - 3 * 9 - template + 9
    assert llm.metadata.num_output == 9
    assert llm.metadata.is_chat_model


def test_complete_stream_and_chat(llm):
    answer = llm.complete("Once upon a time")
    assert answer.text and answer.raw["strategy"] == "w2s"
    deltas = [r.delta for r in llm.stream_complete("Once upon a time")]
    assert "".join(deltas) == answer.text
    reply = llm.chat([ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")])
    assert reply.message.role == "assistant" and reply.message.content


def test_async_methods_do_not_block_the_loop(llm):
    async def work():
        answer = await llm.acomplete("Once upon a time")
        reply = await llm.achat([ChatMessage(role="user", content="Hi")])
        stream = await llm.astream_complete("Once upon a time")
        return answer, reply, [r.delta async for r in stream]

    (answer, reply, deltas), ticks = run_while_ticking(work)
    assert answer.text == llm.complete("Once upon a time").text
    assert "".join(deltas) == answer.text and reply.message.content
    assert ticks > 5


def test_bad_input(llm, tiny_models):
    with pytest.raises(ValueError, match="role 'tool'"):
        llm.chat([ChatMessage(role="tool", content="3")])
    with pytest.raises(ValueError):
        W2SAlignedLlamaIndexLLM(children=0)
    with pytest.raises(ValueError, match="unknown search settings"):
        llm.complete("Hi", itrations=2)


CONVERSATION = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")]


def test_streamed_chat_keeps_the_roles_and_answers_as_chat_does(llm):
    reply = llm.chat(CONVERSATION)
    streamed = list(llm.stream_chat(CONVERSATION))
    assert "".join(r.delta for r in streamed) == streamed[-1].message.content == reply.message.content
    assert streamed[-1].raw["cost"]["prompt_tokens"] == reply.raw["cost"]["prompt_tokens"]  # the same rendering

    async def stream():
        return [r.delta async for r in await llm.astream_chat(CONVERSATION)]

    deltas, ticks = run_while_ticking(stream)
    assert "".join(deltas) == reply.message.content and ticks > 5


def test_max_tokens_and_other_settings_per_call(llm):
    assert llm.max_tokens == 9
    short = llm.complete("Once upon a time", max_tokens=3, iterations=1)
    assert short.raw["settings"]["max_new_tokens"] == 3 and short.raw["cost"]["iterations"] == 1
    assert short.raw["cost"]["answer_tokens"] <= 3
    assert llm.chat(CONVERSATION, max_tokens=3).raw["settings"]["max_new_tokens"] == 3
    assert llm.complete("Once upon a time").raw["settings"]["max_new_tokens"] == 9  # the call changed nothing
    assert llm.metadata.model_name == "tiny_a.gguf"  # the strong model's


def test_class_name_is_the_class(llm):
    assert llm.class_name() == "W2SAlignedLlamaIndexLLM"
    assert llm.to_dict()["class_name"] == "W2SAlignedLlamaIndexLLM"

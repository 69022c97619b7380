"""The streaming mode (`commit_every`): the answer reaches a stream chunk by
chunk while the search goes on, on every streaming path of the three components
(tiny models, real llama.cpp)."""

from __future__ import annotations

import asyncio
import time

import pytest
from langchain_core.callbacks import BaseCallbackHandler

from w2s_langchain.chat_models import ChatW2SAligned
from w2s_langchain.llms import W2SAlignedLLM

PROMPT = "Once upon a time"
CHAT = {"format": "chat"}
# A search long enough that committing after every 4 of its 60 iterations hands
# on text long before it ends.
SEARCH = dict(iterations=60, children=3, chunk_tokens=3, max_tokens=30, n_ctx=512, n_threads=1, seed=3)


def tiny_fields(tiny_models, strong_format):
    return dict(
        strong=str(tiny_models.tiny_a), weak=str(tiny_models.tiny_a), weak_ref=str(tiny_models.tiny_b),
        strong_prompt=strong_format, weak_prompt={"format": "plain"}, weak_ref_prompt={"format": "plain"}, **SEARCH,
    )


class Timeline(BaseCallbackHandler):
    """Progress events and streamed tokens, in the order they came."""

    def __init__(self):
        self.events: list[str] = []

    def on_llm_new_token(self, token, **kwargs):
        if token:
            self.events.append("token")

    def on_custom_event(self, name, data, **kwargs):
        self.events.append("progress")

    def tokens_before_the_search_ended(self) -> int:
        last_progress = max(i for i, e in enumerate(self.events) if e == "progress")
        return self.events[:last_progress].count("token")


@pytest.mark.parametrize("component", ["llm", "chat"])
def test_a_stream_hands_on_committed_chunks_while_the_search_goes_on(tiny_models, component):
    if component == "llm":
        make = lambda **f: W2SAlignedLLM(**tiny_fields(tiny_models, {"format": "plain"}), **f)  # noqa: E731
        text = lambda chunk: chunk  # noqa: E731
    else:
        make = lambda **f: ChatW2SAligned(**tiny_fields(tiny_models, CHAT), **f)  # noqa: E731
        text = lambda chunk: chunk.content  # noqa: E731
    streaming, whole = Timeline(), Timeline()
    pieces = [text(c) for c in make(commit_every=4).stream(PROMPT, config={"callbacks": [streaming]})]
    [text(c) for c in make().stream(PROMPT, config={"callbacks": [whole]})]
    assert streaming.tokens_before_the_search_ended() >= 3
    assert whole.tokens_before_the_search_ended() == 0  # the whole-tree search answers at its end
    # The stream is the answer, the same as a plain call with the same settings.
    answer = make(commit_every=4).invoke(PROMPT)
    assert "".join(pieces) == text(answer) and len(pieces) > 3


def test_the_async_streams_hand_on_chunks_as_they_come(tiny_models):
    chat = ChatW2SAligned(**tiny_fields(tiny_models, CHAT), commit_every=4)

    async def arrivals():
        timeline = Timeline()
        started = time.perf_counter()
        seen = [(time.perf_counter() - started, c.content) async for c in chat.astream(PROMPT, config={"callbacks": [timeline]})]
        events = [e async for e in chat.astream_events(PROMPT, version="v2")]
        return seen, timeline, events

    seen, timeline, events = asyncio.run(arrivals())
    assert timeline.tokens_before_the_search_ended() >= 3
    kinds = [e["event"] for e in events if e["event"] in ("on_custom_event", "on_chat_model_stream")]
    assert kinds.index("on_chat_model_stream") < len(kinds) - 1 - kinds[::-1].index("on_custom_event")
    assert "".join(content for _, content in seen) == chat.invoke(PROMPT).content


def test_llamaindex_streams_hand_on_chunks_as_they_come(tiny_models):
    pytest.importorskip("llama_index.core")
    from llama_index.core.llms import ChatMessage

    from w2s_langchain.llamaindex_llm import W2SAlignedLlamaIndexLLM

    llm = W2SAlignedLlamaIndexLLM(**tiny_fields(tiny_models, CHAT), commit_every=4)
    whole = W2SAlignedLlamaIndexLLM(**tiny_fields(tiny_models, CHAT))

    def first_and_total(stream):
        started = time.perf_counter()
        first, responses = None, []
        for response in stream:
            first = first if first is not None else time.perf_counter() - started
            responses.append(response)
        return first, time.perf_counter() - started, responses

    first, total, responses = first_and_total(llm.stream_complete(PROMPT))
    assert responses[-1].text == llm.complete(PROMPT).text and len(responses) > 3
    assert first < total / 2
    whole_first, whole_total, _ = first_and_total(whole.stream_complete(PROMPT))
    assert whole_first > whole_total * 0.9

    async def achat():
        started, times = time.perf_counter(), []
        stream = await llm.astream_chat([ChatMessage(role="user", content=PROMPT)])
        async for response in stream:
            times.append(time.perf_counter() - started)
        return times, response

    times, last = asyncio.run(achat())
    assert times[0] < times[-1] / 2
    assert last.message.content == llm.chat([ChatMessage(role="user", content=PROMPT)]).message.content


def test_leaving_a_stream_early_stops_its_search(tiny_models):
    llm = W2SAlignedLLM(**{**tiny_fields(tiny_models, {"format": "plain"}), "iterations": 100_000}, commit_every=4)
    started = time.perf_counter()
    stream = llm.stream(PROMPT)
    next(stream)
    stream.close()  # the search stops at its next decode step, and the models are free
    assert time.perf_counter() - started < 30
    assert llm._aligner._free and llm.invoke(PROMPT, iterations=4)

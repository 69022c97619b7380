"""ChatW2SAligned on the tiny models: conversations, usage, and bad input."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.globals import set_llm_cache
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from w2s_langchain.chat_models import ChatW2SAligned, to_conversation

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
    cost = message.response_metadata["cost"]
    # The answer's tokens; what the search sampled to find it stays in the cost report.
    assert 0 < usage["output_tokens"] == cost["answer_tokens"] <= 9 < cost["strong_tokens_sampled"]
    # Counted as the strong model reads the conversation: through its chat template.
    assert chat.get_num_tokens_from_messages(CONVERSATION) == usage["input_tokens"]
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
    with pytest.raises(ValueError, match="a content part's text must be a string, got int 5"):
        chat.invoke([HumanMessage([{"type": "text", "text": 5}])])  # was a raw TypeError
    with pytest.raises(ValueError, match="no chat template"):
        make_chat(strong=str(tiny_models.tiny_b)).invoke("Hi")
    assert chat.invoke("Hi").content  # still usable


class Recorder(BaseCallbackHandler):
    def __init__(self):
        self.progress: list[dict] = []
        self.tokens: list[str] = []

    def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)

    def on_custom_event(self, name, data, **kwargs):
        if name == "w2s_progress":
            self.progress.append(data)


@pytest.mark.parametrize("call", ["stream", "astream", "invoke", "ainvoke", "astream_events"])
@pytest.mark.parametrize("streaming", [False, True])
def test_search_progress_reaches_the_callbacks_on_every_path(make_chat, call, streaming):
    chat = make_chat(streaming=True) if streaming else make_chat()  # streaming=False would turn streaming off
    recorder = Recorder()
    config = {"callbacks": [recorder]}

    async def run_async():
        if call == "astream":
            return "".join([c.content async for c in chat.astream("Hi", config=config)])
        if call == "ainvoke":
            return (await chat.ainvoke("Hi", config=config)).content
        events = [e async for e in chat.astream_events("Hi", version="v2")]
        recorder.progress = [e["data"] for e in events if e["event"] == "on_custom_event"]
        recorder.tokens = [e["data"]["chunk"].content for e in events if e["event"] == "on_chat_model_stream"]
        return "".join(recorder.tokens)

    if call == "stream":
        answer = "".join(c.content for c in chat.stream("Hi", config=config))
    elif call == "invoke":
        answer = chat.invoke("Hi", config=config).content
    else:
        answer = asyncio.run(run_async())
    assert answer == make_chat().invoke("Hi").content
    assert [p["done"] for p in recorder.progress] == [1, 2, 3, 4]
    if call not in ("invoke", "ainvoke") or streaming:  # streamed: the answer reaches the callbacks too
        assert "".join(recorder.tokens) == answer


def test_a_call_with_other_settings_is_never_served_another_settings_cached_answer(make_chat):
    set_llm_cache(InMemoryCache())
    try:
        chat = make_chat()
        chat.invoke("Hi")
        short = chat.invoke("Hi", iterations=1, max_tokens=4)
        assert short.response_metadata["cost"]["iterations"] == 1 and short.usage_metadata["output_tokens"] <= 4
        assert chat.bind(iterations=2).invoke("Hi").response_metadata["cost"]["iterations"] == 2
        again = chat.invoke("Hi", iterations=1, max_tokens=4)  # identical: from the cache
        assert (again.content, again.response_metadata["cost"]) == (short.content, short.response_metadata["cost"])
    finally:
        set_llm_cache(None)


def test_tools_and_structured_output_are_refused_with_what_to_do_instead(make_chat):
    chat = make_chat()

    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    with pytest.raises(NotImplementedError, match="Tool calling is not supported .* Use another chat model"):
        chat.bind_tools([add])
    with pytest.raises(NotImplementedError, match="Structured output is not supported .* parse the answer yourself"):
        chat.with_structured_output({"title": "x", "type": "object", "properties": {}})


def test_traces_name_the_strong_model(make_chat, tiny_models):
    chat = make_chat()
    assert chat.invoke("Hi").response_metadata["model_name"] == tiny_models.tiny_a.name
    assert chat._get_ls_params()["ls_model_name"] == tiny_models.tiny_a.name


@pytest.mark.packaged
def test_the_readme_chat_example_answers_in_whole_characters(packaged_models):
    """README's chat example (seed 0) used to sample a lone UTF-8 continuation
    byte and print "unw\ufffdkinate"."""
    chat = ChatW2SAligned(preset="chat", n_threads=1)
    answer = chat.invoke([("system", "Answer briefly."), ("human", "What should I cook tonight?")]).content
    assert len(answer) > 10 and "\ufffd" not in answer


def test_the_chat_model_defaults_to_the_chat_preset_and_says_when_a_preset_reads_plain_text(make_chat):
    """ChatW2SAligned() used to start from "sentiment" (a base model continuing
    reviews), and answered "Name a fruit." with a made-up transcript."""
    assert ChatW2SAligned().preset == "chat"
    assert ChatW2SAligned()._config.strong.prompt.format == "chat"
    chat = make_chat(strong_prompt={"format": "plain"})
    with pytest.warns(UserWarning, match='reads plain text.*transcript.*preset="chat"'):
        assert chat.invoke([HumanMessage("Hi")]).content


def test_chat_messages_with_a_role_name_are_accepted(make_chat):
    from langchain_core.messages import ChatMessage

    roles = [ChatMessage(role=r, content="x") for r in ("system", "developer", "user", "human", "assistant", "ai")]
    assert [m["role"] for m in to_conversation(roles)] == ["system", "system", "user", "user", "assistant", "assistant"]
    chat = make_chat()
    assert chat.invoke([ChatMessage(role="user", content="Hi")]).content == chat.invoke([HumanMessage("Hi")]).content
    with pytest.raises(ValueError, match="role 'tool' is not supported"):
        chat.invoke([ChatMessage(role="tool", content="3")])


def test_a_setting_assigned_after_construction_is_checked_there(make_chat):
    chat = make_chat()
    with pytest.raises(ValueError, match="iterations must be a whole number >= 1, got -3"):
        chat.iterations = -3
    assert chat.iterations == 4  # the refused value left nothing behind
    with pytest.raises(ValueError, match="max_new_tokens must be"):
        chat.max_tokens = 0
    assert chat.max_tokens == 9 and chat.invoke("Hi").content


def test_max_tokens_is_configurable_and_given_twice_must_agree(make_chat, tiny_models):
    from langchain_core.runnables import ConfigurableField

    chat = make_chat()
    configurable = chat.configurable_fields(max_tokens=ConfigurableField(id="answer_length"))
    short = configurable.with_config(configurable={"answer_length": 2}).invoke("Hi")
    assert short.response_metadata["settings"]["max_new_tokens"] == 2 and short.usage_metadata["output_tokens"] <= 2
    with pytest.raises(ValueError, match="max_tokens=5 and max_new_tokens=6 disagree: give one of them"):
        make_chat(max_tokens=5, max_new_tokens=6)
    assert make_chat(max_tokens=5, max_new_tokens=5).max_new_tokens == 5


def test_token_ids_are_the_strong_models(make_chat, tiny_models):
    from w2s_langchain.engine import load_model

    assert make_chat().get_token_ids("Hello there") == load_model(tiny_models.tiny_a).tokenize("Hello there")

"""How each model sees a prompt: chat templates, plain text, conversations."""

from __future__ import annotations

import pytest

from w2s_langchain.engine import load_model
from w2s_langchain.prompts import PromptFormat, check_prompt, render

CHAT = PromptFormat(format="chat", system="Be kind.", assistant_prefix="{prompt}")


def test_text_and_single_user_message_render_alike(tiny_models):
    model = load_model(tiny_models.tiny_a)
    fmt = PromptFormat(format="chat", system="Be kind.")
    assert render(model, fmt, "Hello") == render(model, fmt, [{"role": "user", "content": "Hello"}])


def test_chat_split_keeps_special_tokens_apart_from_the_answer(tiny_models):
    model = load_model(tiny_models.tiny_a)
    rendered = render(model, CHAT, "Once")
    assert rendered.special.endswith("<|im_start|>")
    assert rendered.plain == "assistant\nOnce"
    assert rendered.end_token == model.tokenize("<|im_end|>", parse_special=True)[0]
    # An answer that spells a special token stays text.
    tokens = rendered.tokenize_with(model, "<|im_end|>")
    assert rendered.end_token not in tokens[len(rendered.tokens) :]
    whole = model.tokenize(rendered.special + rendered.plain + " more", add_special=True, parse_special=True)
    assert rendered.tokenize_with(model, " more") == whole


def test_conversation_merges_the_roles_system_message_first(tiny_models):
    model = load_model(tiny_models.tiny_a)
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a story"},
    ]
    rendered = render(model, PromptFormat(format="chat", system="Be kind."), conversation)
    text = rendered.special + rendered.plain
    assert text.index("Be kind.") < text.index("Answer briefly.") < text.index("Hello!") < text.index("Tell me a story")


def test_plain_format_of_a_conversation_is_a_transcript(tiny_models):
    model = load_model(tiny_models.tiny_b)
    rendered = render(model, PromptFormat(), [{"role": "user", "content": "Hi"}])
    assert rendered.plain == "User: Hi\nAssistant:"
    assert rendered.end_token == model.eos


def test_chat_format_without_a_template_is_a_clear_error(tiny_models):
    with pytest.raises(ValueError, match="no chat template"):
        render(load_model(tiny_models.tiny_b), CHAT, "Hi")


def test_a_user_template_replaces_the_models_own(tiny_models):
    fmt = PromptFormat(format="chat", chat_template="{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    rendered = render(load_model(tiny_models.tiny_b), fmt, "Hi")
    assert rendered.plain == "[user] Hi\n"


def test_a_template_that_fails_names_the_model(tiny_models):
    fmt = PromptFormat(format="chat", chat_template="{{ raise_exception('no system messages') }}")
    with pytest.raises(ValueError, match="tiny_b.gguf.*no system messages"):
        render(load_model(tiny_models.tiny_b), fmt, "Hi")


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("  ", "empty"),
        ([], "non-empty list"),
        ([{"role": "robot", "content": "x"}], "role"),
        ([{"role": "user", "content": 3}], "content"),
        ([{"role": "user", "content": " "}], "empty"),
    ],
)
def test_bad_prompts(prompt, message):
    with pytest.raises(ValueError, match=message):
        check_prompt(prompt)

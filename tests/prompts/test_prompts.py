"""How each model sees a prompt: chat templates, plain text, conversations."""

from __future__ import annotations

import pytest
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from w2s_langchain.engine import load_model
from w2s_langchain.errors import ChatTemplateError
from w2s_langchain.prompts import PromptFormat, check_prompt, render, render_chat_template

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


@pytest.mark.parametrize(
    "template, message",
    [
        ("{{ raise_exception('no system messages') }}", "no system messages"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{% for %}", "Expected an expression"),
    ],
)
def test_a_template_that_fails_names_the_model_and_the_way_out(tiny_models, template, message):
    fmt = PromptFormat(format="chat", chat_template=template)
    with pytest.raises(ChatTemplateError, match=f'tiny_b.gguf.*{message}.*format "plain"'):
        render(load_model(tiny_models.tiny_b), fmt, "Hi")


# --- the bounded sandbox renders real templates as Jinja's plain sandbox does ----------

SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's own
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA2_TEMPLATE = (  # gemma-2-2b-it's own
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
EVERY_HOOK_TEMPLATE = """{%- set ns = namespace(count=0) -%}
{%- macro turn(role, text) -%}
<|im_start|>{{ role }}
{{ text | trim | replace('\r\n', '\n') }}<|im_end|>
{% endmacro -%}
{%- for message in messages -%}
{%- set ns.count = ns.count + 1 -%}
{{ turn(message['role'], message['content']) }}
{%- if loop.last %}{{ '%d turns, the last by %s' % (loop.length, message.role) }}{% endif -%}
{%- else -%}{{ raise_exception('no messages') }}
{%- endfor -%}
{%- set roles -%}{{ messages | map(attribute='role') | join(', ') }}{%- endset %}
{{ '[' ~ roles ~ '] ' ~ ns.count * 2 }} {{ messages | selectattr('role', 'equalto', 'user') | list | length }}
{{ (messages | last).content.upper()[:5] }} {{ '{0}-{1}'.format(bos_token, eos_token) }} {{ messages | tojson }}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif -%}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [
        {"role": "system", "content": "Be kind. 🙂"},
        {"role": "user", "content": "Hi\r\nthere \u202eRTL\x00"},
        {"role": "assistant", "content": "Hello! é"},
        {"role": "user", "content": "Tell me a story"},
    ],
    [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i} " + "word " * 400} for i in range(200)],
]


def plain_sandbox_render(model, template, messages, add_generation_prompt):
    """How chat templates were rendered before they were bounded."""

    def raise_exception(message):
        raise TemplateError(message)

    return (
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        .from_string(template)
        .render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=model.token_text(model.bos),
            eos_token=model.token_text(model.eos),
            raise_exception=raise_exception,
        )
    )


@pytest.mark.parametrize(
    "template", [SMOLLM2_TEMPLATE, GEMMA2_TEMPLATE, EVERY_HOOK_TEMPLATE], ids=["smollm2", "gemma2", "hooks"]
)
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one", "four", "long"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_real_templates_render_as_in_the_plain_sandbox(tiny_models, template, conversation, add_generation_prompt):
    model = load_model(tiny_models.tiny_a)
    try:
        expected = plain_sandbox_render(model, template, conversation, add_generation_prompt)
    except TemplateError as err:  # gemma-2 refuses a system message: so must we
        with pytest.raises(ChatTemplateError, match=str(err)):
            render_chat_template(model, template, conversation, add_generation_prompt=add_generation_prompt)
        return
    assert render_chat_template(model, template, conversation, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("  ", "empty"),
        ([], "non-empty list"),
        ([{"role": "robot", "content": "x"}], "role"),
        ([{"role": "user", "content": 3}], "content"),
        ([{"role": "user", "content": " "}], "empty"),
        ("a\ud800b", "the prompt holds a lone surrogate"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\udfff"}], r"message 1 \(assistant\)"),
        # Was blamed on the chat template ("runs longer than 1 s").
        ([{"role": "user", "content": "Hi"}] * 100_000, "the conversation has 100,000 messages, more than the 10,000"),
    ],
)
def test_bad_prompts(prompt, message):
    with pytest.raises(ValueError, match=message):
        check_prompt(prompt)


def test_renders_in_many_threads_at_once_are_each_bounded_by_their_own_work():
    # Each render takes a tenth of a second; sixteen at once share the GIL for over a
    # second. The bound is each render's own time: none of them is refused.
    import threading

    from w2s_langchain.prompts.sandbox import render_template

    template = "{% for i in range(10000) %}{{ i % 7 }}{% endfor %}"
    outcomes: list = []

    def render() -> None:
        try:
            outcomes.append(len(render_template(template)))
        except Exception as err:
            outcomes.append(err)

    threads = [threading.Thread(target=render) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == [10000] * 16

"""How each model sees the prompt: its own chat template, a template the user
gives, or plain text.

A rendered prompt is split where its last special token ends: the `special`
part is tokenized with special tokens parsed ("<|im_start|>" becomes its id), the
`plain` part is tokenized together with the answer, as ordinary text. Tokenizing
them apart is exact, because llama.cpp's tokenizers never merge across a special
token, and it keeps an answer that happens to contain "<|im_end|>" from turning
into a control token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..engine import Model
from ..errors import ChatTemplateError, SearchTimeoutError
from .sandbox import render_template, why_unusable

_MARK = "\u2063w2s\u2063"  # invisible separator: never in a template's own text


@dataclass(frozen=True)
class PromptFormat:
    """How one model (strong, weak or reference) is shown the prompt.

    `{prompt}` in `user`, `assistant_prefix` or `plain` stands for the user's prompt.
    """

    format: Literal["chat", "plain"] = "plain"
    """"chat": messages through a chat template; "plain": the `plain` text as is."""
    system: str | None = None
    """System message (chat), e.g. the preference an aligned prompt states."""
    user: str = "{prompt}"
    """The user turn (chat)."""
    assistant_prefix: str = ""
    """Text the assistant turn starts with, before the answer (chat), e.g. "{prompt}"
    when the model continues the user's text inside its own turn."""
    plain: str = "{prompt}"
    """The whole prompt (plain)."""
    chat_template: str | None = None
    """A Jinja chat template to use instead of the model's own."""

    def __post_init__(self) -> None:
        if self.format not in ("chat", "plain"):
            raise ValueError(f'format must be "chat" or "plain", got {self.format!r}')


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt as one model will read it, ready to tokenize."""

    special: str
    """Text up to the end of the last special token (tokenized with specials parsed)."""
    plain: str
    """Ordinary text that the answer continues."""
    end_token: int
    """The token that ends an answer in this format (scored at the end: "eos scoring")."""
    tokens: tuple[int, ...] = field(default=())
    """Tokens of `special` (with BOS when the model wants one)."""

    def tokenize_with(self, model: Model, answer: str) -> list[int]:
        """Tokens of the whole prompt followed by `answer`."""
        return list(self.tokens) + model.tokenize(self.plain + answer)


Message = dict[str, str]
"""{"role": "system" | "user" | "assistant", "content": text}."""
Prompt = str | list[Message]
"""A prompt: text, or a conversation whose answer is the next assistant turn."""

_ROLES = ("system", "user", "assistant")


MAX_MESSAGES = 10_000
# A chat template renders a conversation within its 1 s bound up to about 30,000
# short messages (ChatML, measured); no model context holds that many turns anyway.


def check_prompt(prompt: Prompt) -> None:
    """A clear error for an empty prompt, a malformed conversation, or text that
    UTF-8 cannot encode."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("the prompt is empty: give the text to answer or continue")
        check_encodable(prompt, "the prompt")
        return
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("a conversation must be a non-empty list of messages")
    if len(prompt) > MAX_MESSAGES:
        raise ValueError(
            f"the conversation has {len(prompt):,} messages, more than the {MAX_MESSAGES:,} a chat template is "
            "given time to render: keep the recent ones (or summarise the rest)"
        )
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or message.get("role") not in _ROLES or not isinstance(message.get("content"), str):
            raise ValueError(f'each message needs a role ({", ".join(_ROLES)}) and text content, got {message!r}')
        check_encodable(message["content"], f"message {i} ({message['role']})")
    if not any(m["content"].strip() for m in prompt):
        raise ValueError("the conversation is empty: every message has empty content")


def check_encodable(text: str, what: str) -> None:
    """A clear error for text holding a lone surrogate: Python strings may (from JSON
    escapes or undecodable file names, say), UTF-8 and so the models cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{what} holds a lone surrogate ({text[err.start]!r} at position {err.start}), which is not text "
            "UTF-8 can encode: decode your input with errors='replace' (or 'ignore')"
        ) from None


def render(model: Model, fmt: PromptFormat, prompt: Prompt) -> RenderedPrompt:
    """Render `prompt` for `model` in format `fmt`. In `fmt`, "{prompt}" stands for
    the prompt text, or for a conversation's last user message."""
    conversation = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    last_user = next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")
    if fmt.format == "plain":
        text = prompt if isinstance(prompt, str) else _transcript(conversation)
        return _split(model, fmt.plain.replace("{prompt}", text), model.eos)
    template = fmt.chat_template or model.chat_template
    if not template:
        raise ValueError(
            f"{model.name} has no chat template: give one (chat_template=...) or use the plain format"
        )
    messages = _with_system(fmt.system, _with_user_template(fmt.user, conversation))
    text = render_chat_template(model, template, messages, add_generation_prompt=True)
    text += fmt.assistant_prefix.replace("{prompt}", last_user)
    return _split(model, text, _end_of_assistant_turn(model, template, messages))


def _transcript(conversation: list[Message]) -> str:
    """A conversation as plain text, for models without a chat template."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in conversation]
    return "\n".join(lines) + "\nAssistant:"


def _with_user_template(user: str, conversation: list[Message]) -> list[Message]:
    last = max((i for i, m in enumerate(conversation) if m["role"] == "user"), default=None)
    return [
        {"role": m["role"], "content": user.replace("{prompt}", m["content"])} if i == last else dict(m)
        for i, m in enumerate(conversation)
    ]


def _with_system(system: str | None, messages: list[Message]) -> list[Message]:
    """The role's own system message comes first, before any the conversation has."""
    if system is None:
        return messages
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{system}\n\n{messages[0]['content']}"}] + messages[1:]
    return [{"role": "system", "content": system}] + messages


def render_chat_template(model: Model, template: str, messages: list[dict], *, add_generation_prompt: bool) -> str:
    """A Jinja chat template rendered in the bounded sandbox (templates ship inside
    model files: they are code from whoever made the file)."""
    try:
        return render_template(
            template,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=model.token_text(model.bos),
            eos_token=model.token_text(model.eos),
        )
    except SearchTimeoutError:  # the search's time ran out while rendering: not the template's fault
        raise
    except Exception as err:  # the template is foreign code: whatever it raises means it cannot be used
        raise ChatTemplateError(
            f"the chat template of {model.name} is unusable here: {why_unusable(err)}. Give this role a "
            'prompt format with a chat_template of your own, or use format "plain".'
        ) from err


def _end_of_assistant_turn(model: Model, template: str, messages: list[dict]) -> int:
    """The special token the template puts right after an assistant's answer."""
    done = render_chat_template(
        model, template, messages + [{"role": "assistant", "content": _MARK}], add_generation_prompt=False
    )
    after = done[done.rfind(_MARK) + len(_MARK) :]
    for token in model.tokenize(after, parse_special=True):
        if model.token_text(token) in model.control_texts:
            return token
    return model.eos


def _split(model: Model, text: str, end_token: int) -> RenderedPrompt:
    cut = max((text.rfind(t) + len(t) for t in model.control_texts if t in text), default=0)
    special, plain = text[:cut], text[cut:]
    tokens = model.tokenize(special, add_special=True, parse_special=True)
    if len(tokens) >= 2 and tokens[0] == tokens[1] == model.bos:
        tokens = tokens[1:]  # the template wrote BOS and the tokenizer added it again
    return RenderedPrompt(special=special, plain=plain, end_token=end_token, tokens=tuple(tokens))

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

import functools
import inspect
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from jinja2 import Environment, TemplateError, Undefined, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from .engine import Model
from .errors import ChatTemplateError

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
            f"{model.path.name} has no chat template: give one (chat_template=...) or use the plain format"
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
    """A Jinja chat template rendered in a bounded sandbox (templates ship inside
    model files: they are code from whoever made the file)."""
    try:
        if len(template) > _TEMPLATE_MAX_CHARS:
            raise _OverBudget(f"it is {len(template):,} characters long, more than the {_TEMPLATE_MAX_CHARS:,} allowed")
        env = _BoundedSandbox(_RenderBudget())
        return env.from_string(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=model.token_text(model.bos),
            eos_token=model.token_text(model.eos),
            raise_exception=_raise_exception,
        )
    except Exception as err:  # the template is foreign code: whatever it raises means it cannot be used
        raise ChatTemplateError(
            f"the chat template of {model.path.name} is unusable here: {_why(err)}. Give this role a "
            'prompt format with a chat_template of your own, or use format "plain".'
        ) from err


def _raise_exception(message: str) -> None:
    """What templates call to refuse a conversation (HF transformers' convention)."""
    raise TemplateError(message)


def _why(err: Exception) -> str:
    if isinstance(err, SecurityError):
        return f"it reaches for Python internals ({err})"
    if isinstance(err, RecursionError):
        return "it recurses too deeply"
    if isinstance(err, MemoryError):
        return "it ran out of memory"
    if isinstance(err, (_OverBudget, TemplateError)):
        return str(err)
    return f"{type(err).__name__}: {err}"


# --- the bounded sandbox -------------------------------------------------------------
# Jinja's immutable sandbox keeps a template away from Python internals (attributes
# starting with "_", unsafe functions, changing lists and dicts). The bounds below keep
# a hostile or broken template from hanging the caller or eating its memory; real
# templates stay far below each of them.

_TEMPLATE_SECONDS = 1.0
# Real templates render in about a millisecond; a second leaves room for a slow, busy
# machine and a long conversation, and stops a runaway loop quickly.

_TEMPLATE_MAX_CHARS = 100_000
# Published chat templates are a few thousand characters, the longest a few tens of
# thousands. Compiling costs about 10 us a character, which this bounds to about a second.

_TEMPLATE_BUDGET_CHARS = 32_000_000
# Characters one render may build in all: its output and every string or list its
# operations make on the way. A 128k-token context is about 0.5M characters, which a
# template copies a few times over; this is sixty times that, and at most 4 bytes a
# character (128 MB) of memory.


class _OverBudget(Exception):
    """A render went past one of the bounds above."""


class _RenderBudget:
    """What one render may still spend: time until its deadline, and characters."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + _TEMPLATE_SECONDS
        self.chars_left = _TEMPLATE_BUDGET_CHARS

    def check(self, chars: int = 0) -> None:
        """Refuse work of `chars` characters before doing it (and check the time)."""
        if time.monotonic() > self.deadline:
            raise _OverBudget(f"it runs longer than {_TEMPLATE_SECONDS:g} s")
        if chars > self.chars_left:
            raise _OverBudget(f"it builds more than {_TEMPLATE_BUDGET_CHARS:,} characters")

    def spend(self, chars: int) -> None:
        """Account for `chars` characters just built."""
        self.check(chars)
        self.chars_left -= chars


class _CheckedCodeGenerator(CodeGenerator):
    """Compiles templates so that each loop step and each `~` concatenation calls
    back into the environment: Jinja's sandbox intercepts neither on its own."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        steps = nodes.EnvironmentAttribute("loop_steps", lineno=node.lineno)
        node.iter = nodes.Call(steps, [node.iter], [], None, None, lineno=node.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.concat((")
        for part in node.nodes:
            self.visit(part, frame)
            self.write(", ")
        self.write("))")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with every loop step, call, filter, operator and
    piece of output checked against a `_RenderBudget`."""

    code_generator_class = _CheckedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, budget: _RenderBudget):
        super().__init__(trim_blocks=True, lstrip_blocks=True)
        self.budget = budget
        del self.globals["lipsum"]  # lorem ipsum paragraphs: no use to a chat template, and slow in bulk
        self.filters = {name: self._checked_filter(name, f) for name, f in self.filters.items()}

    def concat(self, pieces: Iterable[Any]) -> str:
        """Joins the output, captured blocks, macro results and `~` concatenations."""
        parts = []
        for piece in pieces:
            text = str(piece)
            self.budget.spend(len(text))
            parts.append(text)
        return "".join(parts)

    def loop_steps(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            self.budget.check()
            yield item

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        self.budget.check(_operator_size(operator, left, right))
        result = super().call_binop(context, operator, left, right)
        self.budget.spend(_size(result))
        return result

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (Jinja's names)
        """Calls of methods, macros and global functions."""
        args = __self._listed(args)
        name, text = _str_method(__obj)
        __self.budget.check(_call_size(name, text, args, kwargs, method=True))
        result = super().call(__context, __obj, *args, **kwargs)
        __self.budget.spend(_size(result))
        return result

    def _checked_filter(self, name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)  # keeps the marks that tell Jinja what to pass first
        def checked(*args: Any, **kwargs: Any) -> Any:
            args = self._listed(args)
            given = [a for a in args if not isinstance(a, (Context, EvalContext, Environment))]
            subject, rest = (given[0], tuple(given[1:])) if given else (None, ())
            self.budget.check(_call_size(name, subject, rest, kwargs, method=False))
            result = f(*args, **kwargs)
            self.budget.spend(_size(result))
            return result

        return checked

    def _listed(self, args: tuple) -> tuple:
        """Iterators among `args` (what map, select, reverse... return) as lists, so that
        their size is known before a call uses them; read on the clock: some never end."""
        return tuple(list(self.loop_steps(a)) if _is_plain_iterator(a) else a for a in args)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        """Reaching for an unsafe attribute fails at once, instead of rendering as ""."""
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


# --- sizes, known before the work -----------------------------------------------------


def _size(value: Any) -> int:
    """About how many characters `value` takes as text."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(_size(item) + 4 for item in value)
    if isinstance(value, dict):
        return sum(_size(k) + _size(v) + 4 for k, v in value.items())
    return 16


def _digits(n: int) -> int:
    return abs(n).bit_length() // 3 + 1


def _operator_size(operator: str, left: Any, right: Any) -> int:
    """About how large an operator's result is, before computing it."""
    ints = isinstance(left, int) and isinstance(right, int)
    if operator == "**" and ints:
        return _digits(left) * max(right, 0)
    if operator == "*" and ints:
        return _digits(left) + _digits(right)
    if operator == "*" and (isinstance(left, int) or isinstance(right, int)):  # repetition
        count, sequence = (left, right) if isinstance(left, int) else (right, left)
        return max(count, 0) * _size(sequence)
    if operator == "%" and isinstance(left, str):
        return _size(left) + _size(right) + _format_widths(left)
    return _size(left) + _size(right)


def _call_size(name: str | None, subject: Any, args: tuple, kwargs: dict, *, method: bool) -> int:
    """About how large the result of `subject.name(*args)` (a str method) or
    `subject|name(*args)` (a filter) is, where its arguments tell: a width or a count
    (center, batch...), a join, a format string's field widths, a replace or an indent."""
    numbers = [a for a in (*args, *kwargs.values()) if isinstance(a, int)]
    size = max(numbers, default=0)
    if name == "join":
        items, separator = (args[0], subject) if method else (subject, _arg(args, kwargs, 0, "d", ""))
        return size + _size(items) + _size(separator) * len(items)
    if not isinstance(subject, str):
        return size
    if name in ("format", "format_map"):
        return size + len(subject) + _format_widths(subject) + _size(args) + _size(kwargs)
    if name == "replace":
        old, new = _arg(args, kwargs, 0, "old", ""), _arg(args, kwargs, 1, "new", "")
        return size + len(subject) + (subject.count(str(old)) + 1) * _size(new)
    if name == "indent":
        width = _arg(args, kwargs, 0, "width", 4)
        return size + len(subject) + (subject.count("\n") + 1) * (width if isinstance(width, int) else _size(width))
    if name == "expandtabs":
        tab = _arg(args, kwargs, 0, "tabsize", 8)
        return size + len(subject) + subject.count("\t") * (tab if isinstance(tab, int) else 0)
    return size


def _arg(args: tuple, kwargs: dict, position: int, name: str, default: Any) -> Any:
    return args[position] if len(args) > position else kwargs.get(name, default)


def _format_widths(fmt: str) -> int:
    """Every number in a format string, taken as a field width (an over-estimate)."""
    return sum(int(run[:10]) for run in re.findall(r"\d+", fmt))


def _str_method(obj: Any) -> tuple[str | None, Any]:
    """("join", "sep") for "sep".join, and so on; (None, None) for anything else."""
    method = inspect.unwrap(obj)  # the sandbox wraps str.format
    text = getattr(method, "__self__", None)
    return (getattr(method, "__name__", None), text) if isinstance(text, str) else (None, None)


def _is_plain_iterator(value: Any) -> bool:
    """An iterator other than a for loop's `loop` (which must not be read ahead)."""
    return isinstance(value, Iterator) and not isinstance(value, LoopContext)


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

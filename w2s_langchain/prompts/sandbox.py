"""The bounded Jinja sandbox that chat templates render in.

A chat template ships inside a GGUF file: it is code from whoever made the file, and
runs on every prompt. Jinja's immutable sandbox keeps it away from Python internals
(attributes starting with "_", unsafe functions, changing lists and dicts); the bounds
below keep a hostile or broken template from hanging the caller (endless loops, huge
integer arithmetic that holds the GIL) or eating its memory (strings, lists and
format widths that grow without end). Real templates stay far below each of them.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from jinja2 import Environment, Template, TemplateError, Undefined, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter, SecurityError
from markupsafe import EscapeFormatter, Markup

from ..deadline import current_deadline

RENDER_SECONDS = 1.0
# Real templates render in about a millisecond; a second leaves room for a slow, busy
# machine and a long conversation, and stops a runaway loop quickly.

MAX_TEMPLATE_CHARS = 100_000
# Published chat templates are a few thousand characters, the longest a few tens of
# thousands. Compiling costs about 10 us a character, which this bounds to about a second.

RENDER_BUDGET_CHARS = 32_000_000
# Characters one render may build in all: its output and every string or list its
# operations make on the way. A 128k-token context is about 0.5M characters, which a
# template copies a few times over; this is sixty times that, and at most 4 bytes a
# character (128 MB) of memory.

MAX_INT_DIGITS = 4_000
MAX_INT_BITS = math.ceil(MAX_INT_DIGITS * math.log2(10))
# Integers a render may compute with. Arithmetic on big integers is one C call that
# holds the GIL and never looks at the clock: `10**2000000 // 3**1000000` took 14 s,
# freezing every thread (an asyncio caller's event loop too). Below this size the
# slowest operation (division) takes microseconds; Python itself refuses to print
# integers of more than 4,300 digits, and chat templates count turns and tokens.


class _OverBudget(Exception):
    """A render went past one of the bounds at the top of this module."""


def render_template(template: str, **variables: Any) -> str:
    """`template` rendered with `variables` within the bounds above, and with
    `raise_exception` for a template to refuse its input. Raises whatever the template
    does; `why_unusable` says what that means."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise _OverBudget(f"it is {len(template):,} characters long, more than the {MAX_TEMPLATE_CHARS:,} allowed")
    compiled = _compiled(template)
    token = _render_budget.set(_RenderBudget())
    try:
        return compiled.render(**variables, raise_exception=_raise_exception)
    finally:
        _render_budget.reset(token)


@functools.lru_cache(maxsize=32)
def _compiled(template: str) -> Template:
    """A template compiled once (it renders on every prompt; compiling takes far longer)."""
    return _SANDBOX.from_string(template)


def _raise_exception(message: str) -> None:
    """What templates call to refuse a conversation (HF transformers' convention)."""
    raise TemplateError(message)


def why_unusable(err: Exception) -> str:
    """Why a template that raised `err` while rendering cannot be used, in words."""
    if isinstance(err, SecurityError):
        return f"it reaches for Python internals ({err})"
    if isinstance(err, RecursionError):
        return "it recurses too deeply"
    if isinstance(err, MemoryError):
        return "it ran out of memory"
    if isinstance(err, (_OverBudget, TemplateError)):
        return str(err)
    return f"{type(err).__name__}: {err}"


class _RenderBudget:
    """What one render may still spend: its own CPU time (other threads' work on a
    busy machine does not count against it), the call's deadline, and characters."""

    def __init__(self) -> None:
        self.cpu_deadline = time.thread_time() + RENDER_SECONDS
        self.call = current_deadline()
        self.chars_left = RENDER_BUDGET_CHARS

    def check(self, chars: int = 0) -> None:
        """Refuse work of `chars` characters before doing it (and check the time)."""
        if self.call is not None and time.perf_counter() > self.call.at:
            raise self.call.passed("rendering a chat template")
        if time.thread_time() > self.cpu_deadline:
            raise _OverBudget(f"it runs longer than {RENDER_SECONDS:g} s")
        if chars > self.chars_left:
            raise _OverBudget(f"it builds more than {RENDER_BUDGET_CHARS:,} characters")

    def spend(self, chars: int) -> None:
        """Account for `chars` characters just built."""
        self.check(chars)
        self.chars_left -= chars


# The budget of the render running in this thread.
_render_budget: contextvars.ContextVar[_RenderBudget] = contextvars.ContextVar("w2s_render_budget")


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
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})  # every binary operator Jinja has

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True)
        del self.globals["lipsum"]  # lorem ipsum paragraphs: no use to a chat template, and slow in bulk
        self.filters = {name: self._checked_filter(name, f) for name, f in self.filters.items()}

    @property
    def budget(self) -> _RenderBudget:
        return _render_budget.get()

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
        if _integer_bits(operator, left, right) > MAX_INT_BITS:
            raise _OverBudget(f"it computes with integers of more than {MAX_INT_DIGITS:,} digits")
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

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """`str.format` and `format_map` as Jinja's sandbox wraps them, formatted by
        `_BoundedFormatter`: a width may come from an argument ("{0:>{1}}"), so it is
        known only once the nested fields are filled in."""
        if super().wrap_str_format(value) is None:  # Jinja decides what is a format method
            return None
        text, is_format_map = value.__self__, value.__name__ == "format_map"
        formatter = _BoundedEscapeFormatter(self, escape=text.escape) if isinstance(text, Markup) else _BoundedFormatter(self)

        def bounded_format(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument and no keywords")
                args, kwargs = (), args[0]
            return type(text)(formatter.vformat(text, args, kwargs))

        return functools.update_wrapper(bounded_format, value)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        """Reaching for an unsafe attribute fails at once, instead of rendering as ""."""
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


class _BoundedFormatter(SandboxedFormatter):
    """Jinja's sandboxed `str.format`, refusing a field whose width or precision
    (nested fields filled in) would build too much, before formatting it."""

    def format_field(self, value: Any, format_spec: str) -> Any:
        self._env.budget.check(_size(value) + _format_widths(format_spec))
        return super().format_field(value, format_spec)


class _BoundedEscapeFormatter(_BoundedFormatter, EscapeFormatter):
    """The same for a `Markup` format string (whose fields are escaped)."""


_SANDBOX = _BoundedSandbox()  # one for every render: the budget is each render's own


# --- sizes, known before the work -----------------------------------------------------


def _size(value: Any) -> int:
    """About how many characters `value` takes as text."""
    if isinstance(value, (str, bytes, bytearray)):  # bytes (from str.encode) build as strings do
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(_size(item) + 4 for item in value)
    if isinstance(value, dict):
        return sum(_size(k) + _size(v) + 4 for k, v in value.items())
    return 16


def _digits(n: int) -> int:
    return abs(n).bit_length() // 3 + 1


def _integer_bits(operator: str, left: Any, right: Any) -> int:
    """About how many bits the integers of `left operator right` take (operands and
    result), before computing it; 0 when it is not integer arithmetic."""
    if not (isinstance(left, int) and isinstance(right, int)):
        return 0
    bits = max(left.bit_length(), right.bit_length())
    if operator == "**" and right > 0 and abs(left) > 1:
        return max(bits, left.bit_length() * right)
    if operator == "*":
        return left.bit_length() + right.bit_length()
    return bits


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
    if operator == "%" and isinstance(left, (str, bytes)):
        fmt = left.decode("latin-1") if isinstance(left, bytes) else left
        return _size(left) + _size(right) + _format_widths(fmt, right if isinstance(right, tuple) else (right,))
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
    if not isinstance(subject, (str, bytes)):
        return size
    if name == "translate":  # each character may become a whole string
        table = args[0] if args else kwargs.get("table")
        longest = max((_size(v) for v in table.values()), default=1) if isinstance(table, dict) else 1
        return size + len(subject) * max(longest, 1)
    if isinstance(subject, bytes):
        subject = subject.decode("latin-1")  # sizes alike: one character a byte
        args = tuple(a.decode("latin-1") if isinstance(a, bytes) else a for a in args)
    if name in ("format", "format_map"):
        return size + len(subject) + _format_widths(subject, args) + _size(args) + _size(kwargs)
    if name == "replace":
        old, new = _arg(args, kwargs, 0, "old", ""), _arg(args, kwargs, 1, "new", "")
        occurrences = subject.count(old) if isinstance(old, str) else len(subject)
        return size + len(subject) + (occurrences + 1) * _size(new)
    if name == "indent":
        width = _arg(args, kwargs, 0, "width", 4)
        return size + len(subject) + (subject.count("\n") + 1) * (width if isinstance(width, int) else _size(width))
    if name == "expandtabs":
        tab = _arg(args, kwargs, 0, "tabsize", 8)
        return size + len(subject) + subject.count("\t") * (tab if isinstance(tab, int) else 0)
    return size


def _arg(args: tuple, kwargs: dict, position: int, name: str, default: Any) -> Any:
    return args[position] if len(args) > position else kwargs.get(name, default)


def _format_widths(fmt: str, args: Iterable[Any] = ()) -> int:
    """Every number in a format string, taken as a field width (an over-estimate),
    and with a "*" ("%*s": the width is an argument), every integer argument too."""
    widths = sum(int(run[:10]) for run in re.findall(r"\d+", fmt))
    if "*" in fmt:
        widths += sum(abs(a) for a in args if isinstance(a, int))
    return widths


def _str_method(obj: Any) -> tuple[str | None, Any]:
    """("join", "sep") for "sep".join (and b"sep".join), and so on; (None, None) for anything else."""
    method = inspect.unwrap(obj)  # the sandbox wraps str.format
    text = getattr(method, "__self__", None)
    return (getattr(method, "__name__", None), text) if isinstance(text, (str, bytes)) else (None, None)


def _is_plain_iterator(value: Any) -> bool:
    """An iterator other than a for loop's `loop` (which must not be read ahead)."""
    return isinstance(value, Iterator) and not isinstance(value, LoopContext)

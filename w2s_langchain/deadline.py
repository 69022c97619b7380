"""The deadline of the call running in this thread: what a search's `timeout`
bounds besides the search loop itself (chat-template renders, every request to a
llama-server). Set by the caller around a whole call; read where the work happens."""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import SearchTimeoutError


@dataclass(frozen=True)
class Deadline:
    at: float
    """time.perf_counter() by which the call must end."""
    timeout: float
    """The call's timeout in seconds, for messages."""

    def left(self) -> float:
        return self.at - time.perf_counter()

    def passed(self, doing: str) -> SearchTimeoutError:
        """The error for a call that ran out of time while `doing` something."""
        return SearchTimeoutError(
            f"the search ran past its timeout of {self.timeout} s while {doing}: raise `timeout`, lower the budget "
            "(iterations, samples, max_new_tokens), or set `partial_answer` to get the best answer found so far"
        )


_current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("w2s_call_deadline", default=None)


def current_deadline() -> Deadline | None:
    """The deadline of the call running in this thread (None: no timeout)."""
    return _current.get()


@contextlib.contextmanager
def search_time_limit(timeout: float | None, started: float) -> Iterator[None]:
    """Work inside the block ends when a call of `timeout` seconds that began at
    `started` (a time.perf_counter()) must end, with SearchTimeoutError."""
    token = _current.set(Deadline(started + timeout, timeout) if timeout is not None else None)
    try:
        yield
    finally:
        _current.reset(token)

"""Stopping early: timeout, cancel, Ctrl-C, a context that fills up. Each frees
what the search held and leaves the models usable."""

from __future__ import annotations

import threading
import time

import pytest

from support.search_models import LONG, PROMPT, SMALL, grown, make_models, nothing_held
from w2s_langchain.engine import Context, load_model
from w2s_langchain.errors import ContextOverflowError, SearchCancelledError, SearchTimeoutError
from w2s_langchain.prompts import PromptFormat
from w2s_langchain.search import Proxy, SearchModels, SearchSettings, WeakScorer, search


def usable_afterwards(models: SearchModels, tiny_models) -> bool:
    """The next search on the same models answers as it would on fresh ones."""
    again = search(models, PROMPT, SearchSettings(**SMALL))
    fresh = search(make_models(tiny_models), PROMPT, SearchSettings(**SMALL))
    return again.text == fresh.text and grown(again) == grown(fresh)


def test_timeout_stops_the_search_promptly_and_frees_it(tiny_models):
    models = make_models(tiny_models)
    started = time.perf_counter()
    with pytest.raises(SearchTimeoutError, match="partial_answer"):
        search(models, PROMPT, SearchSettings(**LONG, timeout=0.3))
    # One decode step of the tiny models takes milliseconds: "promptly" is well inside a second.
    assert time.perf_counter() - started < 0.3 + 1.0
    assert nothing_held(models)
    assert usable_afterwards(models, tiny_models)


@pytest.mark.parametrize("strategy", ["w2s", "cbs"])
def test_timeout_with_partial_answer_returns_the_best_so_far(tiny_models, strategy):
    models = make_models(tiny_models)
    settings = SearchSettings(**LONG, strategy=strategy, beam_width=8, timeout=0.3, partial_answer=True)
    result = search(models, PROMPT, settings)
    assert result.stopped == "timeout" and result.source == "partial"
    assert result.text and result.finish_reason is None  # unfinished: max_new_tokens is far away
    answers = {n["answer"] for n in result.tree_dict()["nodes"]}
    assert result.text in answers
    assert nothing_held(models)


def test_partial_answer_needs_something_to_return(tiny_models):
    models = make_models(tiny_models)
    settings = SearchSettings(**{**LONG, "max_new_tokens": 400}, strategy="bon", samples=4, timeout=0.2, partial_answer=True)
    with pytest.raises(SearchTimeoutError):  # Best-of-N has no answer before its samples finish
        search(models, PROMPT, settings)
    assert nothing_held(models)


def test_cancel_from_another_thread_stops_within_one_step(tiny_models):
    models = make_models(tiny_models)
    cancel = threading.Event()
    seen = []

    def progress(done, total, what):
        seen.append(done)
        if done == 3:
            cancel.set()

    with pytest.raises(SearchCancelledError):
        search(models, PROMPT, SearchSettings(**LONG), progress, cancel)
    assert seen == [1, 2, 3]  # the fourth iteration's expansion saw the event
    assert nothing_held(models)
    assert usable_afterwards(models, tiny_models)


def test_keyboard_interrupt_inside_an_expansion_frees_every_branch(tiny_models, monkeypatch):
    models = make_models(tiny_models)
    calls = {"n": 0}
    real_next_logits = Context.next_logits

    def interrupted_while_children_grow(self, branches):
        if self is models.strong:
            calls["n"] += 1
            # With L = 4 an expansion asks the strong context 4 times: call 7 is
            # the second expansion's third token, its children half grown.
            if calls["n"] == 7:
                raise KeyboardInterrupt
        return real_next_logits(self, branches)

    monkeypatch.setattr(Context, "next_logits", interrupted_while_children_grow)
    with pytest.raises(KeyboardInterrupt):
        search(models, PROMPT, SearchSettings(**{**LONG, "chunk_tokens": 4}))
    monkeypatch.undo()
    assert calls["n"] == 7
    assert nothing_held(models)
    assert usable_afterwards(models, tiny_models)


@pytest.mark.parametrize("partial", [False, True])
def test_a_context_that_fills_up_mid_search(tiny_models, partial):
    """The weak contexts hold 256 cells; a 400-token answer needs more (chunks
    of 40 tokens reach that depth within a few iterations)."""

    def ctx(path, n_ctx=256):
        return Context(load_model(path), n_ctx=n_ctx, n_threads=1, n_seq_max=8)

    models = SearchModels(
        ctx(tiny_models.tiny_c, 512), PromptFormat(),
        Proxy(WeakScorer(ctx(tiny_models.tiny_a), PromptFormat()), WeakScorer(ctx(tiny_models.tiny_b), PromptFormat())),
    )
    settings = SearchSettings(**{**LONG, "max_new_tokens": 400, "chunk_tokens": 40}, partial_answer=partial)
    if partial:
        result = search(models, PROMPT, settings)
        assert result.stopped == "context_full" and result.source == "partial" and result.text
    else:
        with pytest.raises(ContextOverflowError, match="raise n_ctx"):
            search(models, PROMPT, settings)
    assert nothing_held(models)

"""Bad settings and prompts are refused; beta scales every value."""

from __future__ import annotations

import pytest

from support.search_models import make_models, run
from w2s_langchain.search import SearchSettings, search


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"strategy": "mcts"}, "unknown strategy"),
        ({"children": 0}, "children"),
        ({"chunk_tokens": 0}, "chunk_tokens"),
        ({"iterations": 0}, "iterations"),
        ({"samples": 0}, "samples"),
        ({"beam_width": 0}, "beam_width"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": "abc"}, "stop"),
        ({"fallback": "hope"}, "fallback"),
        ({"token_budget": 0}, "token_budget"),
        ({"parallel_leaves": 0}, "parallel_leaves"),
        ({"parallel_leaves": 2.0}, "parallel_leaves"),
        ({"selection": "mcts"}, "selection"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
    ],
)
def test_bad_settings(changes, message):
    with pytest.raises(ValueError, match=message):
        SearchSettings(**changes)


def test_empty_prompt(tiny_models):
    with pytest.raises(ValueError, match="empty"):
        search(make_models(tiny_models), "  ", SearchSettings())


def test_beta_scales_every_value(tiny_models):
    one, _ = run(tiny_models, strategy="bon", samples=3)
    two, _ = run(tiny_models, strategy="bon", samples=3, beta=2.0)
    assert two.text == one.text
    assert two.value == pytest.approx(2 * one.value, rel=1e-6)

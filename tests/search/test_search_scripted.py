"""The search's budget, fallback and leaf-counting corners, on a scripted strong
model and proxy (tests/support/scripted.py): every token and value is known, so
token counts are asserted exactly."""

from __future__ import annotations

import pytest

from support.scripted import ScriptedModels
from w2s_langchain.search import SearchSettings, search

# K = 2 children of L = 2 tokens, answers of at most M = 10 tokens.
SCRIPT = dict(iterations=1000, children=2, chunk_tokens=2, max_new_tokens=10)


def run(models: ScriptedModels | None = None, **settings):
    models = models or ScriptedModels()
    return search(models, "a prompt", SearchSettings(**{**SCRIPT, **settings})), models


def test_the_tree_search_stops_when_the_budget_is_spent_exactly():
    result, models = run(token_budget=8)
    # Two whole steps of K x L = 4 tokens spend the budget to the token: no third step.
    assert result.cost.strong_tokens_sampled == 8
    assert [chunk for _, _, chunk in models.strong_side.expansions] == [2, 2]
    assert result.source == "fallback_truncated" and result.text == "aaaa"


def test_the_finish_fallback_ends_the_answer_on_the_last_token_of_the_budget():
    # The tree leaves the fallback what finishing its best path needs, shrinking
    # its last chunks to fit; the fallback's plain sample ends the answer on the
    # budget's last token.
    result, models = run(token_budget=18, fallback="finish")
    assert result.source == "fallback_finished" and result.finish_reason == "length"
    assert result.text == "a" * 10
    assert result.cost.strong_tokens_sampled == 18
    assert models.strong_side.expansions[-1] == (["a" * 8], 1, 2)  # the plain sample


def test_the_fallback_steps_greedily_only_while_the_budget_can_still_finish():
    result, models = run(iterations=2, token_budget=17, fallback="finish")
    # After the tree's 8 tokens, 9 are left for 6 to go: one greedy step (K x L = 4)
    # leaves 5 for the last 4, which a plain sample takes; a second greedy step
    # would leave too few to finish.
    assert models.strong_side.expansions[2:] == [(["aaaa"], 2, 2), (["a" * 6], 1, 4)]
    assert result.source == "fallback_finished" and result.text == "a" * 10
    assert result.cost.strong_tokens_sampled == 16


def test_a_finished_child_of_the_root_keeps_the_fallbacks_reserve():
    # "bb" ends at once: the root has a finished child, but the root is no stage-2
    # candidate, so the fallback may still have to finish the best path.
    result, _ = run(ScriptedModels(ends={"bb"}), token_budget=19, fallback="finish")
    assert result.source == "fallback_finished" and result.finish_reason == "length"
    assert result.cost.strong_tokens_sampled == 19


@pytest.mark.parametrize(
    "budget, sampled, answer",
    [(1, 2, "a"), (3, 4, "aa"), (6, 6, "a" * 4), (10, 10, "a" * 8)],
)
def test_a_budget_below_one_answer_still_buys_an_answer(budget, sampled, answer):
    result, models = run(token_budget=budget, fallback="finish")
    # The root's first step is always taken (its K chunks a token at least, so a
    # budget of 1 is passed by K - 1); the fallback samples what is left and the
    # answer stops there, reported as truncated.
    assert models.strong_side.expansions[0][0] == [""]
    assert (result.text, result.cost.strong_tokens_sampled) == (answer, sampled)
    assert result.source == "fallback_truncated" and result.finish_reason is None


def test_the_search_stops_when_every_leaf_of_a_parallel_step_finished():
    result, _ = run(max_new_tokens=4, parallel_leaves=4)
    # Step 1 grows the root; step 2 both its children, whose 4 children all end
    # with "length": nothing is left to grow.
    assert (result.cost.steps, result.cost.iterations) == (2, 3)


def test_each_parent_of_a_parallel_step_gets_its_own_entropy():
    models = ScriptedModels(entropy=lambda text: 1.0 + len(text) + text.count("b"))
    result, _ = run(models, iterations=12, parallel_leaves=4)
    expanded = [n for n in result.tree.walk() if n.children]
    assert len({n.entropy for n in expanded}) > 2
    assert all(n.entropy == models.entropy(n.chunk.text) for n in expanded)

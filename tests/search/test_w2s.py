"""W2S-AlignTree on the tiny models (tiny_c writes, tiny_a / tiny_b judge, another
vocabulary: the cross-tokenizer path is the tested path): backups, stage 2, the
fallbacks, finished leaves, the golden trees, selection rules, the token budget."""

from __future__ import annotations

import json
import math

import pytest

from support import golden_trees
from support.search_models import PROMPT, assert_every_selection_backed_up, grown, make_models, run, stage2_finalists
from w2s_langchain.search import SearchSettings, search
from w2s_langchain.search.tree import NEG_INF


def test_backprop_takes_the_max_and_counts_visits(tiny_models):
    result, _ = run(tiny_models, max_new_tokens=40)
    assert_every_selection_backed_up(result)
    assert all(node.visits == 1 for node in result.tree.walk() if not node.children)


def test_children_have_distinct_first_tokens_and_priors(tiny_models):
    result, _ = run(tiny_models, max_new_tokens=40)
    for node in result.tree.walk():
        if node.children:
            firsts = [c.chunk.tokens[len(node.chunk.tokens)] for c in node.children if len(c.chunk.tokens) > len(node.chunk.tokens)]
            assert len(set(firsts)) == len(firsts)
            assert node.entropy is not None and node.entropy > 0
        assert 0 < node.prior <= 1


def test_terminal_children_are_minus_infinity_by_default_or_eos_scored(tiny_models):
    quirk, _ = run(tiny_models, max_new_tokens=4, chunk_tokens=2)
    finished = [n for n in quirk.tree.walk() if n.terminal]
    assert finished and all(n.value == NEG_INF for n in finished)
    scored, _ = run(tiny_models, max_new_tokens=4, chunk_tokens=2, terminal_reward="eos")
    finished = [n for n in scored.tree.walk() if n.terminal]
    assert finished and all(n.value == n.eos_value and math.isfinite(n.value) for n in finished)


@pytest.mark.parametrize("nonterminal", [True, False])
def test_stage2_scores_exactly_the_children_of_the_best_ranked_candidates(tiny_models, nonterminal):
    result, _ = run(tiny_models, iterations=40, max_new_tokens=9, chunk_tokens=2, num_select=2, stage2_nonterminal=nonterminal)
    assert result.source == "stage2"
    root = result.tree
    candidates = [n for n in root.walk() if n is not root and not n.terminal and any(ch.terminal for ch in n.children)]
    assert len(candidates) > 2  # more than num_select: the ranking decides
    # With the default -inf quirk nothing is eos-scored before stage 2.
    finalists = [n for n in root.walk() if n.eos_value is not None]
    assert {id(n) for n in finalists} == stage2_finalists(result, 2, nonterminal, SearchSettings().c)
    if not nonterminal:
        assert all(n.terminal for n in finalists)
    best = max(finalists, key=lambda n: n.eos_value)
    assert result.text == best.chunk.text and result.value == best.eos_value


def test_stage2_ranks_by_a_candidates_own_value_not_its_backed_up_one(tiny_models):
    """A candidate whose children all finished has R = -inf under the quirk, yet
    it holds the most finished answers: its own value still ranks it."""
    result, _ = run(tiny_models, iterations=40, max_new_tokens=9, chunk_tokens=2, num_select=1)
    root = result.tree
    candidates = [n for n in root.walk() if n is not root and not n.terminal and any(ch.terminal for ch in n.children)]
    assert any(n.value == NEG_INF for n in candidates)
    assert all(n.own_value == n.proxy.value for n in candidates)
    assert {id(n) for n in root.walk() if n.eos_value is not None} == stage2_finalists(result, 1, True, SearchSettings().c)


def test_cost_seconds_has_every_phase_stage2_included(tiny_models):
    # The result is made inside stage 2: its time so far counts.
    result, _ = run(tiny_models, iterations=40, max_new_tokens=9, chunk_tokens=2)
    assert result.source == "stage2"
    seconds = result.cost.seconds
    assert set(seconds) == {"select", "expand", "evaluate", "stage2", "total"}
    assert 0 < seconds["stage2"] < seconds["total"]


def test_the_root_is_never_a_stage2_candidate(tiny_models):
    # Every child of the root finishes at once (L >= max_new_tokens): the root is
    # the only node with finished children, and it has no parent.
    result, _ = run(tiny_models, iterations=5, max_new_tokens=2, chunk_tokens=2)
    assert result.source == "fallback_finished"
    children = result.tree.children
    assert children and all(ch.terminal for ch in children)
    assert result.value == max(ch.eos_value for ch in children)


def test_fallback_truncates_or_finishes_the_same_best_path(tiny_models):
    truncated, _ = run(tiny_models, iterations=2, max_new_tokens=20)
    assert truncated.source == "fallback_truncated" and truncated.finish_reason is None
    assert len(truncated.text) > 0
    finished, _ = run(tiny_models, iterations=2, max_new_tokens=20, fallback="finish")
    assert finished.source == "fallback_finished" and finished.finish_reason in ("eos", "length", "stop")
    assert finished.text.startswith(truncated.text) and len(finished.text) > len(truncated.text)


def test_finish_fallback_spends_only_the_token_budget(tiny_models):
    settings = dict(iterations=1000, max_new_tokens=30, chunk_tokens=3, fallback="finish", token_budget=40)
    result, _ = run(tiny_models, **settings)
    # Within K = 3 tokens of the budget, plus at most 4 per child that complete a
    # UTF-8 character, whatever the fallback does. Here the tree's last step took
    # a token of the fallback's reserve, so the answer stops where the budget does,
    # one token short of max_new_tokens.
    assert result.cost.strong_tokens_sampled <= 40 + 3 + 3 * 4
    assert (result.source, result.finish_reason) == ("fallback_truncated", None)
    assert result.cost.strong_tokens_sampled == 40 and result.cost.answer_tokens == 29
    unbudgeted, _ = run(tiny_models, **{**settings, "token_budget": None, "iterations": 4})
    assert unbudgeted.source == "fallback_finished"  # without a budget it finishes greedily by V


def test_a_selected_finished_leaf_is_a_visit_and_the_search_goes_on(tiny_models):
    result, _ = run(tiny_models, iterations=60, max_new_tokens=6, chunk_tokens=2, terminal_reward="eos")
    root = result.tree
    assert result.cost.iterations == 60 and root.visits == 60
    revisited = [n for n in root.walk() if n.terminal and n.visits > 1]
    assert revisited  # finished leaves were selected, and their visits backed up
    for node in root.walk():
        if node.children:
            assert node.value == max(c.value for c in node.children)


def test_the_search_stops_when_no_unfinished_leaf_is_left(tiny_models):
    result, _ = run(tiny_models, iterations=500, max_new_tokens=4, chunk_tokens=2)
    leaves = [n for n in result.tree.walk() if not n.children]
    assert all(n.terminal for n in leaves)
    expanded = [n for n in result.tree.walk() if n.children]
    assert result.cost.iterations == len(expanded) < 500


@pytest.mark.parametrize("case", golden_trees.CASES)
def test_one_leaf_per_step_builds_the_golden_trees(tiny_models, case):
    """One leaf per step builds the golden trees (tests/support/golden_trees.py):
    node for node, with the same answer and search counters, values to the
    engine's noise (how the engine reads tokens may change)."""
    expected = json.loads(golden_trees.GOLDEN.read_text())[case]
    settings = SearchSettings(**golden_trees.CASES[case], parallel_leaves=1)
    got = golden_trees.record(search(make_models(tiny_models), PROMPT, settings))
    for record in (got, expected):
        for name in golden_trees.ENGINE_COUNTERS:
            del record["cost"][name]
    assert golden_trees.differences(got, expected) == []


def test_selection_rule_is_a_setting(tiny_models):
    from w2s_langchain.search.tree import ea_puct

    calls = []

    def my_rule(child, parent, c, w):
        calls.append(child)
        return ea_puct(child, parent, c, w)

    default, _ = run(tiny_models)
    mine, _ = run(tiny_models, selection=my_rule)
    assert calls and grown(mine) == grown(default)
    assert mine.settings["selection"].endswith("my_rule")
    # The tiny models' values are far apart: a large c lets exploration decide.
    explore = dict(c=10.0)
    uct_tree, _ = run(tiny_models, selection="uct", **explore)
    puct_tree, _ = run(tiny_models, selection="puct", **explore)
    ea_puct_tree, _ = run(tiny_models, **explore)
    assert grown(uct_tree) != grown(ea_puct_tree) and uct_tree.settings["selection"] == "uct"
    assert grown(puct_tree) == grown(run(tiny_models, entropy_weight=0.0, **explore)[0])


def test_same_seed_same_tree_and_answer(tiny_models):
    a, _ = run(tiny_models)
    b, _ = run(tiny_models)
    assert grown(a) == grown(b)
    c, _ = run(tiny_models, seed=6)
    assert grown(c) != grown(a)


def test_token_budget_stops_the_tree_search_once_spent(tiny_models):
    free, _ = run(tiny_models, iterations=1000, max_new_tokens=24)
    capped, _ = run(tiny_models, iterations=1000, max_new_tokens=24, token_budget=30)
    # The expansion that reaches the cap gets chunks of what is left / K tokens (at
    # least one), so the cap is passed by less than K = 3 tokens, plus at most 4 per
    # child that complete a UTF-8 character.
    assert 30 <= capped.cost.strong_tokens_sampled < 30 + 3 + 3 * 4
    assert capped.cost.iterations < free.cost.iterations
    # The same seed grows the same tree up to the cap: every node the capped search
    # expanded is in the free tree too (the last expansion's chunks were cut short).
    free_answers = {n.chunk.text for n in free.tree.walk()}
    expanded = [n.chunk.text for n in capped.tree.walk() if n.children]
    assert len(expanded) >= 3 and set(expanded) <= free_answers

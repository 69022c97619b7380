"""Leaf parallelism (parallel_leaves = P): a step selects P different leaves
under a virtual loss and grows them in one strong and one weak batch."""

from __future__ import annotations

import pytest

from support.search_models import (
    LONG,
    PROMPT,
    SMALL,
    assert_every_selection_backed_up,
    grown,
    make_models,
    nothing_held,
    run,
    stage2_finalists,
)
from w2s_langchain.engine import context as context_module
from w2s_langchain.search import SearchSettings, search, strategies
from w2s_langchain.search.tree import select_leaves


PARALLEL = dict(iterations=25, max_new_tokens=40, parallel_leaves=4)


def selectable_leaves(root) -> list:
    """Where a selection can end: finished nodes and nodes without children,
    below no finished node."""
    leaves, stack = [], [root]
    while stack:
        node = stack.pop()
        if node.terminal or not node.children:
            leaves.append(node)
        else:
            stack.extend(node.children)
    return leaves


def record_steps(monkeypatch) -> list[tuple[int, list, list]]:
    """Each step of the searches that follow: (leaves asked for, leaves
    selectable, leaves chosen)."""
    steps = []

    def recorded(root, score, n):
        selectable = selectable_leaves(root)
        paths = select_leaves(root, score, n)
        steps.append((n, selectable, [path[-1] for path in paths]))
        return paths

    monkeypatch.setattr(strategies, "select_leaves", recorded)
    return steps


@pytest.mark.parametrize("terminal_reward", ["-inf", "eos"])
@pytest.mark.parametrize("parallel_leaves", [4, 50])
def test_a_step_takes_different_leaves_and_backs_up_every_one(tiny_models, monkeypatch, parallel_leaves, terminal_reward):
    steps = record_steps(monkeypatch)
    settings = dict(iterations=13, max_new_tokens=9, chunk_tokens=2, parallel_leaves=parallel_leaves)
    result, _ = run(tiny_models, **settings, terminal_reward=terminal_reward)
    assert result.cost.iterations == 13 == sum(len(chosen) for _, _, chosen in steps)
    assert result.cost.steps == len(steps) < 13
    for asked, selectable, chosen in steps:
        # Different leaves, as many as asked for while any is left to choose.
        assert len({id(leaf) for leaf in chosen}) == len(chosen) == min(asked, len(selectable))
        assert {id(leaf) for leaf in chosen} <= {id(leaf) for leaf in selectable}
    assert max(len(chosen) for _, _, chosen in steps) == min(parallel_leaves, 9)
    if parallel_leaves == 50:  # every leaf, level by level: the root, its 3 children, their 9
        assert [len(chosen) for _, _, chosen in steps] == [1, 3, 9]
    if terminal_reward == "eos" and parallel_leaves == 4:  # finished leaves are chosen and count as visits
        assert any(leaf.terminal for _, _, chosen in steps for leaf in chosen)
    assert_every_selection_backed_up(result)


def test_a_step_grows_its_leaves_in_one_strong_batch_and_one_weak_one(tiny_models, monkeypatch):
    models = make_models(tiny_models)
    strong, weak = models.strong, models.proxy.contexts
    expansions, evaluations = [], []
    expand, evaluate = strategies._Run.expand, strategies._Run.evaluate

    def counted_expand(self, parents, k, chunk_tokens, *, distinct):
        before = strong.stats.decode_calls
        expand(self, parents, k, chunk_tokens, distinct=distinct)
        children = [child for parent in parents for child in parent.children]
        expansions.append((len(parents), len(children), strong.stats.decode_calls - before, max(c.chunk.n_new for c in children)))

    def counted_evaluate(self, nodes, terminal_reward):
        before = [c.stats.decode_calls for c in weak]
        evaluate(self, nodes, terminal_reward)
        evaluations.append([c.stats.decode_calls - b for c, b in zip(weak, before)])

    monkeypatch.setattr(strategies._Run, "expand", counted_expand)
    monkeypatch.setattr(strategies._Run, "evaluate", counted_evaluate)
    # A search reads in pieces of a few tokens, to see a timeout between them;
    # here one operation should be one llama_decode, whatever it rebuilds.
    monkeypatch.setattr(context_module, "_INTERRUPTIBLE_PIECE", 512)
    result = search(models, PROMPT, SearchSettings(**{**SMALL, **PARALLEL}))
    assert result.cost.steps == len(expansions) == len(evaluations)  # no finished leaf was chosen
    assert max(parents for parents, *_ in expansions) == 4
    for parents, children, decodes, longest in expansions:
        # P x K children, sampled in one decode per token (the first: the parents' rows).
        assert children == 3 * parents and decodes == longest
    assert all(calls == [1, 1] for calls in evaluations)  # one decode per weak context
    one_leaf, _ = run(tiny_models, **{**PARALLEL, "parallel_leaves": 1})
    assert result.cost.iterations == one_leaf.cost.iterations
    assert result.cost.decode_calls < one_leaf.cost.decode_calls / 2


def test_progress_counts_the_iterations_of_each_step(tiny_models):
    seen = []
    settings = SearchSettings(**{**SMALL, "iterations": 13, "parallel_leaves": 50})
    search(make_models(tiny_models), PROMPT, settings, lambda done, total, what: seen.append((done, total, what)))
    assert seen == [(1, 13, "iterations"), (4, 13, "iterations"), (13, 13, "iterations")]


def test_parallel_leaves_meet_the_token_budget_to_within_p_times_k(tiny_models):
    long_chunks = dict(iterations=1000, chunk_tokens=10, max_new_tokens=60, parallel_leaves=4)
    result, _ = run(tiny_models, **long_chunks, token_budget=150)
    # The step that reaches the cap shares what is left among its 4 x 3 children
    # (at least a token each), plus at most 4 per child to complete a UTF-8
    # character; a step of whole chunks could take 120.
    assert 150 <= result.cost.strong_tokens_sampled < 150 + 12 + 12 * 4
    assert result.cost.steps < result.cost.iterations < 1000
    finishing, _ = run(tiny_models, **{**PARALLEL, "iterations": 1000, "max_new_tokens": 30, "token_budget": 40, "fallback": "finish"})
    assert finishing.cost.strong_tokens_sampled <= 40 + 12 + 12 * 4


def test_parallel_leaves_are_reproducible_and_change_the_search(tiny_models):
    a, _ = run(tiny_models, **PARALLEL)
    b, _ = run(tiny_models, **PARALLEL)
    assert grown(a) == grown(b) and a.cost.steps == b.cost.steps
    assert grown(run(tiny_models, **PARALLEL, seed=6)[0]) != grown(a)
    assert grown(run(tiny_models, **{**PARALLEL, "parallel_leaves": 1})[0]) != grown(a)


def test_parallel_leaves_keep_stage2_and_the_fallbacks(tiny_models):
    ranked, _ = run(tiny_models, iterations=40, max_new_tokens=9, chunk_tokens=2, num_select=2, parallel_leaves=4)
    assert ranked.source == "stage2" and ranked.cost.steps < 40
    finalists = [n for n in ranked.tree.walk() if n.eos_value is not None]
    assert {id(n) for n in finalists} == stage2_finalists(ranked, 2, True, SearchSettings().c)
    truncated, _ = run(tiny_models, iterations=5, max_new_tokens=20, parallel_leaves=4)
    assert truncated.source == "fallback_truncated" and truncated.cost.steps == 3  # 1 + 3 + 1 leaves
    finished, _ = run(tiny_models, iterations=5, max_new_tokens=20, parallel_leaves=4, fallback="finish")
    assert finished.source == "fallback_finished" and finished.text.startswith(truncated.text)


def test_a_timeout_between_parallel_leaves_leaves_a_whole_tree(tiny_models):
    models = make_models(tiny_models)
    settings = SearchSettings(**LONG, parallel_leaves=4, timeout=0.3, partial_answer=True)
    result = search(models, PROMPT, settings)
    assert result.stopped == "timeout" and result.cost.steps > 1
    # No virtual loss left behind, no child of an unfinished step kept.
    assert_every_selection_backed_up(result)
    assert all(child.visits >= 1 for node in result.tree.walk() for child in node.children)
    assert nothing_held(models)

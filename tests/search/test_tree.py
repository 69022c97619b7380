"""Pure tree logic (no model needed): EA-PUCT selection, backpropagation and
the virtual loss of leaf parallelism."""

from __future__ import annotations

import math

import pytest

from w2s_langchain.search.strong import Chunk
from w2s_langchain.search.tree import (
    NEG_INF,
    SELECTIONS,
    Node,
    backpropagate,
    beam_pool,
    ea_puct,
    keep_best,
    max_of_children,
    mean_of_children,
    puct,
    select_leaves,
    select_path,
    uct,
    virtual_visit,
)


def node(value=0.0, prior=1.0, visits=1, entropy=None, finish=None, parent=None) -> Node:
    return Node(Chunk([], b"", prior=prior, finish_reason=finish), parent=parent, visits=visits, value=value, entropy=entropy)


def family(parent: Node, *children: Node) -> Node:
    parent.children = list(children)
    for child in children:
        child.parent = parent
    return parent


def test_ea_puct_is_the_spec_formula():
    parent = node(visits=9, entropy=2.0)
    child = node(value=0.5, prior=0.3, visits=2)
    c, w = 1.5, 0.2
    expected = 0.5 + c * 0.3 * math.sqrt(9) / (1 + 2) * (1 + w * 2.0)
    assert ea_puct(child, parent, c, w) == pytest.approx(expected)


def test_selection_takes_the_best_ea_puct_child_at_every_level():
    grandchild_a, grandchild_b = node(value=1.0, prior=0.1), node(value=0.2, prior=0.9)
    left = family(node(value=1.0, prior=0.5, visits=3, entropy=1.0), grandchild_a, grandchild_b)
    right = node(value=0.9, prior=0.5, visits=1)
    root = family(node(visits=4, entropy=1.0), left, right)
    score = lambda ch, p: ea_puct(ch, p, 2.0, 0.2)  # noqa: E731
    path = select_path(root, score)
    assert path[0] is root
    for parent, chosen in zip(path, path[1:]):
        assert chosen is max(parent.children, key=lambda ch: score(ch, parent))
    assert path[-1].children == []


def test_entropy_weight_moves_selection_toward_uncertain_parents_priors():
    exploit = node(value=1.0, prior=0.1, visits=1)
    explore = node(value=0.8, prior=0.9, visits=1)
    calm = family(node(visits=1, entropy=0.0), exploit, explore)
    # With c small, value wins when the parent is certain (or w = 0: plain PUCT)...
    assert select_path(calm, lambda ch, p: ea_puct(ch, p, 0.2, 0.2))[-1] is exploit
    assert select_path(calm, lambda ch, p: ea_puct(ch, p, 0.2, 0.0))[-1] is exploit
    # ...and a high-entropy parent widens the bonus enough for the high prior.
    uncertain = family(node(visits=1, entropy=8.0), exploit, explore)
    assert select_path(uncertain, lambda ch, p: ea_puct(ch, p, 0.2, 0.2))[-1] is explore


def test_selection_stops_at_a_terminal_node():
    done = node(value=2.0, finish="eos")
    family(done, node(value=5.0))  # children of a finished node are never followed
    root = family(node(visits=1), done, node(value=0.0))
    assert select_path(root, lambda ch, p: ch.value)[-1] is done


def test_max_backprop_along_the_path():
    a, b = node(value=0.3), node(value=NEG_INF, finish="length")
    leaf = family(node(value=0.0, visits=1), a, b)
    mid = family(node(value=0.1, visits=2), leaf, node(value=-1.0))
    root = family(node(visits=2), mid, node(value=0.05))
    backpropagate([root, mid, leaf], max_of_children)
    assert leaf.value == 0.3 and mid.value == 0.3 and root.value == 0.3
    assert (leaf.visits, mid.visits, root.visits) == (2, 3, 3)


def test_mean_backup_skips_unjudged_finished_children():
    parent = family(node(), node(value=1.0), node(value=3.0), node(value=NEG_INF, finish="eos"))
    assert mean_of_children(parent) == 2.0
    assert max_of_children(parent) == 3.0
    only_finished = family(node(), node(value=NEG_INF, finish="eos"))
    assert mean_of_children(only_finished) == NEG_INF


def test_puct_and_uct_are_the_reference_formulas():
    parent = node(visits=9, entropy=2.0)
    child = node(value=0.5, prior=0.3, visits=2)
    assert puct(child, parent, 1.5, 0.2) == pytest.approx(0.5 + 1.5 * 0.3 * 3 / 3)
    assert uct(child, parent, 1.5, 0.2) == pytest.approx(0.5 + 1.5 * math.sqrt(math.log(9) / 3))
    assert SELECTIONS == {"ea-puct": ea_puct, "puct": puct, "uct": uct}


def test_uct_ignores_the_prior_that_puct_follows():
    likely, valued = node(value=0.0, prior=0.9, visits=1), node(value=0.1, prior=0.01, visits=1)
    root = family(node(visits=4, entropy=1.0), likely, valued)
    picks = {rule: select_path(root, lambda ch, p: rule(ch, p, 1.0, 0.0))[-1] for rule in (puct, uct)}
    assert picks == {puct: likely, uct: valued}


def test_mean_backup_weights_each_child_by_its_visits():
    parent = family(node(), node(value=1.0, visits=3), node(value=3.0, visits=1), node(value=NEG_INF, finish="eos"))
    assert mean_of_children(parent) == pytest.approx((3 * 1.0 + 1 * 3.0) / 4)


def test_a_finished_beam_competes_with_k_copies_of_itself():
    done = node(value=5.0, finish="eos")
    open_beam = family(node(value=1.0), node(value=1.0), node(value=2.0), node(value=3.0))
    pool = beam_pool([done, open_beam], k=3)
    assert pool == [done, done, done, *open_beam.children]
    # Best first: the finished beam fills both slots, so the search would end.
    assert keep_best(pool, 2) == [done, done]
    assert keep_best(beam_pool([open_beam], k=3), 2) == [open_beam.children[2], open_beam.children[1]]


# --- leaf parallelism ----------------------------------------------------------------


def state(root: Node) -> list[tuple]:
    return [(n.visits, n.value, n.own_value) for n in root.walk()]


def small_tree() -> tuple[Node, Node, Node, Node]:
    """root -> A (leaves a1, a2), B (a leaf). Under PUCT with c = 1, A scores a
    little above B (0.75 to 0.7), and a1 above a2."""
    a1, a2 = node(value=0.5, prior=0.6), node(value=0.4, prior=0.4)
    a = family(node(value=0.5, prior=0.5, visits=3), a1, a2)
    b = node(value=0.2, prior=0.5, visits=1)
    return family(node(visits=4), a, b), a1, a2, b


def puct_score(child: Node, parent: Node) -> float:
    return puct(child, parent, 1.0, 0.0)


def test_a_virtual_visit_is_taken_back_exactly():
    root, a1, _, _ = small_tree()
    before = state(root)
    path = [root, root.children[0], a1]
    virtual_visit(path, 1)
    assert [n.visits for n in path] == [5, 4, 2] and a1.value == 0.5  # visits only
    virtual_visit(path, -1)
    assert state(root) == before


def test_the_virtual_loss_turns_the_next_selection_to_another_branch():
    root, a1, a2, b = small_tree()
    before = state(root)
    # After root -> A -> a1, A's extra visit drops its score (0.72) below B's (0.76).
    assert [p[-1] for p in select_leaves(root, puct_score, 2)] == [a1, b]
    assert state(root) == before  # the virtual losses are taken back
    # Without one the second leaf is a1's sibling: pending only rules out a1 itself.
    no_loss = lambda path, n: None  # noqa: E731
    assert [p[-1] for p in select_leaves(root, puct_score, 2, no_loss)] == [a1, a2]


def test_select_leaves_takes_each_leaf_once_and_stops_when_none_is_left():
    root, a1, a2, b = small_tree()
    done = family(node(value=1.0, prior=0.5, finish="eos"), node(value=9.0))  # finished: a leaf, never entered
    family(root, *root.children, done)
    before = state(root)
    paths = select_leaves(root, puct_score, 10)
    assert sorted(id(p[-1]) for p in paths) == sorted(map(id, (a1, a2, b, done)))
    for path in paths:
        assert path[0] is root and all(child in parent.children for parent, child in zip(path, path[1:]))
    assert state(root) == before
    lone = node(visits=0)  # before the first expansion the root is the only leaf
    assert select_leaves(lone, puct_score, 4) == [[lone]]


def test_one_leaf_is_the_plain_selection_and_the_virtual_loss_is_swappable():
    root, _, _, _ = small_tree()
    calls = []
    paths = select_leaves(root, puct_score, 1, lambda path, n: calls.append((path[-1], n)))
    assert paths == [select_path(root, puct_score)]
    assert calls == [(paths[0][-1], 1), (paths[0][-1], -1)]


def test_a_selection_rule_that_raises_leaves_no_virtual_loss_behind():
    root, _, _, _ = small_tree()
    before = state(root)
    calls = []

    def fails_on_the_second_path(child, parent):
        calls.append(child)
        if len(calls) > 4:  # the first path took 4 scores (2 children at 2 levels)
            raise RuntimeError("a user's rule failed")
        return puct_score(child, parent)

    with pytest.raises(RuntimeError, match="rule failed"):
        select_leaves(root, fails_on_the_second_path, 3)
    assert state(root) == before

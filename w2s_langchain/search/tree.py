"""The search tree and W2S-AlignTree's policy choices, as small swappable functions.

A node is a plain record: the strong model's chunk (answer so far, prior P,
finish reason), the weak models' state, visits N, value R and the entropy H of
the strong model's next-token distribution at the node's end.

The policy choices are plain functions: the tables `SELECTIONS` (how a child is
picked on the way down) and `BACKUPS` (how a node's value follows its children),
and the virtual loss that spreads the leaves of one step (`virtual_visit`).
"""

from __future__ import annotations

import math
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Callable

from .proxy import ProxyState
from .strong import Chunk

NEG_INF = float("-inf")


@dataclass(eq=False)
class Node:
    chunk: Chunk
    parent: Node | None = None
    proxy: ProxyState | None = field(default=None, repr=False)
    visits: int = 0
    """N."""
    value: float = 0.0
    """R: the value this node got when it was evaluated, then its backed-up value
    (by default the max over its children)."""
    own_value: float | None = None
    """The value this node got when it was evaluated, before any backup: what
    stage 2 ranks candidates by."""
    entropy: float | None = None
    """H (bits) of the strong model's next-token distribution here; set on expansion."""
    eos_value: float | None = None
    """The eos-scored value, once stage 2 (or the terminal_reward="eos" switch) computed it."""
    children: list[Node] = field(default_factory=list)
    # What the search did with the node, recorded for the export and the tree view.
    expanded_at: int | None = None
    """The iteration (from 1; a CBS step) whose expansion gave this node its children."""
    stage2_score: float | None = None
    """A stage-2 candidate's ranking score: own value + exploration bonus."""
    stage2_rank: int | None = None
    """A stage-2 candidate's place in that ranking (1 = best)."""
    final_rank: int | None = None
    """A stage-2 finalist's place by its eos-scored value (1 = the answer)."""
    by_fallback: bool = False
    """Added after the search by the fallback that finished the best path."""
    beam_steps: list[int] = field(default_factory=list)
    """The CBS steps (from 1) after which this node was one of the kept beams."""

    @property
    def terminal(self) -> bool:
        return self.chunk.terminal

    @property
    def prior(self) -> float:
        return self.chunk.prior

    def walk(self):
        """This node and all below it, parents before children."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))


# --- selection rules ---------------------------------------------------------------
# A rule scores a child for selection: rule(child, parent, c, w) -> float, where c
# is the exploration constant and w the entropy weight (rules that do not use w
# ignore it). Selection follows the highest score.

SelectionRule = Callable[[Node, Node, float, float], float]


def exploration(child: Node, parent: Node, c: float) -> float:
    """PUCT's exploration bonus: c * P(s) * sqrt(N(parent)) / (1 + N(s))."""
    return c * child.prior * math.sqrt(parent.visits) / (1 + child.visits)


def ea_puct(child: Node, parent: Node, c: float, w: float) -> float:
    """Entropy-Aware PUCT (the paper's): the bonus grows with the parent's uncertainty H (bits)."""
    return child.value + exploration(child, parent, c) * (1 + w * (parent.entropy or 0.0))


def puct(child: Node, parent: Node, c: float, w: float) -> float:
    """Plain PUCT: the prior-weighted bonus, no entropy term (EA-PUCT with w = 0)."""
    return child.value + exploration(child, parent, c)


def uct(child: Node, parent: Node, c: float, w: float) -> float:
    """UCT, as the reference code writes it: no prior, no entropy,
    c * sqrt(ln N(parent) / (1 + N(s)))."""
    return child.value + c * math.sqrt(math.log(parent.visits) / (1 + child.visits))


SELECTIONS: dict[str, SelectionRule] = {"ea-puct": ea_puct, "puct": puct, "uct": uct}


def select_path(root: Node, score: Callable[[Node, Node], float], skip: Container[Node] = frozenset()) -> list[Node]:
    """From the root, follow the best-scoring child until a leaf or a terminal
    node, never entering a node in `skip`."""
    path = [root]
    node = root
    while node.children and not node.terminal:
        node = max((child for child in node.children if child not in skip), key=lambda child: score(child, node))
        path.append(node)
    return path


# --- leaf parallelism --------------------------------------------------------------
# One step may select several leaves before any of them is expanded, as parallel
# MCTS does. A virtual loss makes the selections differ: virtual_loss(path, n)
# counts a path as taken n more times (n = -1 takes that back).

VirtualLoss = Callable[[list[Node], int], None]


def virtual_visit(path: list[Node], n: int) -> None:
    """The virtual loss as visits: each node on the path counts n more visits,
    which lowers its exploration bonus, so the next selection of the step leans
    to other branches. Values are left alone, so taking it back is exact."""
    for node in path:
        node.visits += n


def select_leaves(
    root: Node, score: Callable[[Node, Node], float], n: int, virtual_loss: VirtualLoss = virtual_visit
) -> list[list[Node]]:
    """Up to n paths to different leaves, selected one after another: after each,
    the path gets a virtual loss and its leaf is pending, so no later selection
    ends there or enters a node whose leaves are all pending. Fewer than n when no
    leaf is left to choose. The virtual losses are taken back before it returns
    (nothing reads visits before the step's backups), so the tree is as it was."""
    paths: list[list[Node]] = []
    taken: set[Node] = set()  # pending leaves, and nodes with only pending leaves below
    try:
        while len(paths) < n and root not in taken:
            path = select_path(root, score, taken)
            virtual_loss(path, 1)
            paths.append(path)
            taken.add(path[-1])
            for node in reversed(path[:-1]):
                if not all(child in taken for child in node.children):
                    break
                taken.add(node)
    finally:
        for path in paths:
            virtual_loss(path, -1)
    return paths


# --- backpropagation ---------------------------------------------------------------


def max_of_children(node: Node) -> float:
    """The paper's backup: a node is worth its best child."""
    return max(child.value for child in node.children)


def mean_of_children(node: Node) -> float:
    """Classic MCTS's backup, for the ablation: the visit-weighted mean of the
    children's values. Classic MCTS keeps a running mean of the returns of every
    simulation through a node; here a simulation's return is the value of the
    children it evaluated, so weighting each child's (itself averaged) value by its
    visits N gives that running mean without storing returns. Finished children
    not yet judged (-inf, the reference's quirk) are left out: they have no value
    to average, and one of them would make every mean above it -inf."""
    judged = [child for child in node.children if child.value != NEG_INF]
    visits = sum(child.visits for child in judged)
    return sum(child.value * child.visits for child in judged) / visits if visits else NEG_INF


BACKUPS: dict[str, Callable[[Node], float]] = {"max": max_of_children, "mean": mean_of_children}


def backpropagate(path: list[Node], backup: Callable[[Node], float]) -> None:
    """Bottom-up along the selected path: N += 1, R = backup over the children."""
    for node in reversed(path):
        node.visits += 1
        if node.children:
            node.value = backup(node)


# --- chunk-level beam search -------------------------------------------------------


def beam_pool(beams: list[Node], k: int) -> list[Node]:
    """The candidates one CBS step chooses from: each unfinished beam's k
    children, and each finished beam k times over. A finished beam stays in the
    running exactly as an unfinished one does (as in the baseline's reference,
    where every beam slot holds k successors), so a finished answer that scores
    best can fill every slot and end the search."""
    pool: list[Node] = []
    for beam in beams:
        pool.extend([beam] * k if beam.terminal else beam.children)
    return pool


def keep_best(pool: list[Node], width: int) -> list[Node]:
    """The `width` candidates with the highest values, best first (ties keep pool order)."""
    return sorted(pool, key=lambda n: n.value, reverse=True)[:width]

"""The search tree and W2S-AlignTree's policy choices, as small swappable functions.

A node is a plain record: the strong model's chunk (answer so far, prior P,
finish reason), the weak models' state, visits N, value R and the entropy H of
the strong model's next-token distribution at the node's end.
"""

from __future__ import annotations

import math
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
    """R: the proxy value of this answer prefix, then the max over its children."""
    entropy: float | None = None
    """H (bits) of the strong model's next-token distribution here; set on expansion."""
    eos_value: float | None = None
    """The eos-scored value, once stage 2 (or the terminal_reward="eos" switch) computed it."""
    children: list[Node] = field(default_factory=list)

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


# --- selection scores ------------------------------------------------------------


def exploration(child: Node, parent: Node, c: float) -> float:
    """PUCT's exploration bonus: c * P(s) * sqrt(N(parent)) / (1 + N(s))."""
    return c * child.prior * math.sqrt(parent.visits) / (1 + child.visits)


def ea_puct(child: Node, parent: Node, c: float, w: float) -> float:
    """Entropy-Aware PUCT: the bonus grows with the parent's uncertainty H (bits)."""
    return child.value + exploration(child, parent, c) * (1 + w * (parent.entropy or 0.0))


def select_path(root: Node, score: Callable[[Node, Node], float]) -> list[Node]:
    """From the root, follow the best-scoring child until a leaf or a terminal node."""
    path = [root]
    node = root
    while node.children and not node.terminal:
        node = max(node.children, key=lambda child: score(child, node))
        path.append(node)
    return path


# --- backpropagation ---------------------------------------------------------------


def max_of_children(node: Node) -> float:
    """The paper's backup: a node is worth its best child."""
    return max(child.value for child in node.children)


def mean_of_children(node: Node) -> float:
    """The classic MCTS backup, for the ablation: the mean of the children that
    have a value (unjudged finished answers, -inf, are left out)."""
    finite = [child.value for child in node.children if child.value != NEG_INF]
    return sum(finite) / len(finite) if finite else NEG_INF


BACKUPS: dict[str, Callable[[Node], float]] = {"max": max_of_children, "mean": mean_of_children}


def backpropagate(path: list[Node], backup: Callable[[Node], float]) -> None:
    """Bottom-up along the selected path: N += 1, R = backup over the children."""
    for node in reversed(path):
        node.visits += 1
        if node.children:
            node.value = backup(node)

"""What a search returns: the answer, its value, what it cost, and the tree."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

from ..prompts import Prompt
from .tree import SELECTIONS, Node


@dataclass
class SearchCost:
    """What a search spent."""

    prompt_tokens: int = 0
    """Tokens of the prompt as the strong model reads it."""
    strong_tokens_sampled: int = 0
    """Tokens the strong model sampled: the budget strategies are compared at."""
    answer_tokens: int = 0
    """Tokens of the returned answer, as the strong model wrote them (a stop
    string's included): the output a user is counted for; finding it took
    `strong_tokens_sampled`."""
    strong_tokens_decoded: int = 0
    """Tokens the strong model read (sampled ones, prompt, rebuilt prefixes)."""
    weak_tokens_scored: int = 0
    """Tokens the weak models read."""
    tokens_from_cache: int = 0
    """Tokens the models needed that the KV cache already held (not re-read)."""
    decode_calls: int = 0
    """llama_decode calls, all models."""
    decode_seconds: float = 0.0
    """Wall time inside llama_decode, all models: the rest of `seconds["total"]`
    is the search's own work (sampling, scoring, bookkeeping)."""
    iterations: int = 0
    """MCTS iterations run, one per leaf selected (w2s); steps (cbs)."""
    steps: int = 0
    """Steps the w2s search ran: each selects up to `parallel_leaves` leaves and
    grows them together (so `iterations` with one leaf per step); 0 for the others."""
    tree_nodes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per phase (select, expand, evaluate, stage2, ...) and in total."""


@dataclass
class SearchResult:
    """The answer of one search."""

    prompt: Prompt
    """The prompt: text, or a conversation (a list of role/content messages)."""
    text: str
    """The answer (the strong model's continuation, without the prompt)."""
    value: float | None
    """Its proxy value V (eos-scored when the strategy judged a finished answer)."""
    strategy: str
    source: str
    """How the answer was chosen: "stage2", "best_of_n", "beam", "sample",
    "fallback_truncated" (no finished answer: the best unfinished one),
    "fallback_finished" (that one, finished by the strong model) or "partial"
    (the search was cut short: see `stopped`)."""
    finish_reason: str | None
    """"eos", "length", "stop", or None for a truncated answer."""
    settings: dict[str, Any]
    cost: SearchCost
    stopped: str | None = None
    """Why the search was cut short and answered early (`partial_answer`):
    "timeout" or "context_full"; None when it ran to its end."""
    strong_log_prob: float | None = None
    """log-prob of the answer's tokens (its end token included) under the strong
    model's sampling distribution (temperature, top-k, top-p applied): how likely
    plain sampling was to write it; how far a search pushed away from it."""
    tree: Node | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the tree, as plain JSON-ready data."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tree"}
        data["cost"] = asdict(self.cost)
        data["value"] = _finite_or_none(self.value)
        return data

    def tree_dict(self) -> dict[str, Any]:
        """The tree as plain data, the schema `w2s_langchain.cli.treeview.tree_to_html` draws:
        the prompt, the answer, how it was chosen, the settings and the cost, and the
        nodes, parents before children, each with its statistics and what the search
        did with it (expanded at which iteration, stage-2 rank, added by the fallback)."""
        prompt = self.prompt if isinstance(self.prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in self.prompt)
        data = self.to_dict()
        header = {
            "prompt": prompt,
            "strategy": self.strategy,
            "answer": self.text,
            "result": {key: data[key] for key in ("value", "source", "finish_reason", "stopped")},
            "settings": data["settings"],
            "cost": data["cost"],
        }
        if self.tree is None:
            return header | {"nodes": []}
        ids = {id(node): i for i, node in enumerate(self.tree.walk())}
        chosen = _chosen_path(self.tree, self.text)
        selection_score = self._selection_score()
        nodes = []
        for node in self.tree.walk():
            parent_text = node.parent.chunk.text if node.parent else ""
            nodes.append(
                {
                    "id": ids[id(node)],
                    "parent": ids[id(node.parent)] if node.parent else None,
                    "chunk": node.chunk.text[len(parent_text) :],
                    "answer": node.chunk.text,
                    "visits": node.visits,
                    "value": _finite_or_none(node.value),
                    "own_value": _finite_or_none(node.own_value),
                    "prior": node.prior,
                    "entropy": node.entropy,
                    "terminal": node.terminal,
                    "finish_reason": node.chunk.finish_reason,
                    "eos_value": _finite_or_none(node.eos_value),
                    "chosen": id(node) in chosen,
                    "selection_score": _finite_or_none(selection_score(node)) if node.parent else None,
                    "expanded_at": node.expanded_at,
                    "stage2_score": _finite_or_none(node.stage2_score),
                    "stage2_rank": node.stage2_rank,
                    "final_rank": node.final_rank,
                    "fallback": node.by_fallback,
                    "beam_steps": list(node.beam_steps),
                }
            )
        return header | {"nodes": nodes}

    def _selection_score(self) -> Callable[[Node], float | None]:
        """What w2s's selection rule scores a node at the end of the search (value
        plus exploration bonus); None for other strategies and for a user's own rule,
        which the result names but does not hold."""
        rule = SELECTIONS.get(self.settings.get("selection")) if self.strategy == "w2s" else None
        if rule is None:
            return lambda node: None
        c, w = self.settings["c"], self.settings["entropy_weight"]

        def score(node: Node) -> float | None:
            if node.parent.visits == 0 or node.value is None:  # uct's log(0): never scored so
                return None
            return rule(node, node.parent, c, w)

        return score


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _chosen_path(root: Node, answer: str) -> set[int]:
    """The nodes whose answers lead to the returned one (the deepest match)."""
    best = root
    for node in root.walk():
        if answer.startswith(node.chunk.text) and len(node.chunk.text) >= len(best.chunk.text):
            best = node
    path = set()
    node: Node | None = best
    while node is not None:
        path.add(id(node))
        node = node.parent
    return path


class PhaseTimer:
    """Adds up wall time per phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._running: list[tuple[str, float]] = []  # (phase, when it started), not over yet

    @contextmanager
    def __call__(self, phase: str):
        running = (phase, time.perf_counter())
        self._running.append(running)
        try:
            yield
        finally:
            self._running.remove(running)
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - running[1]

    def so_far(self) -> dict[str, float]:
        """Seconds per phase up to now, the phases still running included: a
        search's result is made inside its last phase (stage 2)."""
        now = time.perf_counter()
        totals = dict(self.seconds)
        for phase, start in self._running:
            totals[phase] = totals.get(phase, 0.0) + now - start
        return totals

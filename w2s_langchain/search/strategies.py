"""The strategies: W2S-AlignTree and its baselines, on one engine and one result type.

`search` is the entry point. Each strategy is a function of a `_Run`, which holds
the strong model, the weak proxy, the settings and the cost counters of one search.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..engine import Context
from ..errors import ContextFullError, ContextOverflowError, SearchCancelledError, SearchTimeoutError
from ..prompts import Prompt, PromptFormat, check_prompt
from .proxy import Proxy
from .result import PhaseTimer, SearchCost, SearchResult
from .settings import SearchSettings
from .strong import StrongModel
from .tree import BACKUPS, NEG_INF, Node, backpropagate, ea_puct, exploration, select_path

# progress(done, total, what): called as the search moves.
Progress = Callable[[int, int, str], None]


@dataclass
class SearchModels:
    """What a search runs on: the strong model's context and prompt format, and
    the weak proxy (None for plain sampling)."""

    strong: Context
    strong_format: PromptFormat
    proxy: Proxy | None


def search(
    models: SearchModels,
    prompt: Prompt,
    settings: SearchSettings,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> SearchResult:
    """Answer `prompt` with the strategy the settings name. Setting `cancel`
    (from another thread) stops the search within one decode step with
    SearchCancelledError; either way the search frees everything it held."""
    check_prompt(prompt)
    if settings.strategy != "base" and models.proxy is None:
        raise ValueError(f"strategy {settings.strategy!r} needs the weak models (a proxy)")
    run = _Run(models, prompt, settings, progress or (lambda done, total, what: None), cancel)
    with run.active():
        return _STRATEGIES[settings.strategy](run)


class _Run:
    """One search in progress: its models, settings, nodes and cost counters."""

    def __init__(
        self, models: SearchModels, prompt: Prompt, settings: SearchSettings, progress: Progress, cancel: threading.Event | None
    ):
        self.prompt = prompt
        self.settings = settings
        self.progress = progress
        # A closure, not a method: the strong model holds it, and a reference back to
        # this run would make every search a cycle that only the gc can free.
        self.check = _stop_check(settings, cancel)
        self.timer = PhaseTimer()
        self.iterations = 0
        self.prompt_tokens = 0
        self.nodes: list[Node] = []
        self.strong = StrongModel(
            models.strong, models.strong_format, settings.sampling, settings.max_new_tokens, settings.stop,
            rng=np.random.default_rng(settings.seed), check=self.check,
        )
        self.proxy = models.proxy
        weak = self.proxy.contexts if self.proxy else []
        self.weak_contexts = [c for c in weak if c is not models.strong]
        self.contexts = [models.strong] + self.weak_contexts

    @contextmanager
    def active(self):
        """Apply the per-search switches (naive, beta), take the cost snapshot;
        afterwards free every branch the search made and restore the contexts."""
        self.started = time.perf_counter()
        self.before = [_snapshot(c) for c in self.contexts]
        saved = [c.reuse_prefixes for c in self.contexts]
        for c in self.contexts:
            c.reuse_prefixes = not self.settings.naive
        if self.proxy is not None:
            self.proxy.beta = self.settings.beta
        try:
            yield
        finally:
            for node in self.nodes:
                self.strong.release(node.chunk)
                if node.proxy is not None:
                    self.proxy.release(node.proxy)
            for c, reuse in zip(self.contexts, saved):
                c.reuse_prefixes = reuse

    def cut_short(self, root: Node, answer: Node | None, why: Exception) -> SearchResult:
        """Answer with what the search found before `why` stopped it, when the
        settings ask for that; otherwise raise `why`."""
        if not self.settings.partial_answer or answer is None or answer is root:
            raise why
        stopped = "timeout" if isinstance(why, SearchTimeoutError) else "context_full"
        return self.result(root, answer, answer.value, "partial", stopped=stopped)

    # --- building blocks -----------------------------------------------------

    def root(self) -> Node:
        node = Node(self.strong.start(self.prompt), proxy=self.proxy.start(self.prompt) if self.proxy else None)
        self.prompt_tokens = len(node.chunk.branch)
        self.nodes.append(node)
        return node

    def expand(self, parents: list[Node], k: int, chunk_tokens: int, *, distinct: bool) -> None:
        """Give each parent k children (strong model), unscored."""
        with self.timer("expand"):
            families = self.strong.expand([p.chunk for p in parents], k, chunk_tokens, distinct=distinct)
        for parent, (entropy, chunks) in zip(parents, families):
            parent.entropy = entropy
            parent.children = [Node(chunk, parent=parent) for chunk in chunks]
            self.nodes.extend(parent.children)

    def score(self, nodes: list[Node], *, eos: bool) -> None:
        """Proxy values of the nodes' answers (and eos-scored values with `eos`)."""
        if not nodes:
            return
        todo = [n for n in nodes if n.proxy is None]
        self.check()
        with self.timer("evaluate"):
            states = self.proxy.extend([n.parent.proxy for n in todo], [n.chunk.text for n in todo])
            for node, state in zip(todo, states):
                node.proxy = state
            if eos:
                for node, value in zip(nodes, self.proxy.eos_values([n.proxy for n in nodes])):
                    node.eos_value = value

    def evaluate_children(self, parent: Node, terminal_reward: str) -> None:
        """Spec step 3: unfinished child R = V (no eos); finished child R = -inf
        (quirk) or its eos-scored V; N = 1."""
        unfinished = [c for c in parent.children if not c.terminal]
        finished = [c for c in parent.children if c.terminal]
        if unfinished:
            self.score(unfinished, eos=False)
        if finished and terminal_reward == "eos":
            self.score(finished, eos=True)
        for child in parent.children:
            child.visits = 1
            child.value = child.proxy.value if not child.terminal else (child.eos_value if terminal_reward == "eos" else NEG_INF)

    def result(self, root: Node, answer: Node, value: float | None, source: str, stopped: str | None = None) -> SearchResult:
        after = [_snapshot(c) for c in self.contexts]
        delta = [[a - b for a, b in zip(x, y)] for x, y in zip(after, self.before)]
        self.timer.seconds["total"] = time.perf_counter() - self.started
        cost = SearchCost(
            prompt_tokens=self.prompt_tokens,
            strong_tokens_sampled=self.strong.tokens_sampled,
            strong_tokens_decoded=delta[0][0],  # contexts[0] is the strong one
            weak_tokens_scored=sum(d[0] for d in delta[1:]),
            tokens_from_cache=sum(d[1] for d in delta),
            decode_calls=sum(d[2] for d in delta),
            decode_seconds=round(sum(d[3] for d in delta), 4),
            iterations=self.iterations,
            tree_nodes=sum(1 for _ in root.walk()),
            seconds={k: round(v, 4) for k, v in self.timer.seconds.items()},
        )
        return SearchResult(
            prompt=self.prompt,
            text=answer.chunk.text,
            value=value,
            strategy=self.settings.strategy,
            source=source,
            finish_reason=answer.chunk.finish_reason,
            settings=self.settings.to_dict(),
            cost=cost,
            stopped=stopped,
            tree=root,
        )


def _stop_check(settings: SearchSettings, cancel: threading.Event | None) -> Callable[[], None]:
    """What the search calls before each decode step: raises if the caller
    cancelled or the time is up."""
    deadline = time.perf_counter() + settings.timeout if settings.timeout is not None else None

    def check() -> None:
        if cancel is not None and cancel.is_set():
            raise SearchCancelledError("the search was cancelled")
        if deadline is not None and time.perf_counter() > deadline:
            raise SearchTimeoutError(
                f"the search ran past its timeout of {settings.timeout} s: raise `timeout`, lower the budget "
                "(iterations, samples, max_new_tokens), or set `partial_answer` to get the best answer found so far"
            )

    return check


def _snapshot(context: Context) -> tuple[int, int, int, float]:
    st = context.stats
    return (st.tokens_decoded, st.tokens_reused, st.decode_calls, st.decode_seconds)


# What may stop a search halfway yet leave an answer worth returning.
_CUT_SHORT = (SearchTimeoutError, ContextFullError, ContextOverflowError)


# --- W2S-AlignTree ------------------------------------------------------------------


def _w2s(run: _Run) -> SearchResult:
    s = run.settings
    root = run.root()
    score = lambda child, parent: ea_puct(child, parent, s.c, s.entropy_weight)  # noqa: E731
    try:
        for i in range(s.iterations):
            if s.token_budget is not None and run.strong.tokens_sampled >= s.token_budget:
                break
            with run.timer("select"):
                path = select_path(root, score)
            leaf = path[-1]
            if leaf.terminal:
                break  # the policy leads only to finished answers: nothing left to grow
            run.expand([leaf], s.children, s.chunk_tokens, distinct=True)
            run.evaluate_children(leaf, s.terminal_reward)
            backpropagate(path, BACKUPS[s.backup])
            run.iterations = i + 1
            run.progress(i + 1, s.iterations, "iterations")
        with run.timer("stage2"):
            return _stage2(run, root)
    except _CUT_SHORT as why:
        _drop_unevaluated(run)
        return run.cut_short(root, _best_path(root), why)


def _drop_unevaluated(run: _Run) -> None:
    """Take back the children of an expansion that was stopped before they were
    valued, so the tree is the one the last whole iteration left."""
    for node in run.nodes:
        if node.children and any(child.visits == 0 for child in node.children):
            node.children = []


def _best_path(root: Node) -> Node:
    """The end of the path that follows the highest backed-up value."""
    node = root
    while node.children:
        node = max(node.children, key=lambda c: c.value)
    return node


def _stage2(run: _Run, root: Node) -> SearchResult:
    """Global re-ranking: candidates are unfinished nodes with a finished child,
    ranked by R + c P sqrt(N(parent)) / (1 + N) (no entropy); the finished (and,
    quirk, unfinished) children of the best `num_select` are eos-scored."""
    s = run.settings
    candidates = [n for n in root.walk() if not n.terminal and any(c.terminal for c in n.children)]
    if not candidates:
        return _fallback(run, root)

    def rank(node: Node) -> float:
        return node.value + (exploration(node, node.parent, s.c) if node.parent else 0.0)

    kept = sorted(candidates, key=rank, reverse=True)[: s.num_select]
    finalists = [c for n in kept for c in n.children if c.terminal or s.stage2_nonterminal]
    run.score(finalists, eos=True)
    best = max(finalists, key=lambda n: n.eos_value)
    return run.result(root, best, best.eos_value, "stage2")


def _fallback(run: _Run, root: Node) -> SearchResult:
    """No finished answer in the tree: the best unfinished path, returned as it is
    or finished by the strong model, choosing greedily by V."""
    node = _best_path(root)
    if run.settings.fallback == "truncate" or node is root:
        return run.result(root, node, node.value, "fallback_truncated")
    s = run.settings
    while not node.terminal:
        run.expand([node], s.children, s.chunk_tokens, distinct=True)
        run.score(node.children, eos=False)
        finished = [c for c in node.children if c.terminal]
        if finished:
            run.score(finished, eos=True)
        for child in node.children:
            child.visits, child.value = 1, child.eos_value if child.terminal else child.proxy.value
        node = max(node.children, key=lambda c: c.value)
    return run.result(root, node, node.value, "fallback_finished")


# --- baselines ----------------------------------------------------------------------


def _base(run: _Run) -> SearchResult:
    """Plain sampling: one answer from the strong model."""
    root = run.root()
    run.expand([root], 1, run.settings.max_new_tokens, distinct=False)
    answer = root.children[0]
    value = None
    if run.proxy is not None:  # reported for comparison; it chooses nothing
        run.score([answer], eos=True)
        value = answer.eos_value
    return run.result(root, answer, value, "sample")


def _bon(run: _Run) -> SearchResult:
    """Best-of-N: N complete samples; the one with the highest eos-scored V."""
    root = run.root()
    run.expand([root], run.settings.samples, run.settings.max_new_tokens, distinct=False)
    run.score(root.children, eos=True)
    for child in root.children:
        child.visits, child.value = 1, child.eos_value
    best = max(root.children, key=lambda n: n.eos_value)
    return run.result(root, best, best.eos_value, "best_of_n")


def _cbs(run: _Run) -> SearchResult:
    """Chunk-level beam search: W beams, each grown by K sampled chunks of L
    tokens; keep the W best by V (eos-scored when finished) until all finish."""
    s = run.settings
    root = run.root()
    beams = [root]
    try:
        while unfinished := [b for b in beams if not b.terminal]:
            run.expand(unfinished, s.children, s.chunk_tokens, distinct=False)
            children = [c for b in unfinished for c in b.children]
            run.score([c for c in children if not c.terminal], eos=False)
            if finished := [c for c in children if c.terminal]:
                run.score(finished, eos=True)
            for child in children:
                child.visits, child.value = 1, child.eos_value if child.terminal else child.proxy.value
            pool = [b for b in beams if b.terminal] + children
            beams = sorted(pool, key=lambda n: n.value, reverse=True)[: s.beam_width]
            run.iterations += 1
            run.progress(max(len(b.chunk.tokens) for b in beams), s.max_new_tokens, "tokens")
    except _CUT_SHORT as why:
        _drop_unevaluated(run)
        return run.cut_short(root, beams[0], why)
    return run.result(root, beams[0], beams[0].value, "beam")


_STRATEGIES: dict[str, Callable[[_Run], SearchResult]] = {"w2s": _w2s, "bon": _bon, "cbs": _cbs, "base": _base}

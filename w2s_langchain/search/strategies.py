"""The strategies: W2S-AlignTree and its baselines, on one engine and one result type.

`search` is the entry point. Each strategy is a function of a `_Run`, which holds
the strong model, the weak proxy, the settings and the cost counters of one search.
"""

from __future__ import annotations

import math
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
from .settings import SearchSettings, Strategy
from .strong import StrongModel
from .tree import BACKUPS, NEG_INF, Node, backpropagate, beam_pool, exploration, keep_best, select_leaves

# progress(done, total, what): called as the search moves.
Progress = Callable[[int, int, str], None]


@dataclass
class SearchModels:
    """What a search runs on: the strong model's context and prompt format, and
    the weak proxy (None for plain sampling)."""

    strong: Context
    strong_format: PromptFormat
    proxy: Proxy | None

    def sampler(self, settings: SearchSettings, check: Callable[[], None]) -> StrongModel:
        """The strong model's side of one search: what expands the tree's leaves
        (start, expand, release, tokens_sampled). Tree-logic tests put a scripted
        one here, and a scripted proxy (start, extend, eos_values, release)."""
        return StrongModel(
            self.strong, self.strong_format, settings.sampling, settings.max_new_tokens, settings.stop,
            rng=np.random.default_rng(settings.seed), check=check,
        )


def search(
    models: SearchModels,
    prompt: Prompt,
    settings: SearchSettings,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    started: float | None = None,
    on_commit: Callable[[str], None] | None = None,
) -> SearchResult:
    """Answer `prompt` with the strategy the settings name. Setting `cancel`
    (from another thread) stops the search within one decode step with
    SearchCancelledError; either way the search frees everything it held.
    `started` (a time.perf_counter()) is when the caller's call began: the
    timeout counts from then (default: now). With `commit_every` (w2s),
    `on_commit(text)` gets each piece of the answer as soon as it is final;
    the answer returned starts with all of them."""
    check_prompt(prompt)
    if settings.strategy != "base" and models.proxy is None:
        raise ValueError(f"strategy {settings.strategy!r} needs the weak models (a proxy)")
    if settings.ensemble and (models.proxy is None or len(models.proxy.pairs) < 2):
        raise ValueError(
            "the ensemble setting needs more aligned/reference prompt pairs: add `ensemble_prompts` to the preset, "
            "or turn `ensemble` off"
        )
    reported = _ReportedProgress(progress)
    run = _Run(models, prompt, settings, reported, cancel, started, on_commit or (lambda text: None))
    with run.active():
        result = _STRATEGIES[settings.strategy](run)
    reported.finish()
    return result


class _ReportedProgress:
    """The caller's progress callback, and the promise its last event keeps: a
    search that ends sooner than its total (it ran out of tree, or all its
    beams finished) says so with a last event whose done equals its total."""

    def __init__(self, progress: Progress | None):
        self._progress = progress
        self._last: tuple[int, int, str] | None = None

    def __call__(self, done: int, total: int, what: str) -> None:
        self._last = (done, total, what)
        if self._progress is not None:
            self._progress(done, total, what)

    def finish(self) -> None:
        if self._last is not None and self._last[0] != self._last[1]:
            done, _, what = self._last
            self(done, done, what)


class _Run:
    """One search in progress: its models, settings, nodes and cost counters."""

    def __init__(
        self,
        models: SearchModels,
        prompt: Prompt,
        settings: SearchSettings,
        progress: Progress,
        cancel: threading.Event | None,
        started: float | None = None,
        on_commit: Callable[[str], None] = lambda text: None,
    ):
        self.prompt = prompt
        self.settings = settings
        self.progress = progress
        self.on_commit = on_commit
        self.committed = ""
        """The answer's text handed on so far (streaming: `commit_every`)."""
        self.tree: Node | None = None
        """The root of the whole tree (a streaming search moves its own root down)."""
        # A closure, not a method: the strong model holds it, and a reference back to
        # this run would make every search a cycle that only the gc can free.
        self.check = stop_check(settings, cancel, started)
        self.timer = PhaseTimer()
        self.iterations = 0
        self.steps = 0
        self.prompt_tokens = 0
        self.nodes: list[Node] = []
        self.strong = models.sampler(settings, self.check)
        self.proxy = models.proxy
        weak = self.proxy.contexts if self.proxy else []
        self.weak_contexts = [c for c in weak if c is not models.strong]
        self.contexts = [models.strong] + self.weak_contexts

    @contextmanager
    def active(self):
        """Apply the per-search switches (the stop check, beta), take the cost
        snapshot; afterwards free every branch the search made and restore the contexts."""
        self.started = time.perf_counter()
        self.before = [_snapshot(c) for c in self.contexts]
        for c in self.contexts:
            c.interrupt = self.check  # also between the pieces of a long decode (a long prompt)
        if self.proxy is not None:
            self.proxy.beta = self.settings.beta
            self.proxy.use_ensemble = self.settings.ensemble
            self.proxy.length_normalized = self.settings.length_normalized
        try:
            yield
        finally:
            for node in self.nodes:
                self.strong.release(node.chunk)
                if node.proxy is not None:
                    self.proxy.release(node.proxy)
            for c in self.contexts:
                c.interrupt = None

    def cut_short(self, answer: Node | None, why: Exception) -> SearchResult:
        """Answer with what the search found before `why` stopped it, when the
        settings ask for that; otherwise raise `why`."""
        if not self.settings.partial_answer or answer is None or answer is self.tree:
            raise why
        stopped = "timeout" if isinstance(why, SearchTimeoutError) else "context_full"
        return self.result(answer, answer.value, "partial", stopped=stopped)

    def commit(self, node: Node) -> None:
        """Streaming: `node`'s answer is final (every later answer continues it):
        hand on what the caller has not had of it. Unless it is finished, the
        last characters that a stop string could still begin with are held back,
        since a longer answer that ends at that stop string would lose them."""
        text = node.chunk.text
        if not node.terminal:
            text = text[: len(text) - max((len(s) - 1 for s in self.settings.stop), default=0)]
        if len(text) > len(self.committed):
            self.on_commit(text[len(self.committed) :])
            self.committed = text

    # --- building blocks -----------------------------------------------------

    def root(self) -> Node:
        node = Node(self.strong.start(self.prompt), proxy=self.proxy.start(self.prompt) if self.proxy else None)
        self.prompt_tokens = len(node.chunk.branch)
        self.nodes.append(node)
        self.tree = node
        return node

    def expand(self, parents: list[Node], k: int, chunk_tokens: int, *, distinct: bool) -> None:
        """Give each parent k children (strong model), unscored."""
        with self.timer("expand"):
            families = self.strong.expand([p.chunk for p in parents], k, chunk_tokens, distinct=distinct)
        for parent, (entropy, chunks) in zip(parents, families):
            parent.entropy = entropy
            parent.expanded_at = self.iterations + 1
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

    def evaluate(self, nodes: list[Node], terminal_reward: str) -> None:
        """Step 3 of an iteration (docs/algorithm.md): an unfinished node's R is V
        (no eos); a finished one's is -inf (quirk: judged only in stage 2) or, with
        "eos", its eos-scored V; N = 1."""
        unfinished = [n for n in nodes if not n.terminal]
        finished = [n for n in nodes if n.terminal]
        if unfinished:
            self.score(unfinished, eos=False)
        if finished and terminal_reward == "eos":
            self.score(finished, eos=True)
        for node in nodes:
            node.visits = 1
            if not node.terminal:
                node.value = node.proxy.value
            else:
                node.value = node.eos_value if terminal_reward == "eos" else NEG_INF
            node.own_value = node.value

    def final_score(self, node: Node, value: float) -> float:
        """What a final choice maximizes: V, plus with `kl_weight` the answer's
        log-prob under the strong model's sampling (the KL-style remedy)."""
        if not self.settings.kl_weight:
            return value
        return value + self.settings.kl_weight * answer_log_prob(node)

    def result(self, answer: Node, value: float | None, source: str, stopped: str | None = None) -> SearchResult:
        after = [_snapshot(c) for c in self.contexts]
        delta = [[a - b for a, b in zip(x, y)] for x, y in zip(after, self.before)]
        seconds = self.timer.so_far() | {"total": time.perf_counter() - self.started}
        cost = SearchCost(
            prompt_tokens=self.prompt_tokens,
            strong_tokens_sampled=self.strong.tokens_sampled,
            answer_tokens=len(answer.chunk.tokens),
            strong_tokens_decoded=delta[0][0],  # contexts[0] is the strong one
            weak_tokens_scored=sum(d[0] for d in delta[1:]),
            tokens_from_cache=sum(d[1] for d in delta),
            decode_calls=sum(d[2] for d in delta),
            decode_seconds=round(sum(d[3] for d in delta), 4),
            iterations=self.iterations,
            steps=self.steps,
            tree_nodes=sum(1 for _ in self.tree.walk()),
            seconds={k: round(v, 4) for k, v in seconds.items()},
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
            strong_log_prob=answer_log_prob(answer),
            tree=self.tree,
        )


def answer_log_prob(node: Node) -> float:
    """log-prob of a node's answer (its end token included) under the strong
    model's sampling distribution: the sum over its path of each chunk's tokens'
    log-probs (a chunk's prior is their geometric mean)."""
    total = 0.0
    while node.parent is not None:
        total += node.chunk.n_new * math.log(node.chunk.prior)
        node = node.parent
    return total


def stop_check(
    settings: SearchSettings, cancel: threading.Event | None, started: float | None = None
) -> Callable[[], None]:
    """What the search calls before each decode step: raises if the caller
    cancelled or the time is up (`settings.timeout` after `started`, default now)."""
    started = time.perf_counter() if started is None else started
    deadline = started + settings.timeout if settings.timeout is not None else None

    def check() -> None:
        if cancel is not None and cancel.is_set():
            raise SearchCancelledError("the search was cancelled")
        if deadline is not None and time.perf_counter() > deadline:
            if settings.partial_answer:  # raised only when the search had nothing to answer with yet
                raise SearchTimeoutError(
                    f"the search ran past its timeout of {settings.timeout} s before it had any answer, so "
                    "partial_answer had none to return (it returns the best one a w2s or cbs search has found): "
                    "raise `timeout` or lower the budget (iterations, samples, max_new_tokens)"
                )
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
    rule = s.selection_rule
    score = lambda child, parent: rule(child, parent, s.c, s.entropy_weight)  # noqa: E731
    open_leaves = 1  # unfinished nodes not yet expanded: what selection can still grow
    rankable = False  # does the tree hold a stage-2 candidate yet?
    next_commit = s.commit_every or math.inf
    try:
        while run.iterations < s.iterations:
            left = _tokens_left(run, root, rankable)
            if open_leaves == 0 or left <= 0:
                break
            # A step: up to P leaves (one iteration each), grown together.
            with run.timer("select"):
                paths = select_leaves(root, score, min(s.parallel_leaves, s.iterations - run.iterations))
            # A finished leaf is not expanded, but its visit counts: it is backed
            # up along its path like any other (step 5), and the search goes on.
            growing = [path[-1] for path in paths if not path[-1].terminal]
            if growing:
                run.expand(growing, s.children, _chunk_tokens(s, left, len(growing)), distinct=True)
                for number, path in enumerate(paths, start=run.iterations + 1):  # one iteration per leaf
                    if not path[-1].terminal:
                        path[-1].expanded_at = number
                children = [child for leaf in growing for child in leaf.children]
                run.evaluate(children, s.terminal_reward)
                open_leaves += sum(not c.terminal for c in children) - len(growing)
                rankable = rankable or any(leaf is not root and any(c.terminal for c in leaf.children) for leaf in growing)
            for path in paths:
                backpropagate(path, BACKUPS[s.backup])
            run.iterations += len(paths)
            run.steps += 1
            run.progress(run.iterations, s.iterations, "iterations")
            if run.iterations >= next_commit:
                next_commit = run.iterations + s.commit_every
                root = _commit(run, root)
                open_leaves = sum(1 for n in root.walk() if not n.children and not n.terminal)
                rankable = any(n is not root and _is_candidate(n) for n in root.walk())
        with run.timer("stage2"):
            return _stage2(run, root)
    except _CUT_SHORT as why:
        _drop_unevaluated(run)
        return run.cut_short(_best_path(root), why)


def _commit(run: _Run, root: Node) -> Node:
    """Streaming (`commit_every`): the root's most visited unfinished child (the
    higher value between equals) becomes final and the new root, keeping its
    subtree, as game-playing MCTS commits to a move; its siblings' subtrees are
    let go (their branches freed). The root stays when no child can go on."""
    going_on = [child for child in root.children if not child.terminal]
    if not going_on:
        return root
    chosen = max(going_on, key=lambda child: (child.visits, child.value))
    for sibling in root.children:
        if sibling is not chosen:
            for node in sibling.walk():
                run.strong.release(node.chunk)
                if node.proxy is not None:
                    run.proxy.release(node.proxy)
    run.commit(chosen)
    return chosen


def _is_candidate(node: Node) -> bool:
    """Stage 2 ranks unfinished nodes with a finished child."""
    return not node.terminal and any(child.terminal for child in node.children)


def _chunk_tokens(s: SearchSettings, left: float, leaves: int) -> int:
    """L, except for the step that reaches the token budget: its leaves' K
    children each get an equal share of what is left (at least one token), so a
    search spends its budget to within (leaves x K) tokens whatever L is."""
    return s.chunk_tokens if left == math.inf else min(s.chunk_tokens, max(1, left // (leaves * s.children)))


def _tokens_left(run: _Run, root: Node, rankable: bool) -> float:
    """What the tree search may still sample of its token budget (inf without one).
    Every strong token a search samples counts, the fallback's included: while
    stage 2 has nothing to rank, the "finish" fallback may have to complete the
    best path, so the tree leaves it the tokens one plain sample needs for that,
    but never the tokens of its own first step."""
    s = run.settings
    if s.token_budget is None:
        return math.inf
    reserve = 0
    if s.fallback == "finish" and not rankable:
        end = _best_path(root)
        reserve = 0 if end.terminal else s.max_new_tokens - len(end.chunk.tokens)
        # Never so much that the root's K chunks do not fit: a budget too small
        # to finish any answer still buys a steered start.
        reserve = min(reserve, max(s.token_budget - s.children * s.chunk_tokens, 0))
    return s.token_budget - reserve - run.strong.tokens_sampled


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
    """Global re-ranking: candidates are unfinished nodes other than the root
    with a finished child, ranked by their own value (the one they got when
    evaluated, not the backed-up max) + c P sqrt(N(parent)) / (1 + N), with no
    entropy term; the finished (and, quirk, unfinished) children of the best
    `num_select` are eos-scored and the best of them is the answer."""
    s = run.settings
    candidates = [n for n in root.walk() if n is not root and _is_candidate(n)]
    if not candidates:
        return _fallback(run, root)

    def rank(node: Node) -> float:
        return node.own_value + exploration(node, node.parent, s.c)

    ranked = sorted(candidates, key=rank, reverse=True)
    for place, node in enumerate(ranked, start=1):
        node.stage2_score, node.stage2_rank = rank(node), place
    kept = ranked[: s.num_select]
    finalists = [c for n in kept for c in n.children if c.terminal or s.stage2_nonterminal]
    run.score(finalists, eos=True)
    by_final_score = sorted(finalists, key=lambda n: run.final_score(n, n.eos_value), reverse=True)
    for place, node in enumerate(by_final_score, start=1):
        node.final_rank = place
    best = by_final_score[0]
    return run.result(best, best.eos_value, "stage2")


def _fallback(run: _Run, root: Node) -> SearchResult:
    """Nothing for stage 2 to rank: the best path, returned as it is ("truncate")
    or finished by the strong model ("finish"), choosing greedily by V among K
    children of L tokens per step. (When that path already ends finished, only the
    root has finished children: the best of them, eos-scored, is the answer.) With
    a token budget, the finishing spends only what is left of it: greedy steps
    while the budget still covers one more step and a plain sample to the end,
    then that plain sample; when what is left cannot pay for the plain sample, it
    samples what is left and the answer stops where the budget does (source
    "fallback_truncated", no finish reason)."""
    s = run.settings
    node = _best_path(root)
    if node.terminal:  # every finished answer hangs from the root (no candidate has a parent)
        finished = [c for c in node.parent.children if c.terminal]
        run.score(finished, eos=True)
        best = max(finished, key=lambda n: n.eos_value)
        return run.result(best, best.eos_value, "fallback_finished")
    budget = s.token_budget if s.token_budget is not None else math.inf
    while s.fallback == "finish" and not node.terminal:
        left = budget - run.strong.tokens_sampled
        to_go = s.max_new_tokens - len(node.chunk.tokens)
        if left >= s.children * s.chunk_tokens + max(to_go - s.chunk_tokens, 0):
            run.expand([node], s.children, s.chunk_tokens, distinct=True)
        elif left >= 1:
            run.expand([node], 1, min(to_go, left), distinct=False)
        else:
            break
        run.evaluate(node.children, terminal_reward="eos")
        for child in node.children:
            child.by_fallback = True
        node = max(node.children, key=lambda c: c.value)
    return run.result(node, node.value, "fallback_finished" if node.terminal else "fallback_truncated")


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
    return run.result(answer, value, "sample")


def _bon(run: _Run) -> SearchResult:
    """Best-of-N: N complete samples; the one with the highest eos-scored V."""
    root = run.root()
    run.expand([root], run.settings.samples, run.settings.max_new_tokens, distinct=False)
    run.evaluate(root.children, terminal_reward="eos")  # every sample is finished
    best = max(root.children, key=lambda n: run.final_score(n, n.value))
    return run.result(best, best.value, "best_of_n")


def _cbs(run: _Run) -> SearchResult:
    """Chunk-level beam search, as in the Weak-to-Strong Search paper's reference
    code: the first step samples W x K chunks of L tokens from the prompt, so every
    beam slot starts filled; each later step gives every unfinished beam K sampled
    chunks, while a finished beam stays in the pool K times over; the W best by V
    (eos-scored when finished) are kept, until all W are finished. The answer is
    the top beam. The defaults (W = 2, K = L = 5) are this package's generic ones;
    that paper used W, K, L = 4, 4, 5 for sentiment and 2, 2, 30 for instructions."""
    s = run.settings
    root = run.root()
    beams = [root]
    try:
        while unfinished := [b for b in beams if not b.terminal]:
            # The first step fills every beam slot: W x K chunks from the prompt.
            k = s.beam_width * s.children if beams == [root] else s.children
            run.expand(unfinished, k, s.chunk_tokens, distinct=False)
            run.evaluate([c for b in unfinished for c in b.children], terminal_reward="eos")
            beams = keep_best(beam_pool(beams, s.children), s.beam_width)
            run.iterations += 1
            for beam in dict.fromkeys(beams):  # a finished beam may fill several slots
                beam.beam_steps.append(run.iterations)
            run.progress(max(len(b.chunk.tokens) for b in beams), s.max_new_tokens, "tokens")
    except _CUT_SHORT as why:
        _drop_unevaluated(run)
        return run.cut_short(beams[0], why)
    return run.result(beams[0], beams[0].value, "beam")


_STRATEGIES: dict[Strategy, Callable[[_Run], SearchResult]] = {"w2s": _w2s, "bon": _bon, "cbs": _cbs, "base": _base}

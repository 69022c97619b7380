"""The weak models' value of an answer:

    V(x, y) = beta * (log pi_aligned(y | x_aligned) - log pi_ref(y | x_ref))

Scores are defined on text: each weak model renders the prompt its own way and
tokenizes prompt + answer itself, so the strong model may use another tokenizer.
`log pi(y | x)` sums the log-probs of the tokens of tok(x + y) after the longest
common prefix of tok(x) and tok(x + y).

Two switches change V (both off in SearchSettings, the paper's V; the sentiment
and polite presets turn the ensemble on): an ensemble of
several aligned/reference prompt pairs, whose log-ratios are averaged, so no one
prompt's quirks decide; and length normalization, each role's log-prob divided
by the number of answer tokens it read, so a long answer does not gather value
only by being long.

Values are incremental. A child's text extends its parent's; re-tokenizing can
merge tokens across the old end, so the child keeps the parent's tokens up to
their longest common prefix (sharing its KV cells) and scores only the rest.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..engine import Branch, Context
from ..engine.sampling import log_softmax_at
from ..prompts import Prompt, PromptFormat, RenderedPrompt, render


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(eq=False)
class WeakState:
    """One weak model's reading of one answer."""

    tokens: list[int]
    """tok(x + y)."""
    log_probs: list[float]
    """Per-token log-probs of `tokens`; NaN where never needed (prompt tokens)."""
    answer_start: int
    """Length of the common prefix of tok(x) and tok(x + y)."""
    branch: Branch | None = field(default=None, repr=False)

    @property
    def log_prob(self) -> float:
        """log pi(y | x)."""
        return float(sum(self.log_probs[self.answer_start :]))

    @property
    def answer_tokens(self) -> int:
        """Tokens of y as this model reads it."""
        return len(self.tokens) - self.answer_start


class WeakScorer:
    """One role (aligned or reference): a weak model and how it sees the prompt."""

    def __init__(self, context: Context, prompt_format: PromptFormat):
        self.context = context
        self.model = context.model
        self.prompt_format = prompt_format

    def start(self, prompt: Prompt) -> tuple[RenderedPrompt, WeakState]:
        rendered = render(self.model, self.prompt_format, prompt)
        tokens = rendered.tokenize_with(self.model, "")
        if not tokens:
            raise ValueError(f"the prompt renders to no tokens for {self.model.name}: nothing to condition on")
        state = WeakState(tokens, [math.nan] * len(tokens), len(tokens), self.context.new_branch(tokens))
        return rendered, state


@dataclass(eq=False)
class ProxyState:
    """Every role's reading of one answer, and its value (no eos)."""

    weak: tuple[WeakState, ...]
    """(aligned, reference), then each ensemble pair's (aligned, reference) when
    the ensemble is on."""
    value: float


class Proxy:
    """V(x, y) over two weak scorers. Both may share one model and one context
    (one GGUF in both roles with two prompts): then each batch of answers is
    scored in a single decode. `ensemble` adds more (aligned, reference) pairs,
    used while `use_ensemble` is set; roles sharing a context are scored together."""

    def __init__(
        self,
        aligned: WeakScorer,
        reference: WeakScorer,
        beta: float = 1.0,
        ensemble: tuple[tuple[WeakScorer, WeakScorer], ...] = (),
    ):
        self.pairs = ((aligned, reference), *ensemble)
        self.beta = beta
        """Scale of V; a search sets it from its settings (as the two switches below)."""
        self.use_ensemble = False
        """Average the log-ratios of every pair, not only the first one's."""
        self.length_normalized = False
        """Each role's log-prob per answer token it read (the end token counted when scored)."""
        self._prompts: list[tuple[RenderedPrompt, list[int]]] = []
        self.tokens_remerged = 0
        """Parent tokens that children scored again because their own tokenization
        merged them with the new text (the old end re-read), all roles together."""

    @property
    def scorers(self) -> tuple[WeakScorer, ...]:
        """The roles a value reads now: aligned, reference (then the ensemble's pairs when it is on)."""
        return self.scorers_for(self.use_ensemble)

    def scorers_for(self, ensemble: bool) -> tuple[WeakScorer, ...]:
        """The roles a value reads with the ensemble on or off."""
        pairs = self.pairs if ensemble else self.pairs[:1]
        return tuple(scorer for pair in pairs for scorer in pair)

    @property
    def all_scorers(self) -> tuple[WeakScorer, ...]:
        """Every role, the ensemble's included, whether it is on or not."""
        return tuple(scorer for pair in self.pairs for scorer in pair)

    @property
    def contexts(self) -> list[Context]:
        """The distinct contexts the weak models run in."""
        return list({id(s.context): s.context for s in self.all_scorers}.values())

    def start(self, prompt: Prompt) -> ProxyState:
        started = [scorer.start(prompt) for scorer in self.scorers]
        self._prompts = [(rendered, state.tokens) for rendered, state in started]
        return ProxyState(tuple(state for _, state in started), 0.0)

    def extend(self, parents: list[ProxyState], answers: list[str]) -> list[ProxyState]:
        """The states of `answers`, each continuing the answer of its parent."""
        requests = []
        try:
            for role, scorer in enumerate(self.scorers):
                children, spans = [], []
                requests.append((scorer.context, children, spans))
                for child, span in self._children(role, [p.weak[role] for p in parents], answers):
                    children.append(child)
                    spans.append(span)
            scored = _score_by_context(requests)
        except BaseException:
            # Stopped halfway (a full cache, Ctrl-C): the forks belong to no node
            # yet, so nothing else would free them.
            for context, children, _ in requests:
                for child in children:
                    context.release(child.branch)
            raise
        for (_, children, _), scores in zip(requests, scored):
            for child, log_probs in zip(children, scores):
                child.log_probs = child.log_probs + list(log_probs)
        # A search extends a node once: from now on its children hold its prefix,
        # and its sequence ids serve the leaves better (it is rebuilt if needed).
        for parent in {id(p): p for p in parents}.values():
            for scorer, weak in zip(self.all_scorers, parent.weak):
                scorer.context.park(weak.branch)
        readings = list(zip(*(children for _, children, _ in requests)))
        return [ProxyState(weak, self._value([w.log_prob for w in weak], [w.answer_tokens for w in weak])) for weak in readings]

    def eos_values(self, states: list[ProxyState]) -> list[float]:
        """V with each weak model's end-of-answer token appended ("eos scoring"):
        finished answers are rewarded for being complete."""
        # The end token is only looked up in the row at each answer's last token,
        # never appended: nothing continues it, so neither a fork (a sequence id)
        # nor its decode is needed. A state given twice is read once (one branch
        # may appear only once per operation).
        unique = list({id(s): s for s in states}.values())
        branches = [[s.weak[role].branch for s in unique] for role in range(len(self.scorers))]
        rows = _next_logits_by_context([s.context for s in self.scorers], branches)
        ends = [rendered.end_token for rendered, _ in self._prompts]
        values = {}
        for i, s in enumerate(unique):
            log_probs = [w.log_prob + log_softmax_at(rows[role][i], ends[role]) for role, w in enumerate(s.weak)]
            values[id(s)] = self._value(log_probs, [w.answer_tokens + 1 for w in s.weak])
        return [values[id(s)] for s in states]

    def release(self, state: ProxyState) -> None:
        for scorer, weak in zip(self.all_scorers, state.weak):  # a state's roles are a prefix of these
            if weak.branch is not None:
                scorer.context.release(weak.branch)
                weak.branch = None

    def _value(self, log_probs: list[float], answer_tokens: list[int]) -> float:
        """beta x the mean over pairs of log pi_aligned - log pi_ref; roles in `scorers` order."""
        if self.length_normalized:
            log_probs = [lp / max(n, 1) for lp, n in zip(log_probs, answer_tokens)]
        ratios = [log_probs[i] - log_probs[i + 1] for i in range(0, len(log_probs), 2)]
        return self.beta * (sum(ratios) / len(ratios))

    def _children(self, role: int, parents: list[WeakState], answers: list[str]) -> Iterator[tuple[WeakState, list[int]]]:
        """Each answer's state (forked from its parent's, up to where their tokens
        agree) and the tokens left to score."""
        scorer = self.scorers[role]
        rendered, prompt_tokens = self._prompts[role]
        for parent, answer in zip(parents, answers):
            tokens = rendered.tokenize_with(scorer.model, answer)
            keep = common_prefix_length(parent.tokens, tokens)
            if keep == 0:
                raise ValueError("a weak prompt must keep at least one token before the answer")
            self.tokens_remerged += len(parent.tokens) - keep
            branch = scorer.context.fork(parent.branch, keep)
            answer_start = common_prefix_length(prompt_tokens, tokens)
            yield WeakState(tokens, parent.log_probs[:keep], answer_start, branch), tokens[keep:]


def _next_logits_by_context(contexts: list[Context], branches: list[list[Branch]]) -> list[np.ndarray]:
    """Each role's next-token rows at the ends of its branches, with one decode per
    distinct context."""
    by_context: dict[int, list[int]] = {}
    for role, context in enumerate(contexts):
        by_context.setdefault(id(context), []).append(role)
    rows: list = [None] * len(contexts)
    for roles in by_context.values():
        together = contexts[roles[0]].next_logits([b for role in roles for b in branches[role]])
        for role in roles:
            rows[role], together = together[: len(branches[role])], together[len(branches[role]) :]
    return rows


def _score_by_context(requests: list[tuple[Context, list[WeakState], list[list[int]]]]) -> list[list[np.ndarray]]:
    """Score each request's spans (appending them to the states' branches), with
    one decode per distinct context."""
    slots_by_context: dict[int, list[tuple[int, int]]] = {}
    for r, (context, states, _) in enumerate(requests):
        if states:
            slots_by_context.setdefault(id(context), []).extend((r, i) for i in range(len(states)))
    results: list[list] = [[None] * len(states) for _, states, _ in requests]
    for slots in slots_by_context.values():
        context = requests[slots[0][0]][0]
        branches = [requests[r][1][i].branch for r, i in slots]
        spans = [requests[r][2][i] for r, i in slots]
        for (r, i), log_probs in zip(slots, context.score(branches, spans)):
            results[r][i] = log_probs
    return results

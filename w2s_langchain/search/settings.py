"""Every setting of a search, checked when it is made (before any model loads).

`SearchSettings` is the one declaration of the search settings: the components'
fields, the `w2s-align` flags and their help, and a preset's "search" keys are all
read from it (see declared_settings.py)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from ..declared_settings import declared_settings
from ..engine import SamplingSettings
from ..prompts import check_encodable
from .tree import SELECTIONS, SelectionRule

# The names a string setting accepts. Each table that runs a choice (SELECTIONS and
# BACKUPS in tree.py, the strategies in strategies.py) is keyed by exactly these;
# tests/test_settings_declared_once.py checks it.
Strategy = Literal["w2s", "bon", "cbs", "base"]

MAX_BRANCHES_PER_STEP = 4096
# Branches one step may decode together: each gets a row of n_vocab next-token
# probabilities (1 GB of float32 rows at 4,096 x 65k tokens), and far more take
# minutes a step on CPUs. Real settings stay below a hundred.
_MOST = {
    "iterations": 1_000_000, "children": MAX_BRANCHES_PER_STEP, "chunk_tokens": 1 << 20, "parallel_leaves": MAX_BRANCHES_PER_STEP,
    "num_select": MAX_BRANCHES_PER_STEP, "samples": MAX_BRANCHES_PER_STEP, "beam_width": MAX_BRANCHES_PER_STEP,
    "max_new_tokens": 1 << 20, "token_budget": 1 << 40, "commit_every": 1_000_000,
}
# The most each whole-number setting can be (max_new_tokens: no context holds more).
SelectionName = Literal["ea-puct", "puct", "uct"]
Backup = Literal["max", "mean"]
TerminalReward = Literal["-inf", "eos"]
Fallback = Literal["truncate", "finish"]


@dataclass(frozen=True)
class SearchSettings:
    """How to search. Defaults are the W2S-AlignTree reference code's generic
    decoder settings (docs/algorithm.md); the switches marked "quirk" keep its behaviour."""

    strategy: Strategy = "w2s"
    """"w2s" (W2S-AlignTree), "bon" (Best-of-N), "cbs" (chunk-level beam search), "base" (plain sampling)."""
    iterations: int = 100
    """m: MCTS iterations (w2s)."""
    children: int = 5
    """K: children per expansion (w2s), chunks per beam (cbs)."""
    chunk_tokens: int = 5
    """L: strong tokens per chunk (w2s, cbs)."""
    selection: SelectionName | SelectionRule = "ea-puct"
    """How selection scores a child (w2s): "ea-puct" (the paper's Entropy-Aware
    PUCT), "puct" (no entropy term) or "uct" (no prior, the paper's ablation); or
    your own function rule(child, parent, c, w) -> float (see search/tree.py)."""
    c: float = 2.0
    """Exploration constant of the selection rule."""
    entropy_weight: float = 0.2
    """w in EA-PUCT; 0 gives plain PUCT."""
    token_budget: int | None = None
    """Most strong tokens a w2s search samples, the "finish" fallback's included
    (the expansion that reaches it gets shorter chunks, so it is met to within K
    tokens, P x K with `parallel_leaves`): a cap on compute, and how strategies
    are compared at a matched budget. A budget too small to finish an answer
    still buys the search's first step; the "finish" fallback then samples what
    is left and the answer stops there (source "fallback_truncated"). None: run
    all `iterations`."""
    parallel_leaves: int = 1
    """P: leaves each w2s step selects and grows together (leaf parallelism).
    With P > 1 a step selects up to P different leaves one after another, a
    virtual loss steering each selection away from the paths already taken, then
    expands them at once: the strong model samples their P x K children in one
    decode per token and the weak models score them in one decode. `iterations`
    still counts leaves, and a token budget is met to within P x K tokens. It
    changes the search (another tree than one leaf per step), so it is off (1) by
    default. A step's batch is one decode while its P x K children fit the
    context's `n_seq_max` (2 P x K for a weak model in both roles); more still
    work, in several."""
    commit_every: int | None = None
    """Streaming mode (w2s): every this many iterations, the root's most visited
    unfinished child is committed: its text is final (a stream hands it on at
    once), it becomes the root with its subtree, and the search goes on below
    it, as game-playing MCTS commits to a move. The first text comes after
    `commit_every` iterations instead of all of them, but the answer is chosen
    chunk by chunk, not over the whole tree: it changes the search, so it is off
    (None) by default. See docs/algorithm.md."""
    num_select: int = 10
    """Stage 2 re-scores the terminal children of this many candidates (w2s)."""
    samples: int = 4
    """N: complete samples (bon)."""
    beam_width: int = 2
    """W: beams kept (cbs)."""
    max_new_tokens: int = 128
    """Most answer tokens the strong model writes."""
    stop: tuple[str, ...] = ()
    """Strings that end the answer (not included in it)."""
    temperature: float = 0.7
    """Sampling temperature of the strong model; 0 is greedy."""
    top_k: int = 50
    """Sample among the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Sample among the most likely tokens whose probabilities add up to top_p, in (0, 1]; 1 keeps all."""
    seed: int = 0
    """Same seed, same settings, same models: same answer."""
    beta: float = 1.0
    """Scale of the proxy value (the reference code drops it: 1)."""
    backup: Backup = "max"
    """Backpropagation: "max" (the paper: a node is worth its best child) or
    "mean" (ablation: classic MCTS's visit-weighted mean of the children)."""
    terminal_reward: TerminalReward = "-inf"
    """Value of a child that finishes during expansion: "-inf" (quirk: judged only
    in stage 2) or "eos" (eos-scored right away)."""
    stage2_nonterminal: bool = True
    """Quirk: stage 2 also eos-scores the candidates' unfinished children."""
    fallback: Fallback = "truncate"
    """With no finished answer in the tree: "truncate" returns the best unfinished
    one as it is (the reference code); "finish" continues it with the strong model,
    greedily by V, until it ends."""
    kl_weight: float = 0.0
    """Remedy for over-optimization, off (0) by default: the final choice (w2s
    stage 2, bon) maximizes V + kl_weight x log-prob of the answer under the
    strong model's sampling distribution, a KL-style penalty on answers that
    plain sampling would rarely write. The reported value stays V."""
    length_normalized: bool = False
    """Remedy, off by default: each weak model's log-prob is divided by the
    answer tokens it read, so V does not grow with length alone (for answers
    that end on their own)."""
    ensemble: bool = False
    """Remedy, off here (the paper's V) and on in the sentiment and polite presets, the
    one remedy the quality benchmark kept: V averages the log-ratios of the config's
    `ensemble_prompts` pairs (paraphrases of the preference) with the main pair's,
    so no single prompt's quirks can be exploited. Costs one weak reading per pair."""
    timeout: float | None = None
    """Seconds a search may run. When they are spent it stops within one decode
    step and raises SearchTimeoutError (or answers, with `partial_answer`)."""
    partial_answer: bool = False
    """When a search is cut short (timeout, or a KV cache too small to go on),
    return the best answer found so far (`SearchResult.stopped` says why)
    instead of raising. Needs something to return: w2s and cbs only."""

    def __post_init__(self) -> None:
        for setting in declared_settings(type(self)):
            value = getattr(self, setting.name)
            if setting.choices and value not in setting.choices and not (setting.name == "selection" and callable(value)):
                rule = " or a function rule(child, parent, c, w) -> float" if setting.name == "selection" else ""
                raise ValueError(
                    f"unknown {setting.name} {value!r}: {setting.name} must be one of {', '.join(setting.choices)}{rule}"
                )
        whole_numbers = [
            "iterations", "children", "chunk_tokens", "parallel_leaves", "num_select", "samples", "beam_width", "max_new_tokens"
        ]
        if self.token_budget is not None:  # None: no budget
            whole_numbers.append("token_budget")
        if self.commit_every is not None:  # None: the whole-tree search
            whole_numbers.append("commit_every")
        for name in whole_numbers:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
            if value > _MOST[name]:
                raise ValueError(f"{name}={value:,} is more than the {_MOST[name]:,} a search can use: lower it")
        if self.branches_per_step > MAX_BRANCHES_PER_STEP:
            raise ValueError(
                f"a {self.strategy} search with these settings grows {self.branches_per_step:,} branches at once "
                f"(samples, beam_width x children or parallel_leaves x children), more than the "
                f"{MAX_BRANCHES_PER_STEP:,} that fit in memory and time: lower them"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:  # numpy's rule
            raise ValueError(f"seed must be a whole number >= 0, got {self.seed!r}")
        for name in ("length_normalized", "ensemble"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("c", "entropy_weight", "beta", "kl_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.timeout is not None and not (
            isinstance(self.timeout, (int, float)) and not isinstance(self.timeout, bool) and self.timeout > 0
            and math.isfinite(self.timeout)
        ):
            raise ValueError(f"timeout must be a number of seconds > 0 or None, got {self.timeout!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a list of strings, got {self.stop!r}")
        for stop in self.stop:
            check_encodable(stop, "a stop string")
        object.__setattr__(self, "stop", tuple(self.stop))
        self.sampling  # checks temperature, top_k, top_p

    def tree_tokens(self) -> int:
        """About how many answer tokens (strong ones) a search's tree holds at its
        largest, every path together: what its KV cache must keep beyond the
        prompt so that no branch is evicted and read again. w2s: K x L per
        iteration, and the "finish" fallback's K children per step down one
        answer (at most the token budget); bon: N answers; cbs: W x K beams'
        chunks down one answer; base: one answer. An estimate, not a bound: a
        chunk can run up to 3 tokens past L to finish a character."""
        n = self.max_new_tokens
        if self.strategy == "w2s":
            grown = self.iterations * self.children * self.chunk_tokens
            finishing = self.children * n if self.fallback == "finish" else 0
            tokens = grown + finishing
            return tokens if self.token_budget is None else min(tokens, self.token_budget)
        if self.strategy == "bon":
            return self.samples * n
        if self.strategy == "cbs":
            return self.beam_width * self.children * n
        return n

    @property
    def branches_per_step(self) -> int:
        """Branches one step of the strategy decodes together (each gets a row of
        next-token probabilities, n_vocab wide)."""
        return {"bon": self.samples, "base": 1, "cbs": self.beam_width * self.children}.get(
            self.strategy, self.parallel_leaves * self.children
        )

    @property
    def selection_rule(self) -> SelectionRule:
        return self.selection if callable(self.selection) else SELECTIONS[self.selection]

    @property
    def sampling(self) -> SamplingSettings:
        return SamplingSettings(self.temperature, self.top_k, self.top_p)

    def with_(self, **changes: Any) -> SearchSettings:
        """A copy with some settings changed (checked again)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown search settings: {', '.join(sorted(unknown))}")
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop"] = list(self.stop)
        if callable(self.selection):  # a user's own rule: named, so results stay JSON
            data["selection"] = f"{self.selection.__module__}.{self.selection.__qualname__}"
        return data

"""The warped next-token distribution: temperature, then top-k, then top-p.

The order is the one Hugging Face's `generate` applies, which the W2S-AlignTree
reference code uses. A `Distribution` holds only the tokens that survive the
warp (at most top_k of them), so keeping one per tree node is cheap.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingSettings:
    """How the strong model's logits become a sampling distribution."""

    temperature: float = 0.7
    """Divides the logits; 0 means greedy (always the most likely token)."""
    top_k: int = 50
    """Keep only the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability adds up to top_p."""

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")


@dataclass(frozen=True)
class Distribution:
    """A distribution over a subset of the vocabulary, most likely token first."""

    tokens: np.ndarray
    """Token ids with non-zero probability."""
    probs: np.ndarray
    """Their probabilities (float64, summing to 1)."""

    def entropy_bits(self) -> float:
        """Shannon entropy in bits."""
        p = self.probs
        return float(-(p * np.log2(p)).sum())

    def prob(self, token: int) -> float:
        """Probability of `token` (0 when the warp removed it)."""
        hit = np.flatnonzero(self.tokens == token)
        return float(self.probs[hit[0]]) if hit.size else 0.0

    def sample(self, rng: np.random.Generator) -> int:
        """One token, drawn with replacement."""
        return int(self.tokens[rng.choice(self.tokens.size, p=self.probs)])

    def sample_distinct(self, rng: np.random.Generator, k: int) -> list[int]:
        """Up to k different tokens, drawn one after another without replacement
        (fewer when fewer than k tokens have non-zero probability)."""
        k = min(k, self.tokens.size)
        picks = rng.choice(self.tokens.size, size=k, replace=False, p=self.probs)
        return [int(self.tokens[i]) for i in picks]


def warp(logits: np.ndarray, settings: SamplingSettings, never: np.ndarray | None = None) -> Distribution:
    """The distribution the strong model samples from, given one row of logits.
    Tokens in `never` are removed before warping, so the entropy and the
    probabilities are over what can really be chosen."""
    logits = np.array(logits, dtype=np.float64)  # a copy: the caller's row stays as it was
    if never is not None and never.size:
        logits[never] = -np.inf
    if settings.temperature == 0:
        return Distribution(np.array([int(np.argmax(logits))]), np.array([1.0]))
    scaled = logits / settings.temperature
    drawable = np.arange(scaled.size)
    if np.count_nonzero(np.isneginf(scaled)) > scaled.size // 2:
        # A sparse row (a server returns only its top tokens): select among those,
        # since selecting among a vocabulary of equal -inf values is 20x slower.
        drawable = np.flatnonzero(~np.isneginf(scaled))
    if 0 < settings.top_k < drawable.size:
        kept = drawable[np.argpartition(scaled[drawable], -settings.top_k)[-settings.top_k :]]
    else:
        kept = drawable
    kept = kept[np.argsort(-scaled[kept], kind="stable")]
    probs = np.exp(scaled[kept] - scaled[kept[0]])
    probs /= probs.sum()
    if settings.top_p < 1:
        # Keep every token whose preceding mass is below top_p: the smallest set
        # reaching top_p, which always holds the most likely token.
        before = np.cumsum(probs) - probs
        n = int(np.count_nonzero(before < settings.top_p))
        kept, probs = kept[:n], probs[:n] / probs[:n].sum()
    nonzero = probs > 0
    return Distribution(kept[nonzero], probs[nonzero])


def log_softmax_at(logits: np.ndarray, token: int) -> float:
    """log p(token) under the plain softmax of one row of logits (no warping):
    the quantity the weak models score text with."""
    row = np.asarray(logits)
    top = row.max()
    # exp in the row's own precision (float32 rows are large), summed in float64.
    return float(row[token] - top) - float(np.log(np.exp(row - top).sum(dtype=np.float64)))

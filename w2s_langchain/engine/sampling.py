"""The warped next-token distribution: temperature, then top-k, then top-p.

The order is the one Hugging Face's `generate` applies, which the W2S-AlignTree
reference code uses. A `Distribution` holds only the tokens that survive the
warp (at most top_k of them), so keeping one per tree node is cheap.

`Utf8Guard` says which tokens would break an answer's UTF-8, so that the sampler
never draws them: a byte-level vocabulary holds lone bytes (b"\\xab") that only
make text as part of a character.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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


# --- UTF-8 ---------------------------------------------------------------------------


def incomplete_character(data: bytes) -> bytes:
    """The bytes at the end of `data` that begin a UTF-8 character and do not
    complete it yet (b"" when `data` ends on a whole character)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:  # ASCII: a whole character
            return b""
        if byte >= 0xC0:  # a lead byte: does the character it starts end here?
            return data[-back:] if back < _utf8_length(byte) else b""
    return b""


def whole_characters(data: bytes) -> bytes:
    """`data` without a character cut short at its end."""
    return data[: len(data) - len(incomplete_character(data))]


def _utf8_length(lead: int) -> int:
    return 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4


# The byte that may follow a lead byte when it is not 0x80..0xBF (RFC 3629:
# no overlong forms, no surrogates, nothing above U+10FFFF).
_SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def _is_utf8_prefix(data: bytes) -> bool:
    """Valid UTF-8, except that it may end inside a character."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.reason == "unexpected end of data" and err.end == len(data)
    return True


class Utf8Guard:
    """Which tokens may come next so that the answer's bytes stay valid UTF-8:
    after a whole character, a token that is itself valid UTF-8 (it may end
    inside a character); inside one, only a token whose first bytes continue
    it and whose other bytes are valid again. A token that adds no bytes (end of
    generation) cannot finish a character, so it waits for the character's end.

    Each token is read (`token_bytes`) the first time it is a candidate, so a
    served model's vocabulary is only learned as far as the server offers it.
    The guard holds no reference to the model, which keeps it (no cycle)."""

    def __init__(self, n_vocab: int):
        self._known = np.zeros(n_vocab, dtype=bool)
        self._first = np.zeros(n_vocab, dtype=np.int16)
        """The token's first byte (-1: no bytes)."""
        self._leading = np.zeros(n_vocab, dtype=np.int8)
        """Continuation bytes (0x80..0xBF) the token starts with, at most 4 counted."""
        self._only_leading = np.zeros(n_vocab, dtype=bool)
        """The token is nothing but continuation bytes (or no bytes at all)."""
        self._sound = np.zeros(n_vocab, dtype=bool)
        """The bytes after the leading continuation bytes are valid UTF-8 (maybe ending inside a character)."""

    def blocked(self, answer: bytes, candidates: np.ndarray, token_bytes: Callable[[int], bytes]) -> np.ndarray:
        """The candidates (token ids) that cannot follow `answer`. When that would
        be all of them, inside a character: only those whose bytes break it (the
        answer then ends there, and its unfinished character is dropped)."""
        self._learn(candidates[~self._known[candidates]], token_bytes)
        first, leading = self._first[candidates], self._leading[candidates]
        sound, only_leading = self._sound[candidates], self._only_leading[candidates]
        pending = incomplete_character(answer)
        if not pending:
            return candidates[(leading > 0) | ~sound]
        lo, hi = _SECOND_BYTE.get(pending[0], (0x80, 0xBF)) if len(pending) == 1 else (0x80, 0xBF)
        needed = _utf8_length(pending[0]) - len(pending)
        continues = (first >= lo) & (first <= hi) & (((leading == needed) & sound) | ((leading < needed) & only_leading))
        if continues.any():
            return candidates[~continues]
        return candidates[(first >= 0) & ~continues]

    def _learn(self, tokens: np.ndarray, token_bytes: Callable[[int], bytes]) -> None:
        for token in tokens.tolist():
            piece = token_bytes(token)
            leading = len(piece) - len(piece.lstrip(bytes(range(0x80, 0xC0))))
            self._first[token] = piece[0] if piece else -1
            self._leading[token] = min(leading, 4)
            self._only_leading[token] = leading == len(piece)
            self._sound[token] = _is_utf8_prefix(piece[leading:])
            self._known[token] = True

"""The strong model's side of a search: it writes every token of the answer.

A `Chunk` is one path of the tree as the strong model sees it: the answer so far
and the branch of the engine that holds prompt + answer. `expand` samples K
children of a chunk, advancing all of them in one decode per token.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from ..engine import Branch, Context, SamplingSettings, warp
from ..engine.sampling import Distribution, incomplete_character, whole_characters
from ..prompts import Prompt, PromptFormat, render

# A chunk never ends inside a UTF-8 character: it samples up to this many extra
# tokens to complete one (a character is at most 4 bytes, and each token the
# sampler may draw inside one adds at least one of them).
_MAX_UTF8_EXTRA_TOKENS = 3


@dataclass(eq=False)
class Chunk:
    """The strong model's answer along one path of the tree."""

    tokens: list[int]
    """Answer tokens so far (the prompt excluded, end-of-generation excluded)."""
    answer: bytes
    """Answer bytes so far, cut before a stop string when one appeared."""
    prior: float = 1.0
    """P: geometric mean of the warped probabilities of this chunk's tokens."""
    finish_reason: str | None = None
    """Why the answer ended: "eos", "length" or "stop"; None while it goes on."""
    n_new: int = 0
    """Tokens sampled for this chunk (end-of-generation included)."""
    branch: Branch | None = field(default=None, repr=False)
    """The engine branch holding prompt + answer; None once released."""

    @property
    def terminal(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.answer.decode("utf-8", errors="replace")


class StrongModel:
    """Samples continuations from the strong model."""

    def __init__(
        self,
        context: Context,
        prompt_format: PromptFormat,
        sampling: SamplingSettings,
        max_new_tokens: int,
        stop: tuple[str, ...] = (),
        rng: np.random.Generator | None = None,
        check: Callable[[], None] = lambda: None,
    ):
        self.context = context
        self.check = check
        """Called before every decode step; raises to stop the search (timeout, cancel)."""
        self.rng = rng if rng is not None else context.rng
        self.model = context.model
        self.prompt_format = prompt_format
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(s for s in stop if s)
        self.tokens_sampled = 0

    def prompt_tokens(self, prompt: Prompt) -> list[int]:
        rendered = render(self.model, self.prompt_format, prompt)
        return rendered.tokenize_with(self.model, "")

    def start(self, prompt: Prompt) -> Chunk:
        """The root: the prompt, no answer yet."""
        return Chunk(tokens=[], answer=b"", branch=self.context.new_branch(self.prompt_tokens(prompt)))

    def expand(self, parents: list[Chunk], k: int, chunk_tokens: int, *, distinct: bool) -> list[tuple[float, list[Chunk]]]:
        """Sample k children of each parent, all advancing together (one decode
        per token for every child of every parent). Each child is `chunk_tokens`
        long unless it ends sooner; with `distinct`, a parent's children start
        with different tokens (sampled without replacement).

        Returns, per parent, the entropy (bits) of its next-token distribution and
        its children. Parents' branches are released: a node is expanded once."""
        for parent in parents:
            if parent.terminal or parent.branch is None:
                raise ValueError("only an unfinished chunk that still holds its branch can be expanded")
        ctx, rng = self.context, self.rng
        self.check()
        rows = ctx.next_logits([parent.branch for parent in parents])
        families: list[tuple[float, list[_Growth]]] = []
        try:
            for parent, row in zip(parents, rows):
                dist = self.distribution(row, parent.answer)
                firsts = dist.sample_distinct(rng, k) if distinct else [dist.sample(rng) for _ in range(k)]
                growing = [_Growth(parent, ctx.fork(parent.branch)) for _ in firsts]
                families.append((dist.entropy_bits(), growing))
                for child, token in zip(growing, firsts):
                    self._add(child, token, dist.prob(token))
                self.release(parent)
            everyone = [child for _, growing in families for child in growing]
            while active := [child for child in everyone if not child.done(chunk_tokens)]:
                self.check()
                for child, row in zip(active, ctx.next_logits([child.branch for child in active])):
                    dist = self.distribution(row, child.answer)
                    token = dist.sample(rng)
                    self._add(child, token, dist.prob(token))
        except BaseException:
            # Stopped halfway (timeout, cancel, Ctrl-C, a full cache): the children
            # are not in the tree yet, so nothing else would free their branches.
            for _, growing in families:
                for child in growing:
                    ctx.release(child.branch)
            raise
        results = []
        for entropy, growing in families:
            children = [child.finish() for child in growing]
            for child in children:
                if child.terminal:  # never expanded: only its text matters now
                    self.release(child)
            results.append((entropy, children))
        return results

    def distribution(self, row: np.ndarray, answer: bytes) -> Distribution:
        """What the next token of `answer` is drawn from, given the logits `row`:
        never a marker token, and never one that would make the answer's bytes
        invalid UTF-8 (inside a character, only tokens that continue it).
        The warp (temperature, top-k, top-p) comes first and the tokens that break
        UTF-8 leave what it kept, so a served model, whose server offers only its
        top tokens, draws from the same tokens as the model in process. When none
        of those can continue the answer, top-p is let go, then top-k: the choice
        is made among the most likely tokens that can."""
        never = self.model.never_sampled
        guard, token_bytes = self.model.utf8_guard, self.model.token_bytes
        for sampling in (self.sampling, replace(self.sampling, top_p=1.0)):
            warped = warp(row, sampling, never)
            allowed = ~np.isin(warped.tokens, guard.blocked(answer, warped.tokens, token_bytes))
            if allowed.all():
                return warped
            if allowed.any():
                probs = warped.probs[allowed]
                return Distribution(warped.tokens[allowed], probs / probs.sum())
        blocked = guard.blocked(answer, np.flatnonzero(np.isfinite(row)), token_bytes)
        return warp(row, self.sampling, np.concatenate([never, blocked]))

    def release(self, chunk: Chunk) -> None:
        if chunk.branch is not None:
            self.context.release(chunk.branch)
            chunk.branch = None

    def _add(self, child: _Growth, token: int, prob: float) -> None:
        """Take one sampled token into a growing child and see whether it ends."""
        self.tokens_sampled += 1
        child.log_probs.append(math.log(prob))
        if self.model.is_end_of_generation(token):
            child.finish_reason = "eos"
        else:
            self.context.append(child.branch, [token])
            child.tokens.append(token)
            child.answer += self.model.token_bytes(token)
            if len(child.tokens) >= self.max_new_tokens:
                child.finish_reason = "length"
        if child.finish_reason is not None:
            # Only the token limit (or a vocabulary with no way to go on) ends an
            # answer inside a character: that character is dropped, never shown broken.
            child.answer = whole_characters(child.answer)
        self._cut_at_stop(child)

    def _cut_at_stop(self, child: _Growth) -> None:
        """End the answer before the first stop string in its text as the user will
        read it: invalid bytes as U+FFFD, and, once the answer is over, a character
        cut short at its end too."""
        if not self.stop:
            return
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = decoder.decode(child.answer, final=child.finish_reason is not None)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            child.answer = text[: min(hits)].encode("utf-8")
            child.finish_reason = "stop"


@dataclass(eq=False)
class _Growth:
    """A child while its chunk is being sampled."""

    parent: Chunk
    branch: Branch
    tokens: list[int] = field(init=False)
    answer: bytes = field(init=False)
    log_probs: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self.tokens = list(self.parent.tokens)
        self.answer = self.parent.answer

    def done(self, chunk_tokens: int) -> bool:
        n = len(self.log_probs)
        if self.finish_reason is not None or n >= chunk_tokens + _MAX_UTF8_EXTRA_TOKENS:
            return True
        return n >= chunk_tokens and not incomplete_character(self.answer)

    def finish(self) -> Chunk:
        return Chunk(
            tokens=self.tokens,
            answer=self.answer,
            prior=math.exp(sum(self.log_probs) / len(self.log_probs)),
            finish_reason=self.finish_reason,
            n_new=len(self.log_probs),
            branch=self.branch,
        )


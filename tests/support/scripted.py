"""A scripted strong model and proxy, for the search's tree logic alone.

A real search needs llama.cpp's sampling to build a tree, so corners such as "the
budget is spent exactly at the end of a step" or "the root's first child
finishes" depend on what a seed happens to sample. Here the search runs on the
same small interface it uses for the real models (`SearchModels.sampler`: start,
expand, release, tokens_sampled; the proxy: start, extend, eos_values, release),
but every token and every value comes from a script:

- one token is one character; a node's children append `chunk_tokens`
  characters, child i repeating the letter "abcdefgh"[i] ("" + "aa", "aa" + "bb", ...);
- an answer whose text is in `ends` ends right there (its end-of-generation token
  is sampled after it and counts as sampled); one reaching max_new_tokens ends
  with "length";
- V of an answer is `values(text)` (default: the count of "a" minus the count of
  "b", so the tree prefers the first child), its eos-scored V that plus `eos_bonus`.

Fakes stop at tree logic: nothing here checks the engine or the weak models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from w2s_langchain.engine.context import ContextStats
from w2s_langchain.prompts import PromptFormat
from w2s_langchain.search import Chunk, ProxyState, SearchModels, SearchSettings

LETTERS = "abcdefgh"


def default_values(text: str) -> float:
    return float(text.count("a") - text.count("b"))


class ScriptedStrong:
    def __init__(self, max_new_tokens: int, ends: set[str], entropy: Callable[[str], float]):
        self.max_new_tokens = max_new_tokens
        self.ends = ends
        self.entropy = entropy
        self.tokens_sampled = 0
        self.expansions: list[tuple[list[str], int, int]] = []
        """Each expand call: (the parents' texts, k, chunk_tokens)."""

    def start(self, prompt) -> Chunk:
        return Chunk(tokens=[], answer=b"", branch=list(prompt))  # the prompt's "tokens": its characters

    def expand(self, parents: list[Chunk], k: int, chunk_tokens: int, *, distinct: bool):
        self.expansions.append(([p.text for p in parents], k, chunk_tokens))
        families = []
        for parent in parents:
            if parent.terminal:
                raise ValueError("only an unfinished chunk can be expanded")
            children = [self._child(parent, LETTERS[i], chunk_tokens) for i in range(k)]
            families.append((self.entropy(parent.text), children))
        return families

    def release(self, chunk: Chunk) -> None:
        pass

    def _child(self, parent: Chunk, letter: str, chunk_tokens: int) -> Chunk:
        text, finish, sampled = parent.text, None, 0
        while finish is None and sampled < chunk_tokens:
            text += letter
            sampled += 1
            if text in self.ends:
                sampled += 1  # the end-of-generation token
                finish = "eos"
            elif len(text) >= self.max_new_tokens:
                finish = "length"
        self.tokens_sampled += sampled
        return Chunk(tokens=[ord(ch) for ch in text], answer=text.encode(), prior=0.5, finish_reason=finish, n_new=sampled)


class ScriptedProxy:
    contexts: list = []

    def __init__(self, values: Callable[[str], float], eos_bonus: float):
        self.values = values
        self.eos_bonus = eos_bonus
        self.beta = 1.0
        self.valued: list[str] = []
        """Every answer extend valued, in order."""

    def start(self, prompt) -> ProxyState:
        return ProxyState(weak=(_Text(""), _Text("")), value=0.0)

    def extend(self, parents: list[ProxyState], answers: list[str]) -> list[ProxyState]:
        self.valued.extend(answers)
        return [ProxyState(weak=(_Text(a), _Text(a)), value=self.beta * self.values(a)) for a in answers]

    def eos_values(self, states: list[ProxyState]) -> list[float]:
        return [self.beta * (self.values(s.weak[0].text) + self.eos_bonus) for s in states]

    def release(self, state: ProxyState) -> None:
        pass


@dataclass
class _Text:
    text: str


@dataclass
class _NoContext:
    """What a search reads of the strong model's context besides the sampler:
    its counters and two switches."""

    stats: ContextStats = field(default_factory=ContextStats)
    reuse_prefixes: bool = True
    interrupt: object = None


class ScriptedModels(SearchModels):
    """SearchModels whose strong model and proxy follow the script above."""

    def __init__(
        self,
        ends: set[str] = frozenset(),
        values: Callable[[str], float] = default_values,
        eos_bonus: float = 0.0,
        entropy: Callable[[str], float] = lambda text: 1.0,
    ):
        super().__init__(_NoContext(), PromptFormat(), ScriptedProxy(values, eos_bonus))
        self.ends = set(ends)
        self.entropy = entropy
        self.strong_side: ScriptedStrong | None = None

    def sampler(self, settings: SearchSettings, check) -> ScriptedStrong:
        self.strong_side = ScriptedStrong(settings.max_new_tokens, self.ends, self.entropy)
        return self.strong_side

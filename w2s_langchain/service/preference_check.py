"""Does a preset's weak pair want what you want? Check it before paying for searches.

A search maximizes V(x, y) = beta * (log pi_aligned(y | x) - log pi_ref(y | x)),
so it can only be as good as V's agreement with your own preference. Two checks:

- `check_pairs`: on labelled pairs (a prompt, the answer you prefer, the one you
  do not), how often V(chosen) > V(rejected), with a 95% Wilson score interval,
  the mean margin V(chosen) - V(rejected), and the pairs V gets most wrong. An
  interval that includes 50% means the pair may not tell them apart at all.
- `rank_samples`: without labels, N plain samples of the strong model for a few
  prompts, ranked by V, so you can read what the pair rewards.

V is computed by `Aligner.values`, the search's own proxy code, for the answer
text as it is (no end token). The command line is `w2s-align check` (see cli.py).
Labelled pairs for the packaged presets ship in presets/pairs/NAME.jsonl.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .aligner import PRESETS_DIR, Aligner
from ..search import SearchSettings

PAIRS_DIR = PRESETS_DIR / "pairs"
MAX_PAIRS_FILE_BYTES = 20 * 2**20
MAX_PAIRS = 10_000
SPLITS = ("tune", "heldout")
_Z95 = 1.959964  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class LabelledPair:
    """Two answers to one prompt: the one the user prefers, and the other."""

    prompt: str
    chosen: str
    rejected: str
    split: str | None = None
    """"tune" or "heldout" in the shipped files: only the tune split may guide
    changes to a preset; agreement is reported on the held-out one."""


def read_pairs(path: str | Path, split: str | None = None) -> list[LabelledPair]:
    """The pairs of a JSONL file, one object per line with string fields
    `prompt`, `chosen` and `rejected` (others are ignored, but `split`); with
    `split`, only the pairs of that split. Every line is checked: a bad one is a
    ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such pairs file: {path}")
    if path.stat().st_size > MAX_PAIRS_FILE_BYTES:
        raise ValueError(f"{path} is over {MAX_PAIRS_FILE_BYTES // 2**20} MiB: a check needs a few hundred pairs at most")
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    pairs = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON ({err.msg})") from None
            if not isinstance(data, dict):
                raise ValueError(f'{where}: each line must be an object {{"prompt": ..., "chosen": ..., "rejected": ...}}')
            for key in ("prompt", "chosen", "rejected"):
                if not isinstance(data.get(key), str) or not data[key].strip():
                    raise ValueError(f"{where}: {key!r} must be a non-empty string")
            if data["chosen"] == data["rejected"]:
                raise ValueError(f"{where}: chosen and rejected are the same answer")
            pair_split = data.get("split")
            if pair_split is not None and pair_split not in SPLITS:
                raise ValueError(f"{where}: split must be one of {', '.join(SPLITS)}, got {pair_split!r}")
            if split is None or pair_split == split:
                pairs.append(LabelledPair(data["prompt"], data["chosen"], data["rejected"], pair_split))
            if len(pairs) > MAX_PAIRS:
                raise ValueError(f"{path} holds more than {MAX_PAIRS} pairs: check a sample of them")
    if not pairs:
        raise ValueError(f"{path} holds no pairs" + (f" of split {split!r}" if split else ""))
    return pairs


def shipped_pairs(preset: str) -> Path | None:
    """The labelled pairs that ship with a packaged preset, if any."""
    path = PAIRS_DIR / f"{preset}.jsonl"
    return path if path.is_file() else None


@dataclass(frozen=True)
class ScoredPair:
    pair: LabelledPair
    chosen_value: float
    rejected_value: float

    @property
    def margin(self) -> float:
        """V(chosen) - V(rejected): above 0 when the weak pair agrees with the label."""
        return self.chosen_value - self.rejected_value


@dataclass(frozen=True)
class AgreementReport:
    """How often the weak pair's V agrees with labelled pairs."""

    pairs: list[ScoredPair]
    agreement: float
    """Share of pairs with V(chosen) > V(rejected); a tie counts half."""
    low: float
    high: float
    """95% Wilson score interval of `agreement`."""
    mean_margin: float

    @property
    def includes_chance(self) -> bool:
        """The interval includes 50%: the weak pair may not tell the answers apart."""
        return self.low <= 0.5 <= self.high

    def most_wrong(self, n: int) -> list[ScoredPair]:
        """The n pairs with the lowest margin (the most wrong first)."""
        return sorted(self.pairs, key=lambda p: p.margin)[:n]

    def to_dict(self, most_wrong: int = 5) -> dict[str, Any]:
        return {
            "pairs": len(self.pairs),
            "agreement": self.agreement,
            "interval_95": [self.low, self.high],
            "interval_method": "Wilson score",
            "includes_chance": self.includes_chance,
            "mean_margin": self.mean_margin,
            "most_wrong": [
                {"prompt": p.pair.prompt, "chosen": p.pair.chosen, "rejected": p.pair.rejected,
                 "chosen_value": p.chosen_value, "rejected_value": p.rejected_value, "margin": p.margin}
                for p in self.most_wrong(most_wrong)
            ],
        }


def wilson_interval(successes: float, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes / n (n >= 1)."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def agreement_report(scored: list[ScoredPair]) -> AgreementReport:
    """The statistics of scored pairs."""
    if not scored:
        raise ValueError("no pairs to report on")
    agree = sum(1.0 if p.margin > 0 else 0.5 if p.margin == 0 else 0.0 for p in scored)
    low, high = wilson_interval(agree, len(scored))
    return AgreementReport(scored, agree / len(scored), low, high, sum(p.margin for p in scored) / len(scored))


def check_pairs(aligner: Aligner, pairs: list[LabelledPair], settings: SearchSettings | None = None) -> AgreementReport:
    """Score every pair with the aligner's weak pair (V of chosen and of
    rejected, given the prompt) and report their agreement."""
    by_prompt: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        by_prompt.setdefault(pair.prompt, []).append(i)
    values: dict[int, tuple[float, float]] = {}
    for prompt, indices in by_prompt.items():  # one prompt reading for all its pairs
        answers = [a for i in indices for a in (pairs[i].chosen, pairs[i].rejected)]
        scored = aligner.values(prompt, answers, settings)
        for k, i in enumerate(indices):
            values[i] = (scored[2 * k], scored[2 * k + 1])
    return agreement_report([ScoredPair(pair, *values[i]) for i, pair in enumerate(pairs)])


@dataclass(frozen=True)
class RankedAnswers:
    prompt: str
    answers: list[tuple[str, float]]
    """(answer, V), the highest V first."""


def rank_samples(
    aligner: Aligner, prompts: list[str], samples: int = 8, settings: SearchSettings | None = None
) -> list[RankedAnswers]:
    """For each prompt, `samples` plain samples of the strong model (its preset's
    sampling settings and max_new_tokens), ranked by V (distinct answers only)."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ValueError(f"samples must be a whole number >= 2 (answers to rank), got {samples!r}")
    settings = settings or aligner.config.search
    ranked = []
    for prompt in prompts:
        result = aligner.search(prompt, settings.with_(strategy="bon", samples=samples))
        texts = list(dict.fromkeys(child.chunk.text for child in result.tree.children))
        values = aligner.values(prompt, texts, settings)
        ranked.append(RankedAnswers(prompt, sorted(zip(texts, values), key=lambda tv: tv[1], reverse=True)))
    return ranked

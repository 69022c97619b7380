"""Leaf parallelism: what growing P leaves per step buys and costs, side by side in one run.

    python benchmarks/parallel_leaves.py                               # 120 openings, P = 1, 2, 4, 8
    python benchmarks/parallel_leaves.py --openings 8 --parallel 1 4   # a quick run

Task 1 of benchmarks/quality.py: the `sentiment` preset (gemma-3-270m continues a
review opening, SmolLM2-135M-Instruct plays both weak roles) runs w2s with that
benchmark's settings at its headline budget, B = 64 strong tokens sampled per
opening, once per P (`parallel_leaves`). Every P runs on one opening before the
next opening starts, in one process with one llama.cpp thread, so their wall times
compare. Per P: wall time and its ratio to the first P, the steps and iterations
the searches really ran, the strong tokens they sampled (the budget really spent),
the strong model's tokens per llama_decode, how often stage 2 chose the answer,
and the gold score, VADER's compound score of the continuation, with its 95%
bootstrap interval. Writes benchmarks/results/parallel_leaves.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
from quality import (
    RESULTS,
    SEED,
    SENTIMENT,
    bootstrap_mean,
    every_nth,
    gold_score,
    headline_budget,
    load_prompts,
    strategy_settings,
    win_rate,
)
from quality import _aligner as sentiment_aligner


@dataclass
class Totals:
    """What the searches at one P ran and found, over all openings."""

    seconds: float = 0.0
    steps: int = 0
    iterations: int = 0
    sampled: int = 0
    strong_decoded: int = 0
    strong_decodes: int = 0
    stage2: int = 0
    gold: list[float] = field(default_factory=list)

    def add(self, search: dict) -> None:
        for name in ("seconds", "steps", "iterations", "sampled", "strong_decoded", "strong_decodes", "stage2"):
            setattr(self, name, getattr(self, name) + search[name])
        self.gold.append(search["gold"])


def one_search(aligner, settings, opening: str) -> dict:
    """One w2s search and what it ran; the strong context's own counters give its decodes."""
    strong = aligner._load().strong
    decodes = strong.stats.decode_calls
    started = time.perf_counter()
    result = aligner.search(opening, settings)
    return {
        "seconds": time.perf_counter() - started,
        "steps": result.cost.steps,
        "iterations": result.cost.iterations,
        "sampled": result.cost.strong_tokens_sampled,
        "strong_decoded": result.cost.strong_tokens_decoded,
        "strong_decodes": strong.stats.decode_calls - decodes,
        "stage2": result.source == "stage2",
        "gold": gold_score(SENTIMENT, result.text),
    }


def run(openings: list[str], leaves: list[int], threads: int) -> dict[int, Totals]:
    aligner, config = sentiment_aligner(SENTIMENT, threads)
    search = config.search.with_(**strategy_settings(SENTIMENT, "w2s", headline_budget(SENTIMENT)))
    aligner.search("warm-up", search.with_(strategy="base", max_new_tokens=4))  # loads the models
    totals = {p: Totals() for p in leaves}
    started = time.perf_counter()
    for n, opening in enumerate(openings, 1):
        for p in leaves:
            totals[p].add(one_search(aligner, search.with_(parallel_leaves=p), opening))
        if n % 10 == 0 or n == len(openings):
            print(f"  {n}/{len(openings)} openings, {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return totals


def table(totals: dict[int, Totals], openings: int) -> list[str]:
    rng = np.random.default_rng(SEED)
    budget = headline_budget(SENTIMENT)
    first, reference = next(iter(totals.items()))
    lines = [
        f"| P | wall s (per opening) | time vs P = {first} | steps | iterations | strong tokens sampled (/ B) | "
        f"strong tokens / llama_decode | chosen by stage 2 | mean {SENTIMENT.gold_name} [95% CI] | win vs P = {first} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p, t in totals.items():
        mean, low, high = bootstrap_mean(np.array(t.gold), rng)
        win = win_rate(np.array(t.gold), np.array(reference.gold), SENTIMENT.higher_is_better) if p != first else None
        lines.append(
            f"| {p} | {t.seconds:.1f} ({t.seconds / openings:.2f}) | {t.seconds / reference.seconds:.2f}x | "
            f"{t.steps / openings:.1f} | {t.iterations / openings:.1f} | {t.sampled / openings:.1f} "
            f"({t.sampled / openings / budget:.2f}) | {t.strong_decoded / t.strong_decodes:.2f} | {t.stage2 / openings:.0%} | "
            f"{mean:.3f} [{low:.3f}, {high:.3f}] | {'-' if win is None else f'{win:.0%}'} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--openings", type=int, default=120, help="review openings, spread over the data file")
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4, 8], help="the P values, the first the reference")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    args = parser.parse_args()

    reviews = load_prompts(SENTIMENT)
    openings = [row["text"] for row in every_nth(reviews, max(1, len(reviews) // args.openings))[: args.openings]]
    started = time.perf_counter()
    totals = run(openings, args.parallel, args.threads)
    minutes = (time.perf_counter() - started) / 60
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Leaf parallelism: the P curve",
        "",
        f"- command: `{' '.join(['python', 'benchmarks/parallel_leaves.py', *sys.argv[1:]])}`",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {minutes:.1f} min; commit {commit}; machine: "
        f"{os.cpu_count()} CPUs, {platform.machine()}, Python {sys.version.split()[0]}; llama.cpp threads: {args.threads}",
        f"- preset `sentiment`, w2s as in benchmarks/quality.py (max_new_tokens {SENTIMENT.max_new_tokens}, seed {SEED}), "
        f"budget B = {headline_budget(SENTIMENT)} strong tokens sampled per opening; {len(openings)} openings",
        "- wall s: all openings at that P (per opening in brackets); steps, iterations and tokens sampled: per opening;"
        " strong tokens / llama_decode: the strong model's tokens read over its decodes (the prompt and rebuilt prefixes"
        " included); chosen by stage 2: the share of answers stage 2 ranked (the rest: the \"finish\" fallback"
        f" completed the best path, the tree holding no finished answer); win vs P = {args.parallel[0]}: the share of"
        f" openings where the answer's gold score beats that of P = {args.parallel[0]} (ties count half).",
        "",
        *table(totals, len(openings)),
    ]
    text = "\n".join(lines) + "\n"
    (RESULTS / "parallel_leaves.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

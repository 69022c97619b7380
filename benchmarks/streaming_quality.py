"""Quality of the streaming mode (`commit_every`) against the whole-tree search,
on the quality benchmark's dev task (task 1 of benchmarks/quality.py: gemma-3-270m
continues review openings, the SmolLM2 pair prefers warm ones, VADER judges),
at the same budget (token_budget B = 64, the headline), the same seed, paired
by opening.

    python benchmarks/streaming_quality.py --every 10 --commit-every 4

Results go to benchmarks/results/streaming_quality.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import RESULTS, SENTIMENT, bootstrap_mean, every_nth, gold_score, headline_budget, load_prompts, strategy_settings, win_rate  # noqa: E402

from w2s_langchain.service.aligner import Aligner, load_preset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=int, default=10, help="every n-th opening of the 120 (10: 12 openings)")
    parser.add_argument("--commit-every", type=int, default=4, help="the streaming mode's commit_every")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per model")
    args = parser.parse_args()
    config = load_preset(SENTIMENT.preset)
    config = config.with_overrides(runtime={"n_threads": args.threads})
    aligner = Aligner(config)
    budget = headline_budget(SENTIMENT)
    whole = config.search.with_(**strategy_settings(SENTIMENT, "w2s", budget))
    streaming = whole.with_(commit_every=args.commit_every)
    openings = every_nth(load_prompts(SENTIMENT), args.every)
    scores: dict[str, list[float]] = {"whole-tree": [], "streaming": []}
    rows = []
    started = time.perf_counter()
    for row in openings:
        texts = {}
        for name, settings in (("whole-tree", whole), ("streaming", streaming)):
            texts[name] = aligner.search(row["text"], settings).text
            scores[name].append(gold_score(SENTIMENT, texts[name]))
        rows.append((row["id"], texts))
        print(f"{len(rows)}/{len(openings)} openings, {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    whole_scores, streaming_scores = np.array(scores["whole-tree"]), np.array(scores["streaming"])
    rng = np.random.default_rng(0)
    mean_diff, low, high = bootstrap_mean(streaming_scores - whole_scores, rng)
    lines = [
        "# The streaming mode's quality against the whole-tree search",
        "",
        f"- command: `python benchmarks/streaming_quality.py --every {args.every} --commit-every {args.commit_every} "
        f"--threads {args.threads}` ({(time.perf_counter() - started) / 60:.1f} min)",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
        f"- task 1 of benchmarks/quality.py (sentiment, VADER compound of the {SENTIMENT.max_new_tokens}-token "
        f"continuation), preset `sentiment`, w2s at token_budget {budget}, seed 0, {len(openings)} openings (every "
        f"{args.every}th of 120); streaming: commit_every {args.commit_every}",
        "",
        "| | mean VADER compound [95% CI] |",
        "|---|---|",
    ]
    for name, values in (("whole-tree", whole_scores), ("streaming", streaming_scores)):
        mean, lo, hi = bootstrap_mean(values, rng)
        lines.append(f"| {name} | {mean:.3f} [{lo:.3f}, {hi:.3f}] |")
    lines += [
        "",
        f"Paired difference, streaming - whole-tree: {mean_diff:+.3f} [95% bootstrap CI {low:+.3f}, {high:+.3f}] over "
        f"{len(openings)} openings; streaming better on {win_rate(streaming_scores, whole_scores, True):.0%} of them "
        f"(ties half), the same answer on {sum(t['whole-tree'] == t['streaming'] for _, t in rows)}. "
        f"With {len(openings)} prompts, only a large difference would show.",
        "",
        "Answers (whole-tree | streaming):",
        "",
    ]
    lines += [f"- {prompt_id}: {t['whole-tree']!r} | {t['streaming']!r}" for prompt_id, t in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "streaming_quality.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines[:16]))


if __name__ == "__main__":
    main()

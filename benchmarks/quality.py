"""Quality benchmark: does the weak pair steer the strong model, how well, and at what price?

    python benchmarks/quality.py                      # the full plan (many hours on 2 cores; resumable)
    python benchmarks/quality.py --quick              # 8 held-out prompts per task, headline only (6 min, --workers 2)
    python benchmarks/quality.py --tasks plain --headline-prompts 40 --experiments headline
    python benchmarks/quality.py --report             # rewrite the report from the saved rows

Three dev tasks, each with a gold judge the search never sees:

1. sentiment: gemma-3-270m continues the opening of a review; the `sentiment`
   preset's weak pair (SmolLM2-135M-Instruct told to like warm reviews, or harsh
   ones) steers it. Openings: the 120 written for this benchmark
   (data/review_openings.jsonl), the first half of every review snippet of 9
   words or more in `pang_lee_polarity.cor` (Pang and Lee's sentence polarity data,
   Rotten Tomatoes snippets) as the gensim package ships it, and 100 more written
   openings (data/review_openings_more.jsonl; headline only). Gold: VADER compound.
2. concise: gemma-3-270m answers a question (data/questions.jsonl); the weak pair
   prefers one short sentence (data/concise.json). Gold: the answer's length in words.
3. plain: gemma-3-270m continues the first sentence of a news story (the first
   half of its words) from `lee_background.cor` as gensim ships it (Lee, Pincombe
   and Welsh's corpus of Australian Broadcasting Corporation news); the weak pair
   prefers plain, easy English to dense, formal prose (data/plain.json). Gold:
   the Flesch reading ease of the continuation (higher is plainer), computed
   with the `readability` package's syllable counter (Apache-2.0).

gensim (LGPL-2.1) is used only for those two data files, read from its installed
package without importing it.

Each task's prompts are split once: every 4th prompt (index % 4 == 0) is "tune",
the rest "heldout". Only the tune split may guide a change to a preset or a
setting; the report is on the split the run names (heldout by default).

Experiments (each at a matched budget B of strong tokens sampled per prompt; B is
counted in answers' worth, B = k x max_new_tokens):
  headline  base, bon, cbs, w2s at 4 answers' worth (B = 64 on task 1), and the
            remedy the verdict kept (KEPT_REMEDY, what the sentiment and polite presets run)
  budget    bon, cbs, w2s and the kept remedy at 2, 4, 8, 16 answers' worth (B = 32 ... 256 on task 1,
            64 ... 512 on tasks 2 and 3):
            the budget curve, and the over-optimization curve (gold, mean proxy V,
            and the answer's mean log-prob per token under the strong model's
            sampling against plain samples', as pressure grows); its plain samples
            and its 4 answers' worth are the headline's searches on its prompts
  remedy    w2s with each remedy switched on, at 4 answers' worth, against the
            headline's w2s on the same prompts

Each finished search is one row of results/quality_runs.jsonl (written as it comes:
an interrupted run resumes where it stopped); the report (quality.md and its
PNG plots) is computed from the rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
RESULTS = HERE / "results"
SEED = 0
BOOTSTRAP_RESAMPLES = 10_000
TUNE_EVERY = 4  # every 4th prompt of a task is in the tune split


# --- the tasks ------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    name: str
    preset: str
    prompts_file: str
    max_new_tokens: int
    gold_name: str
    higher_is_better: bool


SENTIMENT = Task("sentiment", "sentiment", "review_openings.jsonl", 16, "VADER compound", True)
CONCISE = Task("concise", str(DATA / "concise.json"), "questions.jsonl", 32, "words", False)
PLAIN = Task("plain", str(DATA / "plain.json"), "lee_background.cor", 32, "Flesch reading ease", True)
TASKS = {t.name: t for t in (SENTIMENT, CONCISE, PLAIN)}


def load_prompts(name: str) -> list[dict[str, str]]:
    """Prompts written for this benchmark (a file in data/), in file order."""
    path = DATA / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def gensim_data(name: str) -> Path:
    """A data file the gensim package ships, found without importing gensim."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(distribution("gensim").locate_file(f"gensim/test/test_data/{name}"))
    except PackageNotFoundError:
        raise SystemExit("this task reads data that the gensim package ships: pip install gensim") from None
    if not path.is_file():
        raise SystemExit(f"gensim is installed but ships no {name}: pip install 'gensim>=4.3'")
    return path


def _detokenize(words: list[str]) -> str:
    """Join pre-tokenized words as prose: no space before punctuation or a clitic."""
    text = " ".join(words)
    return re.sub(r" (?=[,.;:!?)]|'s\b|n't\b|'re\b|'ll\b|'ve\b|'d\b)", "", text)


def _first_half(words: list[str]) -> str:
    return _detokenize(words[: max(4, len(words) // 2)])


def task_prompts(task: Task) -> list[dict[str, str]]:
    """Every prompt of a task, with its id, in a fixed order."""
    if task is SENTIMENT:
        snippets = gensim_data("pang_lee_polarity.cor").read_text(encoding="cp1252", errors="replace").splitlines()
        extra = []
        for i, line in enumerate(snippets):
            label, *words = line.split()
            if len(words) >= 9:
                extra.append({"id": f"pl{i:03d}", "text": _first_half(words), "lean": label.removeprefix("__label__")})
        # The 100 openings written later come last, so every earlier prompt keeps its
        # split, and only the headline reads them: the budget curve and the remedies
        # had run on spreads of the earlier prompts, which adding them would move.
        more = [{**row, "headline_only": True} for row in load_prompts("review_openings_more.jsonl")]
        return load_prompts(task.prompts_file) + extra + more
    if task is PLAIN:
        stories = gensim_data("lee_background.cor").read_text(encoding="cp1252", errors="replace").splitlines()
        prompts = []
        for i, story in enumerate(stories):
            first = re.split(r"(?<=[.!?])\s+", story.strip())[0].split()
            if len(first) >= 8:
                prompts.append({"id": f"lee{i:03d}", "text": _first_half(first)})
        return prompts
    return load_prompts(task.prompts_file)


def split_of(index: int) -> str:
    return "tune" if index % TUNE_EVERY == 0 else "heldout"


def prompts_of_split(task: Task, split: str) -> list[dict[str, str]]:
    rows = task_prompts(task)
    return [row for i, row in enumerate(rows) if split == "all" or split_of(i) == split]


def every_nth(rows: list, n: int) -> list:
    """A spread-out subset: the data files are grouped by domain and lean."""
    return rows[::n]


def spread(rows: list, count: int | None) -> list:
    """`count` rows spread over the list (all of them when count is None or larger)."""
    if count is None or count >= len(rows):
        return rows
    return [rows[int(i * len(rows) / count)] for i in range(count)]


_vader = None


def gold_score(task: Task, text: str) -> float:
    """The judge the search never sees."""
    global _vader
    if task.name == "concise":
        return float(len(text.split()))
    if task.name == "plain":
        return flesch_reading_ease(text)
    if _vader is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _vader = SentimentIntensityAnalyzer()
    return _vader.polarity_scores(text)["compound"]


def flesch_reading_ease(text: str) -> float:
    """Flesch reading ease of a text, by the `readability` package (its syllable
    counter): 206.835 - 84.6 syllables / word - 1.015 words / sentence. It reads
    one sentence per line of space-separated tokens, so the text is split so first.
    An answer with no words scores 0 (nothing plain about it)."""
    import readability

    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]
    tokens = ["\n".join(" ".join(re.findall(r"\w+(?:'\w+)?|[^\w\s]", s)) for s in sentences)]
    if not any(re.search(r"\w", t) for t in tokens):
        return 0.0
    return float(readability.getmeasures(tokens[0], lang="en")["readability grades"]["FleschReadingEase"])


# --- the plan: which searches to run ---------------------------------------------------


@dataclass(frozen=True)
class Job:
    task: str
    experiment: str  # "headline", "budget" or "remedy"
    budget: int
    label: str  # strategy, or the remedy's name
    prompt_id: str
    prompt: str
    overrides: tuple[tuple[str, Any], ...]

    @property
    def key(self) -> str:
        return f"{self.task}/{self.experiment}/{self.budget}/{self.label}/{self.prompt_id}"


STRATEGIES = ("base", "bon", "cbs", "w2s")
KL_WEIGHT = 0.1  # set before any run, not tuned: about 2-3 units of V for a 16-token answer's log-prob
REMEDIES = {
    "w2s": {},
    f"w2s kl={KL_WEIGHT}": {"kl_weight": KL_WEIGHT},
    "w2s length-normalized": {"length_normalized": True},
    "w2s ensemble": {"ensemble": True},
    "w2s w=0 (plain PUCT)": {"selection": "puct"},
    "w2s UCT": {"selection": "uct"},
    "w2s terminal eos": {"terminal_reward": "eos"},
}
# The remedy the verdict kept (its interval above 0 on two tasks, below 0 on none;
# "Remedies across tasks" in the report): the headline and the budget curve run
# it beside the faithful w2s, so its gain is also measured on prompts the verdict
# did not see.
KEPT_REMEDY = "w2s ensemble"
ANSWERS_WORTH = (2, 4, 8, 16)  # the budget curve, in answers' worth
HEADLINE_ANSWERS = 4


def headline_budget(task: Task) -> int:
    """Four answers' worth of strong tokens per prompt."""
    return HEADLINE_ANSWERS * task.max_new_tokens


def strategy_settings(task: Task, label: str, budget: int) -> dict[str, Any]:
    """Search settings of one strategy (or remedy) at budget B (tokens sampled per prompt)."""
    per_answer = budget // task.max_new_tokens
    # The ensemble is pinned off (the paper's V) unless a remedy turns it on: a
    # shipped preset's own default must not change what a strategy's rows mean.
    common = {"max_new_tokens": task.max_new_tokens, "seed": SEED, "ensemble": False}
    if label == "base":
        return {**common, "strategy": "base"}
    if label == "bon":
        return {**common, "strategy": "bon", "samples": per_answer}
    if label == "cbs":  # W x K chunks of L tokens per step: per_answer answers' worth of tokens
        width = 2 if per_answer <= 8 else 4
        return {**common, "strategy": "cbs", "beam_width": width, "children": per_answer // width, "chunk_tokens": 4}
    w2s = {**common, "strategy": "w2s", "iterations": 1_000_000, "token_budget": budget}
    return {**w2s, **REMEDIES[label]}


@dataclass(frozen=True)
class PlanSize:
    tasks: tuple[str, ...]
    experiments: tuple[str, ...]
    split: str
    headline_prompts: int | None
    curve_prompts: int | None
    curve_tasks: tuple[str, ...]
    remedy_prompts: int | None
    remedies: tuple[str, ...]


FULL = PlanSize(tuple(TASKS), ("headline", "budget", "remedy"), "heldout", None, 120, tuple(TASKS), 60,
                tuple(REMEDIES)[1:])
QUICK = PlanSize(tuple(TASKS), ("headline",), "heldout", 8, None, (), None, ())


def plan(size: PlanSize) -> list[Job]:
    jobs: list[Job] = []

    def add(task: Task, experiment: str, answers: int, labels, prompts) -> None:
        budget = answers * task.max_new_tokens
        for row in prompts:
            for label in labels:
                settings = strategy_settings(task, label, budget)
                jobs.append(Job(task.name, experiment, budget, label, row["id"], row["text"], tuple(settings.items())))

    for name in size.tasks:
        task = TASKS[name]
        prompts = prompts_of_split(task, size.split)
        if "headline" in size.experiments:
            headline = spread(prompts, size.headline_prompts)
            add(task, "headline", HEADLINE_ANSWERS, STRATEGIES, headline)
            add(task, "remedy", HEADLINE_ANSWERS, (KEPT_REMEDY,), headline)  # the remedy experiment's own search
        prompts = [row for row in prompts if not row.get("headline_only")]
        if "budget" in size.experiments and name in size.curve_tasks:
            curve = spread(prompts, size.curve_prompts)
            # Plain samples (the zero-pressure point) and the point at the headline's
            # budget are the headline's own searches: the same settings and seed.
            add(task, "headline", HEADLINE_ANSWERS, STRATEGIES, curve)
            add(task, "remedy", HEADLINE_ANSWERS, (KEPT_REMEDY,), curve)
            for answers in ANSWERS_WORTH:
                if answers != HEADLINE_ANSWERS:
                    add(task, "budget", answers, (*STRATEGIES[1:], KEPT_REMEDY), curve)
        if "remedy" in size.experiments:
            remedy_prompts = spread(prompts, size.remedy_prompts)
            add(task, "headline", HEADLINE_ANSWERS, ("w2s",), remedy_prompts)  # the faithful search to compare with
            add(task, "remedy", HEADLINE_ANSWERS, size.remedies, remedy_prompts)
    return list({job.key: job for job in jobs}.values())  # a search planned twice runs once


# --- running searches (in worker processes) ----------------------------------------------

_aligners: dict[str, Any] = {}


def _aligner(task: Task, threads: int):
    from w2s_langchain.service.aligner import Aligner, load_preset

    if task.name not in _aligners:
        config = load_preset(task.preset)
        config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, n_threads=threads))
        _aligners[task.name] = (Aligner(config), config)
    return _aligners[task.name]


def run_job(job: Job, threads: int) -> dict[str, Any]:
    task = TASKS[job.task]
    aligner, config = _aligner(task, threads)
    settings = config.search.with_(**dict(job.overrides))
    started = time.perf_counter()
    result = aligner.search(job.prompt, settings)
    seconds = time.perf_counter() - started
    tokens = result.cost.answer_tokens + (result.finish_reason == "eos")  # the end token's log-prob counts
    return {
        "key": job.key,
        "task": job.task,
        "experiment": job.experiment,
        "budget": job.budget,
        "label": job.label,
        "prompt_id": job.prompt_id,
        "text": result.text,
        "gold": gold_score(task, result.text),
        "value": result.value if result.value is not None and np.isfinite(result.value) else None,
        "strong_log_prob_per_token": result.strong_log_prob / tokens if tokens else None,
        "source": result.source,
        "finish_reason": result.finish_reason,
        "strong_tokens_sampled": result.cost.strong_tokens_sampled,
        "weak_tokens_scored": result.cost.weak_tokens_scored,
        "iterations": result.cost.iterations,
        "seconds": round(seconds, 3),
    }


def run_all(jobs: list[Job], rows_path: Path, workers: int, threads: int) -> int:
    """Run the jobs not yet in the rows file; returns how many ran."""
    done = {row["key"] for row in read_rows(rows_path)}
    todo = [job for job in jobs if job.key not in done]
    print(f"{len(jobs)} searches planned, {len(jobs) - len(todo)} already in {rows_path.name}, {len(todo)} to run", flush=True)
    started = time.perf_counter()
    with rows_path.open("a") as out, ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(run_job, job, threads) for job in todo]
        try:
            for n, future in enumerate(as_completed(futures), 1):
                row = future.result()
                out.write(json.dumps(row) + "\n")
                out.flush()
                if n % 20 == 0 or n == len(todo):
                    elapsed = time.perf_counter() - started
                    print(f"  {n}/{len(todo)} searches, {elapsed / 60:.1f} min", flush=True)
        except BaseException:
            # A failed search (or Ctrl-C) ends the run now, not after every other search.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return len(todo)


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- statistics -------------------------------------------------------------------------


def bootstrap_mean(values: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean and 95% percentile-bootstrap interval over prompts."""
    means = values[rng.integers(0, len(values), (BOOTSTRAP_RESAMPLES, len(values)))].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def win_rate(ours: np.ndarray, theirs: np.ndarray, higher_is_better: bool) -> float:
    """Share of paired prompts where ours is better; a tie counts half."""
    diff = ours - theirs if higher_is_better else theirs - ours
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def _fmt(mean: float, low: float, high: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def rows_by_label(rows, task: Task, experiment: str, budget: int, labels) -> tuple[dict, list[str]]:
    """Each label's rows by prompt, and the prompts every label has."""
    by_label = {
        label: {r["prompt_id"]: r for r in rows if r["task"] == task.name and r["experiment"] == experiment
                and r["label"] == label and r["budget"] == budget}
        for label in labels
    }
    by_label = {label: v for label, v in by_label.items() if v}
    shared = sorted(set.intersection(*(set(v) for v in by_label.values()))) if by_label else []
    return by_label, shared


def table(rows, task: Task, experiment: str, budget: int, labels, rng) -> list[str]:
    """A line per strategy, over the prompts all of them share: gold, proxy V,
    divergence from the strong model, budget really spent, wall time."""
    by_label, shared = rows_by_label(rows, task, experiment, budget, labels)
    if not shared:
        return []
    better = "higher" if task.higher_is_better else "lower"
    lines = [
        f"| strategy | mean {task.gold_name} ({better} is better) [95% CI] | mean proxy V | strong log-prob / token | "
        "strong tokens (/ B) | iterations | weak tokens | s / prompt | finished |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label in by_label:
        picked = [by_label[label][p] for p in shared]
        gold = np.array([r["gold"] for r in picked])
        values = [r["value"] for r in picked if r["value"] is not None]
        log_probs = [r["strong_log_prob_per_token"] for r in picked if r.get("strong_log_prob_per_token") is not None]
        strong = np.mean([r["strong_tokens_sampled"] for r in picked])
        finished = np.mean([r["finish_reason"] in ("eos", "stop") for r in picked])
        lines.append(
            f"| {label} | {_fmt(*bootstrap_mean(gold, rng))} | {np.mean(values) if values else float('nan'):.2f} | "
            f"{np.mean(log_probs) if log_probs else float('nan'):.3f} | {strong:.0f} ({strong / budget:.2f}) | "
            f"{np.mean([r.get('iterations', 0) for r in picked]):.0f} | "
            f"{np.mean([r['weak_tokens_scored'] for r in picked]):.0f} | {np.mean([r['seconds'] for r in picked]):.1f} | "
            f"{finished:.0%} |"
        )
    lines.append(f"\n{len(shared)} prompts, budget B = {budget} strong tokens sampled per prompt.")
    return lines


def paired_table(rows, task: Task, experiment: str, budget: int, comparisons, rng) -> list[str]:
    """For each (a, b): a - b per prompt, signed so that > 0 means a is better,
    with its 95% bootstrap interval over the prompts every label shares, and a's
    win rate."""
    labels = tuple(dict.fromkeys(label for pair in comparisons for label in pair))
    by_label, shared = rows_by_label(rows, task, experiment, budget, labels)
    comparisons = [(a, b) for a, b in comparisons if a in by_label and b in by_label]
    if not shared or not comparisons:
        return []
    sign = 1 if task.higher_is_better else -1
    gold = {label: np.array([by_label[label][p]["gold"] for p in shared]) for label in by_label}
    lines = ["| comparison | paired difference of gold (> 0: the first is better) [95% CI] | first better on (ties half) |",
             "|---|---|---|"]
    for a, b in comparisons:
        mean, low, high = bootstrap_mean(sign * (gold[a] - gold[b]), rng)
        mark = " (interval above 0)" if low > 0 else " (interval below 0)" if high < 0 else ""
        lines.append(f"| {a} - {b} | {_fmt(mean, low, high)}{mark} | {win_rate(gold[a], gold[b], task.higher_is_better):.0%} |")
    lines.append(f"\n{len(shared)} paired prompts.")
    return lines


def gain_ratio(rows, task: Task, budget: int, label: str = "w2s") -> str | None:
    """The goal's test: a search's gold gain over base against cbs's, on shared prompts."""
    labels = ("base", "cbs", label)
    by_label, shared = rows_by_label(rows, task, "headline", budget, labels)
    if len(by_label) < 3 or not shared:
        return None
    mean = {name: np.mean([by_label[name][p]["gold"] for p in shared]) for name in labels}
    sign = 1 if task.higher_is_better else -1
    gain, cbs_gain = sign * (mean[label] - mean["base"]), sign * (mean["cbs"] - mean["base"])
    ratio = f"{gain / cbs_gain:.2f}x" if cbs_gain > 0 else "undefined (cbs gains nothing)"
    return f"gold gain over base: {label} {gain:+.3f}, cbs {cbs_gain:+.3f}; {label} / cbs = {ratio} (goal: >= 1.15x)"


def curve_rows(rows, task: Task) -> tuple[list[int], set[str]]:
    """The budget experiment's budgets and the prompts every strategy ran at every one."""
    budgets = sorted({r["budget"] for r in rows if r["task"] == task.name and r["experiment"] == "budget"
                      and r["label"] != "base"})
    sets = [{r["prompt_id"] for r in rows if r["task"] == task.name and r["experiment"] == "budget"
             and r["budget"] == b and r["label"] == label} for b in budgets for label in STRATEGIES[1:]]
    sets.append({r["prompt_id"] for r in rows if r["task"] == task.name and r["experiment"] == "budget" and r["label"] == "base"})
    return budgets, set.intersection(*sets) if budgets else set()


def curve_table(rows, task: Task, rng) -> tuple[list[str], dict]:
    """Gold, mean V and divergence from plain samples against B, per strategy."""
    budgets, shared = curve_rows(rows, task)
    if len(budgets) < 2 or not shared:
        return [], {}
    pick = lambda label, b: [r for r in rows if r["task"] == task.name and r["experiment"] == "budget"  # noqa: E731
                             and r["label"] == label and (b is None or r["budget"] == b) and r["prompt_id"] in shared]
    base = pick("base", None)
    base_log_prob = np.mean([r["strong_log_prob_per_token"] for r in base])
    base_gold = bootstrap_mean(np.array([r["gold"] for r in base]), rng)
    lines = [
        f"Base (plain samples): {task.gold_name} {_fmt(*base_gold)}, strong log-prob / token {base_log_prob:.3f}. "
        "Divergence: plain samples' mean log-prob per token minus the strategy's (0: as likely as a plain sample).",
        "",
        "| strategy | B | " + f"mean {task.gold_name} [95% CI] | mean proxy V | divergence (nats / token) |",
        "|---|---|---|---|---|",
    ]
    curve: dict[str, list] = {}
    for label in STRATEGIES[1:]:
        points = []
        for b in budgets:
            picked = pick(label, b)
            gold = bootstrap_mean(np.array([r["gold"] for r in picked]), rng)
            value = np.mean([r["value"] for r in picked if r["value"] is not None])
            divergence = base_log_prob - np.mean([r["strong_log_prob_per_token"] for r in picked])
            points.append((b, gold, value, divergence))
            lines.append(f"| {label} | {b} | {_fmt(*gold)} | {value:.2f} | {divergence:.3f} |")
        curve[label] = points
    sign = 1 if task.higher_is_better else -1
    peaks = ", ".join(f"{label} at B = {max(points, key=lambda p: sign * p[1][0])[0]}" for label, points in curve.items())
    lines += ["", f"{len(shared)} prompts at every budget. Gold peaks: {peaks}."]
    return lines, {"budgets": budgets, "curve": curve, "base_gold": base_gold}


def plot_curves(task: Task, data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for label, points in data["curve"].items():
        budgets = [p[0] for p in points]
        means = [p[1][0] for p in points]
        errors = [[p[1][0] - p[1][1] for p in points], [p[1][2] - p[1][0] for p in points]]
        axes[0].errorbar(budgets, means, yerr=errors, marker="o", capsize=3, label=label)
        axes[1].plot([p[2] for p in points], means, marker="o", label=label)
        axes[2].plot([p[3] for p in points], means, marker="o", label=label)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks(data["budgets"], [str(b) for b in data["budgets"]])
    axes[0].set_xlabel("budget B: strong tokens sampled per prompt")
    axes[1].set_xlabel("mean proxy V of the answer")
    axes[2].set_xlabel("divergence from plain samples (nats / token)")
    for ax in axes:
        ax.axhline(data["base_gold"][0], color="grey", linestyle=":", label="base")
        ax.set_ylabel(f"mean {task.gold_name}")
    axes[0].legend()
    fig.suptitle(f"Task {task.name}: budget and over-optimization curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def proxy_gold_agreement(rows: list[dict], task: Task) -> tuple[int, float]:
    """Over pairs of answers to one prompt whose V and gold both differ: how often
    the higher V is the better gold."""
    unique = {r["key"]: r for r in rows if r["value"] is not None}.values()
    by_prompt: dict[str, list[dict]] = {}
    for r in unique:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    pairs = agree = 0
    sign = 1 if task.higher_is_better else -1
    for answers in by_prompt.values():
        for i, a in enumerate(answers):
            for b in answers[i + 1:]:
                dv, dg = a["value"] - b["value"], sign * (a["gold"] - b["gold"])
                if dv != 0 and dg != 0:
                    pairs += 1
                    agree += (dv > 0) == (dg > 0)
    return pairs, (agree / pairs if pairs else 0.0)


def with_headline_searches(rows: list[dict], experiment: str, labels, source: str = "headline") -> list[dict]:
    """An experiment's rows, plus the `source` experiment's searches of `labels`
    (the headline's, by default) read as its own: they are the same searches
    (settings, budget and seed), run once."""
    return [r for r in rows if r["experiment"] == experiment] + [
        {**r, "experiment": experiment} for r in rows if r["experiment"] == source and r["label"] in labels
    ]


def verdict_prompts(task_rows: list[dict]) -> set[str]:
    """The prompts the remedy verdict was made on: those every remedy that ran
    (the kept one aside, which also runs on the headline's prompts) ran on."""
    sets = [{r["prompt_id"] for r in task_rows if r["experiment"] == "remedy" and r["label"] == label}
            for label in REMEDIES if label not in ("w2s", KEPT_REMEDY)]
    sets = [ids for ids in sets if ids] or [{r["prompt_id"] for r in task_rows if r["experiment"] == "remedy"}]
    return set.intersection(*sets)


def kept_remedy_curve(rows: list[dict], task: Task, rng) -> list[str]:
    """The kept remedy against the faithful w2s at each budget, paired, on the
    prompts both ran at every budget, and the goal's test: does gold fall from
    the smallest budget to the largest?"""
    # Its point at the headline's budget is the remedy experiment's search, w2s's the headline's
    # (the budget rows come twice; rows_by_label keeps one per prompt).
    rows = with_headline_searches(rows, "budget", ("w2s",)) + with_headline_searches(rows, "budget", (KEPT_REMEDY,), "remedy")
    budgets = sorted({r["budget"] for r in rows if r["experiment"] == "budget" and r["label"] == KEPT_REMEDY})
    at = {b: rows_by_label(rows, task, "budget", b, ("w2s", KEPT_REMEDY)) for b in budgets}
    budgets = [b for b in budgets if len(at[b][0]) == 2]
    prompts = sorted(set.intersection(*(set(at[b][1]) for b in budgets))) if budgets else []
    if len(budgets) < 2 or not prompts:
        return []
    sign = 1 if task.higher_is_better else -1
    gold = {(b, label): np.array([at[b][0][label][p]["gold"] for p in prompts]) for b in budgets for label in at[b][0]}
    lines = [f"| B | w2s: mean {task.gold_name} | {KEPT_REMEDY}: mean {task.gold_name} | "
             f"{KEPT_REMEDY} - w2s (> 0: the remedy is better) [95% CI] |", "|---|---|---|---|"]
    for b in budgets:
        w2s, kept = gold[b, "w2s"], gold[b, KEPT_REMEDY]
        lines.append(f"| {b} | {w2s.mean():.3f} | {kept.mean():.3f} | {_fmt(*bootstrap_mean(sign * (kept - w2s), rng))} |")
    low, high = budgets[0], budgets[-1]
    lines += ["", f"{len(prompts)} prompts at every budget."]
    for label in ("w2s", KEPT_REMEDY):
        mean, lo, hi = bootstrap_mean(sign * (gold[high, label] - gold[low, label]), rng)
        verdict = "falls" if hi < 0 else "rises" if lo > 0 else "neither rises nor falls significantly"
        lines.append(f"- {label}, B = {low} to {high} (> 0: better at the larger budget): {_fmt(mean, lo, hi)}: gold {verdict}.")
    return lines


def remedy_verdicts(rows: list[dict], rng) -> list[str]:
    """The rule a remedy must pass to become a preset's default: its paired gold
    difference against the faithful w2s has an interval above 0 on at least two
    tasks, and below 0 on none."""
    found = [label for label in tuple(REMEDIES)[1:] if any(r["label"] == label for r in rows)]
    if not found:
        return []
    # Every remedy on the same prompts: the kept remedy's later searches on more prompts do not move its verdict.
    seen = {name: verdict_prompts([r for r in rows if r["task"] == name]) for name in TASKS}
    verdict_rows = [r for r in rows if r["experiment"] != "remedy" or r["prompt_id"] in seen[r["task"]]]
    lines = ["## Remedies across tasks", "",
             "Each remedy's paired gold difference against the faithful w2s on the same prompts (> 0: the remedy is "
             "better) [95% CI], and the rule's verdict: a remedy becomes a preset's default only if its interval is "
             "above 0 on at least two tasks and below 0 on none.", "",
             "| remedy | " + " | ".join(f"{t.name} ({t.gold_name})" for t in TASKS.values()) + " | verdict |",
             "|---|" + "---|" * len(TASKS) + "---|"]
    for label in found:
        cells, raised, lowered = [], 0, 0
        for task in TASKS.values():
            task_rows = with_headline_searches([r for r in verdict_rows if r["task"] == task.name], "remedy", ("w2s",))
            by_label, shared = rows_by_label(task_rows, task, "remedy", headline_budget(task), ("w2s", label))
            if len(by_label) < 2 or not shared:
                cells.append("not run")
                continue
            sign = 1 if task.higher_is_better else -1
            diff = sign * np.array([by_label[label][p]["gold"] - by_label["w2s"][p]["gold"] for p in shared])
            mean, low, high = bootstrap_mean(diff, rng)
            raised, lowered = raised + (low > 0), lowered + (high < 0)
            cells.append(f"{_fmt(mean, low, high)} on {len(shared)}")
        verdict = "default" if raised >= 2 and not lowered else "stays a switch"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {verdict} |")
    return lines + [""]


def kept_remedy_headline(task_rows: list[dict], task: Task, rng) -> list[str]:
    """The headline with the kept remedy beside the four strategies, and its gain
    over the faithful w2s on the prompts the remedy verdict did not see."""
    budget = headline_budget(task)
    rows = with_headline_searches(task_rows, "headline", (KEPT_REMEDY,), "remedy")
    main = table(rows, task, "headline", budget, (*STRATEGIES, KEPT_REMEDY), rng)
    if not main or f"| {KEPT_REMEDY} |" not in "\n".join(main):
        return []
    versus = [(KEPT_REMEDY, other) for other in ("w2s", "cbs", "bon", "base")]
    lines = [f"#### The kept remedy ({KEPT_REMEDY}) on the headline's prompts", "", *main, "",
             *paired_table(rows, task, "headline", budget, versus, rng), ""]
    ratio = gain_ratio(rows, task, budget, KEPT_REMEDY)
    if ratio:
        lines += [ratio, ""]
    seen = verdict_prompts(task_rows)
    unseen = paired_table([r for r in rows if r["prompt_id"] not in seen], task, "headline", budget,
                          [(KEPT_REMEDY, "w2s")], rng)
    if unseen:
        lines += ["On the prompts the remedy verdict did not see:", "", *unseen, ""]
    return lines


def report(rows: list[dict], header: list[str], out_dir: Path) -> str:
    rng = np.random.default_rng(SEED)
    lines = ["# Quality benchmark", "", *header, ""]
    for task in TASKS.values():
        task_rows = [r for r in rows if r["task"] == task.name]
        if not task_rows:
            continue
        better = "higher" if task.higher_is_better else "lower"
        lines += [f"## Task {task.name} (gold: {task.gold_name}, {better} is better)", ""]
        headline = headline_budget(task)
        main = table(task_rows, task, "headline", headline, STRATEGIES, rng)
        if main:
            lines += ["### Headline", "", *main, ""]
            versus = [("w2s", other) for other in ("cbs", "bon", "base")]
            lines += paired_table(task_rows, task, "headline", headline, versus, rng) + [""]
            ratio = gain_ratio(task_rows, task, headline)
            if ratio:
                lines += [ratio, ""]
            lines += kept_remedy_headline(task_rows, task, rng)
        curve, data = curve_table(with_headline_searches(task_rows, "budget", STRATEGIES), task, rng)
        if curve:
            lines += ["### Budget and over-optimization curves", "", *curve, ""]
            plot = out_dir / f"quality_{task.name}_curves.png"
            plot_curves(task, data, plot)
            lines += [f"![budget and over-optimization curves]({plot.name})", ""]
        kept_curve = kept_remedy_curve(task_rows, task, rng)
        if kept_curve:
            lines += [f"#### The kept remedy ({KEPT_REMEDY}) along the budget", "", *kept_curve, ""]
        # The faithful w2s of the remedy comparison is the headline's search.
        remedy_rows = with_headline_searches(task_rows, "remedy", ("w2s",))
        remedies = [label for label in REMEDIES if any(r["label"] == label for r in remedy_rows)]
        if len(remedies) > 1:
            lines += ["### Remedies (w2s, each switch alone)", ""]
            lines += table(remedy_rows, task, "remedy", headline, remedies, rng) + [""]
            lines += paired_table(remedy_rows, task, "remedy", headline, [(r, "w2s") for r in remedies[1:]], rng) + [""]
    lines += remedy_verdicts(rows, rng)
    lines += ["## Does the proxy agree with the gold judge?", "",
              "Over pairs of answers to the same prompt (any two strategies, budgets or remedies) whose proxy values "
              "and gold scores both differ: how often the answer with the higher proxy value is also the better one by "
              "the gold judge (50% = no agreement). `w2s-align check` measures the same on labelled pairs.", "",
              "| task | pairs | proxy and gold agree |", "|---|---|---|"]
    for task in TASKS.values():
        pairs, agree = proxy_gold_agreement([r for r in rows if r["task"] == task.name], task)
        if pairs:
            lines.append(f"| {task.name} | {pairs} | {agree:.0%} |")
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 held-out prompts per task, headline only (120 searches)")
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASKS), help="tasks to run (default: all)")
    parser.add_argument("--experiments", nargs="+", choices=("headline", "budget", "remedy"), help="default: all")
    parser.add_argument("--split", choices=("heldout", "tune", "all"), help="prompts to run on (default: heldout)")
    parser.add_argument("--headline-prompts", type=int, help="prompts per task for the headline (default: the whole split)")
    parser.add_argument("--curve-prompts", type=int, help="prompts for the budget curve (default 120)")
    parser.add_argument("--curve-tasks", nargs="+", choices=tuple(TASKS), help="tasks with a budget curve (default: all)")
    parser.add_argument("--remedy-prompts", type=int, help="prompts per task for the remedies (default 60)")
    parser.add_argument("--remedies", nargs="+", choices=tuple(REMEDIES)[1:], help="remedies to run (default: all)")
    parser.add_argument("--name", help="results name (default: quality, or quality_quick)")
    parser.add_argument("--workers", type=int, default=1, help="searches run in this many processes at once")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per process")
    parser.add_argument("--report", action="store_true", help="only rewrite the report from the saved rows")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's header (repeatable)")
    args = parser.parse_args()

    size = QUICK if args.quick else FULL
    given = {
        "tasks": tuple(args.tasks) if args.tasks else None,
        "experiments": tuple(args.experiments) if args.experiments else None,
        "split": args.split,
        "headline_prompts": args.headline_prompts,
        "curve_prompts": args.curve_prompts,
        "curve_tasks": tuple(args.curve_tasks) if args.curve_tasks else None,
        "remedy_prompts": args.remedy_prompts,
        "remedies": tuple(args.remedies) if args.remedies else None,
    }
    size = dataclasses.replace(size, **{k: v for k, v in given.items() if v is not None})
    name = args.name or ("quality_quick" if args.quick else "quality")
    rows_path = RESULTS / f"{name}_runs.jsonl"
    command = "python benchmarks/quality.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    if not args.report:
        started = time.perf_counter()
        n_run = run_all(plan(size), rows_path, args.workers, args.threads)
        minutes = (time.perf_counter() - started) / 60
        with (RESULTS / f"{name}_run.txt").open("a") as log:  # one line per invocation (a resumed run adds one)
            log.write(
                f"`{command}`: {n_run} searches, finished {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC after "
                f"{minutes:.1f} min; {args.workers} worker(s), {args.threads} thread(s) each; {os.cpu_count()} CPUs, "
                f"{platform.machine()}, Python {sys.version.split()[0]}\n"
            )
    run_note = (RESULTS / f"{name}_run.txt").read_text().strip().splitlines() if (RESULTS / f"{name}_run.txt").exists() else []
    header = [f"- {line}" for line in run_note + args.note] + [
        f"- seed {SEED} for every search; models: gemma-3-270m (strong), SmolLM2-135M-Instruct (both weak roles)",
        f"- raw rows (answer text included): `{rows_path.name}`",
        "- s / prompt is wall time while other searches (and on a shared machine, other work) used the cores: compare"
        " it within a table only; benchmarks/speed.py measures speed properly.",
        "- strong log-prob / token: the answer's mean log-prob per token under the strong model's sampling"
        " distribution (temperature 0.7, top-k 50): how far a search moved from what plain sampling writes.",
        "- finished: the share of answers that ended by themselves (end of text or a stop string) rather than at"
        " max_new_tokens.",
        "- paired differences: per prompt, w2s's gold minus the other's (signed so > 0 is w2s better), mean and 95%"
        f" percentile-bootstrap interval over prompts ({BOOTSTRAP_RESAMPLES} resamples).",
    ]
    text = report(read_rows(rows_path), header, RESULTS)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

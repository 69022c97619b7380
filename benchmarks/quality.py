"""Quality benchmark: does the weak pair really steer the strong model, and how well?

    python benchmarks/quality.py --workers 2   # full run, about 20 min on 2 cores
    python benchmarks/quality.py --quick    # a small run, under 10 minutes
    python benchmarks/quality.py --report   # rewrite the report from the saved rows

Task 1, sentiment steering (the paper's first task): gemma-3-270m continues the
opening of a review (benchmarks/data/review_openings.jsonl, half of them leaning
negative); SmolLM2-135M-Instruct, prompted to like warm reviews (aligned) or harsh
ones (reference), is the weak pair (preset `sentiment`). The gold judge is VADER's
compound score of the continuation, which the search never sees.

Task 2, concise answers: gemma-3-270m answers a question
(benchmarks/data/questions.jsonl); the weak pair prefers one short sentence over a
long, wordy answer (benchmarks/data/concise.json). Gold: the answer's length in
words (fewer is better), a measure the weak models never see.

Strategies run at a matched budget B of strong tokens sampled per prompt:
  base  one sample (no weak models, budget max_new_tokens)
  bon   N = B / max_new_tokens complete samples
  cbs   W x K = B / max_new_tokens (chunk-level beam search, L = 4)
  w2s   W2S-AlignTree with the preset's settings and token_budget = B (its
        "finish" fallback included)
Ablations of w2s (task 1, the headline budget): plain PUCT (no entropy term),
UCT (no prior either), mean backup, L = 4, 8.

Each finished search is one row of benchmarks/results/quality_runs.jsonl (written
as it comes, so an interrupted run resumes where it stopped); the report
(quality.md and the PNG plots) is computed from those rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
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


# --- the plan: which searches to run ------------------------------------------------


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
TASKS = {t.name: t for t in (SENTIMENT, CONCISE)}


@dataclass(frozen=True)
class Job:
    task: str
    experiment: str  # "budget" or "ablation"
    budget: int
    label: str  # strategy, or the ablation's name
    prompt_id: str
    prompt: str
    overrides: tuple[tuple[str, Any], ...]

    @property
    def key(self) -> str:
        return f"{self.task}/{self.experiment}/{self.budget}/{self.label}/{self.prompt_id}"


def strategy_settings(task: Task, label: str, budget: int) -> dict[str, Any]:
    """Search settings of one strategy at budget B (tokens sampled per prompt)."""
    per_answer = budget // task.max_new_tokens
    common = {"max_new_tokens": task.max_new_tokens, "seed": SEED}
    if label == "base":
        return {**common, "strategy": "base"}
    if label == "bon":
        return {**common, "strategy": "bon", "samples": per_answer}
    if label == "cbs":  # W x K chunks of L tokens per step: per_answer answers' worth of tokens
        width = 2 if per_answer <= 8 else 4
        return {**common, "strategy": "cbs", "beam_width": width, "children": per_answer // width, "chunk_tokens": 4}
    w2s = {**common, "strategy": "w2s", "iterations": 1_000_000, "token_budget": budget}
    ablations = {
        "w2s": {},
        "w2s w=0 (plain PUCT)": {"selection": "puct"},
        "w2s UCT": {"selection": "uct"},
        "w2s mean backup": {"backup": "mean"},
        "w2s L=4": {"chunk_tokens": 4},
        "w2s L=8": {"chunk_tokens": 8},
        "w2s terminal eos": {"terminal_reward": "eos"},
    }
    return {**w2s, **ablations[label]}


STRATEGIES = ("base", "bon", "cbs", "w2s")
ABLATIONS = ("w2s", "w2s w=0 (plain PUCT)", "w2s UCT", "w2s mean backup", "w2s L=4", "w2s L=8")


def load_prompts(task: Task) -> list[dict[str, str]]:
    return [json.loads(line) for line in (DATA / task.prompts_file).read_text().splitlines() if line.strip()]


def every_nth(rows: list, n: int) -> list:
    """A spread-out subset: the data files are grouped by domain and lean."""
    return rows[::n]


def plan(quick: bool) -> list[Job]:
    """The searches of a run, sized for a 2-core laptop. Full: task 1 on every
    opening at B = 4 answers' worth of tokens (the headline), on every 10th
    opening also at 8 and 16 answers' worth (how quality grows with compute), the
    ablations on every 5th opening at the headline budget, task 2 on 16
    questions. Quick: every 10th opening at the headline budget and 4 questions."""
    jobs: list[Job] = []

    def add(task: Task, experiment: str, budget: int, labels, prompts) -> None:
        for row in prompts:
            for label in labels:
                settings = strategy_settings(task, label, budget)
                jobs.append(Job(task.name, experiment, budget, label, row["id"], row["text"], tuple(settings.items())))

    reviews, questions = load_prompts(SENTIMENT), load_prompts(CONCISE)
    headline = headline_budget(SENTIMENT)
    if quick:
        add(SENTIMENT, "budget", headline, STRATEGIES, every_nth(reviews, 10))
        add(CONCISE, "budget", headline_budget(CONCISE), STRATEGIES, every_nth(questions, 8))
        return jobs
    add(SENTIMENT, "budget", headline, STRATEGIES, reviews)
    for budget in (2 * headline, 4 * headline):
        add(SENTIMENT, "budget", budget, STRATEGIES[1:], every_nth(reviews, 10))
    add(SENTIMENT, "ablation", headline, ABLATIONS[1:], every_nth(reviews, 5))
    add(CONCISE, "budget", headline_budget(CONCISE), STRATEGIES, every_nth(questions, 2))
    # Diagnosis of task 2 (added after its first results, judged by the proxy's
    # own logic, not tuned on the gold): the faithful quirk values a finished child
    # at -inf while the tree grows, which steers w2s away from short answers.
    add(CONCISE, "ablation", headline_budget(CONCISE), ("w2s terminal eos",), every_nth(questions, 2))
    return jobs


def headline_budget(task: Task) -> int:
    """Four answers' worth of strong tokens per prompt."""
    return 4 * task.max_new_tokens


# --- running searches (in worker processes) ---------------------------------------------

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
        "source": result.source,
        "finish_reason": result.finish_reason,
        "strong_tokens_sampled": result.cost.strong_tokens_sampled,
        "weak_tokens_scored": result.cost.weak_tokens_scored,
        "seconds": round(seconds, 3),
    }


_vader = None


def gold_score(task: Task, text: str) -> float:
    """The judge the search never sees."""
    global _vader
    if task.name == "concise":
        return float(len(text.split()))
    if _vader is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _vader = SentimentIntensityAnalyzer()
    return _vader.polarity_scores(text)["compound"]


def run_all(jobs: list[Job], rows_path: Path, workers: int, threads: int) -> int:
    """Run the jobs not yet in the rows file; returns how many ran."""
    done = {row["key"] for row in read_rows(rows_path)}
    todo = [job for job in jobs if job.key not in done]
    print(f"{len(jobs)} searches planned, {len(jobs) - len(todo)} already in {rows_path.name}, {len(todo)} to run")
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


# --- statistics ---------------------------------------------------------------------------


def bootstrap_mean(values: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean and 95% percentile-bootstrap interval over prompts."""
    means = values[rng.integers(0, len(values), (BOOTSTRAP_RESAMPLES, len(values)))].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def win_rate(ours: np.ndarray, theirs: np.ndarray, higher_is_better: bool) -> float:
    """Share of paired prompts where ours is better; a tie counts half."""
    diff = ours - theirs if higher_is_better else theirs - ours
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def table(rows: list[dict], task: Task, experiment: str, budget: int, labels, rng) -> list[str]:
    """One markdown table: a line per strategy, over the prompts all of them share."""
    by_label = {
        label: {r["prompt_id"]: r for r in rows if r["task"] == task.name and r["label"] == label and r["budget"] == budget
                and r["experiment"] in (experiment, "budget")}
        for label in labels
    }
    # base is budget-free; the middle-budget w2s rows are the ablations' reference.
    shared = sorted(set.intersection(*(set(v) for v in by_label.values()))) if by_label else []
    if not shared:
        return []
    gold = {label: np.array([by_label[label][p]["gold"] for p in shared]) for label in labels}
    better = "higher" if task.higher_is_better else "lower"
    lines = [
        f"| strategy | mean {task.gold_name} ({better} is better) [95% CI] | win vs base | win vs bon | win vs cbs | "
        "mean proxy V | strong tokens (/ B) | weak tokens | s / prompt | finished |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in labels:
        picked = [by_label[label][p] for p in shared]
        mean, low, high = bootstrap_mean(gold[label], rng)
        values = [r["value"] for r in picked if r["value"] is not None]
        vs = lambda other: f"{win_rate(gold[label], gold[other], task.higher_is_better):.0%}" if other in gold and other != label else "-"  # noqa: E731
        finished = np.mean([r["finish_reason"] in ("eos", "stop") for r in picked])
        strong = np.mean([r["strong_tokens_sampled"] for r in picked])
        lines.append(
            f"| {label} | {mean:.3f} [{low:.3f}, {high:.3f}] | {vs('base')} | {vs('bon')} | {vs('cbs')} | "
            f"{np.mean(values):.2f} | {strong:.0f} ({strong / budget:.2f}) | "
            f"{np.mean([r['weak_tokens_scored'] for r in picked]):.0f} | {np.mean([r['seconds'] for r in picked]):.1f} | "
            f"{finished:.0%} |"
        )
    lines.append(f"\n{len(shared)} prompts, budget B = {budget} strong tokens sampled per prompt.")
    return lines


def with_base(rows: list[dict]) -> list[dict]:
    """base ignores the budget: its rows count at every budget of their task."""
    budgets = {(r["task"], r["budget"]) for r in rows}
    extra = [{**r, "budget": b} for r in rows if r["label"] == "base" for (t, b) in budgets if t == r["task"] and b != r["budget"]]
    return rows + extra


def report(rows: list[dict], header: list[str], out_dir: Path) -> str:
    rng = np.random.default_rng(SEED)
    rows = with_base(rows)
    lines = ["# Quality benchmark", "", *header, ""]
    budgets = sorted({r["budget"] for r in rows if r["task"] == "sentiment" and r["experiment"] == "budget"})
    headline = headline_budget(SENTIMENT) if headline_budget(SENTIMENT) in budgets else None
    if headline is not None:
        lines += ["## Task 1: sentiment steering (headline)", ""]
        lines += table(rows, SENTIMENT, "budget", headline, STRATEGIES, rng)
    for budget in budgets:
        if budget != headline:
            lines += ["", f"### Task 1 at B = {budget}", ""]
            lines += table(rows, SENTIMENT, "budget", budget, STRATEGIES, rng)
    curve = budget_curve(rows, budgets, rng)
    if len(budgets) > 1:
        lines += ["", f"### Gold score against budget, on the {len(curve_prompts(rows, budgets))} prompts every budget shares", "",
                  "| strategy | " + " | ".join(f"B = {b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
        for label, points in curve.items():
            lines.append(f"| {label} | " + " | ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in points) + " |")
        plot_budget(curve, budgets, out_dir / "quality_budget.png")
        lines += ["", "![gold score against budget](quality_budget.png)"]
    ablation = table(rows, SENTIMENT, "ablation", headline_budget(SENTIMENT), ("base", "cbs") + ABLATIONS, rng)
    if ablation and any(r["experiment"] == "ablation" for r in rows):
        lines += ["", "## Ablations (task 1)", "", *ablation]
        plot_ablation(rows, out_dir / "quality_ablation.png", rng)
        lines += ["", "![ablations](quality_ablation.png)"]
    for budget in sorted({r["budget"] for r in rows if r["task"] == "concise"}):
        lines += ["", f"## Task 2: concise answers (gold: {CONCISE.gold_name}, fewer is better)", ""]
        labels = STRATEGIES + (("w2s terminal eos",) if any(r["label"] == "w2s terminal eos" for r in rows) else ())
        lines += table(rows, CONCISE, "ablation", budget, labels, rng)
    lines += ["", "## Does the proxy agree with the gold judge?", "",
              "Over pairs of answers to the same prompt (any two strategies or budgets, duplicates of base left out) "
              "whose proxy values and gold scores both differ: how often the answer with the higher proxy value "
              "is also the better one by the gold judge (50% = no agreement).", "",
              "| task | pairs | proxy and gold agree |", "|---|---|---|"]
    for task in TASKS.values():
        pairs, agree = proxy_gold_agreement([r for r in rows if r.get("key") and r["task"] == task.name], task)
        if pairs:
            lines.append(f"| {task.name} | {pairs} | {agree:.0%} |")
    return "\n".join(lines) + "\n"


def proxy_gold_agreement(rows: list[dict], task: Task) -> tuple[int, float]:
    unique = {r["key"]: r for r in rows if r["value"] is not None}.values()  # with_base copies share a key
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


def curve_prompts(rows, budgets) -> set[str]:
    """Task-1 prompts every searching strategy ran at every budget (base rows
    count at every budget, see with_base, so they decide nothing)."""
    return set.intersection(*(
        {r["prompt_id"] for r in rows if r["task"] == "sentiment" and r["budget"] == b and r["label"] == label}
        for b in budgets for label in STRATEGIES[1:]
    ))


def budget_curve(rows, budgets, rng) -> dict[str, list[tuple[float, float, float]]]:
    shared = curve_prompts(rows, budgets)
    curve = {}
    for label in STRATEGIES:
        points = []
        for b in budgets:
            gold = [r["gold"] for r in rows if r["task"] == "sentiment" and r["experiment"] == "budget" and r["label"] == label
                    and r["budget"] == b and r["prompt_id"] in shared]
            points.append(bootstrap_mean(np.array(gold), rng))
        curve[label] = points
    return curve


def plot_budget(curve, budgets, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curve.items():
        means = [m for m, _, _ in points]
        errors = [[m - lo for m, lo, _ in points], [hi - m for m, _, hi in points]]
        ax.errorbar(budgets, means, yerr=errors, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("budget: strong tokens sampled per prompt")
    ax.set_ylabel("mean VADER compound (95% CI)")
    ax.set_title("Task 1, sentiment steering")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ablation(rows, path: Path, rng) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = headline_budget(SENTIMENT)
    ids = {r["prompt_id"] for r in rows if r["task"] == "sentiment" and r["experiment"] == "ablation"}
    labels = [label for label in ("base", "bon", "cbs") + ABLATIONS]
    stats = []
    for label in labels:
        gold = [r["gold"] for r in rows if r["task"] == "sentiment" and r["budget"] == budget and r["label"] == label
                and r["prompt_id"] in ids]
        stats.append(bootstrap_mean(np.array(gold), rng))
    fig, ax = plt.subplots(figsize=(7, 4))
    means = [m for m, _, _ in stats]
    ax.bar(range(len(labels)), means, yerr=[[m - lo for m, lo, _ in stats], [hi - m for m, _, hi in stats]], capsize=3)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel("mean VADER compound (95% CI)")
    ax.set_title(f"Task 1 ablations, B = {budget}, {len(ids)} prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run, under 10 minutes")
    parser.add_argument("--workers", type=int, default=1, help="searches run in this many processes at once")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per process")
    parser.add_argument("--report", action="store_true", help="only rewrite the report from the saved rows")
    args = parser.parse_args()

    name = "quality_quick" if args.quick else "quality"
    rows_path = RESULTS / f"{name}_runs.jsonl"
    command = "python benchmarks/quality.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    if not args.report:
        started = time.perf_counter()
        n_run = run_all(plan(args.quick), rows_path, args.workers, args.threads)
        minutes = (time.perf_counter() - started) / 60
        with (RESULTS / f"{name}_run.txt").open("a") as log:  # one line per invocation (a resumed run adds one)
            log.write(
                f"`{command}`: {n_run} searches, finished {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC after "
                f"{minutes:.1f} min; {args.workers} worker(s), {args.threads} thread(s) each; {os.cpu_count()} CPUs, "
                f"{platform.machine()}, Python {sys.version.split()[0]}\n"
            )
    run_note = (RESULTS / f"{name}_run.txt").read_text().strip().splitlines()
    header = [f"- {line}" for line in run_note] + [
        f"- seed {SEED} for every search; models: gemma-3-270m (strong), SmolLM2-135M-Instruct (both weak roles)",
        f"- raw rows (answer text included): `{rows_path.name}`",
        "- s / prompt is wall time while other searches (and on this shared machine, other work) used the cores: compare"
        " it within a table only; benchmarks/speed.py measures speed properly.",
        "- finished: the share of answers that ended by themselves (end of text or a stop string) rather than at"
        " max_new_tokens; task 1's 16-token continuations always run to the limit.",
        "- win vs X: the share of prompts where the strategy's gold score beats X's on the same prompt (ties count half).",
    ]
    text = report(read_rows(rows_path), header, RESULTS)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""The quality benchmark's statistics (benchmarks/quality.py) on rows made up here:
the signs of paired differences on a lower-is-better gold, the rule that decides
whether a remedy becomes a preset's default, and the reuse of the headline's
searches by the other experiments. The numbers these compute decide what ships,
so a sign slip must fail here, not in a report."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _rows(quality, task: str, label: str, golds, experiment: str = "remedy", budget: int | None = None) -> list[dict]:
    budget = budget or quality.headline_budget(quality.TASKS[task])
    return [
        {"key": f"{task}/{experiment}/{budget}/{label}/p{i}", "task": task, "experiment": experiment, "budget": budget,
         "label": label, "prompt_id": f"p{i}", "gold": float(gold), "value": 1.0, "strong_log_prob_per_token": -1.0,
         "strong_tokens_sampled": budget, "weak_tokens_scored": 10, "iterations": 5, "seconds": 1.0,
         "finish_reason": "length"}
        for i, gold in enumerate(golds)
    ]


def _faithful_and(quality, remedy: str, shifts: dict[str, float], n: int = 30) -> list[dict]:
    """The faithful w2s (as headline rows) and a remedy whose gold is shifted per task."""
    noise = np.random.default_rng(0).normal(0, 0.05, n)
    rows = []
    for task in quality.TASKS:
        base = 10 + noise
        rows += _rows(quality, task, "w2s", base, experiment="headline")
        rows += _rows(quality, task, remedy, base + shifts[task])
    return rows


def _verdict(quality, rows, remedy: str) -> str:
    line = next(line for line in quality.remedy_verdicts(rows, np.random.default_rng(0)) if line.startswith(f"| {remedy} |"))
    return line.rsplit("|", 2)[1].strip()


def test_a_remedy_that_helps_two_tasks_and_costs_nothing_on_the_third_becomes_the_default(quality):
    # Fewer words is better on the concise task: -3 words is a gain there.
    rows = _faithful_and(quality, "w2s kl=0.1", {"sentiment": +0.3, "concise": -3.0, "plain": 0.0})
    assert _verdict(quality, rows, "w2s kl=0.1") == "default"


def test_a_remedy_that_lengthens_concise_answers_does_not_count_that_as_a_gain(quality):
    # +3 words on the concise task is a loss: the rule must read the gold's direction.
    rows = _faithful_and(quality, "w2s kl=0.1", {"sentiment": +0.3, "concise": +3.0, "plain": +4.0})
    assert _verdict(quality, rows, "w2s kl=0.1") == "stays a switch"


def test_a_significant_loss_on_one_task_keeps_a_remedy_a_switch(quality):
    rows = _faithful_and(quality, "w2s UCT", {"sentiment": +0.3, "concise": -3.0, "plain": -5.0})
    assert _verdict(quality, rows, "w2s UCT") == "stays a switch"


def test_one_gain_is_not_enough(quality):
    rows = _faithful_and(quality, "w2s ensemble", {"sentiment": +0.3, "concise": 0.0, "plain": 0.0})
    assert _verdict(quality, rows, "w2s ensemble") == "stays a switch"


def test_paired_differences_are_signed_so_that_positive_means_w2s_is_better(quality):
    concise = quality.TASKS["concise"]
    budget = quality.headline_budget(concise)
    rows = _rows(quality, "concise", "w2s", [10.0] * 20, "headline") + _rows(quality, "concise", "cbs", [14.0] * 20, "headline")
    lines = quality.paired_table(rows, concise, "headline", budget, [("w2s", "cbs")], np.random.default_rng(0))
    assert "| w2s - cbs | 4.000 [4.000, 4.000] (interval above 0) | 100% |" in lines


def test_the_curve_and_the_remedies_read_the_headline_searches_as_their_own(quality):
    rows = _rows(quality, "sentiment", "w2s", [0.5] * 3, "headline") + _rows(quality, "sentiment", "cbs", [0.1] * 3, "headline")
    rows += _rows(quality, "sentiment", "w2s", [0.7] * 3, "budget")
    as_budget = quality.with_headline_searches(rows, "budget", ("w2s",))
    assert {r["experiment"] for r in as_budget} == {"budget"}
    assert sorted(r["gold"] for r in as_budget) == [0.5] * 3 + [0.7] * 3  # cbs was not asked for
    assert [r["experiment"] for r in rows].count("headline") == 6  # the caller's rows are left as they were


def test_the_kept_remedys_budget_curve_reads_its_remedy_search_and_says_when_gold_falls(quality):
    # Concise: more words is worse, so w2s going from 10 to 20 words is a fall.
    concise = quality.TASKS["concise"]
    noise = np.random.default_rng(1).normal(0, 0.5, 12)
    kept = quality.KEPT_REMEDY
    rows = (_rows(quality, "concise", "w2s", 10 + noise, "budget", 64) + _rows(quality, "concise", "w2s", 15 + noise, "headline")
            + _rows(quality, "concise", "w2s", 20 + noise, "budget", 512)
            + _rows(quality, "concise", kept, 10 + noise, "budget", 64) + _rows(quality, "concise", kept, 10 + noise, "remedy")
            + _rows(quality, "concise", kept, 10 + noise[::-1], "budget", 512))
    lines = quality.kept_remedy_curve(rows, concise, np.random.default_rng(0))
    assert [line.split("|")[1].strip() for line in lines if line.startswith("| ") and line[2].isdigit()] == ["64", "128", "512"]
    assert any(line.startswith("- w2s, B = 64 to 512") and line.endswith("gold falls.") for line in lines)
    assert any(line.startswith(f"- {kept}, B = 64 to 512") and "neither rises nor falls" in line for line in lines)

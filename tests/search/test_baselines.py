"""The baselines on the tiny models: plain sampling, Best-of-N, chunk-level beam search."""

from __future__ import annotations

import pytest

from support.search_models import run


@pytest.mark.parametrize("strategy", ["base", "bon", "cbs", "w2s"])
def test_every_strategy_answers(tiny_models, strategy):
    result, _ = run(tiny_models, strategy=strategy, samples=3, beam_width=2)
    assert result.strategy == strategy
    assert result.cost.strong_tokens_sampled > 0
    assert result.finish_reason in ("eos", "length", "stop") or result.source == "fallback_truncated"
    if strategy != "base":
        assert result.cost.weak_tokens_scored > 0


def test_bon_returns_the_best_eos_scored_sample(tiny_models):
    result, _ = run(tiny_models, strategy="bon", samples=4)
    values = [c.eos_value for c in result.tree.children]
    assert result.value == max(values)


def depth(node) -> int:
    return 0 if node.parent is None else 1 + depth(node.parent)


def test_cbs_keeps_the_best_beams_until_all_finish(tiny_models):
    width, k = 2, 3
    result, _ = run(tiny_models, strategy="cbs", children=k, beam_width=width, chunk_tokens=3, max_new_tokens=9)
    assert result.finish_reason is not None
    assert result.cost.iterations >= 3
    # The first step fills every beam slot: W x K chunks from the prompt.
    assert len(result.tree.children) == width * k
    # At every step the beams kept (the unfinished ones grow children) are the
    # best by value: no unfinished node left behind beats one that was kept.
    by_depth: dict[int, list] = {}
    for node in result.tree.walk():
        by_depth.setdefault(depth(node), []).append(node)
    for nodes in by_depth.values():
        kept = [n.value for n in nodes if n.children]
        dropped = [n.value for n in nodes if not n.children and not n.terminal]
        if kept and dropped:
            assert min(kept) >= max(dropped)
    assert sum(1 for n in result.tree.walk() if n.children and n is not result.tree) >= 2

"""The weak proxy on the tiny models: values built incrementally, what extending
costs, eos scoring (tests/search/test_scoring.py checks every value from scratch)."""

from __future__ import annotations

import numpy as np
import pytest

from support.search_models import PROMPT, TOL, make_models
from w2s_langchain.engine import Context


@pytest.mark.parametrize("same_weak_model", [False, True])
def test_incremental_value_equals_full_recomputation(tiny_models, same_weak_model):
    proxy = make_models(tiny_models, same_weak_model=same_weak_model).proxy
    chunks = ["Hel", "lo wo", "rld, é", "漢字🙂", " the", "n walking"]  # merges across chunk ends
    state, text = proxy.start(PROMPT), ""
    for chunk in chunks:
        text += chunk
        (state,) = proxy.extend([state], [text])
        fresh_proxy = make_models(tiny_models, same_weak_model=same_weak_model).proxy
        (fresh,) = fresh_proxy.extend([fresh_proxy.start(PROMPT)], [text])
        assert state.value == pytest.approx(fresh.value, abs=TOL)
        for ours, theirs in zip(state.weak, fresh.weak):
            assert ours.tokens == theirs.tokens
            assert ours.log_prob == pytest.approx(theirs.log_prob, abs=TOL)


def test_extending_costs_only_the_new_tokens(tiny_models):
    proxy = make_models(tiny_models).proxy
    root = proxy.start(PROMPT)
    (parent,) = proxy.extend([root], [" walki"])
    contexts = [s.context for s in proxy.scorers]
    before = [c.stats.tokens_decoded for c in contexts]
    (child,) = proxy.extend([parent], [" walking home"])
    remerged = 0
    for c, b, p, ch in zip(contexts, before, parent.weak, child.weak):
        kept = next(i for i, (x, y) in enumerate(zip(p.tokens + [-1], ch.tokens)) if x != y)
        # The last kept token (for its row), the re-merged tail and the new tokens but
        # the last one (only appended: it predicts nothing scored yet).
        assert c.stats.tokens_decoded - b == 1 + len(ch.tokens) - kept - 1
        remerged += len(p.tokens) - kept
    assert remerged > 0 and proxy.tokens_remerged == remerged  # " walki" + "ng" merge


def test_eos_value_adds_each_models_end_token(tiny_models):
    proxy = make_models(tiny_models).proxy
    (state,) = proxy.extend([proxy.start(PROMPT)], [" and then"])
    (eos_value,) = proxy.eos_values([state])
    ends = []
    for scorer, weak in zip(proxy.scorers, state.weak):
        ctx = Context(scorer.model, n_ctx=512, n_threads=1)
        row = ctx.next_logits([ctx.new_branch(weak.tokens)])[0].astype(np.float64)
        ends.append(row[scorer.model.eos] - row.max() - np.log(np.exp(row - row.max()).sum()))
    assert eos_value == pytest.approx(state.value + ends[0] - ends[1], abs=TOL)

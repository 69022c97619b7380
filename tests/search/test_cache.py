"""What the KV cache changes: what is read, never the tree; and a search frees
every branch it made."""

from __future__ import annotations

import pytest

from support.search_models import PROMPT, SMALL, TOL, make_models
from w2s_langchain.search import SearchSettings, search


@pytest.mark.parametrize("terminal_reward", ["-inf", "eos"])
@pytest.mark.parametrize("same_weak_model", [False, True])
def test_the_cache_changes_what_is_read_not_the_tree(tiny_models, same_weak_model, terminal_reward):
    """Shared prefixes and decodes, parked parents, eos read in place, spans' last
    tokens left undecoded, evictions and rebuilds change what is read, not what
    it is worth: the same tree as contexts that re-read every prefix from its
    first token, for a fraction of the tokens."""
    settings = SearchSettings(**{**SMALL, "terminal_reward": terminal_reward})
    models = make_models(tiny_models, same_weak_model=same_weak_model, n_seq_max=8)  # evicts: rebuilds too
    cached = search(models, PROMPT, settings)
    assert sum(c.stats.evictions for c in models.proxy.contexts) > 0
    naive_models = make_models(tiny_models, same_weak_model=same_weak_model, n_seq_max=8, reuse_prefixes=False)
    naive = search(naive_models, PROMPT, settings)
    nodes_c, nodes_n = cached.tree_dict()["nodes"], naive.tree_dict()["nodes"]
    assert [(n["answer"], n["visits"]) for n in nodes_c] == [(n["answer"], n["visits"]) for n in nodes_n]
    for x, y in zip(nodes_c, nodes_n):
        assert (x["value"] is None) == (y["value"] is None)
        if x["value"] is not None:
            assert x["value"] == pytest.approx(y["value"], abs=TOL)
    assert (naive.text, naive.source) == (cached.text, cached.source)
    assert naive.cost.strong_tokens_decoded > 2 * cached.cost.strong_tokens_decoded
    assert naive.cost.weak_tokens_scored > 2 * cached.cost.weak_tokens_scored
    assert naive.cost.strong_tokens_sampled == cached.cost.strong_tokens_sampled


def test_a_search_frees_every_branch(tiny_models):
    models = make_models(tiny_models, n_seq_max=8)  # far fewer ids than nodes: eviction at work
    result = search(models, PROMPT, SearchSettings(**SMALL))
    assert result.cost.tree_nodes > 8
    for ctx in [models.strong] + models.proxy.contexts:
        assert ctx.n_resident == 0 and ctx.kv_cells_used() == 0

"""The search's test models and the helpers its tests share: tiny_c writes, tiny_a
and tiny_b judge (another vocabulary than tiny_c's: the cross-tokenizer path is
the tested one)."""

from __future__ import annotations

import math

from w2s_langchain.engine import Context, load_model
from w2s_langchain.prompts import PromptFormat
from w2s_langchain.search import Proxy, SearchModels, SearchSettings, WeakScorer, search

PROMPT = "Once upon a time"
TOL = 1e-3  # F32 tiny models: see test_engine.py


def make_models(tiny_models, *, same_weak_model: bool = False, n_seq_max: int = 32, reuse_prefixes: bool = True) -> SearchModels:
    """reuse_prefixes=False: contexts that re-read every prefix, as code without a KV cache does."""

    def ctx(path):
        return Context(load_model(path), n_ctx=512, n_threads=1, n_seq_max=n_seq_max, reuse_prefixes=reuse_prefixes)

    strong = ctx(tiny_models.tiny_c)
    if same_weak_model:  # one GGUF in both roles, two prompts, one context
        weak = ctx(tiny_models.tiny_a)
        aligned = WeakScorer(weak, PromptFormat(format="chat", system="Be warm.", assistant_prefix="{prompt}"))
        reference = WeakScorer(weak, PromptFormat(format="chat", system="Be cold.", assistant_prefix="{prompt}"))
    else:
        aligned = WeakScorer(ctx(tiny_models.tiny_a), PromptFormat())
        reference = WeakScorer(ctx(tiny_models.tiny_b), PromptFormat())
    return SearchModels(strong, PromptFormat(), Proxy(aligned, reference))


SMALL = dict(iterations=12, children=3, chunk_tokens=3, max_new_tokens=12, seed=5)


def run(tiny_models, **settings):
    models = make_models(tiny_models)
    return search(models, PROMPT, SearchSettings(**{**SMALL, **settings})), models


def grown(result) -> list[dict]:
    """The tree a search grew, as exported, without the selection scores (which a
    user's own rule does not give): what two searches that chose alike share."""
    return [{k: v for k, v in node.items() if k != "selection_score"} for node in result.tree_dict()["nodes"]]


LONG = dict(iterations=1_000_000, children=3, chunk_tokens=1, max_new_tokens=100, seed=5)


def nothing_held(models: SearchModels) -> bool:
    return all(c.n_resident == 0 and c.kv_cells_used() == 0 for c in [models.strong] + models.proxy.contexts)


def assert_every_selection_backed_up(result) -> None:
    """The root has one visit per iteration (it starts at none); an expanded node
    one for its evaluation, one for its expansion and one per visit it passed on
    to a child; and R is the max of its children."""
    root = result.tree
    assert root.visits == result.cost.iterations
    for node in root.walk():
        if node.children:
            assert node.value == max(c.value for c in node.children)
            own = 1 if node is root else 2
            assert node.visits == own + sum(c.visits - 1 for c in node.children)


def stage2_finalists(result, num_select: int, nonterminal: bool, c: float) -> set[int]:
    """Stage 2 computed by hand from the tree: the candidates (unfinished, not the
    root, with a finished child) ranked by their own proxy value (no eos, no
    backup) + c P sqrt(N(parent)) / (1 + N); the children of the best few."""
    root = result.tree
    candidates = [n for n in root.walk() if n is not root and not n.terminal and any(ch.terminal for ch in n.children)]
    rank = lambda n: n.proxy.value + c * n.prior * math.sqrt(n.parent.visits) / (1 + n.visits)  # noqa: E731
    kept = sorted(candidates, key=rank, reverse=True)[:num_select]
    return {id(ch) for n in kept for ch in n.children if ch.terminal or nonterminal}

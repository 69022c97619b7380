"""W2S-AlignTree and its baselines on real llama.cpp with the tiny models.

The strong model is tiny_c and the weak pair tiny_a / tiny_b, whose vocabulary
differs from tiny_c's: the cross-tokenizer path is the tested path.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import threading
import time

import golden_trees

from w2s_langchain.engine import Context, load_model
from w2s_langchain.engine import context as context_module
from w2s_langchain.errors import ContextOverflowError, SearchCancelledError, SearchTimeoutError
from w2s_langchain.prompts import PromptFormat
from w2s_langchain.search import Proxy, SearchModels, SearchSettings, StrongModel, WeakScorer, search, strategies
from w2s_langchain.engine.sampling import incomplete_character
from w2s_langchain.search.tree import NEG_INF, select_leaves

PROMPT = "Once upon a time"
TOL = 1e-3  # F32 tiny models: see test_engine.py


def make_models(tiny_models, *, same_weak_model: bool = False, n_seq_max: int = 32) -> SearchModels:
    def ctx(path):
        return Context(load_model(path), n_ctx=512, n_threads=1, n_seq_max=n_seq_max)

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


# --- the proxy ---------------------------------------------------------------------


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


def test_value_equals_llama_cpp_python_scoring_from_scratch(tiny_models):
    """V checked against an independent computation: llama-cpp-python's own
    `Llama` reads prompt + answer once, and the answer's log-probs are summed by
    hand from its logits (every answer token counts, the first one too)."""
    from llama_cpp import Llama

    answer = " and then the"
    proxy = make_models(tiny_models).proxy
    (state,) = proxy.extend([proxy.start(PROMPT)], [answer])
    log_probs = []
    for path in (tiny_models.tiny_a, tiny_models.tiny_b):
        llm = Llama(model_path=str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
        prompt_tokens = llm.tokenize(PROMPT.encode(), add_bos=True)
        tokens = llm.tokenize((PROMPT + answer).encode(), add_bos=True)
        start = next(i for i, (a, b) in enumerate(zip(prompt_tokens + [-1], tokens)) if a != b)
        llm.eval(tokens)
        logits = np.asarray(llm.scores[: len(tokens)], dtype=np.float64)
        total = 0.0
        for i in range(start, len(tokens)):
            row = logits[i - 1]
            total += row[tokens[i]] - row.max() - np.log(np.exp(row - row.max()).sum())
        log_probs.append(total)
        llm.close()
    assert state.value == pytest.approx(log_probs[0] - log_probs[1], abs=TOL)


def test_priors_are_the_geometric_mean_of_warped_probabilities(tiny_models):
    """P of a chunk, recomputed token by token on a fresh context of the strong model."""
    from w2s_langchain.engine import warp

    result, models = run(tiny_models, iterations=6, max_new_tokens=40)
    strong = models.strong
    sampling = SearchSettings(**SMALL).sampling
    sampler = StrongModel(strong, PromptFormat(), sampling, 40)
    prompt_tokens = sampler.prompt_tokens(PROMPT)
    fresh = Context(strong.model, n_ctx=512, n_threads=1)
    checked = 0
    for node in result.tree.walk():
        if node.parent is None or node.terminal:
            continue
        start = len(node.parent.chunk.tokens)
        probs = []
        for i in range(start, len(node.chunk.tokens)):
            branch = fresh.new_branch(prompt_tokens + node.chunk.tokens[:i])
            (row,) = fresh.next_logits([branch])
            fresh.release(branch)
            answer = strong.model.detokenize(node.chunk.tokens[:i])
            probs.append(sampler.distribution(row, answer).prob(node.chunk.tokens[i]))
        assert node.prior == pytest.approx(math.exp(np.mean(np.log(probs))), rel=1e-3)
        assert node.prior < 1.0
        checked += 1
    assert checked >= 10


def test_marker_tokens_are_never_sampled(tiny_models):
    """Control and user-defined tokens that do not end generation (tiny_a's
    <|bos|> and <|im_start|>) are masked before warping; the ending ones
    (<|eos|>, <|im_end|>) keep their role."""
    import llama_cpp

    def ctx(path):
        return Context(load_model(path), n_ctx=512, n_threads=1, n_seq_max=32)

    strong = ctx(tiny_models.tiny_a)
    models = SearchModels(strong, PromptFormat(), make_models(tiny_models).proxy)
    model = strong.model
    marked = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
    markers = {
        t for t in range(model.n_vocab)
        if llama_cpp.llama_vocab_get_attr(model.vocab, t) & marked and not llama_cpp.llama_vocab_is_eog(model.vocab, t)
    }
    assert {model.token_text(t) for t in markers} == {"<|bos|>", "<|im_start|>"}
    assert set(model.never_sampled.tolist()) == markers
    # Flat sampling over many tokens: without the mask both markers come up (6 times
    # in 847 tokens under this seed).
    settings = SearchSettings(strategy="bon", samples=16, max_new_tokens=64, temperature=5.0, top_k=0, seed=1)
    result = search(models, PROMPT, settings)
    sampled = [t for child in result.tree.children for t in child.chunk.tokens]
    assert len(sampled) > 500 and not markers & set(sampled)
    assert any(child.chunk.finish_reason == "eos" for child in result.tree.children)


# --- W2S-AlignTree's invariants ------------------------------------------------------


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


def test_backprop_takes_the_max_and_counts_visits(tiny_models):
    result, _ = run(tiny_models, max_new_tokens=40)
    assert_every_selection_backed_up(result)
    assert all(node.visits == 1 for node in result.tree.walk() if not node.children)


def test_children_have_distinct_first_tokens_and_priors(tiny_models):
    result, _ = run(tiny_models, max_new_tokens=40)
    for node in result.tree.walk():
        if node.children:
            firsts = [c.chunk.tokens[len(node.chunk.tokens)] for c in node.children if len(c.chunk.tokens) > len(node.chunk.tokens)]
            assert len(set(firsts)) == len(firsts)
            assert node.entropy is not None and node.entropy > 0
        assert 0 < node.prior <= 1


def test_terminal_children_are_minus_infinity_by_default_or_eos_scored(tiny_models):
    quirk, _ = run(tiny_models, max_new_tokens=4, chunk_tokens=2)
    finished = [n for n in quirk.tree.walk() if n.terminal]
    assert finished and all(n.value == NEG_INF for n in finished)
    scored, _ = run(tiny_models, max_new_tokens=4, chunk_tokens=2, terminal_reward="eos")
    finished = [n for n in scored.tree.walk() if n.terminal]
    assert finished and all(n.value == n.eos_value and math.isfinite(n.value) for n in finished)


def stage2_finalists(result, num_select: int, nonterminal: bool, c: float) -> set[int]:
    """Stage 2 computed by hand from the tree: the candidates (unfinished, not the
    root, with a finished child) ranked by their own proxy value (no eos, no
    backup) + c P sqrt(N(parent)) / (1 + N); the children of the best few."""
    root = result.tree
    candidates = [n for n in root.walk() if n is not root and not n.terminal and any(ch.terminal for ch in n.children)]
    rank = lambda n: n.proxy.value + c * n.prior * math.sqrt(n.parent.visits) / (1 + n.visits)  # noqa: E731
    kept = sorted(candidates, key=rank, reverse=True)[:num_select]
    return {id(ch) for n in kept for ch in n.children if ch.terminal or nonterminal}


@pytest.mark.parametrize("nonterminal", [True, False])
def test_stage2_scores_exactly_the_children_of_the_best_ranked_candidates(tiny_models, nonterminal):
    result, _ = run(tiny_models, iterations=40, max_new_tokens=9, chunk_tokens=2, num_select=2, stage2_nonterminal=nonterminal)
    assert result.source == "stage2"
    root = result.tree
    candidates = [n for n in root.walk() if n is not root and not n.terminal and any(ch.terminal for ch in n.children)]
    assert len(candidates) > 2  # more than num_select: the ranking decides
    # With the default -inf quirk nothing is eos-scored before stage 2.
    finalists = [n for n in root.walk() if n.eos_value is not None]
    assert {id(n) for n in finalists} == stage2_finalists(result, 2, nonterminal, SearchSettings().c)
    if not nonterminal:
        assert all(n.terminal for n in finalists)
    best = max(finalists, key=lambda n: n.eos_value)
    assert result.text == best.chunk.text and result.value == best.eos_value


def test_stage2_ranks_by_a_candidates_own_value_not_its_backed_up_one(tiny_models):
    """A candidate whose children all finished has R = -inf under the quirk, yet
    it holds the most finished answers: its own value still ranks it."""
    result, _ = run(tiny_models, iterations=40, max_new_tokens=9, chunk_tokens=2, num_select=1)
    root = result.tree
    candidates = [n for n in root.walk() if n is not root and not n.terminal and any(ch.terminal for ch in n.children)]
    assert any(n.value == NEG_INF for n in candidates)
    assert all(n.own_value == n.proxy.value for n in candidates)
    assert {id(n) for n in root.walk() if n.eos_value is not None} == stage2_finalists(result, 1, True, SearchSettings().c)


def test_cost_seconds_has_every_phase_stage2_included(tiny_models):
    # The result is made inside stage 2: its time so far counts.
    result, _ = run(tiny_models, iterations=40, max_new_tokens=9, chunk_tokens=2)
    assert result.source == "stage2"
    seconds = result.cost.seconds
    assert set(seconds) == {"select", "expand", "evaluate", "stage2", "total"}
    assert 0 < seconds["stage2"] < seconds["total"]


def test_the_root_is_never_a_stage2_candidate(tiny_models):
    # Every child of the root finishes at once (L >= max_new_tokens): the root is
    # the only node with finished children, and it has no parent.
    result, _ = run(tiny_models, iterations=5, max_new_tokens=2, chunk_tokens=2)
    assert result.source == "fallback_finished"
    children = result.tree.children
    assert children and all(ch.terminal for ch in children)
    assert result.value == max(ch.eos_value for ch in children)


def test_fallback_truncates_or_finishes_the_same_best_path(tiny_models):
    truncated, _ = run(tiny_models, iterations=2, max_new_tokens=20)
    assert truncated.source == "fallback_truncated" and truncated.finish_reason is None
    assert len(truncated.text) > 0
    finished, _ = run(tiny_models, iterations=2, max_new_tokens=20, fallback="finish")
    assert finished.source == "fallback_finished" and finished.finish_reason in ("eos", "length", "stop")
    assert finished.text.startswith(truncated.text) and len(finished.text) > len(truncated.text)


def test_finish_fallback_spends_only_the_token_budget(tiny_models):
    settings = dict(iterations=1000, max_new_tokens=30, chunk_tokens=3, fallback="finish", token_budget=40)
    result, _ = run(tiny_models, **settings)
    assert result.source in ("fallback_finished", "stage2")
    # Within K = 3 tokens of the budget, plus at most 4 per child that complete a
    # UTF-8 character; before, the fallback's greedy steps sampled far past it.
    assert result.cost.strong_tokens_sampled <= 40 + 3 + 3 * 4
    unbudgeted, _ = run(tiny_models, **{**settings, "token_budget": None, "iterations": 4})
    assert unbudgeted.source == "fallback_finished"  # without a budget it finishes greedily by V


# --- the terminal_reward="eos" switch and finished leaves ---------------------------


def test_a_selected_finished_leaf_is_a_visit_and_the_search_goes_on(tiny_models):
    result, _ = run(tiny_models, iterations=60, max_new_tokens=6, chunk_tokens=2, terminal_reward="eos")
    root = result.tree
    assert result.cost.iterations == 60 and root.visits == 60
    revisited = [n for n in root.walk() if n.terminal and n.visits > 1]
    assert revisited  # finished leaves were selected, and their visits backed up
    for node in root.walk():
        if node.children:
            assert node.value == max(c.value for c in node.children)


def test_the_search_stops_when_no_unfinished_leaf_is_left(tiny_models):
    result, _ = run(tiny_models, iterations=500, max_new_tokens=4, chunk_tokens=2)
    leaves = [n for n in result.tree.walk() if not n.children]
    assert all(n.terminal for n in leaves)
    expanded = [n for n in result.tree.walk() if n.children]
    assert result.cost.iterations == len(expanded) < 500


@pytest.mark.parametrize("case", golden_trees.CASES)
def test_one_leaf_per_step_builds_the_golden_trees(tiny_models, case):
    """One leaf per step is the search as it was before leaf parallelism
    (tests/golden_trees.py): node for node, with the same answer and search counters,
    values to the engine's noise (how the engine reads tokens may change)."""
    expected = json.loads(golden_trees.GOLDEN.read_text())[case]
    settings = SearchSettings(**golden_trees.CASES[case], parallel_leaves=1)
    got = golden_trees.record(search(make_models(tiny_models), PROMPT, settings))
    for record in (got, expected):
        for name in golden_trees.ENGINE_COUNTERS:
            del record["cost"][name]
    assert golden_trees.differences(got, expected) == []


# --- selection rules -----------------------------------------------------------------


def test_selection_rule_is_a_setting(tiny_models):
    from w2s_langchain.search.tree import ea_puct

    calls = []

    def my_rule(child, parent, c, w):
        calls.append(child)
        return ea_puct(child, parent, c, w)

    default, _ = run(tiny_models)
    mine, _ = run(tiny_models, selection=my_rule)
    assert calls and mine.tree_dict() == default.tree_dict()
    assert mine.settings["selection"].endswith("my_rule")
    # The tiny models' values are far apart: a large c lets exploration decide.
    explore = dict(c=10.0)
    uct_tree, _ = run(tiny_models, selection="uct", **explore)
    puct_tree, _ = run(tiny_models, selection="puct", **explore)
    ea_puct_tree, _ = run(tiny_models, **explore)
    assert uct_tree.tree_dict() != ea_puct_tree.tree_dict() and uct_tree.settings["selection"] == "uct"
    assert puct_tree.tree_dict() == run(tiny_models, entropy_weight=0.0, **explore)[0].tree_dict()


def test_same_seed_same_tree_and_answer(tiny_models):
    a, _ = run(tiny_models)
    b, _ = run(tiny_models)
    assert a.tree_dict() == b.tree_dict()
    c, _ = run(tiny_models, seed=6)
    assert c.tree_dict() != a.tree_dict()


def test_cached_and_naive_build_the_same_tree_at_different_cost(tiny_models):
    cached, _ = run(tiny_models)
    naive, _ = run(tiny_models, naive=True)
    nodes_c, nodes_n = cached.tree_dict()["nodes"], naive.tree_dict()["nodes"]
    assert [n["answer"] for n in nodes_c] == [n["answer"] for n in nodes_n]
    assert [n["visits"] for n in nodes_c] == [n["visits"] for n in nodes_n]
    for x, y in zip(nodes_c, nodes_n):
        assert (x["value"] is None) == (y["value"] is None)
        if x["value"] is not None:
            assert x["value"] == pytest.approx(y["value"], abs=TOL)
    assert naive.text == cached.text
    assert naive.cost.strong_tokens_decoded > 2 * cached.cost.strong_tokens_decoded
    assert naive.cost.weak_tokens_scored > 2 * cached.cost.weak_tokens_scored
    assert naive.cost.strong_tokens_sampled == cached.cost.strong_tokens_sampled


def _unshared_entries(jobs):
    return [(pos, [j]) for j, job in enumerate(jobs) for pos in range(job.start, job.end)]


def _eos_values_by_forks(proxy, states):
    """Eos scoring as it was before the end token was read off each answer's row
    in place: fork the answer, append the end token, score it."""
    values = []
    for state in states:
        log_probs = []
        for role, scorer in enumerate(proxy.scorers):
            fork = scorer.context.fork(state.weak[role].branch)
            (end,) = scorer.context.score([fork], [[proxy._prompts[role][0].end_token]])
            scorer.context.release(fork)
            log_probs.append(state.weak[role].log_prob + end[0])
        values.append(proxy._value(*log_probs))
    return values


@pytest.mark.parametrize("terminal_reward", ["-inf", "eos"])
@pytest.mark.parametrize("same_weak_model", [False, True])
def test_weak_savings_build_the_same_tree_for_fewer_tokens(tiny_models, monkeypatch, same_weak_model, terminal_reward):
    """Shared decodes, parked parents, eos read in place and spans' last tokens
    left undecoded change what is read, not what it is worth: the same tree as
    without them."""
    settings = SearchSettings(**{**SMALL, "terminal_reward": terminal_reward})
    models = make_models(tiny_models, same_weak_model=same_weak_model, n_seq_max=8)  # evicts: rebuilds too
    new = search(models, PROMPT, settings)
    assert sum(c.stats.evictions for c in models.proxy.contexts) > 0
    # Before: each branch decoded its own tokens, a scored span's last one too,
    # expanded nodes kept their sequence ids, and eos scoring forked.
    monkeypatch.setattr(context_module, "_plan_entries", _unshared_entries)
    monkeypatch.setattr(context_module._Job, "end", property(lambda job: len(job.tokens)))
    monkeypatch.setattr(Context, "park", lambda self, branch: None)
    monkeypatch.setattr(Proxy, "eos_values", _eos_values_by_forks)
    old = search(make_models(tiny_models, same_weak_model=same_weak_model, n_seq_max=8), PROMPT, settings)
    nodes_new, nodes_old = new.tree_dict()["nodes"], old.tree_dict()["nodes"]
    assert [(n["answer"], n["visits"]) for n in nodes_new] == [(n["answer"], n["visits"]) for n in nodes_old]
    for x, y in zip(nodes_new, nodes_old):
        assert (x["value"] is None) == (y["value"] is None)
        if x["value"] is not None:
            assert x["value"] == pytest.approx(y["value"], abs=TOL)
    assert (new.text, new.source) == (old.text, old.source)
    assert new.value == pytest.approx(old.value, abs=TOL)
    assert new.cost.weak_tokens_scored < old.cost.weak_tokens_scored


def test_token_budget_stops_the_tree_search_once_spent(tiny_models):
    free, _ = run(tiny_models, iterations=1000, max_new_tokens=24)
    capped, _ = run(tiny_models, iterations=1000, max_new_tokens=24, token_budget=30)
    # The expansion that reaches the cap gets chunks of what is left / K tokens (at
    # least one), so the cap is passed by less than K = 3 tokens, plus at most 4 per
    # child that complete a UTF-8 character.
    assert 30 <= capped.cost.strong_tokens_sampled < 30 + 3 + 3 * 4
    assert capped.cost.iterations < free.cost.iterations
    # The same seed grows the same tree up to the cap: every node the capped search
    # expanded is in the free tree too (the last expansion's chunks were cut short).
    free_answers = {n.chunk.text for n in free.tree.walk()}
    expanded = [n.chunk.text for n in capped.tree.walk() if n.children]
    assert len(expanded) >= 3 and set(expanded) <= free_answers


def test_a_search_frees_every_branch(tiny_models):
    models = make_models(tiny_models, n_seq_max=8)  # far fewer ids than nodes: eviction at work
    result = search(models, PROMPT, SearchSettings(**SMALL))
    assert result.cost.tree_nodes > 8
    for ctx in [models.strong] + models.proxy.contexts:
        assert ctx.n_resident == 0 and ctx.kv_cells_used() == 0


def test_chunks_never_end_inside_a_character(tiny_models):
    result, _ = run(tiny_models, iterations=20, max_new_tokens=40)
    for node in result.tree.walk():
        if not node.terminal and node.chunk.n_new <= SMALL["chunk_tokens"] + 3:
            assert not incomplete_character(node.chunk.answer)


# --- leaf parallelism -----------------------------------------------------------------

PARALLEL = dict(iterations=25, max_new_tokens=40, parallel_leaves=4)


def selectable_leaves(root) -> list:
    """Where a selection can end: finished nodes and nodes without children,
    below no finished node."""
    leaves, stack = [], [root]
    while stack:
        node = stack.pop()
        if node.terminal or not node.children:
            leaves.append(node)
        else:
            stack.extend(node.children)
    return leaves


def record_steps(monkeypatch) -> list[tuple[int, list, list]]:
    """Each step of the searches that follow: (leaves asked for, leaves
    selectable, leaves chosen)."""
    steps = []

    def recorded(root, score, n):
        selectable = selectable_leaves(root)
        paths = select_leaves(root, score, n)
        steps.append((n, selectable, [path[-1] for path in paths]))
        return paths

    monkeypatch.setattr(strategies, "select_leaves", recorded)
    return steps


@pytest.mark.parametrize("terminal_reward", ["-inf", "eos"])
@pytest.mark.parametrize("parallel_leaves", [4, 50])
def test_a_step_takes_different_leaves_and_backs_up_every_one(tiny_models, monkeypatch, parallel_leaves, terminal_reward):
    steps = record_steps(monkeypatch)
    settings = dict(iterations=13, max_new_tokens=9, chunk_tokens=2, parallel_leaves=parallel_leaves)
    result, _ = run(tiny_models, **settings, terminal_reward=terminal_reward)
    assert result.cost.iterations == 13 == sum(len(chosen) for _, _, chosen in steps)
    assert result.cost.steps == len(steps) < 13
    for asked, selectable, chosen in steps:
        # Different leaves, as many as asked for while any is left to choose.
        assert len({id(leaf) for leaf in chosen}) == len(chosen) == min(asked, len(selectable))
        assert {id(leaf) for leaf in chosen} <= {id(leaf) for leaf in selectable}
    assert max(len(chosen) for _, _, chosen in steps) == min(parallel_leaves, 9)
    if parallel_leaves == 50:  # every leaf, level by level: the root, its 3 children, their 9
        assert [len(chosen) for _, _, chosen in steps] == [1, 3, 9]
    if terminal_reward == "eos" and parallel_leaves == 4:  # finished leaves are chosen and count as visits
        assert any(leaf.terminal for _, _, chosen in steps for leaf in chosen)
    assert_every_selection_backed_up(result)


def test_a_step_grows_its_leaves_in_one_strong_batch_and_one_weak_one(tiny_models, monkeypatch):
    models = make_models(tiny_models)
    strong, weak = models.strong, models.proxy.contexts
    expansions, evaluations = [], []
    expand, evaluate = strategies._Run.expand, strategies._Run.evaluate

    def counted_expand(self, parents, k, chunk_tokens, *, distinct):
        before = strong.stats.decode_calls
        expand(self, parents, k, chunk_tokens, distinct=distinct)
        children = [child for parent in parents for child in parent.children]
        expansions.append((len(parents), len(children), strong.stats.decode_calls - before, max(c.chunk.n_new for c in children)))

    def counted_evaluate(self, nodes, terminal_reward):
        before = [c.stats.decode_calls for c in weak]
        evaluate(self, nodes, terminal_reward)
        evaluations.append([c.stats.decode_calls - b for c, b in zip(weak, before)])

    monkeypatch.setattr(strategies._Run, "expand", counted_expand)
    monkeypatch.setattr(strategies._Run, "evaluate", counted_evaluate)
    # A search reads in pieces of a few tokens, to see a timeout between them;
    # here one operation should be one llama_decode, whatever it rebuilds.
    monkeypatch.setattr(context_module, "_INTERRUPTIBLE_PIECE", 512)
    result = search(models, PROMPT, SearchSettings(**{**SMALL, **PARALLEL}))
    assert result.cost.steps == len(expansions) == len(evaluations)  # no finished leaf was chosen
    assert max(parents for parents, *_ in expansions) == 4
    for parents, children, decodes, longest in expansions:
        # P x K children, sampled in one decode per token (the first: the parents' rows).
        assert children == 3 * parents and decodes == longest
    assert all(calls == [1, 1] for calls in evaluations)  # one decode per weak context
    one_leaf, _ = run(tiny_models, **{**PARALLEL, "parallel_leaves": 1})
    assert result.cost.iterations == one_leaf.cost.iterations
    assert result.cost.decode_calls < one_leaf.cost.decode_calls / 2


def test_progress_counts_the_iterations_of_each_step(tiny_models):
    seen = []
    settings = SearchSettings(**{**SMALL, "iterations": 13, "parallel_leaves": 50})
    search(make_models(tiny_models), PROMPT, settings, lambda done, total, what: seen.append((done, total, what)))
    assert seen == [(1, 13, "iterations"), (4, 13, "iterations"), (13, 13, "iterations")]


def test_parallel_leaves_meet_the_token_budget_to_within_p_times_k(tiny_models):
    long_chunks = dict(iterations=1000, chunk_tokens=10, max_new_tokens=60, parallel_leaves=4)
    result, _ = run(tiny_models, **long_chunks, token_budget=150)
    # The step that reaches the cap shares what is left among its 4 x 3 children
    # (at least a token each), plus at most 4 per child to complete a UTF-8
    # character; a step of whole chunks could take 120.
    assert 150 <= result.cost.strong_tokens_sampled < 150 + 12 + 12 * 4
    assert result.cost.steps < result.cost.iterations < 1000
    finishing, _ = run(tiny_models, **{**PARALLEL, "iterations": 1000, "max_new_tokens": 30, "token_budget": 40, "fallback": "finish"})
    assert finishing.cost.strong_tokens_sampled <= 40 + 12 + 12 * 4


def test_parallel_leaves_are_reproducible_and_change_the_search(tiny_models):
    a, _ = run(tiny_models, **PARALLEL)
    b, _ = run(tiny_models, **PARALLEL)
    assert a.tree_dict() == b.tree_dict() and a.cost.steps == b.cost.steps
    assert run(tiny_models, **PARALLEL, seed=6)[0].tree_dict() != a.tree_dict()
    assert run(tiny_models, **{**PARALLEL, "parallel_leaves": 1})[0].tree_dict() != a.tree_dict()


def test_parallel_leaves_keep_stage2_and_the_fallbacks(tiny_models):
    ranked, _ = run(tiny_models, iterations=40, max_new_tokens=9, chunk_tokens=2, num_select=2, parallel_leaves=4)
    assert ranked.source == "stage2" and ranked.cost.steps < 40
    finalists = [n for n in ranked.tree.walk() if n.eos_value is not None]
    assert {id(n) for n in finalists} == stage2_finalists(ranked, 2, True, SearchSettings().c)
    truncated, _ = run(tiny_models, iterations=5, max_new_tokens=20, parallel_leaves=4)
    assert truncated.source == "fallback_truncated" and truncated.cost.steps == 3  # 1 + 3 + 1 leaves
    finished, _ = run(tiny_models, iterations=5, max_new_tokens=20, parallel_leaves=4, fallback="finish")
    assert finished.source == "fallback_finished" and finished.text.startswith(truncated.text)


def test_a_timeout_between_parallel_leaves_leaves_a_whole_tree(tiny_models):
    models = make_models(tiny_models)
    settings = SearchSettings(**LONG, parallel_leaves=4, timeout=0.3, partial_answer=True)
    result = search(models, PROMPT, settings)
    assert result.stopped == "timeout" and result.cost.steps > 1
    # No virtual loss left behind, no child of an unfinished step kept.
    assert_every_selection_backed_up(result)
    assert all(child.visits >= 1 for node in result.tree.walk() for child in node.children)
    assert nothing_held(models)


# --- the strong model: stop strings and limits -------------------------------------------


def test_stop_string_spanning_tokens_ends_the_answer_before_it(tiny_models):
    models = make_models(tiny_models)
    greedy = SearchSettings(strategy="base", temperature=0.0, max_new_tokens=24)
    full = search(models, PROMPT, greedy)
    assert len(full.text) > 10
    stop = full.text[4:9]
    cut = full.text.index(stop)
    stopped = search(models, PROMPT, greedy.with_(stop=("zzz-never", stop)))
    assert stopped.text == full.text[:cut] and stopped.finish_reason == "stop"


def test_max_new_tokens_bounds_every_answer(tiny_models):
    result, _ = run(tiny_models, strategy="bon", samples=5, max_new_tokens=7)
    for child in result.tree.children:
        assert len(child.chunk.tokens) <= 7 and child.terminal


def test_strong_expand_samples_with_and_without_replacement(tiny_models):
    models = make_models(tiny_models)
    strong = StrongModel(models.strong, PromptFormat(), SearchSettings(top_k=2).sampling, 8)
    root = strong.start(PROMPT)
    ((entropy, kids),) = strong.expand([root], 5, 1, distinct=True)
    assert len(kids) == 2  # top-k 2 leaves two distinct first tokens
    assert 0 < entropy <= 1.0


# --- baselines -------------------------------------------------------------------------


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


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"strategy": "mcts"}, "unknown strategy"),
        ({"children": 0}, "children"),
        ({"chunk_tokens": 0}, "chunk_tokens"),
        ({"iterations": 0}, "iterations"),
        ({"samples": 0}, "samples"),
        ({"beam_width": 0}, "beam_width"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": "abc"}, "stop"),
        ({"fallback": "hope"}, "fallback"),
        ({"token_budget": 0}, "token_budget"),
        ({"parallel_leaves": 0}, "parallel_leaves"),
        ({"parallel_leaves": 2.0}, "parallel_leaves"),
        ({"selection": "mcts"}, "selection"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
    ],
)
def test_bad_settings(changes, message):
    with pytest.raises(ValueError, match=message):
        SearchSettings(**changes)


def test_empty_prompt(tiny_models):
    with pytest.raises(ValueError, match="empty"):
        search(make_models(tiny_models), "  ", SearchSettings())


def test_beta_scales_every_value(tiny_models):
    one, _ = run(tiny_models, strategy="bon", samples=3)
    two, _ = run(tiny_models, strategy="bon", samples=3, beta=2.0)
    assert two.text == one.text
    assert two.value == pytest.approx(2 * one.value, rel=1e-6)


def test_an_expansion_is_one_decode_per_token_and_one_per_weak_context(tiny_models):
    models = make_models(tiny_models)
    strong = StrongModel(models.strong, PromptFormat(), SearchSettings(top_k=0).sampling, 50, rng=np.random.default_rng(0))
    root = strong.start(PROMPT)
    before = models.strong.stats.decode_calls
    ((_, kids),) = strong.expand([root], 4, 5, distinct=True)
    # One decode for the parent, then one per further token for all children at once.
    assert models.strong.stats.decode_calls - before == 1 + max(k.n_new for k in kids) - 1
    proxy = models.proxy
    parent = proxy.start(PROMPT)
    contexts = proxy.contexts
    calls = [c.stats.decode_calls for c in contexts]
    proxy.extend([parent] * len(kids), [k.text for k in kids])
    assert [c.stats.decode_calls - b for c, b in zip(contexts, calls)] == [1] * len(contexts)


# --- stopping early: timeout, cancel, interrupt, a full context --------------------

LONG = dict(iterations=1_000_000, children=3, chunk_tokens=1, max_new_tokens=100, seed=5)


def nothing_held(models: SearchModels) -> bool:
    return all(c.n_resident == 0 and c.kv_cells_used() == 0 for c in [models.strong] + models.proxy.contexts)


def usable_afterwards(models: SearchModels, tiny_models) -> bool:
    """The next search on the same models answers as it would on fresh ones."""
    again = search(models, PROMPT, SearchSettings(**SMALL))
    fresh = search(make_models(tiny_models), PROMPT, SearchSettings(**SMALL))
    return again.text == fresh.text and again.tree_dict() == fresh.tree_dict()


def test_timeout_stops_the_search_promptly_and_frees_it(tiny_models):
    models = make_models(tiny_models)
    started = time.perf_counter()
    with pytest.raises(SearchTimeoutError, match="partial_answer"):
        search(models, PROMPT, SearchSettings(**LONG, timeout=0.3))
    # One decode step of the tiny models takes milliseconds: "promptly" is well inside a second.
    assert time.perf_counter() - started < 0.3 + 1.0
    assert nothing_held(models)
    assert usable_afterwards(models, tiny_models)


@pytest.mark.parametrize("strategy", ["w2s", "cbs"])
def test_timeout_with_partial_answer_returns_the_best_so_far(tiny_models, strategy):
    models = make_models(tiny_models)
    settings = SearchSettings(**LONG, strategy=strategy, beam_width=8, timeout=0.3, partial_answer=True)
    result = search(models, PROMPT, settings)
    assert result.stopped == "timeout" and result.source == "partial"
    assert result.text and result.finish_reason is None  # unfinished: max_new_tokens is far away
    answers = {n["answer"] for n in result.tree_dict()["nodes"]}
    assert result.text in answers
    assert nothing_held(models)


def test_partial_answer_needs_something_to_return(tiny_models):
    models = make_models(tiny_models)
    settings = SearchSettings(**{**LONG, "max_new_tokens": 400}, strategy="bon", samples=4, timeout=0.2, partial_answer=True)
    with pytest.raises(SearchTimeoutError):  # Best-of-N has no answer before its samples finish
        search(models, PROMPT, settings)
    assert nothing_held(models)


def test_cancel_from_another_thread_stops_within_one_step(tiny_models):
    models = make_models(tiny_models)
    cancel = threading.Event()
    seen = []

    def progress(done, total, what):
        seen.append(done)
        if done == 3:
            cancel.set()

    with pytest.raises(SearchCancelledError):
        search(models, PROMPT, SearchSettings(**LONG), progress, cancel)
    assert seen == [1, 2, 3]  # the fourth iteration's expansion saw the event
    assert nothing_held(models)
    assert usable_afterwards(models, tiny_models)


def test_keyboard_interrupt_inside_an_expansion_frees_every_branch(tiny_models, monkeypatch):
    models = make_models(tiny_models)
    calls = {"n": 0}
    real_next_logits = Context.next_logits

    def interrupted_while_children_grow(self, branches):
        if self is models.strong:
            calls["n"] += 1
            # With L = 4 an expansion asks the strong context 4 times: call 7 is
            # the second expansion's third token, its children half grown.
            if calls["n"] == 7:
                raise KeyboardInterrupt
        return real_next_logits(self, branches)

    monkeypatch.setattr(Context, "next_logits", interrupted_while_children_grow)
    with pytest.raises(KeyboardInterrupt):
        search(models, PROMPT, SearchSettings(**{**LONG, "chunk_tokens": 4}))
    monkeypatch.undo()
    assert calls["n"] == 7
    assert nothing_held(models)
    assert usable_afterwards(models, tiny_models)


@pytest.mark.parametrize("partial", [False, True])
def test_a_context_that_fills_up_mid_search(tiny_models, partial):
    """The weak contexts hold 256 cells; a 400-token answer needs more (chunks
    of 40 tokens reach that depth within a few iterations)."""

    def ctx(path, n_ctx=256):
        return Context(load_model(path), n_ctx=n_ctx, n_threads=1, n_seq_max=8)

    models = SearchModels(
        ctx(tiny_models.tiny_c, 512), PromptFormat(),
        Proxy(WeakScorer(ctx(tiny_models.tiny_a), PromptFormat()), WeakScorer(ctx(tiny_models.tiny_b), PromptFormat())),
    )
    settings = SearchSettings(**{**LONG, "max_new_tokens": 400, "chunk_tokens": 40}, partial_answer=partial)
    if partial:
        result = search(models, PROMPT, settings)
        assert result.stopped == "context_full" and result.source == "partial" and result.text
    else:
        with pytest.raises(ContextOverflowError, match="raise n_ctx"):
            search(models, PROMPT, settings)
    assert nothing_held(models)

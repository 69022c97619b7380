"""The strong model's side: priors, masked marker tokens, chunks that never end
inside a character, stop strings, max_new_tokens, one decode per token."""

from __future__ import annotations

import math

import numpy as np
import pytest

from support.search_models import PROMPT, SMALL, make_models, run
from w2s_langchain.engine import Context, load_model
from w2s_langchain.prompts import PromptFormat
from w2s_langchain.search import SearchModels, SearchSettings, StrongModel, search
from w2s_langchain.engine.sampling import incomplete_character


def test_priors_are_the_geometric_mean_of_warped_probabilities(tiny_models):
    """P of a chunk, recomputed token by token on a fresh context of the strong model."""
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


def test_chunks_never_end_inside_a_character(tiny_models):
    result, _ = run(tiny_models, iterations=20, max_new_tokens=40)
    for node in result.tree.walk():
        if not node.terminal and node.chunk.n_new <= SMALL["chunk_tokens"] + 3:
            assert not incomplete_character(node.chunk.answer)


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

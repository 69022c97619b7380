"""The weak models' values checked against an independent computation:
llama-cpp-python's own `Llama` reads each role's prompt + answer from scratch,
and the answer's log-probs are summed by hand from its logits (every token after
the common prefix of tok(prompt) and tok(prompt + answer) counts, so a first
answer token that merged into the prompt's last one counts too). Tolerance as in
test_engine.py: the tiny models are F32."""

from __future__ import annotations

import numpy as np
import pytest
from llama_cpp import Llama

from w2s_langchain.engine import Context, load_model
from w2s_langchain.prompts import PromptFormat, render
from w2s_langchain.search import Proxy, SearchModels, SearchSettings, WeakScorer, search

TOL = 1e-3
PROMPT = "Once upon a time"
CHAT = dict(format="chat", assistant_prefix="{prompt}")


class FromScratch:
    """One role's log pi(answer | prompt) and its end token's log-prob, each
    answer read from its first token."""

    def __init__(self, path, prompt_format: PromptFormat, prompt: str):
        self.llm = Llama(model_path=str(path), n_ctx=512, n_threads=1, logits_all=True, verbose=False)
        self.rendered = render(load_model(path), prompt_format, prompt)

    def tokens(self, answer: str) -> list[int]:
        return list(self.rendered.tokens) + self.llm.tokenize((self.rendered.plain + answer).encode(), add_bos=False)

    def log_probs(self, answer: str) -> tuple[float, float]:
        """(log pi(answer | prompt), log p(end token | prompt + answer))."""
        prompt, tokens = self.tokens(""), self.tokens(answer)
        start = next(i for i, (a, b) in enumerate(zip(prompt + [-1], tokens)) if a != b)
        self.llm.reset()
        self.llm.eval(tokens)
        rows = np.asarray(self.llm.scores[: len(tokens)], dtype=np.float64)
        rows = rows - rows.max(axis=1, keepdims=True)
        rows = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
        return sum(rows[i - 1, tokens[i]] for i in range(start, len(tokens))), rows[-1, self.rendered.end_token]

    def close(self) -> None:
        self.llm.close()


def context(path, n_seq_max: int) -> Context:
    return Context(load_model(path), n_ctx=512, n_threads=1, n_seq_max=n_seq_max)


# (aligned model, its format, reference model, its format): two models; one model
# in both roles with two chat prompts (one context, shared decodes); one model
# with a chat prompt (ends with <|im_end|>) against a plain one (ends with <|eos|>).
PAIRS = {
    "two models": ("tiny_a", {}, "tiny_b", {}),
    "one model, two chat prompts": ("tiny_a", dict(CHAT, system="Be warm."), "tiny_a", dict(CHAT, system="Be cold.")),
    "one model, chat and plain": ("tiny_a", dict(CHAT, system="Be warm."), "tiny_a", {}),
}


def proxy_for(tiny_models, pair: str, n_seq_max: int) -> tuple[Proxy, list]:
    aligned, aligned_format, reference, reference_format = PAIRS[pair]
    paths = [getattr(tiny_models, aligned), getattr(tiny_models, reference)]
    shared = context(paths[0], n_seq_max) if aligned == reference else None
    scorers = [
        WeakScorer(shared or context(path, n_seq_max), PromptFormat(**fmt))
        for path, fmt in zip(paths, (aligned_format, reference_format))
    ]
    return Proxy(*scorers), [(path, PromptFormat(**fmt)) for path, fmt in zip(paths, (aligned_format, reference_format))]


@pytest.mark.parametrize("parallel_leaves", [1, 4])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_every_value_of_a_search_equals_scoring_from_scratch(tiny_models, pair, parallel_leaves):
    # 6 sequence ids for more branches than that: branches are evicted and rebuilt.
    proxy, roles = proxy_for(tiny_models, pair, n_seq_max=6)
    models = SearchModels(context(tiny_models.tiny_c, 32), PromptFormat(), proxy)
    settings = SearchSettings(
        iterations=16, children=3, chunk_tokens=3, max_new_tokens=15, seed=5, terminal_reward="eos",
        parallel_leaves=parallel_leaves,
    )
    result = search(models, PROMPT, settings)
    assert sum(c.stats.evictions for c in proxy.contexts) > 0
    scratch = [FromScratch(path, fmt, PROMPT) for path, fmt in roles]
    checked = eos_checked = 0
    try:
        for node in result.tree.walk():
            if node.parent is None or node.proxy is None:
                continue
            (aligned, aligned_end), (reference, reference_end) = (s.log_probs(node.chunk.text) for s in scratch)
            assert node.proxy.value == pytest.approx(aligned - reference, abs=TOL)
            checked += 1
            if node.eos_value is not None:
                assert node.eos_value == pytest.approx(aligned + aligned_end - reference - reference_end, abs=TOL)
                eos_checked += 1
    finally:
        for s in scratch:
            s.close()
    assert checked >= 12 and eos_checked >= 3


def test_an_answer_that_merges_into_the_prompts_last_token(tiny_models):
    # tok("Once upon a t") ends with " t"; with "he and then" after it, " t" + "he"
    # merge into " the": the answer's log-prob starts at that merged token.
    prompt, answer = "Once upon a t", "he and then"
    proxy, roles = proxy_for(tiny_models, "two models", n_seq_max=8)
    (state,) = proxy.extend([proxy.start(prompt)], [answer])
    scratch = [FromScratch(path, fmt, prompt) for path, fmt in roles]
    try:
        prompt_tokens, tokens = scratch[0].tokens(""), scratch[0].tokens(answer)
        assert prompt_tokens[:-1] == tokens[: len(prompt_tokens) - 1] and prompt_tokens[-1] != tokens[len(prompt_tokens) - 1]
        (aligned, _), (reference, _) = (s.log_probs(answer) for s in scratch)
    finally:
        for s in scratch:
            s.close()
    assert state.value == pytest.approx(aligned - reference, abs=TOL)

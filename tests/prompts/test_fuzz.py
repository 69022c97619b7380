"""Odd and hostile prompts and stop strings, fuzzed through the real search.

Every strategy runs on real llama.cpp with the tiny models: tiny_c writes, tiny_a
(through its chat template) and tiny_b (plain text) judge. Whatever the input, a
search either answers with text that is valid UTF-8 and free of every stop string,
or raises one of the documented errors: a `W2SError` (a prompt too long for the
context, say), or a plain `ValueError` naming what is malformed (an empty prompt, a
broken conversation, a lone surrogate in a prompt or a stop string). Afterwards the
contexts hold no branch, whatever happened.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from w2s_langchain.engine import Context, load_model
from w2s_langchain.errors import ContextOverflowError, W2SError
from w2s_langchain.prompts import PromptFormat
from w2s_langchain.search import Proxy, SearchModels, SearchSettings, WeakScorer, search

STRATEGIES = ["base", "bon", "cbs", "w2s"]
SMALL = dict(iterations=4, children=2, chunk_tokens=2, max_new_tokens=10, samples=2, beam_width=2, seed=3)

# Deterministic for CI: the same examples every run, nothing stored between runs.
FUZZ = settings(
    max_examples=50, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)

# --- what hostile text looks like -------------------------------------------------------

BLANKS = ["", " ", "\n", "\r\n", "\t", "\u3000"]  # str.strip() removes all of these
ODD_PIECES = [
    "\x00", "\ufeff", "\u200b", "\ufffd", "\uffff", "\U0010ffff",  # NUL, BOM, zero width, replacement, noncharacters
    "🙂", "👨‍👩‍👧", "👍🏽", "🇫🇷",  # emoji, ZWJ sequences, modifiers, flags
    "e\u0301", "\u0308\u0308\u0308", "a\u20dd",  # combining marks, stacked
    "\u202e", "\u200f", "שלום", "مرحبا",  # right-to-left override, marks and scripts
    "<|im_start|>", "<|im_end|>", "<|eos|>", "{prompt}", "{{ x }}", "{% if %}",  # special tokens, template syntax
]
PIECE = st.one_of(st.sampled_from(BLANKS + ODD_PIECES), st.characters())
TEXT = st.lists(PIECE, max_size=20).map("".join)
VISIBLE = st.one_of(st.sampled_from(ODD_PIECES), st.characters(exclude_categories=["Z", "Cc", "Cs"]))
SAYS_SOMETHING = st.builds("{}{}{}".format, TEXT, VISIBLE, TEXT)  # not blank: a prompt to answer
LONG_LINE = st.builds(lambda piece, n: piece * n, VISIBLE, st.integers(100, 800))
ROLE = st.sampled_from(["system", "user", "assistant"])
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": TEXT})
CONVERSATION = st.builds(  # ends with a user message that says something
    lambda before, last: before + [{"role": "user", "content": last}], st.lists(MESSAGE, max_size=3), SAYS_SOMETHING
)
PROMPT = st.one_of(SAYS_SOMETHING, CONVERSATION, LONG_LINE)
STOP = st.lists(TEXT, max_size=3)

# What check_prompt refuses. A Python str can hold a lone surrogate (from a JSON
# escape, say), which UTF-8 cannot encode.
BLANK = st.lists(st.sampled_from(BLANKS), max_size=4).map("".join)
WITH_SURROGATE = st.builds("{}\ud800{}".format, TEXT, TEXT)
BAD_MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["", "robot", "User", "tool"]), "content": TEXT}),
    st.fixed_dictionaries({"role": ROLE, "content": st.one_of(st.none(), st.integers(), WITH_SURROGATE)}),
    st.fixed_dictionaries({"content": TEXT}),
    TEXT,
)
MALFORMED_PROMPT = st.one_of(
    BLANK,
    WITH_SURROGATE,
    st.just([]),
    st.lists(st.fixed_dictionaries({"role": ROLE, "content": BLANK}), min_size=1, max_size=3),
    st.builds(lambda good, bad: good + [bad], st.lists(MESSAGE, max_size=2), BAD_MESSAGE),
)


@pytest.fixture(scope="module")
def models(tiny_models) -> SearchModels:
    def context(path):
        return Context(load_model(path), n_ctx=512, n_threads=1, n_seq_max=16)

    chat = PromptFormat(format="chat", system="Be warm.", assistant_prefix="{prompt}")
    aligned = WeakScorer(context(tiny_models.tiny_a), chat)
    reference = WeakScorer(context(tiny_models.tiny_b), PromptFormat())
    proxy = Proxy(aligned, reference)
    return SearchModels(context(tiny_models.tiny_c), PromptFormat(), proxy)


def run(models: SearchModels, prompt, strategy: str, stop=()):
    """The search's answer, or the W2SError it raised (any other exception fails the
    test); either way the contexts hold no branch afterwards."""
    try:
        return search(models, prompt, SearchSettings(strategy=strategy, stop=tuple(stop), **SMALL))
    except W2SError as err:
        return err
    finally:
        for ctx in [models.strong] + models.proxy.contexts:
            assert ctx.n_resident == 0 and ctx.kv_cells_used() == 0


def assert_clean_answer(text: str, stop) -> None:
    text.encode("utf-8")  # no lone surrogate: the answer is valid UTF-8
    for s in stop:
        assert not s or s not in text, f"stop string {s!r} in the answer {text!r}"


# --- the properties ----------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
@FUZZ
@given(prompt=PROMPT, stop=STOP)
def test_odd_prompts_and_stop_strings_give_clean_text(models, strategy, prompt, stop):
    """Any text a person could type, or a conversation of it: an answer, or a
    W2SError for a prompt too long for the context."""
    result = run(models, prompt, strategy, stop)
    event(type(result).__name__)  # --hypothesis-show-statistics: how often each outcome came
    if isinstance(result, Exception):  # the one refusal a well-formed prompt may get
        assert isinstance(result, ContextOverflowError) and "does not fit the context" in str(result), repr(result)
    else:
        assert_clean_answer(result.text, stop)


@pytest.mark.parametrize("strategy", STRATEGIES)
@FUZZ
@given(prompt=st.one_of(SAYS_SOMETHING, CONVERSATION), data=st.data())
def test_stop_strings_taken_from_the_answer_end_it_before_them(models, strategy, prompt, data):
    """Stop strings cut from the answer the same search gives without them: across
    chunk boundaries, prefixes of each other, with U+FFFD where the model wrote
    bytes that are not UTF-8."""
    full = run(models, prompt, strategy)
    if isinstance(full, Exception) or len(full.text) < 2:
        return
    text = full.text
    boundaries = chunk_boundaries(full)
    at = data.draw(st.sampled_from(boundaries) if boundaries else st.integers(1, len(text) - 1), label="cut")
    before, after = data.draw(st.integers(0, min(at, 4))), data.draw(st.integers(1, 4))
    spanning = text[at - before : at + after]
    stop = [spanning, spanning[: max(1, len(spanning) // 2)], data.draw(TEXT, label="noise")]
    stopped = run(models, prompt, strategy, stop)
    event(f"finish: {stopped.finish_reason}")
    assert_clean_answer(stopped.text, stop)
    if strategy == "base":  # one sample, same seed: the same text, up to the first stop string
        first = min(i for i in (text.find(s) for s in stop if s) if i >= 0)
        assert stopped.text == text[:first] and stopped.finish_reason == "stop"


def chunk_boundaries(result) -> list[int]:
    """Where, in the answer's text, one chunk of its path ends and the next begins."""
    text = result.text
    prefixes = (node.chunk.text for node in result.tree.walk())
    return sorted({len(p) for p in prefixes if 0 < len(p) < len(text) and text.startswith(p)})


@FUZZ
@given(
    prompt_and_stop=st.one_of(
        st.tuples(MALFORMED_PROMPT, STOP), st.tuples(PROMPT, st.lists(WITH_SURROGATE, min_size=1, max_size=2))
    )
)
def test_malformed_prompts_and_stop_strings_are_refused_plainly(models, prompt_and_stop):
    """An empty prompt, a broken conversation, text UTF-8 cannot encode: a plain
    ValueError saying which (not a UnicodeEncodeError from deep inside)."""
    prompt, stop = prompt_and_stop
    with pytest.raises(ValueError) as refused:
        run(models, prompt, "w2s", stop)
    assert type(refused.value) is ValueError
    assert re.search("empty|non-empty list|role|lone surrogate", str(refused.value))
    event(str(refused.value).split(":")[0][:40])

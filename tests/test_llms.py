"""W2SAlignedLLM behind LangChain's interfaces, on the tiny models (real llama.cpp)."""

from __future__ import annotations

import time

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.caches import InMemoryCache
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from pydantic import ValidationError

from loop_ticker import run_while_ticking
from w2s_langchain.engine import load_model
from w2s_langchain.engine import model as engine_model
from w2s_langchain.llms import W2SAlignedLLM

PROMPT = "Once upon a time"
PLAIN = {"format": "plain"}


@pytest.fixture
def make_llm(tiny_models):
    def make(**fields):
        settings = dict(
            strong=str(tiny_models.tiny_c), weak=str(tiny_models.tiny_a), weak_ref=str(tiny_models.tiny_b),
            strong_prompt=PLAIN, weak_prompt=PLAIN, weak_ref_prompt=PLAIN,
            iterations=6, children=3, chunk_tokens=3, max_new_tokens=12, n_ctx=512, n_threads=1, seed=3,
        )
        return W2SAlignedLLM(**{**settings, **fields})

    return make


class Recorder(BaseCallbackHandler):
    def __init__(self):
        self.events: list[tuple[str, object]] = []

    def on_llm_new_token(self, token, **kwargs):
        self.events.append(("token", token))

    def on_custom_event(self, name, data, **kwargs):
        self.events.append((name, data))


def test_invoke_runs_the_search_and_reports_it(make_llm):
    llm = make_llm()
    text = llm.invoke(PROMPT)
    assert isinstance(text, str) and text
    result = llm.generate([PROMPT])
    generation = result.generations[0][0]
    assert generation.text == text  # same seed, same answer
    info = generation.generation_info
    assert info["strategy"] == "w2s" and info["cost"]["iterations"] == 6 and "value" in info
    usage = result.llm_output["token_usage"]
    assert usage["completion_tokens"] == info["cost"]["strong_tokens_sampled"] > 0
    assert usage["prompt_tokens"] > 0


def test_per_call_overrides_and_bind_agree(make_llm):
    llm = make_llm()
    direct = llm.invoke(PROMPT, strategy="bon", samples=2)
    bound = llm.bind(strategy="bon", samples=2).invoke(PROMPT)
    assert direct == bound
    assert llm.generate([PROMPT], strategy="bon", samples=2).generations[0][0].generation_info["strategy"] == "bon"


def test_stop_per_call_is_honoured(make_llm):
    llm = make_llm(strategy="base", temperature=0.0, max_new_tokens=20)
    full = llm.invoke(PROMPT)
    # Random weights write odd bytes; stop at a plain ASCII pair past the start.
    stop = next(full[i : i + 2] for i in range(2, len(full) - 2) if full[i : i + 2].isascii())
    assert llm.invoke(PROMPT, stop=[stop]) == full[: full.index(stop)]


def test_stream_gives_the_answer_in_pieces_after_progress(make_llm):
    llm = make_llm()
    recorder = Recorder()
    pieces = list(llm.stream(PROMPT, config={"callbacks": [recorder]}))
    assert "".join(pieces) == llm.invoke(PROMPT)
    assert len(pieces) >= 1
    progress = [data for name, data in recorder.events if name == "w2s_progress"]
    tokens = [t for name, t in recorder.events if name == "token"]
    assert [p["done"] for p in progress] == list(range(1, 7))
    assert tokens == pieces
    first_token = next(i for i, (name, _) in enumerate(recorder.events) if name == "token")
    assert all(name == "w2s_progress" for name, _ in recorder.events[:first_token])


def test_async_calls_do_not_block_the_loop_and_match_sequential_answers(make_llm):
    llm = make_llm()
    prompts = [PROMPT, "The cat sat", "Hello there"]
    sequential = [llm.invoke(p) for p in prompts]

    async def work():
        answers = await llm.abatch(prompts)
        streamed = "".join([piece async for piece in llm.astream(PROMPT)])
        return answers, streamed

    (answers, streamed), ticks = run_while_ticking(work)
    assert answers == sequential
    assert streamed == sequential[0]
    assert ticks > 5  # the loop kept running while the searches ran in threads


def test_identifying_params_keep_the_cache_honest(make_llm):
    cache = InMemoryCache()
    small = make_llm(cache=cache, iterations=3)
    large = make_llm(cache=cache, iterations=6)
    assert small._identifying_params != large._identifying_params
    assert small._identifying_params["search"]["iterations"] == 3
    a = small.invoke(PROMPT)
    b = large.invoke(PROMPT)
    assert small.invoke(PROMPT) == a  # served from the cache
    assert large.generate([PROMPT]).generations[0][0].text == b
    assert len(cache._cache) == 2


def test_many_instances_are_cheap_and_share_one_copy_of_the_weights(make_llm, tiny_models):
    before = len(engine_model._loaded)
    start = time.perf_counter()
    llms = [make_llm(iterations=1 + i % 5) for i in range(100)]
    assert time.perf_counter() - start < 5
    assert len(engine_model._loaded) == before  # nothing loads until first use
    llms[0].invoke(PROMPT)
    llms[1].invoke(PROMPT)
    assert load_model(str(tiny_models.tiny_c)) is load_model(tiny_models.tiny_c)


def test_get_num_tokens_uses_the_strong_tokenizer(make_llm, tiny_models):
    text = "walking home 🙂"
    assert make_llm().get_num_tokens(text) == len(load_model(tiny_models.tiny_c).tokenize(text))


def test_lcel_chain(make_llm):
    chain = PromptTemplate.from_template("Tell me about {topic}.") | make_llm() | StrOutputParser()
    assert isinstance(chain.invoke({"topic": "owls"}), str)


def test_bad_input_is_refused_before_any_search_and_the_instance_stays_usable(make_llm):
    with pytest.raises(ValidationError, match="no_such_field"):
        make_llm(no_such_field=1)
    with pytest.raises(ValidationError, match="children"):
        make_llm(children=0)
    with pytest.raises(ValidationError, match="unknown preset"):
        make_llm(preset="nope")
    with pytest.raises(ValidationError, match="n_gpu_layers"):
        make_llm(n_gpu_layers=-5)
    llm = make_llm()
    with pytest.raises(ValueError, match="unknown search settings: itrations"):
        llm.invoke(PROMPT, itrations=3)
    with pytest.raises(ValueError, match="top_p"):
        llm.invoke(PROMPT, top_p=2.0)
    with pytest.raises(TypeError, match="stop"):
        llm.invoke(PROMPT, stop="abc")
    with pytest.raises(ValueError, match="empty"):
        llm.invoke("   ")
    with pytest.raises(ValueError, match="do not fit the context"):
        llm.invoke(PROMPT, max_new_tokens=600)  # n_ctx is 512
    with pytest.raises(Exception, match="w2s-models pull"):
        make_llm(strong="qwen2.5-coder-1.5b-instruct").invoke(PROMPT)
    assert llm.invoke(PROMPT)  # still usable


def test_models_are_freed_with_the_last_component_using_them(make_llm, tiny_models, tmp_path):
    import gc
    import weakref

    path = tmp_path / "strong.gguf"
    path.write_bytes(tiny_models.tiny_c.read_bytes())
    first, second = make_llm(strong=str(path)), make_llm(strong=str(path), iterations=2)
    first.invoke(PROMPT)
    second.invoke(PROMPT)
    model = weakref.ref(load_model(path))
    assert first._aligner is second._aligner  # one set of contexts, one copy of the weights
    del first
    gc.collect()
    assert model() is not None
    del second
    gc.collect()
    assert model() is None

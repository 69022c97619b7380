"""W2SAlignedLLM behind LangChain's interfaces, on the tiny models (real llama.cpp)."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import threading
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import llama_cpp
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.caches import InMemoryCache
from langchain_core.globals import set_llm_cache
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from pydantic import ValidationError

from support.loop_ticker import run_while_ticking
from support.components import PROMPT, nothing_held
from w2s_langchain.engine import load_model
from w2s_langchain.engine import model as engine_model
from w2s_langchain.errors import SearchTimeoutError
from w2s_langchain.llms import W2SAlignedLLM


class Recorder(BaseCallbackHandler):
    def __init__(self):
        self.events: list[tuple[str, object]] = []
        self.metadata: dict = {}

    def on_llm_start(self, serialized, prompts, *, metadata=None, **kwargs):
        self.metadata = metadata or {}

    def on_chat_model_start(self, serialized, messages, *, metadata=None, **kwargs):
        self.metadata = metadata or {}

    def on_llm_new_token(self, token, **kwargs):
        self.events.append(("token", token))

    def on_custom_event(self, name, data, **kwargs):
        self.events.append((name, data))

    def of(self, name: str) -> list:
        return [data for event, data in self.events if event == name]


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
    # The answer's tokens, not every token the search sampled (that is the cost report's).
    assert 0 < usage["completion_tokens"] == info["cost"]["answer_tokens"] <= 12 < info["cost"]["strong_tokens_sampled"]
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


ENDLESS = dict(iterations=1_000_000, chunk_tokens=1, max_new_tokens=100)


@pytest.mark.parametrize("call", ["ainvoke", "astream"])
async def test_cancelling_an_async_call_stops_its_search(make_llm, call):
    llm = make_llm(**ENDLESS, timeout=6.0)  # the timeout only bounds the test if cancelling fails
    alone = llm.invoke(PROMPT, iterations=6, max_new_tokens=12)

    async def endless():
        if call == "ainvoke":
            return await llm.ainvoke(PROMPT)
        return [piece async for piece in llm.astream(PROMPT)]

    task = asyncio.create_task(endless())
    await asyncio.sleep(0.5)  # the search is running in its thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    started = time.perf_counter()
    # The next call waits for the cancelled search to let go of the models: it
    # only finishes quickly if that search stopped.
    after = await llm.ainvoke(PROMPT, iterations=6, max_new_tokens=12)
    assert time.perf_counter() - started < 2.0
    assert after == alone
    assert nothing_held(llm)


def test_timeout_raises_or_answers_with_the_best_so_far(make_llm):
    with pytest.raises(SearchTimeoutError):
        make_llm(**ENDLESS, timeout=0.3).invoke(PROMPT)
    result = make_llm(**ENDLESS, timeout=0.3, partial_answer=True).generate([PROMPT])
    generation = result.generations[0][0]
    assert generation.text and generation.generation_info["stopped"] == "timeout"


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
    """The chain formats the prompt, searches, and hands the answer on unchanged:
    the same text as the LLM gives for that prompt directly (same seed)."""
    llm = make_llm()
    chain = PromptTemplate.from_template("Tell me about {topic}.") | llm | StrOutputParser()
    answer = chain.invoke({"topic": "owls"})
    assert answer and answer == llm.invoke("Tell me about owls.")
    assert answer != llm.invoke("Tell me about cats.")


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
    with pytest.raises(ValueError, match=r"needs at least 616 tokens of context in tiny_c.gguf.*at most 512 \(n_ctx=512"):
        llm.invoke(PROMPT, max_new_tokens=600)  # n_ctx is 512
    # A weak model with another tokenizer is allowed twice the answer's tokens, and told why.
    with pytest.raises(ValueError, match=r"in tiny_a.gguf .*up to 600 tokens per role \(twice max_new_tokens: a weak model "):
        llm.invoke(PROMPT, max_new_tokens=300)
    with pytest.raises(Exception, match="w2s-models pull"):
        make_llm(strong="qwen2.5-coder-1.5b-instruct").invoke(PROMPT)
    assert llm.invoke(PROMPT)  # still usable


@pytest.fixture
def llama_frees(monkeypatch) -> list[tuple[str, int]]:
    """Each call of llama.cpp's free functions for models and contexts, in order, as
    ("model" | "context", handle); the real functions still run. Only models loaded
    after this fixture is set up free through it (the engine binds the function at load)."""
    calls = []

    def recording(kind, free):
        def record_and_free(handle):
            calls.append((kind, handle))
            free(handle)

        return record_and_free

    monkeypatch.setattr(llama_cpp, "llama_model_free", recording("model", llama_cpp.llama_model_free))
    monkeypatch.setattr(llama_cpp, "llama_free", recording("context", llama_cpp.llama_free))
    return calls


def private_copy(model: Path, tmp_path: Path) -> Path:
    """A copy of a model file that no other test loads."""
    path = tmp_path / model.name
    path.write_bytes(model.read_bytes())
    return path


def context_handles(llm) -> dict[int, Path]:
    """The llama.cpp handles of a component's contexts, and the model file of each."""
    models = llm._aligner._models
    return {c._handle: c.model.path for c in [models.strong] + models.proxy.contexts}


class SearchStarted(BaseCallbackHandler):
    """Sets `event` at a search's first progress report."""

    def __init__(self):
        self.event = threading.Event()

    def on_custom_event(self, name, data, **kwargs):
        self.event.set()


LONG_SEARCH = dict(iterations=300, chunk_tokens=2, max_new_tokens=100)  # about a second on the tiny models


@pytest.mark.parametrize("contexts", ["shared", "own"])
def test_models_are_freed_once_with_the_last_component_using_them(make_llm, tiny_models, tmp_path, llama_frees, contexts):
    path = private_copy(tiny_models.tiny_c, tmp_path)
    # The same runtime settings share one set of contexts; another n_ctx gets
    # contexts of its own on the same weights.
    first = make_llm(strong=str(path))
    second = make_llm(strong=str(path), n_ctx=512 if contexts == "shared" else 256)
    alone = second.invoke(PROMPT, **LONG_SEARCH)
    first.invoke(PROMPT)
    assert (first._aligner is second._aligner) == (contexts == "shared")
    model = weakref.ref(load_model(path))
    model_handle = model().handle
    first_contexts, second_contexts = context_handles(first), context_handles(second)
    ours = {**first_contexts, **second_contexts}
    our_frees = {("model", model_handle)} | {("context", h) for h in ours}
    # Addresses are reused: only from now on, while ours live, is a free of one of
    # these handles one of ours (other tests' garbage may be freed here too).
    llama_frees.clear()

    def frees_of_ours() -> list[tuple[str, int]]:
        return [call for call in llama_frees if call in our_frees]

    started = SearchStarted()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(second.invoke, PROMPT, config={"callbacks": [started]}, **LONG_SEARCH)
        assert started.event.wait(timeout=30)
        del first  # while the second searches on the same weights
        gc.collect()
        assert not running.done()
        assert model() is not None
        assert sorted(frees_of_ours()) == sorted(("context", h) for h in first_contexts if h not in second_contexts)
        assert running.result() == alone

    del second
    gc.collect()
    assert model() is None
    assert sorted(frees_of_ours()) == sorted([("model", model_handle)] + [("context", h) for h in ours])  # each once


def test_a_component_in_a_reference_cycle_frees_its_contexts_before_their_model(make_llm, tiny_models, tmp_path, llama_frees):
    path = private_copy(tiny_models.tiny_c, tmp_path)
    llm = make_llm(strong=str(path))
    llm.invoke(PROMPT)
    model_handle = load_model(path).handle
    contexts = [h for h, file in context_handles(llm).items() if file == path]
    llama_frees.clear()  # addresses are reused: count only frees from now on
    # In a reference cycle, as a component often is (a callback that refers back to
    # its chain), it and all it holds go in one collection, in an order of the
    # collector's choosing.
    cycle = [llm]
    cycle.append(cycle)
    del llm, cycle
    gc.collect()
    # llama.cpp reads the model while it frees a context: the model must go last.
    assert llama_frees.index(("model", model_handle)) > max(llama_frees.index(("context", h)) for h in contexts)


def test_a_deleted_component_frees_its_model_without_waiting_for_the_gc(make_llm, tiny_models, tmp_path):
    path = private_copy(tiny_models.tiny_c, tmp_path)
    gc.collect()  # earlier tests' garbage; from here on only reference counting frees
    gc.disable()
    try:
        llm = make_llm(strong=str(path))
        llm.invoke(PROMPT)
        list(llm.stream(PROMPT, timeout=60.0))
        model = weakref.ref(load_model(path))
        del llm
        assert model() is None  # no search left a cycle holding the contexts behind
    finally:
        gc.enable()


@pytest.fixture
def global_llm_cache():
    cache = InMemoryCache()
    set_llm_cache(cache)
    yield cache
    set_llm_cache(None)


def test_a_call_with_other_settings_is_never_served_another_settings_cached_answer(make_llm, global_llm_cache):
    llm = make_llm()
    first = llm.generate([PROMPT]).generations[0][0]

    def call(**settings):
        recorder = Recorder()
        generation = llm.generate([PROMPT], callbacks=[recorder], **settings).generations[0][0]
        return generation, len(recorder.of("w2s_progress"))  # no progress: served from the cache

    short, searched = call(iterations=1, max_new_tokens=4)
    assert searched == 1 and short.generation_info["cost"]["iterations"] == 1
    assert short.generation_info["settings"]["max_new_tokens"] == 4 and short.generation_info["cost"]["answer_tokens"] <= 4
    hot, searched = call(temperature=1.5, seed=7)
    assert searched == 6 and hot.generation_info["settings"]["temperature"] == 1.5
    recorder = Recorder()
    llm.bind(iterations=5).invoke(PROMPT, config={"callbacks": [recorder]})
    assert [p["done"] for p in recorder.of("w2s_progress")] == [1, 2, 3, 4, 5]
    # Identical calls are still served from the cache.
    assert call(iterations=1, max_new_tokens=4) == (short, 0)
    assert call() == (first, 0)


def test_progress_reaches_the_callbacks_of_every_call(make_llm):
    llm = make_llm()

    async def async_calls():
        invoked, streamed = Recorder(), Recorder()
        await llm.ainvoke(PROMPT, config={"callbacks": [invoked]})
        [piece async for piece in llm.astream(PROMPT, config={"callbacks": [streamed]})]
        events = [e async for e in llm.astream_events(PROMPT, version="v2")]
        return invoked, streamed, [e["data"] for e in events if e["event"] == "on_custom_event"]

    invoked = Recorder()
    llm.invoke(PROMPT, config={"callbacks": [invoked]})
    async_invoked, async_streamed, events = asyncio.run(async_calls())
    for progress in (invoked.of("w2s_progress"), async_invoked.of("w2s_progress"), async_streamed.of("w2s_progress"), events):
        assert [p["done"] for p in progress] == list(range(1, 7))


@pytest.mark.parametrize("call", ["invoke", "ainvoke"])
def test_streaming_true_sends_the_answer_to_the_callbacks_in_pieces(make_llm, call):
    llm = make_llm(streaming=True)
    recorder = Recorder()
    config = {"callbacks": [recorder]}
    answer = llm.invoke(PROMPT, config=config) if call == "invoke" else asyncio.run(llm.ainvoke(PROMPT, config=config))
    tokens = recorder.of("token")
    assert tokens and "".join(tokens) == answer == make_llm().invoke(PROMPT)
    assert [name for name, _ in recorder.events][-len(tokens) :] == ["token"] * len(tokens)  # after the progress


def test_max_tokens_is_max_new_tokens_everywhere(make_llm):
    llm = make_llm(max_tokens=5)
    assert llm.max_tokens == llm.max_new_tokens == 5
    llm.max_tokens = 6
    assert llm.max_new_tokens == 6

    def settings_of(generation) -> dict:
        return generation.generation_info["settings"]

    assert settings_of(llm.generate([PROMPT]).generations[0][0])["max_new_tokens"] == 6
    assert settings_of(llm.generate([PROMPT], max_tokens=4).generations[0][0])["max_new_tokens"] == 4
    assert llm.bind(max_tokens=4).invoke(PROMPT) == llm.invoke(PROMPT, max_new_tokens=4)
    with pytest.raises(ValueError, match="disagree"):
        llm.invoke(PROMPT, max_tokens=4, max_new_tokens=5)


def test_traces_name_the_strong_model_and_the_weak_pair(make_llm, tiny_models):
    recorder = Recorder()
    make_llm().invoke(PROMPT, config={"callbacks": [recorder]})
    assert recorder.metadata["ls_model_name"] == tiny_models.tiny_c.name
    assert recorder.metadata["w2s_weak_model"] == str(tiny_models.tiny_a)
    assert recorder.metadata["w2s_weak_ref_model"] == str(tiny_models.tiny_b)
    named = make_llm(model_name="my-aligned-model")
    assert named.generate([PROMPT]).llm_output["model_name"] == "my-aligned-model"


def test_the_components_import_from_the_package_root_without_llamaindex():
    code = (
        "import sys\n"
        "from w2s_langchain import ChatW2SAligned, W2SAlignedLLM\n"
        "assert not any(m.startswith('llama_index') for m in sys.modules), 'llama_index imported'\n"
        "from w2s_langchain import W2SAlignedLlamaIndexLLM\n"
        "import w2s_langchain.chat_models, w2s_langchain.llms, w2s_langchain.llamaindex_llm as li\n"
        "assert ChatW2SAligned is w2s_langchain.chat_models.ChatW2SAligned\n"
        "assert W2SAlignedLLM is w2s_langchain.llms.W2SAlignedLLM and W2SAlignedLlamaIndexLLM is li.W2SAlignedLlamaIndexLLM\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_timeout_counts_the_time_spent_waiting_for_another_search(make_llm):
    slow = make_llm(**ENDLESS, timeout=4.0)
    queued = make_llm(**ENDLESS, timeout=0.3)
    assert slow._config.runtime == queued._config.runtime  # one set of models: the second waits for the first
    started = SearchStarted()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(slow.invoke, PROMPT, config={"callbacks": [started]})
        assert started.event.wait(timeout=30)
        begin = time.perf_counter()
        with pytest.raises(SearchTimeoutError):
            queued.invoke(PROMPT)
        waited = time.perf_counter() - begin
        assert not running.done()  # it timed out while queued, not after the other search
        with pytest.raises(SearchTimeoutError):
            running.result()
    assert waited < 0.3 + 0.3


def test_a_context_too_small_for_the_search_is_said_once_before_it_starts(make_llm):
    llm = make_llm(n_ctx=100, **LONG_SEARCH)
    with pytest.warns(RuntimeWarning, match=r"tree needs about \d+ tokens of context .*the context holds 256 \(n_ctx=100\)") as caught:
        llm.invoke(PROMPT)
    assert "leave n_ctx unset" in str(caught[0].message) and len(caught) == 3  # the 3 contexts, each once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llm.invoke(PROMPT)  # once: no second warning
        make_llm().invoke(PROMPT)  # a search that fits says nothing
    assert llm.n_ctx == 100  # the setting is not changed behind the user's back


def test_selection_is_a_field(make_llm):
    assert make_llm(selection="uct")._config.search.selection == "uct"
    info = make_llm().generate(["Once upon a time"], selection="puct").generations[0][0].generation_info
    assert info["settings"]["selection"] == "puct"
    with pytest.raises(ValidationError, match="selection"):
        make_llm(selection="alphazero")


@pytest.mark.packaged
def test_a_timeout_holds_while_the_models_read_a_long_prompt(packaged_models):
    # The sentiment preset's models; reading this prompt (430 tokens) in one go
    # takes them over a second on one thread.
    llm = W2SAlignedLLM(n_threads=1, iterations=50, timeout=0.5)
    llm.invoke("Hello", iterations=1, max_new_tokens=2, timeout=60.0)  # loads the models: not what is timed here
    long_prompt = "The restaurant on the corner serves soup, bread and tea to the people of the town. " * 24
    begin = time.perf_counter()
    with pytest.raises(SearchTimeoutError):
        llm.invoke(long_prompt)
    # Within one piece of a decode (32 tokens) and the release, with room for a busy machine.
    assert time.perf_counter() - begin < 0.5 + 0.4



def test_an_answer_is_always_valid_utf8(make_llm):
    """The tiny models' byte-level vocabularies hold every lone byte, and their
    random weights sample them freely (hot and untruncated here): a token that
    cannot continue the answer's bytes into valid UTF-8 is never drawn, so no
    answer shows U+FFFD (a broken character), however it ends: end of
    generation, the token limit (a character it would cut is dropped), a stop."""
    sampled = make_llm(strategy="base", temperature=3.0, top_k=0)
    answers = [sampled.invoke(PROMPT, seed=seed, max_tokens=n) for seed in range(12) for n in (1, 2, 12)]
    searched = make_llm(temperature=3.0, top_k=0) | StrOutputParser()
    answers += [searched.invoke(PROMPT, seed=seed) for seed in range(4)]
    assert sum(len(a.encode()) for a in answers) > 200
    assert [a for a in answers if "\ufffd" in a] == []


def test_progress_ends_with_a_done_event_when_the_search_ends_early(make_llm):
    """A tree that runs out of unfinished leaves (every child of the root ends
    within its first chunk) ends the search before its 40 iterations, and beams
    may all finish before max_tokens: the last event says the search is done."""
    recorder = Recorder()
    make_llm(iterations=40, max_tokens=3).invoke(PROMPT, config={"callbacks": [recorder]})
    progress = recorder.of("w2s_progress")
    assert progress[0]["total"] == 40 > progress[-2]["done"]
    assert progress[-1]["done"] == progress[-1]["total"] == progress[-2]["done"]
    for seed in range(4):
        recorder = Recorder()
        make_llm(strategy="cbs", max_tokens=30, seed=seed).invoke(PROMPT, config={"callbacks": [recorder]})
        assert recorder.of("w2s_progress")[-1]["done"] == recorder.of("w2s_progress")[-1]["total"]


def test_a_timeout_before_any_answer_says_so_when_partial_answer_is_set(make_llm):
    with pytest.raises(SearchTimeoutError, match="before it had any answer, so partial_answer had none") as caught:
        make_llm(**ENDLESS, timeout=1e-6, partial_answer=True).invoke(PROMPT)
    assert "set `partial_answer`" not in str(caught.value)


@pytest.mark.parametrize("budget", [40, 50])
def test_a_token_budget_below_one_answer_buys_a_truncated_answer(make_llm, budget):
    """The default preset's search shape (K = 3 chunks of L = 1 token, answers of
    up to 50, fallback "finish") with a budget that cannot pay for a whole answer:
    the search still takes its first step, the fallback samples what is left of
    the budget, and the answer stops there."""
    llm = make_llm(children=3, chunk_tokens=1, max_new_tokens=50, fallback="finish")
    text = llm.invoke(PROMPT, token_budget=budget)
    info = llm.generate([PROMPT], token_budget=budget).generations[0][0].generation_info
    assert text
    assert info["source"] == "fallback_truncated" and info["finish_reason"] is None
    assert info["cost"]["iterations"] >= 1
    # A chunk may take up to 4 more tokens to complete a UTF-8 character.
    assert budget <= info["cost"]["strong_tokens_sampled"] <= budget + 4
    assert info["cost"]["answer_tokens"] == info["cost"]["strong_tokens_sampled"] - 2  # the root's other 2 chunks

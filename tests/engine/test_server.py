"""The strong model served by a real llama-server (built from llama-cpp-python's own
llama.cpp), the weak models local: same search, same answers, concurrent searches,
and the faults a network brings."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from langchain_core.callbacks import BaseCallbackHandler

from support.search_models import PROMPT, make_models
from support.served import PLAIN, served_component
from w2s_langchain.service.aligner import _server_n_probs
from w2s_langchain.engine.server import ServerContext, ServerModel
from w2s_langchain.errors import ContextOverflowError, ModelLoadError, ServerError, ServerUnavailableError, SearchTimeoutError
from w2s_langchain.llms import W2SAlignedLLM
from w2s_langchain.engine.local_server import free_port
from w2s_langchain.search import SearchModels, SearchSettings, search



def served_models(tiny_models, url: str, settings: SearchSettings) -> SearchModels:
    local = make_models(tiny_models)
    server = ServerModel(url)
    return SearchModels(ServerContext(server, n_probs=_server_n_probs(settings, server)), local.strong_format, local.proxy)


def assert_same_tree(ours, theirs) -> None:
    """Same nodes in the same order with the same texts, visits and values; priors
    and entropies to the noise of F16 KV cells read in other batch shapes."""
    assert ours.text == theirs.text
    pairs = list(zip(ours.tree.walk(), theirs.tree.walk()))
    assert len(pairs) == sum(1 for _ in ours.tree.walk()) == sum(1 for _ in theirs.tree.walk())
    for a, b in pairs:
        assert (a.chunk.text, a.chunk.finish_reason, a.visits, len(a.children)) == (
            b.chunk.text, b.chunk.finish_reason, b.visits, len(b.children)
        )
        assert a.value == pytest.approx(b.value, rel=1e-9) or (math.isinf(a.value) and a.value == b.value)
        assert a.prior == pytest.approx(b.prior, rel=1e-3)
        if a.entropy is not None:
            assert a.entropy == pytest.approx(b.entropy, abs=1e-3)


SETTINGS = [
    dict(iterations=12, children=3, chunk_tokens=1, max_new_tokens=12, seed=5),
    dict(iterations=30, children=3, chunk_tokens=1, max_new_tokens=20, seed=1, top_k=0),
    dict(iterations=20, children=2, chunk_tokens=1, max_new_tokens=16, seed=2, terminal_reward="eos", top_p=0.9),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["default", "top_k=0", "eos+top_p"])
def test_with_one_token_chunks_the_served_search_equals_the_in_process_one(tiny_models, llama_server, settings):
    server = llama_server(tiny_models.tiny_c, parallel=4, ctx=2048)
    settings = SearchSettings(**settings)
    in_process = search(make_models(tiny_models), PROMPT, settings)
    served = search(served_models(tiny_models, server.url, settings), PROMPT, settings)
    assert_same_tree(served, in_process)
    assert served.cost.iterations == in_process.cost.iterations
    assert served.cost.strong_tokens_sampled == in_process.cost.strong_tokens_sampled
    assert served.cost.tokens_from_cache > served.cost.strong_tokens_decoded  # the slots re-use prefixes


@pytest.mark.parametrize("strategy", ["bon", "cbs", "base"])
def test_the_baselines_answer_as_in_process_too(tiny_models, llama_server, strategy):
    server = llama_server(tiny_models.tiny_c, parallel=2, ctx=1024)
    settings = SearchSettings(strategy=strategy, samples=3, children=2, chunk_tokens=3, max_new_tokens=10, seed=4)
    assert search(served_models(tiny_models, server.url, settings), PROMPT, settings).text == search(
        make_models(tiny_models), PROMPT, settings
    ).text


def test_longer_chunks_give_a_valid_tree_reproducibly(tiny_models, llama_server):
    server = llama_server(tiny_models.tiny_c, parallel=4, ctx=2048)
    settings = SearchSettings(iterations=15, children=3, chunk_tokens=4, max_new_tokens=16, seed=9)
    first = search(served_models(tiny_models, server.url, settings), PROMPT, settings)
    again = search(served_models(tiny_models, server.url, settings), PROMPT, settings)
    assert_same_tree(again, first)
    for node in first.tree.walk():
        for child in node.children:
            assert child.chunk.tokens[: len(node.chunk.tokens)] == node.chunk.tokens
            assert child.terminal or len(child.chunk.tokens) - len(node.chunk.tokens) >= 4
    assert first.cost.iterations == 15


def component(tiny_models, url: str, **fields) -> W2SAlignedLLM:
    search = dict(iterations=40, children=3, chunk_tokens=1, max_new_tokens=24, n_ctx=512)
    return served_component(tiny_models, url, **{**search, **fields})


def seconds_to_time_out_while_stopped(llm: W2SAlignedLLM, server, stop_after: float | None = None) -> float:
    """How long `llm.invoke(PROMPT)` takes to raise SearchTimeoutError while the
    server is stopped (SIGSTOP) from `stop_after` seconds into the call, or from
    before it; the server is resumed afterwards."""
    pause = None if stop_after is None else threading.Timer(stop_after, os.kill, args=(server.process.pid, signal.SIGSTOP))
    if pause is None:
        os.kill(server.process.pid, signal.SIGSTOP)
    else:
        pause.start()
    started = time.perf_counter()
    try:
        with pytest.raises(SearchTimeoutError):
            llm.invoke(PROMPT)
        return time.perf_counter() - started
    finally:
        if pause is not None:
            pause.join()
        os.kill(server.process.pid, signal.SIGCONT)


def test_a_component_takes_the_server_address_as_its_strong_model(tiny_models, llama_server):
    server = llama_server(tiny_models.tiny_c, parallel=2, ctx=1024)
    served = component(tiny_models, server.url)
    local = component(tiny_models, str(tiny_models.tiny_c))
    assert served.invoke(PROMPT) == local.invoke(PROMPT)
    assert served.get_num_tokens("hello there") == local.get_num_tokens("hello there")


def test_concurrent_searches_run_at_once_each_answering_as_alone(tiny_models, llama_server):
    server = llama_server(tiny_models.tiny_c, parallel=4, ctx=2048)
    llm = component(tiny_models, server.url, iterations=150, max_new_tokens=40)
    prompts = [f"{PROMPT} {i}" for i in range(4)]
    alone = [llm.invoke(p) for p in prompts]
    running, most = 0, 0
    lock = threading.Lock()

    def one(prompt):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return llm.invoke(prompt)
        finally:
            with lock:
                running -= 1

    async def together():
        return await asyncio.gather(*(llm.ainvoke(p) for p in prompts))

    assert asyncio.run(together()) == alone
    aligner = llm._aligner
    assert aligner._lanes == 4  # one lane per server slot: no search waited for another
    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 4


def test_an_unreachable_server_is_a_clear_error_naming_it(tiny_models):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnavailableError, match=rf"{url}.*llama-server -m"):
        component(tiny_models, url).invoke(PROMPT)


def test_a_server_killed_mid_search_fails_it_cleanly_and_the_component_works_again(tiny_models, llama_server):
    server = llama_server(tiny_models.tiny_c, parallel=2, ctx=1024)
    # A tree the weak contexts hold whole: with evictions, what the killed search
    # left cached would change the batches, and so the F32 rounding, of the next one.
    llm = component(tiny_models, server.url, iterations=100, max_new_tokens=60)
    expected = llm.invoke(PROMPT)
    killer = threading.Timer(0.3, server.process.kill)
    killer.start()
    with pytest.raises(ServerUnavailableError, match=server.url):
        llm.invoke(PROMPT)
    killer.join()
    aligner = llm._aligner
    assert len(aligner._free) == aligner._lanes  # every lane given back
    for context in aligner._models.proxy.contexts:
        assert context.n_resident == 0  # the weak branches were freed
    restarted = llama_server(tiny_models.tiny_c, parallel=2, ctx=1024, port=server.port)
    assert restarted.url == server.url
    # Answers again. Not compared with `expected` token for token: the server batches a
    # step's concurrent requests as they arrive, which moves F32 rounding (it failed
    # once in a full run, not alone).
    again = llm.generate([PROMPT]).generations[0][0]
    assert again.text and again.generation_info["cost"]["iterations"] == 100 and expected


def test_a_stalled_server_cannot_outlast_the_timeout(tiny_models, llama_server):
    server = llama_server(tiny_models.tiny_c, parallel=2, ctx=1024)
    llm = component(tiny_models, server.url, iterations=400, max_new_tokens=60, timeout=1.5)
    llm.invoke("warm up", iterations=5)  # the first call asks the server what it serves
    assert seconds_to_time_out_while_stopped(llm, server, stop_after=0.3) < 1.5 + 0.5
    assert llm.invoke(PROMPT, iterations=20)  # works again once the server does


def test_a_context_too_small_for_the_search_is_refused_before_it_starts(tiny_models, llama_server):
    server = llama_server(tiny_models.tiny_c, parallel=4, ctx=256)  # tokens per slot
    llm = component(tiny_models, server.url, max_new_tokens=300)
    with pytest.raises(ContextOverflowError, match=r"llama-server.*-c"):
        llm.invoke(PROMPT)


def test_a_chat_prompt_for_a_model_without_a_chat_template_is_refused(tiny_models, llama_server):
    server = llama_server(tiny_models.tiny_c)  # tiny_c has no template: the server falls back to ChatML
    assert ServerModel(server.url).chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        component(tiny_models, server.url, strong_prompt={"format": "chat"}).invoke(PROMPT)


def test_a_chat_template_the_model_has_is_used(tiny_models, llama_server):
    server = llama_server(tiny_models.tiny_a)  # tiny_a has a ChatML template
    prompt = {"format": "chat", "system": "Be brief."}
    served = component(tiny_models, server.url, strong_prompt=prompt, iterations=10)
    local = component(tiny_models, str(tiny_models.tiny_a), strong_prompt=prompt, iterations=10)
    assert served.invoke(PROMPT) == local.invoke(PROMPT)


def test_the_api_key_is_sent_checked_and_never_shown(tiny_models, llama_server, monkeypatch):
    secret = "k3y-" + "x" * 12
    server = llama_server(tiny_models.tiny_c, api_key=secret)
    monkeypatch.delenv("LLAMA_API_KEY", raising=False)
    with pytest.raises(ServerError, match="refused the API key") as refused:
        component(tiny_models, server.url).invoke(PROMPT)
    assert secret not in str(refused.value)
    llm = component(tiny_models, server.url, api_key=secret, iterations=5)
    assert llm.invoke(PROMPT)
    assert secret not in repr(llm) and secret not in str(llm._identifying_params)
    monkeypatch.setenv("LLAMA_API_KEY", secret)  # the server's own variable works too
    assert component(tiny_models, server.url, iterations=5).invoke(PROMPT) == llm.invoke(PROMPT)


@pytest.mark.parametrize("role", ["weak", "weak_ref"])
def test_only_the_strong_model_may_be_served_and_addresses_are_checked_at_construction(tiny_models, role):
    with pytest.raises(ValueError, match="only the strong model may be served"):
        component(tiny_models, str(tiny_models.tiny_c), **{role: "http://127.0.0.1:8080"})
    for bad in ("http://", "http://127.0.0.1:port"):
        with pytest.raises(ValueError, match="write it as http://HOST:PORT"):
            component(tiny_models, bad)


def test_searches_from_several_processes_share_one_server(tiny_models, llama_server):
    server = llama_server(tiny_models.tiny_c, parallel=2, ctx=1024)
    script = (
        "import sys; from w2s_langchain.llms import W2SAlignedLLM; "
        "print(W2SAlignedLLM(strong=sys.argv[1], weak=sys.argv[2], weak_ref=sys.argv[3], strong_prompt={'format': 'plain'}, "
        "weak_prompt={'format': 'plain'}, weak_ref_prompt={'format': 'plain'}, iterations=40, children=3, chunk_tokens=1, "
        "max_new_tokens=24, n_ctx=512, n_threads=1, seed=3).invoke(sys.argv[4]).encode('utf-8').hex())"
    )
    prompts = [f"{PROMPT} {i}" for i in range(2)]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, server.url, str(tiny_models.tiny_a), str(tiny_models.tiny_b), p],
            stdout=subprocess.PIPE, text=True,
        )
        for p in prompts
    ]
    answers = [bytes.fromhex(child.communicate(timeout=120)[0].strip()).decode("utf-8") for child in children]
    assert all(child.returncode == 0 for child in children)
    local = component(tiny_models, str(tiny_models.tiny_c))
    assert answers == [local.invoke(p) for p in prompts]


def test_the_command_line_takes_a_server_address(tiny_models, llama_server, tmp_path):
    server = llama_server(tiny_models.tiny_c)
    preset = tmp_path / "served.json"
    preset.write_text(json.dumps({
        "strong": {"model": server.url}, "weak": {"model": str(tiny_models.tiny_a)},
        "weak_ref": {"model": str(tiny_models.tiny_b)},
        "search": {"iterations": 10, "children": 3, "chunk_tokens": 1, "max_new_tokens": 12},
        "runtime": {"n_ctx": 512, "n_threads": 1},
    }))
    done = subprocess.run(
        [sys.executable, "-m", "w2s_langchain.cli.align", PROMPT, "--preset", str(preset), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["cost"]["iterations"] == 10
    unreachable = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-m", "w2s_langchain.cli.align", PROMPT, "--preset", str(preset), "--strong", unreachable, "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert unreachable in json.loads(done.stdout)["error"]["message"]


def test_chat_model_and_llamaindex_stream_over_a_served_model(tiny_models, llama_server):
    from langchain_core.messages import HumanMessage
    from llama_index.core.llms import ChatMessage

    from w2s_langchain import ChatW2SAligned, W2SAlignedLlamaIndexLLM

    server = llama_server(tiny_models.tiny_a, ctx=256)  # tiny_a has a chat template
    fields = dict(
        weak=str(tiny_models.tiny_a), weak_ref=str(tiny_models.tiny_b), strong_prompt={"format": "chat"},
        weak_prompt=PLAIN, weak_ref_prompt=PLAIN, iterations=10, children=3, chunk_tokens=1, max_new_tokens=12,
        n_ctx=512, n_threads=1, seed=3,
    )
    served_chat = ChatW2SAligned(strong=server.url, **fields)
    local_chat = ChatW2SAligned(strong=str(tiny_models.tiny_a), **fields)
    question = [HumanMessage("Once upon a time")]
    assert "".join(c.content for c in served_chat.stream(question)) == local_chat.invoke(question).content
    assert served_chat.get_num_tokens_from_messages(question) == local_chat.get_num_tokens_from_messages(question)
    index_llm = W2SAlignedLlamaIndexLLM(strong=server.url, **fields)
    # What a search can use of the server's slot (256), not the weak models' n_ctx.
    assert index_llm.metadata.context_window == index_llm.context_window() <= 256
    streamed = list(index_llm.stream_chat([ChatMessage(role="user", content="Once upon a time")]))
    assert streamed[-1].message.content == local_chat.invoke(question).content


# --- faults a real server shows: restarts, stalls, concurrency (see also test_server_faults.py) ---


def test_ctx_is_per_slot_and_the_server_gets_it_times_the_slots(tiny_models, llama_server):
    # llama-server splits -c among its slots: -c 2048 --parallel 4 gave 512 a slot.
    server = llama_server(tiny_models.tiny_c, parallel=4, ctx=512)
    model = ServerModel(server.url)
    assert (model.n_ctx, model.slots) == (512, 4)


def test_a_server_restarted_with_another_model_is_noticed(tiny_models, llama_server):
    # gemma restarted as SmolLM2 on the same port gave garbage answers, no error.
    first = llama_server(tiny_models.tiny_c, parallel=2, ctx=256)
    llm = component(tiny_models, first.url, iterations=10, max_new_tokens=12, n_ctx=256)
    assert llm.invoke(PROMPT) == component(tiny_models, str(tiny_models.tiny_c), iterations=10, max_new_tokens=12).invoke(PROMPT)
    first.stop()
    second = llama_server(tiny_models.tiny_a, parallel=2, ctx=256, port=first.port)  # another vocabulary
    expected = component(tiny_models, str(tiny_models.tiny_a), iterations=10, max_new_tokens=12).invoke(PROMPT)
    assert llm.invoke(PROMPT) == expected
    assert llm.get_num_tokens("hello there") == component(tiny_models, str(tiny_models.tiny_a)).get_num_tokens("hello there")
    # The refusal's own advice: restart with a larger -c. The next call believes the new size.
    slot = ServerModel(second.url).n_ctx  # llama.cpp rounds small sizes up
    roomy = component(tiny_models, second.url, iterations=3, max_new_tokens=slot + 10, n_ctx=512)
    with pytest.raises(ContextOverflowError, match=f"llama-server .* at most {slot} \\(a slot of the llama-server\\)"):
        roomy.invoke(PROMPT)
    second.stop()
    llama_server(tiny_models.tiny_a, parallel=2, ctx=2 * slot, port=first.port)
    with pytest.raises(ContextOverflowError, match=r"tiny_[ab]\.gguf"):  # the server's slot now fits: a weak one does not
        roomy.invoke(PROMPT)


def test_a_server_restarted_mid_search_with_a_model_of_the_same_vocabulary_stops_the_search(tiny_models, llama_server):
    # tiny_a and tiny_b share a vocabulary: every id stays valid, so before the replies'
    # model names were checked the search went on, half one model's answer, half the other's.
    first = llama_server(tiny_models.tiny_a, parallel=2, ctx=256)
    llm = component(tiny_models, first.url, iterations=40, max_new_tokens=20, n_ctx=256)
    llm.invoke(PROMPT, iterations=2)  # the first contact: the server serves tiny_a
    swapped: list[str] = []

    class SwapServerMidSearch(BaseCallbackHandler):
        def on_custom_event(self, name, data, **kwargs):
            if name == "w2s_progress" and data["done"] == 10 and not swapped:
                # The search thread waits here, with no request in flight, while the server restarts.
                first.stop()
                swapped.append(llama_server(tiny_models.tiny_b, parallel=2, ctx=256, port=first.port).url)

    with pytest.raises(ServerUnavailableError, match=r"now serves .*tiny_b\.gguf.*not .*tiny_a\.gguf"):
        llm.invoke(PROMPT, config={"callbacks": [SwapServerMidSearch()]})
    assert swapped == [first.url]
    aligner = llm._aligner
    assert len(aligner._free) == aligner._lanes and all(c.n_resident == 0 for c in aligner._models.proxy.contexts)
    expected = component(tiny_models, str(tiny_models.tiny_b), iterations=40, max_new_tokens=20).invoke(PROMPT)
    assert llm.invoke(PROMPT) == expected  # the next call uses the new model


def test_a_stalled_server_cannot_outlast_the_timeout_of_a_first_call(tiny_models, llama_server):
    # The handshake ignored the timeout: a SIGSTOPped server held the call until resumed.
    server = llama_server(tiny_models.tiny_c, parallel=2, ctx=256)
    llm = component(tiny_models, server.url, timeout=2)
    assert seconds_to_time_out_while_stopped(llm, server) < 2 + 1.0
    assert llm.invoke(PROMPT, iterations=5)


def test_one_searchs_timeout_does_not_fail_the_others_on_the_server(tiny_models, llama_server):
    # Its cut closed every request in flight on the server: the others died as unavailable.
    server = llama_server(tiny_models.tiny_c, parallel=4, ctx=512)
    llm = component(tiny_models, server.url, iterations=60, max_new_tokens=30)
    prompts = [f"{PROMPT} {i}" for i in range(3)]
    alone = [llm.invoke(p) for p in prompts]
    outcomes: dict[int, object] = {}

    def patient(i):
        outcomes[i] = llm.invoke(prompts[i])

    threads = [threading.Thread(target=patient, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    hasty = []
    for _ in range(5):  # timeouts and cancels while the others run
        try:
            llm.invoke(PROMPT, iterations=400, max_new_tokens=60, timeout=0.3)
        except SearchTimeoutError as err:
            hasty.append(err)
    for thread in threads:
        thread.join()
    assert len(hasty) == 5
    assert [outcomes[i] for i in range(3)] == alone


def test_a_branch_may_fill_a_slot_exactly_as_in_process(tiny_models, llama_server):
    server = llama_server(tiny_models.tiny_c, ctx=64)
    context = ServerContext(ServerModel(server.url))
    branch = context.new_branch([5] * (context.n_ctx - 1))
    context.append(branch, [6])  # n_ctx tokens: accepted, as Context accepts them
    with pytest.raises(ContextOverflowError):
        context.append(branch, [7])


def test_served_answers_never_hold_the_marker_tokens_in_process_never_samples(tiny_models, llama_server, tmp_path):
    # llama-server offers user-defined markers ("<tr>") as text; the engine masks them.
    from support.tiny_gguf import MARKERS, write_tiny_model

    marked = write_tiny_model(tmp_path / "marked.gguf", vocab="ab+markers", seed=1)
    server = llama_server(marked, parallel=4, ctx=512)
    settings = dict(iterations=30, children=3, chunk_tokens=1, max_new_tokens=20, seed=1, top_k=0)
    served = component(tiny_models, server.url, **settings).invoke(PROMPT)
    local = component(tiny_models, str(marked), **settings).invoke(PROMPT)
    assert served == local
    assert not any(marker in served for marker in MARKERS)


def test_a_server_elsewhere_gets_its_markers_from_a_local_copy_of_its_model_file(tiny_models, llama_server, tmp_path):
    # A server on another machine names a file this machine cannot read: its markers
    # were unknown, and sampled. served_model_file names a copy here.
    from support.tiny_gguf import MARKERS, write_tiny_model

    (tmp_path / "elsewhere").mkdir()
    served_file = write_tiny_model(tmp_path / "elsewhere" / "marked.gguf", vocab="ab+markers", seed=1)
    copy = write_tiny_model(tmp_path / "marked.gguf", vocab="ab+markers", seed=1)
    server = llama_server(served_file, parallel=4, ctx=512)
    served_file.unlink()  # the server has it loaded; here, /props now names a file that is not
    settings = dict(iterations=30, children=3, chunk_tokens=1, max_new_tokens=20, seed=1, top_k=0)
    local = component(tiny_models, str(copy), **settings).invoke(PROMPT)
    unknown = component(tiny_models, server.url, **settings).invoke(PROMPT)
    assert any(marker in unknown for marker in MARKERS)  # the limit without the copy (docs/serving.md)
    known = component(tiny_models, server.url, served_model_file=str(copy), **settings).invoke(PROMPT)
    assert known == local and not any(marker in known for marker in MARKERS)
    with pytest.raises(ModelLoadError, match=r"served_model_file: .*tiny_c\.gguf has a vocabulary of \d+ tokens, not \d+"):
        component(tiny_models, server.url, served_model_file=str(tiny_models.tiny_c), **settings).invoke(PROMPT)
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)  # nothing writes to it: reading it would wait for ever
    with pytest.raises(ModelLoadError, match=r"served_model_file: .*fifo\.gguf is not a regular file"):
        component(tiny_models, server.url, served_model_file=str(fifo), **settings).invoke(PROMPT)
    with pytest.raises(ValueError, match="served_model_file is for a strong model that a llama-server serves"):
        component(tiny_models, str(copy), served_model_file=str(copy))


def test_idle_lanes_are_freed(tiny_models, llama_server, monkeypatch):
    # Weak-context lanes were kept forever: 24 calls, RSS from 277 MB to 1.78 GB.
    from w2s_langchain.service import aligner as aligner_module

    server = llama_server(tiny_models.tiny_c, parallel=4, ctx=256)
    llm = component(tiny_models, server.url, iterations=40, max_new_tokens=20)

    async def together():
        return await asyncio.gather(*(llm.ainvoke(f"{PROMPT} {i}") for i in range(4)))

    asyncio.run(together())
    assert llm._aligner._lanes == 4
    monkeypatch.setattr(aligner_module, "IDLE_LANE_SECONDS", 0.0)
    llm.invoke(PROMPT, iterations=2)
    assert llm._aligner._lanes == 2  # the first lane stays, and the one just given back

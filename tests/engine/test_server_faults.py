"""The served strong model under faults a real llama-server cannot be made to show:
replies that lie, arrive a byte at a time, never end, or stall one endpoint. A
small fake server (fake_llama_server.py) plays the server; the weak models are the
real tiny GGUF models."""

from __future__ import annotations

import json
import threading
import time

import pytest

from support.fake_llama_server import N_VOCAB, FakeLlamaServer, offered
from support.served import PLAIN, served_component
from w2s_langchain.service.aligner import _server_n_probs
from w2s_langchain.engine.server import ServerContext, ServerModel, connect_server
from w2s_langchain.errors import ChatTemplateError, SearchTimeoutError, ServerError, ServerUnavailableError
from w2s_langchain.llms import W2SAlignedLLM
from w2s_langchain.search import SearchSettings



def component(tiny_models, url: str, **fields) -> W2SAlignedLLM:
    search = dict(iterations=4, children=2, chunk_tokens=1, max_new_tokens=4, n_ctx=256)
    return served_component(tiny_models, url, **{**search, **fields})


def stall(seconds: float):
    return lambda request: time.sleep(seconds)


def timed(call) -> tuple[BaseException | None, float]:
    started = time.perf_counter()
    try:
        call()
    except BaseException as err:  # noqa: BLE001 (what was raised is the point)
        return err, time.perf_counter() - started
    return None, time.perf_counter() - started


# --- hangs ------------------------------------------------------------------------------


def test_the_timeout_covers_the_first_contact_with_the_server(tiny_models):
    # /props delayed 40 s with timeout=2 gave SearchTimeoutError after 40 s.
    with FakeLlamaServer() as fake:
        fake.on("/props", stall(30))
        err, took = timed(lambda: component(tiny_models, fake.url, timeout=2).invoke("Once"))
    assert isinstance(err, SearchTimeoutError) and "/props" in str(err)
    assert took < 2 + 1.5


def test_the_timeout_covers_tokenize_requests(tiny_models):
    with FakeLlamaServer() as fake:
        llm = component(tiny_models, fake.url, timeout=1)
        llm.invoke("Once")  # connected
        fake.on("/tokenize", stall(20))
        err, took = timed(lambda: llm.invoke("Once more"))
    assert isinstance(err, SearchTimeoutError) and "/tokenize" in str(err)
    assert took < 1 + 1.5


def test_a_reply_sent_a_byte_a_second_ends_at_the_request_limit():
    # The limit was per socket read: a byte each second never tripped it.
    with FakeLlamaServer() as fake:
        model = ServerModel(fake.url, timeout=2)
        fake.on("/tokenize", lambda request: request.drip({"tokens": [5] * 50}, every=0.5))
        err, took = timed(lambda: model.tokenize("hello"))
    assert isinstance(err, ServerUnavailableError) and "within 2 s" in str(err)
    assert took < 2 + 1.5


def test_a_stalled_server_does_not_hold_up_the_first_contact_with_another():
    # One process-wide lock was held through the handshake: B waited for A's stall.
    with FakeLlamaServer() as stalled, FakeLlamaServer() as healthy:
        stalled.on("/health", stall(8))
        blocked = threading.Thread(target=lambda: timed(lambda: connect_server(stalled.url)), daemon=True)
        blocked.start()
        time.sleep(0.3)  # A's handshake is under way
        err, took = timed(lambda: connect_server(healthy.url))
    assert err is None and took < 2


# --- one caller's failure is its own ---------------------------------------------------------


def test_one_callers_failed_request_cuts_only_its_own_requests():
    # Each caller's requests were all cut when any caller gave up: one HTTP 500 killed the others.
    def completion(request):
        if request.body.get("prompt") == [66]:  # the doomed caller's branch
            request.reply({"error": {"message": "boom"}}, status=500)
        else:
            time.sleep(0.5)
            request.reply(offered([10, 11]))

    with FakeLlamaServer() as fake:
        model = ServerModel(fake.url)
        fake.on("/completion", completion)
        context = ServerContext(model, n_probs=2)
        results: dict[str, object] = {}

        def run(name, prompt):
            try:
                results[name] = context.next_logits([context.new_branch(prompt) for _ in range(3)])
            except ServerError as err:
                results[name] = err

        others = [threading.Thread(target=run, args=(f"other{i}", [20 + i])) for i in range(3)]
        for thread in others:
            thread.start()
        time.sleep(0.1)
        run("doomed", [66])
        for thread in others:
            thread.join()
    assert "HTTP 500" in str(results["doomed"])
    assert all(not isinstance(results[f"other{i}"], Exception) for i in range(3)), results


def test_one_callers_interrupt_cuts_only_its_own_requests():
    with FakeLlamaServer() as fake:
        model = ServerModel(fake.url)
        fake.on("/completion", lambda request: (time.sleep(0.6), request.reply(offered([10, 11]))))
        patient, hasty = ServerContext(model, n_probs=2), ServerContext(model, n_probs=2)

        def give_up():
            raise SearchTimeoutError("hasty gave up")

        hasty.interrupt = give_up
        rows: list = []
        worker = threading.Thread(target=lambda: rows.append(patient.next_logits([patient.new_branch([5])] * 3)))
        worker.start()
        time.sleep(0.1)
        with pytest.raises(SearchTimeoutError):
            hasty.next_logits([hasty.new_branch([6])] * 3)
        worker.join()
    assert len(rows) == 1 and rows[0].shape == (3, N_VOCAB)


# --- every reply is checked ------------------------------------------------------------------

BAD_COMPLETIONS = {
    "a negative token id": (offered([-1, 10]), r"top_logprobs\[0\]\.id is -1|id is -1"),
    "a token id past the vocabulary": (offered([N_VOCAB]), rf"id is {N_VOCAB}, not an integer from 0 to {N_VOCAB - 1}"),
    "true as a token id": ({"completion_probabilities": [{"top_logprobs": [{"id": True, "logprob": -1, "bytes": [97]}]}]}, "id is True"),
    "a float token id": ({"completion_probabilities": [{"top_logprobs": [{"id": 1.5, "logprob": -1, "bytes": [97]}]}]}, "id is 1.5"),
    "a string token id": ({"completion_probabilities": [{"top_logprobs": [{"id": "3", "logprob": -1, "bytes": [97]}]}]}, "id is '3'"),
    "a positive log-prob": (offered([10], [5.0]), "logprob is 5.0, not a log-probability"),
    "a byte past 255": ({"completion_probabilities": [{"top_logprobs": [{"id": 10, "logprob": -1, "bytes": [300]}]}]}, "bytes is not a list of byte values"),
    "a negative prompt count": ({**offered([10]), "timings": {"prompt_n": -120_000_000_000}}, "prompt_n is -120000000000"),
    "no probabilities": ({"content": "x"}, "no completion_probabilities"),
    "probabilities not a list": ({"completion_probabilities": [{"top_logprobs": 7}]}, "top_logprobs is not a list"),
    "more tokens than asked": (offered(list(range(10, 40))), "not a list of at most 2 entries"),
    "a list, not an object": ([1, 2], "not a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_COMPLETIONS))
def test_a_bad_completion_reply_is_a_server_error_naming_what_was_wrong(case):
    reply, message = BAD_COMPLETIONS[case]
    with FakeLlamaServer() as fake:
        context = ServerContext(ServerModel(fake.url), n_probs=2)
        fake.on("/completion", lambda request: request.reply(reply))
        with pytest.raises(ServerError, match=message):
            context.next_logits([context.new_branch([5])])


def test_a_nan_log_prob_is_a_server_error():
    raw = b'{"completion_probabilities": [{"top_logprobs": [{"id": 10, "logprob": NaN, "bytes": [97]}]}]}'
    with FakeLlamaServer() as fake:
        context = ServerContext(ServerModel(fake.url), n_probs=2)
        fake.on("/completion", lambda request: request.reply(None, raw=raw))
        with pytest.raises(ServerError, match="logprob is nan"):
            context.next_logits([context.new_branch([5])])


@pytest.mark.parametrize("tokens", [[-1], [True], [N_VOCAB + 5], "abc"])
def test_bad_token_ids_from_tokenize_are_a_server_error(tokens):
    with FakeLlamaServer() as fake:
        model = ServerModel(fake.url)
        fake.on("/tokenize", lambda request: request.reply({"tokens": tokens}))
        with pytest.raises(ServerError, match="/tokenize"):
            model.tokenize("hello")


@pytest.mark.parametrize(
    "models, message",
    [
        ({"data": [{"id": "x"}]}, "no meta"),
        ({"data": []}, r"no data\[0\]"),
        ({"data": [{"id": "x", "meta": {"n_vocab": 10**10, "n_ctx_train": 10}}]}, "n_vocab is 10000000000, not an integer from 2 to 1,048,576"),
        ({"data": [{"id": "x", "meta": {"n_vocab": "many", "n_ctx_train": 10}}]}, "n_vocab is 'many'"),
    ],
)
def test_a_server_that_does_not_describe_its_model_is_refused_clearly(models, message):
    with FakeLlamaServer() as fake:
        fake.models = models
        with pytest.raises(ServerError, match=message):
            ServerModel(fake.url)


# --- bounds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("claimed", [None, 16 * 2**30], ids=["endless chunked body", "Content-Length of 16 GB"])
def test_a_reply_larger_than_its_request_needs_is_refused_early(claimed):
    with FakeLlamaServer() as fake:
        model = ServerModel(fake.url)
        fake.on("/tokenize", lambda request: request.endless(claimed))
        err, took = timed(lambda: model.tokenize("hello"))
    assert isinstance(err, ServerError) and "more than such a request needs" in str(err)
    assert took < 5


def test_a_chat_template_with_thousands_of_special_spellings_is_refused_without_asking_each():
    template = "".join(f"<|tok{i}|>" for i in range(5000))
    with FakeLlamaServer(chat_template=template) as fake:
        model = ServerModel(fake.url)
        before = len(fake.seen)
        with pytest.raises(ChatTemplateError, match="5,000 special-token spellings"):
            model.control_texts
        assert len(fake.seen) - before < 10


def test_top_k_0_on_a_large_served_vocabulary_warns():
    with FakeLlamaServer() as fake:
        fake.models["data"][0]["meta"]["n_vocab"] = 262_144
        model = ServerModel(fake.url)
        with pytest.warns(RuntimeWarning, match="top_k=0 asks .* all 262,144 tokens"):
            _server_n_probs(SearchSettings(top_k=0), model)


def test_request_threads_of_forgotten_servers_end():
    # Each (address, key) kept a pool of up to 32 threads forever: 25 keys, 300 threads.
    with FakeLlamaServer() as fake:
        fake.on("/completion", lambda request: (time.sleep(0.05), request.reply(offered([10]))))
        before = threading.active_count()
        for i in range(25):
            model = connect_server(fake.url, api_key=f"key{i}")
            context = ServerContext(model, n_probs=1)
            context.next_logits([context.new_branch([5]) for _ in range(4)])
        time.sleep(0.5)
        assert threading.active_count() - before <= 40


# --- keys --------------------------------------------------------------------------------------


def test_the_environment_key_is_not_sent_to_an_address_from_a_preset_file(tiny_models, tmp_path, monkeypatch):
    secret = "sk-" + "z" * 16
    monkeypatch.setenv("LLAMA_API_KEY", secret)
    with FakeLlamaServer() as fake:
        preset = tmp_path / "shared.json"
        preset.write_text(json.dumps({
            "strong": {"model": fake.url, "prompt": PLAIN}, "weak": {"model": str(tiny_models.tiny_a), "prompt": PLAIN},
            "weak_ref": {"model": str(tiny_models.tiny_b), "prompt": PLAIN},
            "search": {"iterations": 2, "children": 2, "chunk_tokens": 1, "max_new_tokens": 3},
            "runtime": {"n_ctx": 256, "n_threads": 1},
        }))
        from_file = W2SAlignedLLM(preset=str(preset))
        from_file.invoke("Once")
        assert not any(secret in str(r.headers.get("Authorization")) for r in fake.seen)
        direct = W2SAlignedLLM(preset=str(preset), strong=fake.url)  # given directly: sent
        direct.invoke("Once")
        assert any(r.headers.get("Authorization") == f"Bearer {secret}" for r in fake.seen)
        from_file.invoke("Twice")  # its models are shared with `direct`, not its key
        assert from_file._aligner is not direct._aligner


def test_a_step_whose_rows_cannot_fit_is_refused_before_the_search_with_the_numbers(tiny_models):
    # A served n_vocab sizes a dense row per branch: 5e7 made a 3-iteration search take 62 s at 3 GB.
    with FakeLlamaServer() as fake:
        fake.models["data"][0]["meta"]["n_vocab"] = 1_000_000
        llm = component(tiny_models, fake.url, strategy="bon", samples=300)
        with pytest.raises(ValueError, match=r"300 branches over the 1,000,000-token vocabulary .* 2.2 GB"):
            llm.invoke("Once")
        assert not any(r.path == "/completion" and not r.body.get("ignore_eos") for r in fake.seen)

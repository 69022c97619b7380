"""The engine against real llama.cpp, on the tiny generated GGUF models.

Tolerance: the tiny models' weights are F32 and the engine turns flash attention
off, so a forked, batched or rebuilt decode matches a fresh one to float32
rounding (largest difference seen: 1.4e-4 in log-probability, most are 0); we
allow 1e-3. Quantized real models differ more: see test_engine_packaged.py.
"""

from __future__ import annotations

import gc
import threading
import weakref

import llama_cpp
import numpy as np
import pytest

from w2s_langchain.engine import Context, LoadSettings, load_model
from w2s_langchain.errors import ContextFullError, ContextOverflowError, ModelLoadError

TOL = 1e-3
PROMPT = "Once upon a time, the quick brown fox"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def make_context(path, **settings) -> Context:
    settings = {"n_ctx": 256, "n_threads": 1, **settings}
    return Context(load_model(path), **settings)


def fresh_next_logprobs(path, tokens: list[int]) -> np.ndarray:
    """Next-token log-probs after `tokens`, decoded from scratch in a new context."""
    ctx = make_context(path, n_seq_max=1)
    return log_softmax(ctx.next_logits([ctx.new_branch(tokens)])[0])


@pytest.fixture
def tiny(tiny_models):
    return tiny_models.tiny_a


@pytest.fixture
def prompt_tokens(tiny):
    return load_model(tiny).tokenize(PROMPT, add_special=True)


# --- results equal a fresh decode ------------------------------------------------


@pytest.mark.parametrize("undecoded", ["appended", "scored"])
def test_a_fork_shares_only_the_cells_that_were_decoded(tiny, prompt_tokens, undecoded):
    """`append` and the last token of a `score` span leave tokens no cell holds
    yet: a fork copies the decoded cells only and decodes the rest itself."""
    ctx = make_context(tiny)
    branch = ctx.new_branch(prompt_tokens)
    ctx.next_logits([branch])
    more = prompt_tokens[1:4]
    if undecoded == "appended":
        ctx.append(branch, more)
    else:
        ctx.score([branch], [more])
    child = ctx.fork(branch)
    assert child.resident
    (row,) = ctx.next_logits([child])
    assert np.abs(log_softmax(row) - fresh_next_logprobs(tiny, prompt_tokens + more)).max() < TOL


def test_forked_and_extended_branch_matches_fresh_decode(tiny, prompt_tokens):
    ctx = make_context(tiny)
    root = ctx.new_branch(prompt_tokens)
    ctx.next_logits([root])
    left, right = ctx.fork(root), ctx.fork(root)
    continuations = ([5, 17, 42, 99, 7], [300, 3, 3, 120, 64])
    for step in range(5):
        logits = ctx.extend([left, right], [continuations[0][step], continuations[1][step]])
    for branch, cont, row in zip((left, right), continuations, logits):
        assert branch.tokens == tuple(prompt_tokens + cont)
        expected = fresh_next_logprobs(tiny, prompt_tokens + cont)
        np.testing.assert_allclose(log_softmax(row), expected, atol=TOL)
        np.testing.assert_allclose(log_softmax(ctx.next_logits([branch])[0]), expected, atol=TOL)


def test_batch_of_k_sequences_matches_k_separate_decodes(tiny, prompt_tokens):
    rng = np.random.default_rng(0)
    steps = rng.integers(0, 256, size=(6, 4)).tolist()  # 6 steps, 4 branches
    batched = make_context(tiny)
    root = batched.new_branch(prompt_tokens)
    kids = [batched.fork(root) for _ in range(4)]
    for tokens in steps:
        rows = batched.extend(kids, tokens)
    for k in range(4):
        alone = make_context(tiny, n_seq_max=1)
        branch = alone.new_branch(prompt_tokens)
        for tokens in steps:
            row = alone.extend([branch], [tokens[k]])[0]
        np.testing.assert_allclose(log_softmax(rows[k]), log_softmax(row), atol=TOL)


def test_score_equals_token_by_token_logprobs(tiny, prompt_tokens):
    ctx = make_context(tiny)
    root = ctx.new_branch(prompt_tokens)
    spans = [[10, 20, 30], [7], [200, 201, 202, 203, 204, 205]]
    kids = [ctx.fork(root) for _ in spans]
    scores = ctx.score(kids, spans)
    for kid, span, got in zip(kids, spans, scores):
        assert kid.tokens == tuple(prompt_tokens + span)
        expected = [fresh_next_logprobs(tiny, prompt_tokens + span[:i])[t] for i, t in enumerate(span)]
        np.testing.assert_allclose(got, expected, atol=TOL)


def test_scoring_siblings_costs_their_spans_but_their_last_tokens_and_one_shared_token(tiny, prompt_tokens):
    """Forks of one cached branch need the same row (at its last token): it is
    decoded once for all of them; a span's last token predicts nothing scored, so
    it is only appended. Each fork gets exactly what it gets alone."""
    ctx = make_context(tiny)
    root = ctx.new_branch(prompt_tokens)
    ctx.next_logits([root])
    spans = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13]]
    kids = [ctx.fork(root) for _ in spans]
    before = ctx.stats.tokens_decoded, ctx.stats.decode_calls, ctx.stats.tokens_reread
    together = ctx.score(kids, spans)
    assert ctx.stats.tokens_decoded - before[0] == sum(len(s) - 1 for s in spans) + 1
    assert ctx.stats.decode_calls - before[1] == 1
    assert ctx.stats.tokens_reread - before[2] == 1
    for span, got in zip(spans, together):
        (alone,) = ctx.score([ctx.fork(root)], [span])
        np.testing.assert_allclose(got, alone, atol=TOL)


def test_a_spans_last_token_is_decoded_by_the_first_operation_that_needs_its_row(tiny, prompt_tokens):
    ctx = make_context(tiny)
    branch = ctx.new_branch(prompt_tokens)
    ctx.score([branch], [[1, 2, 3]])
    assert ctx.kv_cells_used() == len(prompt_tokens) + 2  # 3 predicts nothing scored: only appended
    kids = [ctx.fork(branch) for _ in range(3)]
    before = ctx.stats.tokens_decoded
    scores = ctx.score(kids, [[4], [5], [6]])
    assert ctx.stats.tokens_decoded - before == 1  # 3, once for the three forks, for its row
    expected = fresh_next_logprobs(tiny, prompt_tokens + [1, 2, 3])
    np.testing.assert_allclose([s[0] for s in scores], expected[[4, 5, 6]], atol=TOL)
    # A branch rebuilt from it copies the cells it holds and decodes the rest, 3 included.
    for kid in kids:
        ctx.release(kid)
    longer = ctx.new_branch(prompt_tokens + [1, 2, 3, 7, 8])
    before = ctx.stats.tokens_decoded
    row = ctx.next_logits([longer])[0]
    assert ctx.stats.tokens_decoded - before == 3
    np.testing.assert_allclose(log_softmax(row), fresh_next_logprobs(tiny, prompt_tokens + [1, 2, 3, 7, 8]), atol=TOL)


def test_branches_rebuilding_the_same_prefix_decode_it_once(tiny, prompt_tokens):
    """Forks of a parked (or evicted) branch and two prompts that share a start:
    each token they share is decoded once, for all of them, with the values each
    would get alone."""
    ctx = make_context(tiny)
    parent = ctx.new_branch(prompt_tokens)
    other = ctx.new_branch(prompt_tokens[:5] + [7, 8])
    before = ctx.stats.tokens_decoded
    ctx.score([parent, other], [[1, 2], [3]])
    # The first 5 once; the spans' last tokens (2 and 3) are only appended.
    assert ctx.stats.tokens_decoded - before == len(prompt_tokens) + 1 + 2
    ctx.park(parent)  # its cells go, but for the 5 that `other` shares
    assert not parent.resident and len(parent) == len(prompt_tokens) + 2
    spans = [[4, 5], [6], [9, 10, 11]]
    kids = [ctx.fork(parent) for _ in spans]
    before = ctx.stats.tokens_decoded, ctx.stats.tokens_refilled, ctx.stats.tokens_reread
    got = ctx.score(kids, spans)
    # `other` still holds the first 5: the rest of the parent is decoded once.
    assert ctx.stats.tokens_refilled - before[1] == len(parent) - 1 - 5
    assert ctx.stats.tokens_decoded - before[0] == len(parent) - 5 + sum(len(s) - 1 for s in spans)
    assert ctx.stats.tokens_reread == before[2]
    for span, lp in zip(spans, got):
        tokens = list(parent.tokens) + span
        expected = [fresh_next_logprobs(tiny, tokens[:i])[tokens[i]] for i in range(len(parent), len(tokens))]
        np.testing.assert_allclose(lp, expected, atol=TOL)


def test_counters_say_what_tokens_were_decoded_for(tiny, prompt_tokens):
    ctx = make_context(tiny, n_seq_max=2)
    a = ctx.new_branch(prompt_tokens)
    ctx.score([a], [[1, 2]])  # a new branch: its prompt is read to fill the cache
    assert (ctx.stats.tokens_refilled, ctx.stats.tokens_reread) == (len(prompt_tokens) - 1, 0)
    ctx.next_logits([a])  # decodes the span's last token, which score only appended
    ctx.score([a], [[3]])  # that token again, for its row
    assert (ctx.stats.tokens_refilled, ctx.stats.tokens_reread) == (len(prompt_tokens) - 1, 1)
    b = ctx.fork(a, 3)
    ctx.fork(b, 2)  # a third sequence id: `a`, the least recently used, is evicted
    assert (ctx.stats.evictions, ctx.stats.evictions_for_seqs, ctx.stats.evictions_for_cells) == (1, 1, 0)
    assert not a.resident
    ctx.score([a], [[4]])  # rebuilt from `b`'s 3 cells, evicting the last fork
    # `a` held the prompt + 3 tokens; its decode starts at 3, its first row at the last token.
    assert ctx.stats.tokens_refilled == len(prompt_tokens) - 1 + len(prompt_tokens) + 3 - 1 - 3
    assert (ctx.stats.evictions, ctx.stats.evictions_for_seqs) == (2, 2)


def test_forks_share_cells_instead_of_copying(tiny, prompt_tokens):
    ctx = make_context(tiny)
    root = ctx.new_branch(prompt_tokens)
    ctx.next_logits([root])
    assert ctx.kv_cells_used() == len(prompt_tokens)
    kids = [ctx.fork(root) for _ in range(5)]
    assert ctx.kv_cells_used() == len(prompt_tokens)
    ctx.extend(kids, [1, 2, 3, 4, 5])
    assert ctx.kv_cells_used() == len(prompt_tokens) + 5


def test_fork_of_a_prefix_then_diverge(tiny, prompt_tokens):
    ctx = make_context(tiny)
    root = ctx.new_branch(prompt_tokens)
    ctx.next_logits([root])
    short = ctx.fork(root, 4)
    row = ctx.extend([short], [77])[0]
    np.testing.assert_allclose(log_softmax(row), fresh_next_logprobs(tiny, prompt_tokens[:4] + [77]), atol=TOL)


# --- recycling, eviction, rebuild ------------------------------------------------


def test_thousands_of_cycles_leave_cells_and_sequence_ids_where_they_started(tiny, prompt_tokens):
    ctx = make_context(tiny, n_seq_max=8)
    root = ctx.new_branch(prompt_tokens)
    ctx.next_logits([root])
    cells, resident, free = ctx.kv_cells_used(), ctx.n_resident, len(ctx._free_seqs)
    rng = np.random.default_rng(1)
    for _ in range(2000):
        a, b = ctx.fork(root), ctx.fork(root)
        ctx.extend([a, b], rng.integers(0, 256, size=2).tolist())
        ctx.score([a], [rng.integers(0, 256, size=3).tolist()])
        ctx.release(a)
        ctx.release(b)
    assert ctx.stats.evictions == 0
    assert (ctx.kv_cells_used(), ctx.n_resident, len(ctx._free_seqs)) == (cells, resident, free)


def test_eviction_when_sequence_ids_run_out_keeps_results(tiny, prompt_tokens):
    ctx = make_context(tiny, n_seq_max=3)
    root = ctx.new_branch(prompt_tokens)
    branches = [ctx.fork(root) for _ in range(8)]  # more branches than sequence ids
    first = [log_softmax(ctx.extend([b], [40 + i])[0]) for i, b in enumerate(branches)]
    assert ctx.stats.evictions > 0 and ctx.n_resident <= 3
    again = [log_softmax(ctx.next_logits([b])[0]) for b in reversed(branches)][::-1]
    for i, (x, y) in enumerate(zip(first, again)):
        np.testing.assert_allclose(x, y, atol=TOL)
        np.testing.assert_allclose(x, fresh_next_logprobs(tiny, prompt_tokens + [40 + i]), atol=TOL)


def test_eviction_when_kv_cells_run_out_keeps_results(tiny, prompt_tokens):
    ctx = make_context(tiny, n_ctx=256, n_seq_max=16)
    assert ctx.n_ctx < 10 * 40  # ten branches of 40 private tokens cannot all stay
    rng = np.random.default_rng(2)
    spans = [rng.integers(0, 256, size=40).tolist() for _ in range(10)]
    branches = [ctx.new_branch(prompt_tokens[:1] + s) for s in spans]
    first = [log_softmax(ctx.next_logits([b])[0]) for b in branches]
    assert ctx.stats.evictions > 0
    assert ctx.kv_cells_used() <= ctx.n_ctx
    for b, span, x in zip(branches, spans, first):
        np.testing.assert_allclose(log_softmax(ctx.next_logits([b])[0]), x, atol=TOL)
        np.testing.assert_allclose(x, fresh_next_logprobs(tiny, prompt_tokens[:1] + span), atol=TOL)


def decode_refusing(times: int | None):
    """llama_decode that answers "no KV slot" (status 1) the first `times` calls, or always."""
    real = llama_cpp.llama_decode
    refused = []

    def decode(handle, batch):
        if times is None or len(refused) < times:
            refused.append(batch.n_tokens)
            return 1
        return real(handle, batch)

    return decode, refused


def test_a_decode_refused_for_want_of_a_kv_slot_is_retried_after_eviction(tiny, prompt_tokens, monkeypatch):
    ctx = make_context(tiny, n_seq_max=4)
    others = [ctx.new_branch(prompt_tokens[:2] + [i]) for i in range(3)]
    ctx.next_logits(others)
    target = ctx.new_branch(prompt_tokens)
    decode, refused = decode_refusing(times=1)
    monkeypatch.setattr(llama_cpp, "llama_decode", decode)
    evictions = ctx.stats.evictions
    row = ctx.next_logits([target])[0]
    monkeypatch.undo()
    assert len(refused) == 1 and ctx.stats.evictions == evictions + 1
    np.testing.assert_allclose(log_softmax(row), fresh_next_logprobs(tiny, prompt_tokens), atol=TOL)


def test_a_decode_refused_with_nothing_left_to_evict_is_a_clear_error(tiny, prompt_tokens, monkeypatch):
    ctx = make_context(tiny, n_seq_max=4)
    others = [ctx.new_branch(prompt_tokens[:2] + [i]) for i in range(3)]
    target = ctx.new_branch(prompt_tokens)
    decode, refused = decode_refusing(times=None)
    monkeypatch.setattr(llama_cpp, "llama_decode", decode)
    with pytest.raises(ContextFullError, match="raise n_ctx"):
        ctx.next_logits([target])
    monkeypatch.undo()
    assert len(refused) >= 1  # tried, evicted what it could, then gave up
    rows = ctx.next_logits(others + [target])  # the context still works
    np.testing.assert_allclose(log_softmax(rows[-1]), fresh_next_logprobs(tiny, prompt_tokens), atol=TOL)


def test_rebuild_reuses_the_longest_cached_prefix(tiny, prompt_tokens):
    ctx = make_context(tiny, n_seq_max=2)
    root = ctx.new_branch(prompt_tokens)
    ctx.next_logits([root])
    child = ctx.fork(root)
    ctx.extend([child], [9])
    ctx.next_logits([root])
    other = ctx.new_branch([1, 2, 3])
    ctx.next_logits([other])  # evicts `child`, the least recently used
    assert not child.resident and root.resident
    before = ctx.stats.tokens_decoded
    row = ctx.next_logits([child])[0]  # copies root's cells, decodes one token
    assert ctx.stats.tokens_decoded - before == 1
    np.testing.assert_allclose(log_softmax(row), fresh_next_logprobs(tiny, prompt_tokens + [9]), atol=TOL)


def test_an_operation_larger_than_the_cache_runs_in_groups(tiny):
    ctx = make_context(tiny, n_seq_max=4)
    rng = np.random.default_rng(3)
    n = ctx.n_ctx // 2 + 4  # two such branches cannot sit in the cache together
    sequences = [rng.integers(0, 256, size=n).tolist() for _ in range(2)]
    rows = ctx.next_logits([ctx.new_branch(seq) for seq in sequences])
    assert ctx.stats.evictions > 0
    for row, seq in zip(rows, sequences):
        np.testing.assert_allclose(log_softmax(row), fresh_next_logprobs(tiny, seq), atol=TOL)


def test_more_branches_than_sequence_ids_in_one_call(tiny, prompt_tokens):
    ctx = make_context(tiny, n_seq_max=2)
    root = ctx.new_branch(prompt_tokens)
    kids = [ctx.fork(root) for _ in range(5)]
    rows = ctx.extend(kids, [1, 2, 3, 4, 5])
    assert ctx.n_resident <= 2
    for row, token in zip(rows, [1, 2, 3, 4, 5]):
        np.testing.assert_allclose(log_softmax(row), fresh_next_logprobs(tiny, prompt_tokens + [token]), atol=TOL)


# --- loading and sharing ---------------------------------------------------------


def test_a_model_is_loaded_once_and_freed_with_its_last_user(tiny_models, tmp_path):
    path = tmp_path / "only_here.gguf"  # a file no other test holds
    path.write_bytes(tiny_models.tiny_b.read_bytes())
    model = load_model(path)
    assert load_model(str(path)) is model
    assert load_model(path, LoadSettings(use_mmap=False)) is not model
    ctx_a, ctx_b = Context(model, n_threads=1), Context(model, n_threads=1)
    assert ctx_a.model is ctx_b.model
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is not None  # the contexts still hold it
    del ctx_a, ctx_b
    gc.collect()
    assert ref() is None


def test_tokens_are_bytes_and_utf8_safe(tiny):
    model = load_model(tiny)
    text = "naïve café: 漢字 🙂 e\u0301"
    tokens = model.tokenize(text)
    assert model.detokenize(tokens).decode("utf-8") == text
    assert model.token_bytes(model.bos) == b""
    # Byte-level tokens split multi-byte characters: a single piece may not be
    # valid UTF-8, which is why the engine hands out bytes.
    pieces = [model.token_bytes(t) for t in model.tokenize("🙂")]
    assert len(pieces) > 1
    with pytest.raises(UnicodeDecodeError):
        pieces[0].decode("utf-8")
    assert model.is_end_of_generation(model.eos)
    assert not model.is_end_of_generation(tokens[0])


def test_chat_template_metadata(tiny_models):
    assert "im_start" in load_model(tiny_models.tiny_a).chat_template
    assert load_model(tiny_models.tiny_b).chat_template is None


# --- bad input -------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        load_model(tmp_path / "nothing.gguf")


def test_not_a_gguf_file(broken_models):
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(broken_models.not_gguf)


def test_truncated_gguf(broken_models):
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(broken_models.truncated)


def test_recurrent_model_is_refused(broken_models):
    with pytest.raises(ModelLoadError, match="recurrent"):
        load_model(broken_models.recurrent)


@pytest.mark.parametrize(
    "settings, name",
    [
        ({"n_ctx": 8}, "n_ctx"),
        ({"n_ctx": 10**7}, "n_ctx"),
        ({"n_ctx": 256.0}, "n_ctx"),
        ({"n_batch": 0}, "n_batch"),
        ({"n_batch": 1024}, "n_batch"),  # more than n_ctx
        ({"n_threads": 0}, "n_threads"),
        ({"n_threads": 100_000}, "n_threads"),
        ({"n_seq_max": 0}, "n_seq_max"),
        ({"n_seq_max": 10_000}, "n_seq_max"),
    ],
)
def test_out_of_range_context_settings(tiny, settings, name):
    with pytest.raises(ValueError, match=name):
        make_context(tiny, **settings)


def test_out_of_range_load_settings():
    with pytest.raises(ValueError, match="n_gpu_layers"):
        LoadSettings(n_gpu_layers=-2)


def test_prompt_longer_than_the_context(tiny):
    ctx = make_context(tiny)
    with pytest.raises(ContextOverflowError, match="does not fit"):
        ctx.new_branch(list(range(ctx.n_ctx + 1)))
    branch = ctx.new_branch(list(range(ctx.n_ctx)))
    with pytest.raises(ContextOverflowError):
        ctx.extend([branch], [1])
    assert len(branch) == ctx.n_ctx  # the failed call changed nothing


def test_bad_calls(tiny, prompt_tokens):
    ctx = make_context(tiny)
    branch = ctx.new_branch(prompt_tokens)
    with pytest.raises(ValueError, match="token ids"):
        ctx.extend([branch], [ctx.model.n_vocab])
    with pytest.raises(ValueError, match="2 tokens"):
        ctx.extend([branch], [1, 2])
    with pytest.raises(ValueError, match="only once"):
        ctx.extend([branch, branch], [1, 2])
    with pytest.raises(ValueError, match="empty branch"):
        ctx.next_logits([ctx.new_branch([])])
    ctx.release(branch)
    with pytest.raises(ValueError, match="released"):
        ctx.extend([branch], [1])


# --- one lock per context ----------------------------------------------------------


def test_concurrent_callers_get_the_results_they_would_get_alone(tiny, prompt_tokens):
    ctx = make_context(tiny, n_seq_max=8)
    root = ctx.new_branch(prompt_tokens)
    rng = np.random.default_rng(4)
    plans = [rng.integers(0, 256, size=30).tolist() for _ in range(4)]
    results: dict[int, np.ndarray] = {}

    def worker(i: int) -> None:
        branch = ctx.fork(root)
        for token in plans[i]:
            row = ctx.extend([branch], [token])[0]
        results[i] = log_softmax(row)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, plan in enumerate(plans):
        np.testing.assert_allclose(results[i], fresh_next_logprobs(tiny, prompt_tokens + plan), atol=TOL)


def test_thousands_of_branches_in_one_operation_on_two_sequence_ids(tiny, prompt_tokens):
    # Groups of n_seq_max ran by recursion, one level per group: 2,100 branches on
    # 2 sequence ids raised RecursionError (as ctypes.ArgumentError) past ~983 groups.
    ctx = make_context(tiny, n_seq_max=2)
    branches = [ctx.new_branch(prompt_tokens[:3]) for _ in range(2100)]
    rows = ctx.next_logits(branches)
    assert rows.shape[0] == 2100
    np.testing.assert_allclose(log_softmax(rows[-1]), fresh_next_logprobs(tiny, prompt_tokens[:3]), atol=1e-4)

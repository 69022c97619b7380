"""Sanity checks for the tiny GGUF generator, through llama.cpp's low-level API.

These only prove that the generated files are what tests expect (they load,
tokenize, decode, and fail as intended); the engine has its own tests.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from support.tiny_gguf import CHATML_TEMPLATE, build_vocab, write_tiny_model

ROUND_TRIP_TEXTS = [
    "",
    "Hello world, the walking dog is in the house.",
    "tabs\tand\nnew lines\n\n  and  double  spaces ",
    "café déjà vu, naïve façade",
    "漢字とかな",
    "emoji 🙂 and 👍🏽 and 👨‍👩‍👧",
    "combining: e\u0301 a\u0308 o\u0303\u0301",
]


@pytest.fixture(scope="module", autouse=True)
def llama_backend() -> None:
    # Idempotent and process-wide; not freed because other tests may use it.
    llama_cpp.llama_backend_init()


@contextmanager
def loaded(path: Path) -> Iterator[llama_cpp.llama_model_p]:
    params = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model, f"llama.cpp could not load {path}"
    try:
        yield model
    finally:
        llama_cpp.llama_model_free(model)


@contextmanager
def context(model: llama_cpp.llama_model_p, n_ctx: int = 64) -> Iterator[llama_cpp.llama_context_p]:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_ctx
    params.n_ubatch = n_ctx
    params.n_threads = 1
    params.n_threads_batch = 1
    ctx = llama_cpp.llama_init_from_model(model, params)
    assert ctx, "llama.cpp could not create a context"
    try:
        yield ctx
    finally:
        llama_cpp.llama_free(ctx)


def tokenize(vocab: llama_cpp.llama_vocab_p, text: str, add_special: bool = False) -> list[int]:
    data = text.encode("utf-8")
    n_max = len(data) + 2  # at most one token per byte, plus BOS
    buf = (llama_cpp.llama_token * n_max)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, False)
    assert n >= 0, f"tokenize failed for {text!r}"
    return list(buf[:n])


def piece(vocab: llama_cpp.llama_vocab_p, token: int) -> bytes:
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    assert n >= 0, f"token {token} has a piece longer than the buffer"
    return buf.raw[:n]


def detokenize(vocab: llama_cpp.llama_vocab_p, tokens: list[int]) -> bytes:
    return b"".join(piece(vocab, t) for t in tokens)


def all_logits(ctx: llama_cpp.llama_context_p, tokens: list[int], n_vocab: int) -> np.ndarray:
    """Decode ``tokens`` as one sequence; logits of every position, (n_tokens, n_vocab)."""
    # A batch larger than n_batch aborts the whole process instead of failing.
    assert len(tokens) <= llama_cpp.llama_n_batch(ctx)
    batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
    try:
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = True
        batch.n_tokens = len(tokens)
        assert llama_cpp.llama_decode(ctx, batch) == 0
        rows = [
            np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
            for i in range(len(tokens))
        ]
        return np.array(rows)  # copies, before the context reuses its buffer
    finally:
        llama_cpp.llama_batch_free(batch)


def entropy_bits(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    return -(p * np.log2(np.where(p > 0, p, 1.0))).sum(axis=-1)


def loads(path: Path) -> bool:
    params = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if model:
        llama_cpp.llama_model_free(model)
    return bool(model)


def test_same_seed_gives_identical_bytes(tmp_path, tiny_models):
    again = write_tiny_model(tmp_path / "a.gguf", vocab="ab", seed=1, chat_template=CHATML_TEMPLATE)
    other_seed = write_tiny_model(tmp_path / "b.gguf", vocab="ab", seed=99, chat_template=CHATML_TEMPLATE)
    assert again.read_bytes() == tiny_models.tiny_a.read_bytes()
    assert other_seed.read_bytes() != again.read_bytes()


def test_files_are_small(tiny_models, broken_models):
    for path in (*vars(tiny_models).values(), broken_models.recurrent):
        assert path.stat().st_size < 300_000, path


@pytest.mark.parametrize(
    ("name", "vocab_name", "has_template"),
    [("tiny_a", "ab", True), ("tiny_b", "ab", False), ("tiny_c", "c", False)],
)
def test_model_loads_with_its_vocabulary(tiny_models, name, vocab_name, has_template):
    expected = build_vocab(vocab_name)
    with loaded(getattr(tiny_models, name)) as model:
        vocab = llama_cpp.llama_model_get_vocab(model)
        assert llama_cpp.llama_vocab_n_tokens(vocab) == expected.n_vocab
        assert llama_cpp.llama_vocab_bos(vocab) == expected.bos_id
        assert llama_cpp.llama_vocab_eos(vocab) == expected.eos_id
        assert llama_cpp.llama_vocab_is_eog(vocab, expected.eos_id)
        assert llama_cpp.llama_vocab_get_attr(vocab, expected.bos_id) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
        assert tokenize(vocab, "hi", add_special=True)[0] == expected.bos_id
        assert not llama_cpp.llama_model_is_recurrent(model)
        template = llama_cpp.llama_model_chat_template(model, None)
        assert (template == CHATML_TEMPLATE.encode()) if has_template else template is None


@pytest.mark.parametrize("name", ["tiny_a", "tiny_c"])
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenize_round_trips_bytes(tiny_models, name, text):
    with loaded(getattr(tiny_models, name)) as model:
        vocab = llama_cpp.llama_model_get_vocab(model)
        assert detokenize(vocab, tokenize(vocab, text)) == text.encode("utf-8")


def test_shared_and_different_vocabularies(tiny_models):
    text = "the walking dog and the world"

    def pieces(path: Path) -> list[bytes]:
        with loaded(path) as model:
            vocab = llama_cpp.llama_model_get_vocab(model)
            return [piece(vocab, t) for t in tokenize(vocab, text)]

    def ids(path: Path) -> list[int]:
        with loaded(path) as model:
            return tokenize(llama_cpp.llama_model_get_vocab(model), text)

    assert ids(tiny_models.tiny_a) == ids(tiny_models.tiny_b)
    assert ids(tiny_models.tiny_a) != ids(tiny_models.tiny_c)
    # Not just other ids: the text is cut into other pieces.
    assert pieces(tiny_models.tiny_a) != pieces(tiny_models.tiny_c)


def test_appending_text_can_merge_across_the_old_boundary(tiny_models):
    with loaded(tiny_models.tiny_a) as model:
        vocab = llama_cpp.llama_model_get_vocab(model)
        head, tail = tokenize(vocab, "walki"), tokenize(vocab, "ng")
        whole = tokenize(vocab, "walking")
    assert whole != head + tail
    assert len(whole) < len(head) + len(tail)


@pytest.mark.parametrize("name", ["tiny_a", "tiny_b", "tiny_c"])
def test_decode_gives_peaked_but_not_one_hot_distributions(tiny_models, name):
    with loaded(getattr(tiny_models, name)) as model, context(model) as ctx:
        vocab = llama_cpp.llama_model_get_vocab(model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        tokens = tokenize(vocab, "Hello world, the walking dog is in the house.", add_special=True)
        logits = all_logits(ctx, tokens, n_vocab)
    assert logits.shape == (len(tokens), n_vocab)
    assert np.isfinite(logits).all()
    entropy = entropy_bits(logits.astype(np.float64))
    assert (entropy > 1.0).all() and (entropy < math.log2(n_vocab) - 0.5).all(), entropy


def test_broken_files_fail_to_load(broken_models):
    assert not loads(broken_models.not_gguf)
    assert not loads(broken_models.truncated)


def test_recurrent_model_loads_as_recurrent(broken_models):
    with loaded(broken_models.recurrent) as model:
        assert llama_cpp.llama_model_is_recurrent(model)

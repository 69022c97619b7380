"""The warped distribution: temperature, top-k, top-p, entropy and the samplers."""

from __future__ import annotations

import numpy as np
import pytest

from w2s_langchain.engine import SamplingSettings, log_softmax_at, warp

LOGITS = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05]))


def test_plain_softmax_when_warping_is_off():
    dist = warp(LOGITS, SamplingSettings(temperature=1.0, top_k=0, top_p=1.0))
    assert list(dist.tokens) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(dist.probs, [0.4, 0.3, 0.15, 0.1, 0.05])
    expected_bits = -sum(p * np.log2(p) for p in [0.4, 0.3, 0.15, 0.1, 0.05])
    assert dist.entropy_bits() == pytest.approx(expected_bits)


def test_top_k_keeps_k_most_likely_and_renormalizes():
    dist = warp(LOGITS, SamplingSettings(temperature=1.0, top_k=2))
    assert list(dist.tokens) == [0, 1]
    np.testing.assert_allclose(dist.probs, [0.4 / 0.7, 0.3 / 0.7])


def test_top_p_keeps_smallest_set_reaching_p():
    # 0.4 + 0.3 = 0.7 < 0.75, so the third token is needed to reach 0.75.
    dist = warp(LOGITS, SamplingSettings(temperature=1.0, top_k=0, top_p=0.75))
    assert list(dist.tokens) == [0, 1, 2]
    # A tiny top_p still keeps the most likely token.
    assert list(warp(LOGITS, SamplingSettings(temperature=1.0, top_p=1e-9)).tokens) == [0]


def test_temperature_sharpens_and_zero_is_greedy():
    cold = warp(LOGITS, SamplingSettings(temperature=0.5, top_k=0))
    warm = warp(LOGITS, SamplingSettings(temperature=1.0, top_k=0))
    assert cold.entropy_bits() < warm.entropy_bits()
    greedy = warp(LOGITS, SamplingSettings(temperature=0.0))
    assert list(greedy.tokens) == [0] and greedy.entropy_bits() == 0.0


def test_prob_of_removed_token_is_zero():
    dist = warp(LOGITS, SamplingSettings(temperature=1.0, top_k=2))
    assert dist.prob(1) == pytest.approx(0.3 / 0.7)
    assert dist.prob(4) == 0.0


def test_sample_distinct_gives_distinct_tokens_and_caps_at_support():
    rng = np.random.default_rng(0)
    dist = warp(LOGITS, SamplingSettings(temperature=1.0, top_k=3))
    for _ in range(50):
        picks = dist.sample_distinct(rng, 3)
        assert sorted(picks) == [0, 1, 2]
    assert len(dist.sample_distinct(rng, 10)) == 3


def test_sampling_follows_the_distribution_and_the_seed():
    dist = warp(LOGITS, SamplingSettings(temperature=1.0, top_k=0))
    draws = [dist.sample(np.random.default_rng(7)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same token
    rng = np.random.default_rng(1)
    counts = np.bincount([dist.sample(rng) for _ in range(4000)], minlength=5) / 4000
    np.testing.assert_allclose(counts, [0.4, 0.3, 0.15, 0.1, 0.05], atol=0.03)


def test_log_softmax_at_matches_numpy():
    logits = np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    expected = logits[3] - np.log(np.exp(logits.astype(np.float64)).sum())
    assert log_softmax_at(logits, 3) == pytest.approx(expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**kwargs)


@pytest.mark.parametrize("top_k", [0, 5, 40, 100])
def test_a_sparse_row_warps_like_its_drawable_tokens_alone(top_k):
    """A server returns only its top tokens (-inf elsewhere): the warp keeps the same
    tokens with the same probabilities as on those tokens alone."""
    rng = np.random.default_rng(0)
    drawable = np.sort(rng.choice(5000, size=60, replace=False))
    row = np.full(5000, -np.inf)
    row[drawable] = rng.normal(size=60) * 3
    settings = SamplingSettings(temperature=0.7, top_k=top_k, top_p=0.9)
    sparse = warp(row, settings)
    alone = warp(row[drawable], settings)
    np.testing.assert_array_equal(sparse.tokens, drawable[alone.tokens])
    np.testing.assert_allclose(sparse.probs, alone.probs, rtol=1e-12)



def allowed_after(pieces: list[bytes], answer: bytes) -> set[bytes]:
    from w2s_langchain.engine.sampling import Utf8Guard

    every = np.arange(len(pieces))
    blocked = set(Utf8Guard(len(pieces)).blocked(answer, every, pieces.__getitem__).tolist())
    return {pieces[t] for t in every if t not in blocked}


def test_utf8_guard_lets_only_valid_continuations_through():
    from w2s_langchain.engine.sampling import incomplete_character, whole_characters

    pieces = [b"a", b"\xab", b"\xe2", b"\x82", b"\xac!", b"\xac\xac", b"", b"\xe2\x82", b"\xed\xa0", b"\xff", b" \xc3"]
    # After whole characters: tokens valid on their own (ending inside a character is fine).
    assert allowed_after(pieces, b"ok") == {b"a", b"\xe2", b"", b"\xe2\x82", b" \xc3"}
    # Inside a 3-byte character: continuation bytes only, as many as it lacks, then
    # valid bytes again; no empty token (the text may not end mid-character).
    assert allowed_after(pieces, b"ok\xe2") == {b"\xab", b"\x82", b"\xac\xac"}
    assert allowed_after(pieces, b"ok\xe2\x82") == {b"\xab", b"\x82", b"\xac!"}
    # After \xed the next byte is 80..9F (no surrogates).
    assert allowed_after(pieces, b"\xed") == {b"\x82"}
    # Nothing can continue: the text may end there (its broken character is then dropped).
    assert allowed_after([b"a", b"", b"\xe2"], b"\xe2") == {b""}
    assert incomplete_character(b"ok\xe2\x82") == b"\xe2\x82" and whole_characters(b"ok\xe2\x82") == b"ok"
    assert incomplete_character("ok\u20ac".encode()) == b"" and incomplete_character(b"\x82") == b""

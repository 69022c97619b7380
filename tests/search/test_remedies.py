"""The over-optimization remedies (search settings, all off by default) on the
tiny models: a KL-style final choice, length-normalized values, and an ensemble
of aligned/reference prompt pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from support.search_models import PROMPT, SMALL, TOL, grown, make_models, stage2_finalists
from w2s_langchain.engine import Context, load_model
from w2s_langchain.prompts import PromptFormat
from w2s_langchain.search import Proxy, SearchModels, SearchSettings, WeakScorer, search
from w2s_langchain.search.strategies import answer_log_prob

# --- KL-style final choice -------------------------------------------------------------


def test_strong_log_prob_is_the_answers_sampling_log_prob(tiny_models):
    result = search(make_models(tiny_models), PROMPT, SearchSettings(**SMALL, strategy="w2s"))
    node = next(n for n in result.tree.walk() if n.chunk.text == result.text and not n.children)
    total, walk = 0.0, node
    while walk.parent is not None:  # each chunk's prior is the geometric mean of its tokens' probabilities
        total += walk.chunk.n_new * math.log(walk.chunk.prior)
        walk = walk.parent
    assert result.strong_log_prob == pytest.approx(total) and total < 0


def test_bon_with_a_kl_weight_trades_value_for_likelihood(tiny_models):
    settings = SearchSettings(**{**SMALL, "seed": 3}, strategy="bon", samples=6)
    plain = search(make_models(tiny_models), PROMPT, settings)
    samples = plain.tree.children
    assert plain.value == max(n.value for n in samples)
    heavy = search(make_models(tiny_models), PROMPT, settings.with_(kl_weight=1000.0))
    assert heavy.strong_log_prob == pytest.approx(max(answer_log_prob(n) for n in samples))
    # The two choices differ on this seed (not on every one), so the weight decided something.
    assert heavy.text != plain.text and heavy.value < plain.value


def test_stage2_with_a_kl_weight_maximizes_value_plus_weighted_log_prob(tiny_models):
    weight = 0.5
    settings = SearchSettings(**{**SMALL, "iterations": 40, "max_new_tokens": 9, "chunk_tokens": 2}, kl_weight=weight)
    result = search(make_models(tiny_models), PROMPT, settings)
    assert result.source == "stage2"
    finalists = [n for n in result.tree.walk() if id(n) in stage2_finalists(result, settings.num_select, True, settings.c)]
    best = max(finalists, key=lambda n: n.eos_value + weight * answer_log_prob(n))
    assert result.text == best.chunk.text and result.value == best.eos_value


# --- length-normalized values ----------------------------------------------------------


def test_length_normalized_value_is_the_per_token_log_ratio(tiny_models):
    proxy = make_models(tiny_models).proxy
    (plain,) = proxy.extend([proxy.start(PROMPT)], [" and then the end"])
    proxy.length_normalized = True
    (state,) = proxy.extend([proxy.start(PROMPT)], [" and then the end"])
    aligned, reference = state.weak
    assert aligned.answer_tokens > 1
    expected = aligned.log_prob / aligned.answer_tokens - reference.log_prob / reference.answer_tokens
    assert state.value == pytest.approx(expected, abs=TOL)
    assert plain.value == pytest.approx(aligned.log_prob - reference.log_prob, abs=TOL)
    assert state.value != pytest.approx(plain.value, abs=TOL)
    # eos-scored: the end token is one more token each model reads.
    ends = []
    for scorer, weak in zip(proxy.scorers, state.weak):
        ctx = Context(scorer.model, n_ctx=512, n_threads=1)
        row = ctx.next_logits([ctx.new_branch(weak.tokens)])[0].astype(np.float64)
        ends.append(row[scorer.model.eos] - row.max() - np.log(np.exp(row - row.max()).sum()))
    (eos_value,) = proxy.eos_values([state])
    assert eos_value == pytest.approx(
        (aligned.log_prob + ends[0]) / (aligned.answer_tokens + 1) - (reference.log_prob + ends[1]) / (reference.answer_tokens + 1),
        abs=TOL,
    )


def test_a_search_with_length_normalized_values_values_its_tree_so(tiny_models):
    settings = SearchSettings(**SMALL, length_normalized=True)
    result = search(make_models(tiny_models), PROMPT, settings)
    leaf = next(n for n in result.tree.walk() if n.proxy is not None and not n.terminal and n.parent is not None)
    aligned, reference = leaf.proxy.weak
    assert leaf.own_value == pytest.approx(
        aligned.log_prob / aligned.answer_tokens - reference.log_prob / reference.answer_tokens, abs=TOL
    )
    assert search(make_models(tiny_models), PROMPT, SearchSettings(**SMALL)).tree_dict() != result.tree_dict()


# --- an ensemble of prompt pairs --------------------------------------------------------


def ensemble_proxy(tiny_models, pairs):
    """tiny_a (aligned) and tiny_b (reference), each in one context, with a prompt pair per entry of `pairs`."""
    aligned_ctx = Context(load_model(tiny_models.tiny_a), n_ctx=512, n_threads=1, n_seq_max=32)
    reference_ctx = Context(load_model(tiny_models.tiny_b), n_ctx=512, n_threads=1, n_seq_max=32)
    scorers = [(WeakScorer(aligned_ctx, a), WeakScorer(reference_ctx, r)) for a, r in pairs]
    return Proxy(*scorers[0], ensemble=tuple(scorers[1:]))


PAIRS = [
    (PromptFormat(format="plain", plain="Kind: {prompt}"), PromptFormat(format="plain", plain="Rude: {prompt}")),
    (PromptFormat(format="plain", plain="Warm words. {prompt}"), PromptFormat(format="plain", plain="Cold words. {prompt}")),
    (PromptFormat(format="plain", plain="{prompt}"), PromptFormat(format="plain", plain="No. {prompt}")),
]


def test_ensemble_value_is_the_mean_of_each_pairs_log_ratio(tiny_models):
    answer = " and then the end"
    singles = []
    for pair in PAIRS:
        proxy = ensemble_proxy(tiny_models, [pair])
        singles.append(proxy.extend([proxy.start(PROMPT)], [answer])[0])
    proxy = ensemble_proxy(tiny_models, PAIRS)
    (off,) = proxy.extend([proxy.start(PROMPT)], [answer])
    assert off.value == pytest.approx(singles[0].value, abs=TOL) and len(off.weak) == 2  # off: the first pair only
    proxy.use_ensemble = True
    (on,) = proxy.extend([proxy.start(PROMPT)], [answer])
    assert len(on.weak) == 6
    assert on.value == pytest.approx(sum(s.value for s in singles) / 3, abs=TOL)
    (eos_on,) = proxy.eos_values([on])
    eos_singles = []
    for pair in PAIRS:
        single = ensemble_proxy(tiny_models, [pair])
        eos_singles.append(single.eos_values(single.extend([single.start(PROMPT)], [answer]))[0])
    assert eos_on == pytest.approx(sum(eos_singles) / 3, abs=TOL)


def test_a_search_with_the_ensemble_reads_every_pair_and_frees_it(tiny_models):
    strong = Context(load_model(tiny_models.tiny_c), n_ctx=512, n_threads=1, n_seq_max=32)
    proxy = ensemble_proxy(tiny_models, PAIRS)
    models = SearchModels(strong, PromptFormat(), proxy)
    off = search(models, PROMPT, SearchSettings(**SMALL))
    on = search(models, PROMPT, SearchSettings(**SMALL, ensemble=True))
    assert on.cost.weak_tokens_scored > 2 * off.cost.weak_tokens_scored
    assert grown(on) != grown(off)
    assert all(c.n_resident == 0 for c in proxy.contexts)
    # Off again: the same tree as before the ensemble ran.
    assert grown(search(models, PROMPT, SearchSettings(**SMALL))) == grown(off)


def test_the_ensemble_needs_more_than_one_pair(tiny_models):
    with pytest.raises(ValueError, match="ensemble_prompts"):
        search(make_models(tiny_models), PROMPT, SearchSettings(**SMALL, ensemble=True))


@pytest.mark.parametrize(
    "changes, message",
    [({"kl_weight": -1.0}, "kl_weight"), ({"length_normalized": 1}, "length_normalized"), ({"ensemble": "yes"}, "ensemble")],
)
def test_bad_remedy_settings(changes, message):
    with pytest.raises(ValueError, match=message):
        SearchSettings(**changes)


# --- the ensemble from a preset ---------------------------------------------------------


def tiny_config(tiny_models, **extra):
    plain = {"format": "plain"}
    return {
        "strong": {"model": str(tiny_models.tiny_c), "prompt": plain},
        "weak": {"model": str(tiny_models.tiny_a), "prompt": plain},
        "weak_ref": {"model": str(tiny_models.tiny_b), "prompt": plain},
        "search": {**SMALL},
        "runtime": {"n_ctx": 512, "n_threads": 1},
        **extra,
    }


@pytest.mark.parametrize(
    "ensemble, message",
    [
        ({"weak": {}}, "must be a list"),
        ([{"weak": {}}], r"ensemble_prompts\[0\] must be an object with exactly"),
        ([{"weak": {"format": "plain"}, "weak_ref": "x"}], r"ensemble_prompts\[0\]"),
        ([{"weak": {"format": "plain"}, "weak_ref": {"format": "plain"}}] * 17, "at most 16"),
    ],
)
def test_bad_ensemble_prompts_in_a_preset(tiny_models, ensemble, message):
    from w2s_langchain.service.aligner import AlignerConfig

    with pytest.raises(ValueError, match=message):
        AlignerConfig.from_dict(tiny_config(tiny_models, ensemble_prompts=ensemble))


def test_a_presets_ensemble_is_averaged_by_the_aligner(tiny_models):
    from w2s_langchain.service.aligner import Aligner, AlignerConfig

    pairs = [{"weak": {"format": "plain", "plain": a.plain}, "weak_ref": {"format": "plain", "plain": r.plain}}
             for a, r in PAIRS[1:]]
    config = AlignerConfig.from_dict(tiny_config(tiny_models, ensemble_prompts=pairs))
    aligner = Aligner(config)
    answer = " and then the end"
    on = aligner.values(PROMPT, [answer], config.search.with_(ensemble=True))[0]
    off = aligner.values(PROMPT, [answer])[0]
    singles = []
    for pair in [(PromptFormat(format="plain"), PromptFormat(format="plain")), *PAIRS[1:]]:
        proxy = ensemble_proxy(tiny_models, [pair])
        singles.append(proxy.extend([proxy.start(PROMPT)], [answer])[0].value)
    assert off == pytest.approx(singles[0], abs=TOL)
    assert on == pytest.approx(sum(singles) / 3, abs=TOL)
    result = aligner.search(PROMPT, config.search.with_(ensemble=True))
    assert result.text and all(c.n_resident == 0 for c in aligner._models.proxy.contexts)


def test_ensemble_prompts_are_not_rendered_while_the_ensemble_is_off(tiny_models):
    """A preset's ensemble prompts may need what its main prompts do not (tiny_b has no
    chat template): with the ensemble off they are never rendered."""
    from w2s_langchain.service.aligner import Aligner, AlignerConfig

    chat = {"format": "chat", "system": "Be kind."}
    config = AlignerConfig.from_dict(tiny_config(tiny_models, ensemble_prompts=[{"weak": chat, "weak_ref": chat}]))
    aligner = Aligner(config)
    assert aligner.search(PROMPT).text
    with pytest.raises(ValueError, match="no chat template"):
        aligner.search(PROMPT, config.search.with_(ensemble=True))


def test_a_weak_prompt_of_ones_own_drops_the_presets_ensemble():
    """The shipped presets turn the ensemble on with paraphrases of their own
    preference: a caller's own aligned or reference prompt is another preference,
    so those paraphrases (and the ensemble) go; asking for the ensemble anyway is
    a clear error, not a silent mix of two preferences."""
    from w2s_langchain.service.aligner import Aligner, load_preset

    preset = load_preset("sentiment")
    assert preset.search.ensemble and len(preset.ensemble_prompts) == 2
    same = preset.with_overrides(models={"weak": "smollm2-135m-instruct"}, search={"iterations": 5})
    assert same.search.ensemble and same.ensemble_prompts == preset.ensemble_prompts
    own = preset.with_overrides(prompts={"weak_ref": {"format": "chat", "system": "You write dull reviews."}})
    assert not own.search.ensemble and own.ensemble_prompts == ()
    insisted = preset.with_overrides(prompts={"weak": {"format": "chat", "system": "Be kind."}}, search={"ensemble": True})
    with pytest.raises(ValueError, match="needs `ensemble_prompts`"):
        Aligner(insisted).values("The film was", [" good."])

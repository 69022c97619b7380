"""`w2s-align check` and its Python functions, on the tiny models (and one
packaged preset on its shipped pairs)."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest

from support.tiny_gguf import write_tiny_preset

from w2s_langchain.cli import align as cli
from w2s_langchain.service.aligner import Aligner, load_preset
from w2s_langchain.engine import Context, load_model
from w2s_langchain.service.preference_check import (
    LabelledPair,
    check_pairs,
    rank_samples,
    read_pairs,
    shipped_pairs,
    wilson_interval,
)
from w2s_langchain.prompts import PromptFormat
from w2s_langchain.search import Proxy, WeakScorer

PROMPT = "Once upon a time"
ANSWERS = [" the cat", " and then", " far away", " a dog sat", " in the end", " we went home"]
TOL = 1e-3


@pytest.fixture
def tiny_preset(tiny_models, tmp_path):
    return write_tiny_preset(tiny_models, tmp_path / "tiny.json", max_new_tokens=8)


def values_by_hand(tiny_models, answers: list[str]) -> list[float]:
    """V of each answer from a proxy built here, one answer at a time."""
    def scorer(path):
        return WeakScorer(Context(load_model(path), n_ctx=512, n_threads=1), PromptFormat(format="plain"))

    proxy = Proxy(scorer(tiny_models.tiny_a), scorer(tiny_models.tiny_b))
    return [proxy.extend([proxy.start(PROMPT)], [a])[0].value for a in answers]


@pytest.fixture
def labelled(tiny_models):
    """Three pairs whose label agrees with V and one whose label disagrees: 75%."""
    values = values_by_hand(tiny_models, ANSWERS[:8])
    pairs, margins = [], []
    for i, (a, b) in enumerate([(0, 1), (2, 3), (4, 5), (1, 2)]):
        high, low = (a, b) if values[a] > values[b] else (b, a)
        chosen, rejected = (low, high) if i == 3 else (high, low)  # the last pair is labelled against V
        pairs.append(LabelledPair(PROMPT, ANSWERS[chosen], ANSWERS[rejected]))
        margins.append(values[chosen] - values[rejected])
    return pairs, margins


def test_agreement_margin_and_most_wrong(tiny_preset, labelled):
    pairs, margins = labelled
    report = check_pairs(Aligner(load_preset(str(tiny_preset))), pairs)
    assert [p.margin for p in report.pairs] == pytest.approx(margins, abs=TOL)
    assert report.agreement == 0.75
    assert report.mean_margin == pytest.approx(sum(margins) / 4, abs=TOL)
    assert report.most_wrong(1)[0].pair == pairs[3] and report.most_wrong(1)[0].margin < 0
    assert (report.low, report.high) == pytest.approx(wilson_interval(3, 4))
    assert report.includes_chance  # 4 pairs cannot tell


def test_a_pair_is_scored_as_a_search_scores_its_answer(tiny_preset, tiny_models):
    aligner = Aligner(load_preset(str(tiny_preset)))
    assert aligner.values(PROMPT, ANSWERS) == pytest.approx(values_by_hand(tiny_models, ANSWERS), abs=TOL)


def test_scoring_pairs_makes_room_for_the_pairs_not_for_the_presets_search(tiny_models, tmp_path, labelled):
    # The check holds a prompt and a few answers at once; it warned that "this search's
    # tree" would be evicted (a search of 1000 iterations) though it runs no search.
    preset = write_tiny_preset(tiny_models, tmp_path / "big_search.json", iterations=1000, chunk_tokens=4)
    pairs, margins = labelled
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = check_pairs(Aligner(load_preset(str(preset))), pairs)
    assert [p.margin for p in report.pairs] == pytest.approx(margins, abs=TOL)


def test_wilson_interval_known_values():
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    low, high = wilson_interval(130, 200)  # 65%
    assert 0.5 < low < 0.65 < high


def test_rank_samples_orders_plain_samples_by_their_value(tiny_preset):
    aligner = Aligner(load_preset(str(tiny_preset)))
    (ranked,) = rank_samples(aligner, [PROMPT], samples=5)
    texts = [a for a, _ in ranked.answers]
    assert 2 <= len(texts) == len(set(texts)) <= 5
    assert [v for _, v in ranked.answers] == sorted((v for _, v in ranked.answers), reverse=True)
    assert [v for _, v in ranked.answers] == pytest.approx(aligner.values(PROMPT, texts), abs=TOL)


def write_pairs(path, pairs, **extra):
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, **extra}) + "\n"
                            for p in pairs))
    return path


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "line 1: not JSON"),
        ('["a"]', "must be an object"),
        ('{"prompt": "p", "chosen": "a"}', "'rejected' must be a non-empty string"),
        ('{"prompt": "p", "chosen": "a", "rejected": "a"}', "the same answer"),
        ('{"prompt": "p", "chosen": "a", "rejected": "b", "split": "train"}', "split must be one of"),
    ],
)
def test_bad_pairs_files(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        read_pairs(path)


def test_a_split_selects_its_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "split": "tune"}\n'
                    '{"prompt": "q", "chosen": "c", "rejected": "d", "split": "heldout"}\n')
    assert [p.prompt for p in read_pairs(path, "heldout")] == ["q"]
    assert len(read_pairs(path)) == 2


def test_cli_check_reports_as_json(tiny_preset, labelled, tmp_path, capsys):
    pairs, margins = labelled
    path = write_pairs(tmp_path / "pairs.jsonl", pairs)
    assert cli.main(["check", "--preset", str(tiny_preset), "--pairs", str(path), "--json", "--show", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["agreement"] == 0.75 and data["pairs"] == 4 and data["includes_chance"]
    assert data["interval_method"] == "Wilson score"
    assert [p["margin"] for p in data["most_wrong"]] == pytest.approx(sorted(margins)[:2], abs=TOL)


def test_cli_check_warns_when_the_interval_includes_chance(tiny_preset, labelled, tmp_path, capsys):
    path = write_pairs(tmp_path / "pairs.jsonl", labelled[0])
    assert cli.main(["check", "--preset", str(tiny_preset), "--pairs", str(path)]) == 0
    out = capsys.readouterr().out
    assert "agrees with the label on 75% of 4 pairs" in out and "WARNING: the interval includes 50%" in out


def test_cli_check_unlabelled_ranks_samples(tiny_preset, capsys):
    assert cli.main(["check", "--preset", str(tiny_preset), "--prompt", PROMPT, "--samples", "4", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "ranked highest:" in out and "ranked lowest:" in out


def test_cli_check_usage_and_input_errors(tiny_preset, tmp_path, capsys):
    assert cli.main(["check", "--preset", str(tiny_preset), "--pairs", "x.jsonl", "--prompt", "p"]) == cli.EXIT_USAGE
    assert cli.main(["check", "--preset", str(tiny_preset), "--pairs", str(tmp_path / "none.jsonl")]) == cli.EXIT_NO_ANSWER
    assert "no such pairs file" in capsys.readouterr().err
    assert cli.main(["check", "--preset", str(tiny_preset)]) == cli.EXIT_NO_ANSWER  # a user's preset ships no pairs
    assert "--pairs FILE" in capsys.readouterr().err


def test_the_prompt_check_is_answered_after_a_double_dash(tiny_preset, capsys):
    assert cli.main(["--preset", str(tiny_preset), "--json", "--strategy", "base", "--", "check"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "check"


@pytest.mark.packaged
def test_shipped_sentiment_pairs_on_the_packaged_preset(packaged_models):
    """The sentiment preset's weak pair on a few of its shipped held-out pairs:
    the check runs end to end on real models, and on pairs whose gold gap is
    wide the pair agrees more often than not (the README quotes the full figure)."""
    config = load_preset("sentiment")
    config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, n_threads=1, n_ctx=1024))
    pairs = read_pairs(shipped_pairs("sentiment"), "heldout")
    report = check_pairs(Aligner(config), pairs[:24])
    assert len(report.pairs) == 24
    assert report.agreement > 0.5

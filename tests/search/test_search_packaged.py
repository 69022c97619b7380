"""End to end on the packaged models: every strategy once, the default preset,
and the `w2s-align` command. Small budgets: these check that the whole path
works on real models, not how well it aligns (benchmarks/ measure that)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from w2s_langchain.cli import align as cli
from w2s_langchain.service.aligner import Aligner, Runtime, load_preset
from w2s_langchain.engine import model as engine_model

pytestmark = pytest.mark.packaged

OPENING = "The hotel room was"


@pytest.fixture(scope="module")
def aligner(packaged_models):
    config = load_preset("sentiment")
    runtime = dataclasses.replace(config.runtime, n_threads=1)
    return Aligner(dataclasses.replace(config, runtime=runtime))


@pytest.mark.parametrize(
    "strategy, settings",
    [
        ("base", {}),
        ("bon", {"samples": 3}),
        ("cbs", {"beam_width": 2, "children": 2, "chunk_tokens": 6}),
        ("w2s", {"iterations": 8, "chunk_tokens": 4}),
    ],
)
def test_every_strategy_on_the_default_preset(aligner, strategy, settings):
    search = aligner.config.search.with_(strategy=strategy, max_new_tokens=16, seed=1, **settings)
    result = aligner.search(OPENING, search)
    assert result.text.strip()
    assert result.cost.strong_tokens_sampled >= len(result.text.split()) > 0
    assert result.finish_reason in ("eos", "length", "stop")
    if strategy != "base":
        assert result.cost.weak_tokens_scored > 0
    # The search freed all it held: the next search starts from a clean cache.
    models = aligner._models
    assert models.strong.n_resident == 0
    assert all(c.n_resident == 0 for c in models.proxy.contexts)


@pytest.mark.parametrize("name, on_by_default", [("sentiment", True), ("polite", True), ("chat", False)])
def test_each_shipped_preset_carries_an_ensemble_that_runs(packaged_models, name, on_by_default):
    """The remedy the quality benchmark kept: the sentiment and polite presets turn it
    on, the chat preset (long RAG prompts, read again by every pair) carries it for
    `ensemble=True`. V reads the ensemble's prompt pairs beside the main one, and a
    search with it runs end to end and frees all it held."""
    config = load_preset(name)
    assert config.search.ensemble is on_by_default and len(config.ensemble_prompts) == 2
    config = dataclasses.replace(config, search=config.search.with_(ensemble=True))
    aligner = Aligner(dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, n_threads=1, n_ctx=1024)))
    answer = " and the staff were kind to us."
    (on,) = aligner.values(OPENING, [answer], config.search)
    (off,) = aligner.values(OPENING, [answer], config.search.with_(ensemble=False))
    assert math.isfinite(on) and math.isfinite(off) and on != off
    result = aligner.search(OPENING, config.search.with_(iterations=2, max_new_tokens=4, seed=1))
    assert result.text and result.cost.weak_tokens_scored > 0
    assert all(c.n_resident == 0 for c in aligner._models.proxy.contexts)


def test_one_weak_model_in_both_roles_is_loaded_once(aligner):
    aligner.search(OPENING, aligner.config.search.with_(strategy="bon", samples=1, max_new_tokens=4))
    scorers = aligner._models.proxy.scorers
    assert scorers[0].context is scorers[1].context  # one context: both roles in one decode
    assert scorers[0].model.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert aligner._models.strong.model.path.name == "gemma-3-270m-q4_k_m.gguf"


def test_same_seed_same_answer_on_real_models(aligner):
    settings = aligner.config.search.with_(iterations=6, chunk_tokens=3, max_new_tokens=9, seed=7)
    assert aligner.search(OPENING, settings).text == aligner.search(OPENING, settings).text


def test_command_line_json_and_tree(packaged_models, tmp_path, capsys):
    tree = tmp_path / "tree.html"
    code = cli.main(
        [OPENING, "--iterations", "5", "--chunk-tokens", "3", "--max-new-tokens", "9", "--n-threads", "1",
         "--n-ctx", "1024", "--json", "--tree", str(tree)]
    )
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(out)
    assert data["strategy"] == "w2s" and data["text"] and data["cost"]["iterations"] == 5
    html = tree.read_text(encoding="utf-8")
    embedded = json.loads(html.split('<script type="application/json" id="tree-data">')[1].split("</script>")[0])
    assert embedded["answer"] == data["text"] and len(embedded["visits"]) == data["cost"]["tree_nodes"]


def test_command_line_prints_answer_and_cost_summary(packaged_models, capsys):
    code = cli.main([OPENING, "--strategy", "bon", "--samples", "2", "--max-new-tokens", "6", "--n-threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0 and out.startswith(OPENING)
    assert "bon:" in err and "weak models read" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["  "], "prompt is empty"),
        (["x", "--preset", "nope"], "unknown preset"),
        (["x", "--strategy", "mcts"], "unknown strategy"),
        (["x", "--children", "0"], "children"),
        (["x", "--temperature", "-1"], "temperature"),
        (["x", "--top-p", "0"], "top_p"),
        (["x", "--strong", "no-such-model"], "unknown model"),
        (["x", "--max-new-tokens", "5000", "--n-ctx", "1024"], "needs at least"),
    ],
)
def test_command_line_bad_input(argv, message, capsys):
    loaded_before = len(engine_model._loaded)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if message not in ("needs at least", "unknown model"):  # these need the model file to decide
        assert len(engine_model._loaded) == loaded_before


def test_runtime_rejects_unknown_preset_keys(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"strong": {"model": "x"}, "weak": {"model": "x"}, "weak_ref": {"model": "x"}, "serch": {}}))
    with pytest.raises(ValueError, match="serch"):
        load_preset(str(bad))
    assert Runtime().n_seq_max == 64

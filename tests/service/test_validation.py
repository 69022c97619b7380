"""Settings and prompts are checked before any work: every field when a component
is made, with a message naming it, and the prompt before any model loads."""

from __future__ import annotations

import json

import pytest

from w2s_langchain.service.aligner import Aligner, AlignerConfig, Role
from w2s_langchain.llms import W2SAlignedLLM


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("strong", "", "strong must name a model"),
        ("weak_ref", " ", "weak_ref must name a model"),
        *[("n_ctx", v, "n_ctx must be an integer from 16 to") for v in (0, -1, 10**9)],
        *[("n_seq_max", v, "n_seq_max must be an integer from 1 to") for v in (0, -1, 10**9)],
        ("n_seq_max", True, "n_seq_max must be a number, got True"),
        ("n_ctx", False, "n_ctx must be a number"),
        ("n_batch", 0, "n_batch must be an integer from 1"),
        ("n_threads", 10**6, "n_threads must be an integer from 1 to 512"),
        ("n_gpu_layers", -2, "n_gpu_layers must be an integer >= -1"),
        ("seed", -1, "seed must be a whole number >= 0"),
    ],
)
def test_every_field_is_checked_at_construction(field, value, message):
    with pytest.raises(ValueError, match=message):  # pydantic's ValidationError is a ValueError
        W2SAlignedLLM(**{field: value})


def test_a_preset_with_a_bad_runtime_setting_is_refused_when_read():
    with pytest.raises(ValueError, match="n_seq_max must be an integer"):
        AlignerConfig.from_dict(
            {"strong": {"model": "a.gguf"}, "weak": {"model": "b.gguf"}, "weak_ref": {"model": "b.gguf"},
             "runtime": {"n_seq_max": 0}}
        )


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a\ud800b", "lone surrogate"),
        ([{"role": "user", "content": ["not", "text"]}], "text content"),
    ],
)
def test_the_prompt_is_checked_before_any_model_loads(tiny_models, prompt, message):
    strong, weak = Role(str(tiny_models.tiny_c)), Role(str(tiny_models.tiny_a))
    aligner = Aligner(AlignerConfig(strong=strong, weak=weak, weak_ref=weak))
    with pytest.raises(ValueError, match=message):
        aligner.search(prompt)
    assert aligner._models is None  # nothing was loaded


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", float("inf"), "temperature must be a finite number"),
        ("temperature", float("nan"), "temperature must be a finite number"),
        ("samples", 100_000, r"samples=100,000 is more than the 4,096"),
        ("iterations", 10**9, r"iterations=1,000,000,000 is more than the 1,000,000"),
    ],
)
def test_settings_past_what_a_search_can_use_are_refused_with_the_numbers(field, value, message):
    with pytest.raises(ValueError, match=message):
        W2SAlignedLLM(**{field: value})


def test_branches_grown_at_once_are_bounded_by_their_product():
    with pytest.raises(ValueError, match=r"grows 50,000 branches at once .* more than the 4,096"):
        W2SAlignedLLM(parallel_leaves=1000, children=50)
    with pytest.raises(ValueError, match=r"cbs search .* grows 20,000 branches"):
        W2SAlignedLLM(strategy="cbs", beam_width=200, children=100)


def test_a_preset_path_starting_with_a_dot_is_the_local_file(tmp_path, monkeypatch):
    from w2s_langchain.service.aligner import load_preset

    mine = {"strong": {"model": "mine.gguf"}, "weak": {"model": "b.gguf"}, "weak_ref": {"model": "c.gguf"}}
    (tmp_path / "chat").write_text(json.dumps(mine))  # the name of a packaged preset
    monkeypatch.chdir(tmp_path)
    assert load_preset("./chat").strong.model == "mine.gguf"
    assert load_preset("chat").strong.model != "mine.gguf"  # a bare name is the packaged one


@pytest.mark.parametrize(
    "text, message",
    [("[1, 2]", "holds a JSON list, not an object"), ("[" * 100_000 + "]" * 100_000, "nested too deeply"), ("{", "Expecting")],
)
def test_a_preset_file_that_is_not_a_preset_object_is_a_clear_error(tmp_path, text, message):
    from w2s_langchain.service.aligner import load_preset

    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_preset(str(path))


SECRET = "sk-" + "q" * 20


@pytest.mark.parametrize("component", ["W2SAlignedLLM", "ChatW2SAligned", "W2SAlignedLlamaIndexLLM"])
def test_the_api_key_is_a_secret_in_every_dump(component):
    import w2s_langchain

    llm = getattr(w2s_langchain, component)(strong="http://127.0.0.1:8080", api_key=SECRET)
    assert llm.api_key.get_secret_value() == SECRET
    shown = [repr(llm), str(llm.model_dump()), llm.model_dump_json()]
    if component == "W2SAlignedLlamaIndexLLM":  # LlamaIndex's own serialisation
        shown += [llm.to_json(), str(llm.to_dict())]
    assert all(SECRET not in text for text in shown)


def test_a_key_read_from_a_file_loses_its_newline_and_a_key_with_a_line_break_inside_is_refused_unshown():
    llm = W2SAlignedLLM(strong="http://127.0.0.1:8080", api_key=SECRET + "\n")
    assert llm._config.runtime.api_key.get_secret_value() == SECRET
    with pytest.raises(ValueError, match="line breaks") as refused:
        W2SAlignedLLM(strong="http://127.0.0.1:8080", api_key="sk-ab\ncd-" + SECRET)
    assert SECRET not in str(refused.value) and "cd-" not in str(refused.value)


def test_an_address_with_credentials_is_refused_without_showing_them():
    with pytest.raises(ValueError, match="carries credentials") as refused:
        W2SAlignedLLM(strong=f"http://user:{SECRET}@127.0.0.1:8080")
    assert SECRET not in str(refused.value)


def test_the_environment_key_goes_only_to_an_address_given_directly(tmp_path, monkeypatch):
    from w2s_langchain.service.aligner import load_preset

    monkeypatch.setenv("LLAMA_API_KEY", SECRET)
    path = tmp_path / "shared.json"
    path.write_text(json.dumps({"strong": {"model": "http://elsewhere.example:8080"}, "weak": {"model": "b.gguf"},
                                "weak_ref": {"model": "c.gguf"}}))
    from_file = load_preset(str(path))
    assert from_file.runtime.server_api_key(not from_file.strong_from_preset_file) is None
    direct = from_file.with_overrides(models={"strong": "http://mine.example:8080"})
    assert direct.runtime.server_api_key(not direct.strong_from_preset_file) == SECRET
    # A component's `strong` field is given directly; only the preset's address is not.
    assert not W2SAlignedLLM(preset=str(path), strong="http://mine.example:8080")._config.strong_from_preset_file
    assert W2SAlignedLLM(preset=str(path))._config.strong_from_preset_file
    # A key given with the preset (or the component) goes wherever the preset says: it was meant for it.
    keyed = from_file.with_overrides(runtime={"api_key": "sk-for-that-server"})
    assert keyed.runtime.server_api_key(False) == "sk-for-that-server"

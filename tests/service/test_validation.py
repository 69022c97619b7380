"""Settings and prompts are checked before any work: every field when a component
is made, with a message naming it, and the prompt before any model loads."""

from __future__ import annotations

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

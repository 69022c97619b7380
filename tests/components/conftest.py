"""The components on the tiny models: make_llm and make_chat build them with small
searches, any field overridden."""

from __future__ import annotations

import pytest

from support.components import CHAT, PLAIN
from w2s_langchain.chat_models import ChatW2SAligned
from w2s_langchain.llms import W2SAlignedLLM


@pytest.fixture
def make_llm(tiny_models):
    def make(**fields):
        settings = dict(
            strong=str(tiny_models.tiny_c), weak=str(tiny_models.tiny_a), weak_ref=str(tiny_models.tiny_b),
            strong_prompt=PLAIN, weak_prompt=PLAIN, weak_ref_prompt=PLAIN,
            iterations=6, children=3, chunk_tokens=3, max_new_tokens=12, n_ctx=512, n_threads=1, seed=3,
        )
        if "max_tokens" in fields:  # the same setting under its other name
            del settings["max_new_tokens"]
        return W2SAlignedLLM(**{**settings, **fields})

    return make


@pytest.fixture
def make_chat(tiny_models):
    def make(**fields):
        settings = dict(
            strong=str(tiny_models.tiny_a), weak=str(tiny_models.tiny_a), weak_ref=str(tiny_models.tiny_a),
            strong_prompt=CHAT, weak_prompt={"format": "chat", "system": "Be warm."},
            weak_ref_prompt={"format": "chat", "system": "Be cold."},
            iterations=4, children=2, chunk_tokens=3, max_tokens=9, n_ctx=512, n_threads=1, seed=2,
        )
        return ChatW2SAligned(**{**settings, **fields})

    return make

"""The components' fields are made at import (from the settings' declarations), so
type checkers and IDEs read them from w2s_langchain/_component/fields.pyi: it
must be current and name every field with its type."""

from __future__ import annotations

import ast

from support.field_stub import STUB, stub_text
from w2s_langchain._component.fields import AlignedModelSettings
from w2s_langchain.chat_models import ChatW2SAligned
from w2s_langchain.llamaindex_llm import W2SAlignedLlamaIndexLLM
from w2s_langchain.llms import W2SAlignedLLM


def test_the_stub_is_current():
    assert STUB.read_text() == stub_text(), "run: PYTHONPATH=. python tests/support/field_stub.py"


def test_the_stub_declares_every_field_of_every_component():
    (stub_class,) = [node for node in ast.parse(STUB.read_text()).body if isinstance(node, ast.ClassDef)]
    declared = [node.target.id for node in stub_class.body if isinstance(node, ast.AnnAssign)]
    assert declared == list(AlignedModelSettings.model_fields)
    for component in (W2SAlignedLLM, ChatW2SAligned, W2SAlignedLlamaIndexLLM):
        assert set(declared) <= set(component.model_fields)
        for name in declared:
            assert component.model_fields[name].annotation == AlignedModelSettings.model_fields[name].annotation

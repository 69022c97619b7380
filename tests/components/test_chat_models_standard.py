"""LangChain's standard tests for chat models (langchain-tests, pinned in the
test extra) on the packaged SmolLM2-135M-Instruct, with a small search budget.
Features we do not offer (tools, structured output, media) are switched off
through the suite's own flags."""

from __future__ import annotations

import inspect

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from w2s_langchain.chat_models import ChatW2SAligned

# Small and quick; n_threads=1 because CI machines share their cores.
PARAMS = {"preset": "chat", "iterations": 3, "chunk_tokens": 6, "n_threads": 1, "n_ctx": 1024}


class _Flags:
    @property
    def chat_model_class(self):
        return ChatW2SAligned

    @property
    def chat_model_params(self) -> dict:
        return PARAMS

    @property
    def standard_chat_model_params(self) -> dict:
        # No timeout or retries: a local llama.cpp call has no network to wait on.
        return {"temperature": 0, "max_tokens": 24, "stop": []}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True


def _async_tests_marked(cls: type) -> type:
    """The suite's async cases are plain `async def` tests, which pytest-asyncio
    runs unmarked only in its auto mode (pyproject.toml here). pytest does not read
    that file when started from another project or with another config file, so
    they are marked here. The suite's own functions get the mark (it adds to their
    marks in place): a copy would count as an override, which the suite forbids."""
    for name, test in inspect.getmembers(cls, inspect.iscoroutinefunction):
        if name.startswith("test_"):
            pytest.mark.asyncio(loop_scope="function")(test)
    return cls


@_async_tests_marked
class TestChatW2SAlignedUnit(_Flags, ChatModelUnitTests):
    pass


@_async_tests_marked
@pytest.mark.packaged
@pytest.mark.usefixtures("packaged_models")
class TestChatW2SAlignedIntegration(_Flags, ChatModelIntegrationTests):
    pass

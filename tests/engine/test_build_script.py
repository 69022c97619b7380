""".ci/build-llama-server reads llama-cpp-python's version with the interpreter
that has the package, wherever it is started from."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "build-llama-server"
VERSION = importlib.metadata.version("llama-cpp-python")


def run_script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    # A cached build, so the script only has to find it: no download, no compiler.
    binary = tmp_path / f"llama-server-{VERSION}" / "build" / "bin" / "llama-server"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LLAMA_SERVER_CACHE": str(tmp_path)}
    return subprocess.run(["bash", str(SCRIPT)], env={**base, **env}, capture_output=True, text=True)


def test_the_version_comes_from_the_interpreter_given(tmp_path):
    # PATH holds only the system's python3, which lacks the package.
    done = run_script(tmp_path, PYTHON=sys.executable)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"llama-server-{VERSION}/build/bin/llama-server")


def test_the_active_virtual_environment_is_used(tmp_path):
    done = run_script(tmp_path, VIRTUAL_ENV=sys.prefix)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(not shutil.which("python3", path="/usr/bin:/bin"), reason="no system python3")
def test_an_interpreter_without_the_package_is_a_clear_error(tmp_path):
    probe = subprocess.run(["/usr/bin/python3", "-c", "import llama_cpp"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("the system python3 has llama-cpp-python")
    done = run_script(tmp_path, PYTHON="/usr/bin/python3")
    assert done.returncode == 1 and done.stdout == ""
    assert "has no llama-cpp-python" in done.stderr and "PYTHON=" in done.stderr

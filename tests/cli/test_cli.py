"""The command line on the tiny models: stopping a search from outside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from support.tiny_gguf import write_tiny_preset
from w2s_langchain.cli import align as cli

ENDLESS = ["--iterations", "1000000", "--chunk-tokens", "1", "--max-new-tokens", "100", "--n-threads", "1"]


@pytest.fixture
def tiny_preset(tiny_models, tmp_path):
    return write_tiny_preset(tiny_models, tmp_path / "tiny.json")


def _as_a_terminal_would() -> None:
    """A child's Ctrl-C as from a terminal: a shell starts background jobs (a CI
    step, `cmd &`) with SIGINT ignored, and the tests' children would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_the_search_and_exits_cleanly(tiny_preset):
    proc = subprocess.Popen(
        [sys.executable, "-m", "w2s_langchain.cli.align", "Once upon a time", "--preset", str(tiny_preset), *ENDLESS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_as_a_terminal_would,
    )
    # Wait until the models are mapped (imports done, main() running), however slow
    # a loaded machine makes the start; then it searches without end.
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    while proc.poll() is None and "tiny_c.gguf" not in maps.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    started = time.perf_counter()
    _, err = proc.communicate(timeout=30)
    assert time.perf_counter() - started < 2.0
    assert proc.returncode == 130
    assert "interrupted" in err and "Traceback" not in err


def test_timeout_with_and_without_a_partial_answer(tiny_preset, capsys):
    argv = ["Once upon a time", "--preset", str(tiny_preset), *ENDLESS, "--timeout", "1"]
    assert cli.main(argv) == 1
    assert "timeout of 1.0 s" in capsys.readouterr().err
    assert cli.main(argv + ["--partial-answer"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Once upon a time") and len(out.strip()) > len("Once upon a time")
    assert "cut short (timeout)" in err


# --- Ctrl-C while the models load ----------------------------------------------------
# The interrupt is sent from the first line llama.cpp logs inside a load: Python then
# runs its handler inside llama.cpp's log callback, where ctypes used to drop the
# KeyboardInterrupt and the run went on to a full answer.

INTERRUPT_DURING_LOAD = """
import logging, os, signal, sys
from w2s_langchain.engine.model import _init_backend
_init_backend()  # first: only lines logged from inside a load send the signal

class CtrlCAtTheFirstLogLine(logging.Handler):
    sent = False
    def emit(self, record):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)

log = logging.getLogger("w2s_langchain.llama_cpp")
log.setLevel(logging.DEBUG)
log.addHandler(CtrlCAtTheFirstLogLine())
if sys.argv[1] == "cli":
    from w2s_langchain.cli import align as cli
    sys.exit(cli.main(["Once upon a time", "--preset", sys.argv[2], "--iterations", "2"]))
from w2s_langchain.llms import W2SAlignedLLM
try:
    print(W2SAlignedLLM(preset=sys.argv[2], iterations=2).invoke("Once upon a time"))
except KeyboardInterrupt:
    print("KeyboardInterrupt", file=sys.stderr)
    sys.exit(130)
"""


@pytest.mark.parametrize("how", ["cli", "invoke"])
def test_ctrl_c_while_models_load_stops_the_run(tiny_preset, how):
    child = subprocess.run(
        [sys.executable, "-c", INTERRUPT_DURING_LOAD, how, str(tiny_preset)], capture_output=True, text=True, timeout=120,
        preexec_fn=_as_a_terminal_would,
    )
    assert child.returncode == 130, child.stdout + child.stderr
    assert child.stdout == ""  # no answer
    assert ("interrupted" if how == "cli" else "KeyboardInterrupt") in child.stderr
    assert "Exception ignored" not in child.stderr and "Traceback" not in child.stderr


# --- Ctrl-C during the first imports -----------------------------------------------------
# The console scripts start in w2s_langchain.cli.launch (standard library only); the
# command's own module imports numpy, llama.cpp and pydantic. Ctrl-C in those ~0.7 s
# printed a traceback and, with --json, no JSON.

INTERRUPT_DURING_IMPORTS = """
import importlib.abc, os, signal, sys
trigger = sys.argv[1]

class CtrlCWhenImported(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == trigger:
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlCWhenImported())
from w2s_langchain.cli import launch
assert trigger not in sys.modules
sys.argv = sys.argv[2:]
sys.exit(getattr(launch, sys.argv[0].replace("-", "_"))())
"""


@pytest.mark.parametrize(
    "imported, command",
    [
        ("numpy", ["w2s-align", "Once upon a time", "--json"]),
        ("llama_cpp", ["w2s-align", "Once upon a time"]),
        ("w2s_langchain.models.registry", ["w2s-models", "list"]),
    ],
)
def test_ctrl_c_during_the_first_imports_ends_the_command_cleanly(imported, command):
    child = subprocess.run(
        [sys.executable, "-c", INTERRUPT_DURING_IMPORTS, imported, *command], capture_output=True, text=True, timeout=120,
        preexec_fn=_as_a_terminal_would,
    )
    assert child.returncode == 130, child.stdout + child.stderr
    assert "Traceback" not in child.stderr
    if "--json" in command:
        assert json.loads(child.stdout) == {"error": {"type": "KeyboardInterrupt", "message": "interrupted", "exit_code": 130}}
    else:
        assert child.stdout == "" and child.stderr.strip() == f"{command[0]}: interrupted"


def test_the_console_scripts_start_in_the_launcher():
    scripts = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"w2s-models": "w2s_langchain.cli.launch:w2s_models", "w2s-align": "w2s_langchain.cli.launch:w2s_align"}


# --- the tree file, and errors as JSON ---------------------------------------------------

SHORT = ["--iterations", "2", "--n-threads", "1"]


@pytest.mark.parametrize("where", ["a missing directory", "a directory"])
def test_a_tree_path_that_cannot_be_written_fails_before_any_model_loads(tmp_path, capsys, where):
    preset = tmp_path / "absent.json"  # models that do not exist: the tree's check must come first
    absent = {"model": str(tmp_path / "absent.gguf")}
    preset.write_text(json.dumps({"strong": absent, "weak": absent, "weak_ref": absent}))
    tree = tmp_path / "no such folder" / "tree.html" if where == "a missing directory" else tmp_path
    assert cli.main(["Once", "--preset", str(preset), "--tree", str(tree), *SHORT]) == 1
    err = capsys.readouterr().err
    assert f"--tree {tree}" in err and "absent.gguf" not in err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (writes fail with ENOSPC)")
def test_a_tree_that_fails_to_write_at_the_end_still_gives_the_answer(tiny_preset, capsys):
    argv = ["Once upon a time", "--preset", str(tiny_preset), *SHORT, "--tree", "/dev/full"]
    assert cli.main(argv) == 3
    out, err = capsys.readouterr()
    assert out.startswith("Once upon a time") and len(out.strip()) > len("Once upon a time")
    assert "the tree was not written to /dev/full: No space left on device" in err
    assert cli.main(argv + ["--json"]) == 3
    data = json.loads(capsys.readouterr().out)
    assert data["text"] and data["error"]["exit_code"] == 3 and "No space left" in data["error"]["message"]


@pytest.mark.parametrize(
    "extra, code, error_type",
    [
        (["--strong", "no-such-model"], 1, "UnknownModelError"),
        (["--iterations", "many"], 2, "_UsageError"),
        (["--n-ctx", "0"], 1, "ValueError"),
        ([*ENDLESS, "--timeout", "0.3"], 1, "SearchTimeoutError"),
    ],
)
def test_json_errors_are_json(tiny_preset, capsys, extra, code, error_type):
    assert cli.main(["Once upon a time", "--preset", str(tiny_preset), "--json", *extra]) == code
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["type"] == error_type and error["exit_code"] == code and error["message"]


def test_selection_is_a_flag_and_a_preset_key(tiny_preset, tmp_path, capsys):
    assert cli.main(["Once upon a time", "--preset", str(tiny_preset), "--selection", "uct", "--iterations", "3",
                     "--n-threads", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["selection"] == "uct"
    preset = json.loads(tiny_preset.read_text())
    preset["search"]["selection"] = "puct"
    puct_preset = tmp_path / "puct.json"
    puct_preset.write_text(json.dumps(preset))
    assert cli.main(["Once upon a time", "--preset", str(puct_preset), "--iterations", "3", "--n-threads", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["selection"] == "puct"
    assert cli.main(["Once upon a time", "--preset", str(tiny_preset), "--selection", "alphazero"]) != 0
    assert "selection must be one of ea-puct, puct, uct" in capsys.readouterr().err


def test_parallel_leaves_is_a_flag_and_a_preset_key(tiny_preset, tmp_path, capsys):
    argv = ["Once upon a time", "--iterations", "9", "--n-threads", "1"]
    assert cli.main([*argv, "--preset", str(tiny_preset), "--parallel-leaves", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"]["parallel_leaves"] == 4
    assert data["cost"]["iterations"] == 9 and data["cost"]["steps"] < 9
    preset = json.loads(tiny_preset.read_text())
    preset["search"]["parallel_leaves"] = 2
    two_leaves = tmp_path / "two_leaves.json"
    two_leaves.write_text(json.dumps(preset))
    assert cli.main([*argv, "--preset", str(two_leaves)]) == 0
    assert "9 iterations in 5 steps" in capsys.readouterr().err  # the root, then 2 leaves at a time
    assert cli.main([*argv, "--preset", str(tiny_preset), "--parallel-leaves", "0"]) == 1
    assert "parallel_leaves must be a whole number >= 1" in capsys.readouterr().err


def test_a_tree_path_that_is_a_pipe_is_refused_before_any_model_loads(tmp_path, capsys):
    preset = tmp_path / "absent.json"
    absent = {"model": str(tmp_path / "absent.gguf")}
    preset.write_text(json.dumps({"strong": absent, "weak": absent, "weak_ref": absent}))
    pipe = tmp_path / "tree.html"
    os.mkfifo(pipe)  # writing it after the search waited for a reader forever: no answer printed
    assert cli.main(["Once", "--preset", str(preset), "--tree", str(pipe), *SHORT]) == 1
    err = capsys.readouterr().err
    assert f"--tree {pipe} is a pipe" in err and "absent.gguf" not in err


@pytest.mark.parametrize("preset_text", ["[1, 2]", "[" * 100_000 + "]" * 100_000])
def test_json_errors_are_json_for_preset_files_that_are_not_presets(tmp_path, capsys, preset_text):
    preset = tmp_path / "odd.json"
    preset.write_text(preset_text)
    assert cli.main(["Once", "--preset", str(preset), "--json"]) == 1
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["type"] == "ValueError" and str(preset) in error["message"]


def test_json_errors_are_json_even_for_an_error_the_package_did_not_foresee(tiny_preset, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("n_vocab")

    monkeypatch.setattr(cli.Aligner, "search", broken)
    assert cli.main(["Once upon a time", "--preset", str(tiny_preset), "--json"]) == 1
    error = json.loads(capsys.readouterr().out)["error"]
    assert error == {"type": "KeyError", "message": "'n_vocab'", "exit_code": 1}

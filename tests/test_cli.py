"""The command line on the tiny models: stopping a search from outside."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from w2s_langchain import cli

ENDLESS = ["--iterations", "1000000", "--chunk-tokens", "1", "--max-new-tokens", "100", "--n-threads", "1"]


@pytest.fixture
def tiny_preset(tiny_models, tmp_path):
    plain = {"format": "plain"}
    preset = {
        "strong": {"model": str(tiny_models.tiny_c), "prompt": plain},
        "weak": {"model": str(tiny_models.tiny_a), "prompt": plain},
        "weak_ref": {"model": str(tiny_models.tiny_b), "prompt": plain},
        "search": {"children": 3, "seed": 1},
        "runtime": {"n_ctx": 512},
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(preset))
    return path


def test_ctrl_c_stops_the_search_and_exits_cleanly(tiny_preset):
    proc = subprocess.Popen(
        [sys.executable, "-m", "w2s_langchain.cli", "Once upon a time", "--preset", str(tiny_preset), *ENDLESS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(3)  # imports and tiny models load well within this; then it searches without end
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    started = time.perf_counter()
    _, err = proc.communicate(timeout=30)
    assert time.perf_counter() - started < 2.0
    assert proc.returncode == 130
    assert "interrupted" in err and "Traceback" not in err


def test_timeout_with_and_without_a_partial_answer(tiny_preset, capsys):
    argv = ["Once upon a time", "--preset", str(tiny_preset), *ENDLESS, "--timeout", "0.3"]
    assert cli.main(argv) == 1
    assert "timeout of 0.3 s" in capsys.readouterr().err
    assert cli.main(argv + ["--partial-answer"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Once upon a time") and len(out.strip()) > len("Once upon a time")
    assert "cut short (timeout)" in err

"""Every example runs, end to end on the packaged models, with a tiny search budget."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.packaged


@pytest.mark.parametrize(
    "script",
    ["lcel_chain.py", "rag_pipeline.py", "llamaindex_query.py", "streaming_progress.py", "async_batch.py", "served_strong_model.py"],
)
def test_example_runs(script, packaged_models, llama_server_binary):
    env = {**os.environ, "W2S_ITERATIONS": "2", "W2S_THREADS": "1", "LLAMA_SERVER": str(llama_server_binary)}
    done = subprocess.run([sys.executable, str(EXAMPLES / script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.strip()) > 20
    if script == "streaming_progress.py":
        assert "2/2 iterations" in done.stderr
    if script == "rag_pipeline.py":  # a prompt of about 1,000 tokens, no branch evicted, streamed
        assert "RuntimeWarning" not in done.stderr and "first token after" in done.stdout

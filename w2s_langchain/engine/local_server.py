"""Start and stop a `llama-server` on this machine: for trying the served strong
model locally, for the tests and the serving benchmark. (In production the server
runs on its own machine; see docs/serving.md.)

    with LocalLlamaServer("model.gguf", parallel=4) as server:
        llm = W2SAlignedLLM(strong=server.url)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from ..models.registry import user_cache_dir

def find_llama_server() -> Path:
    """The llama-server binary: $LLAMA_SERVER, else one on PATH, else the one
    .ci/build-llama-server built (in $LLAMA_SERVER_CACHE, by default the user cache)."""
    if os.environ.get("LLAMA_SERVER"):
        return Path(os.environ["LLAMA_SERVER"])
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    builds = Path(os.environ.get("LLAMA_SERVER_CACHE") or user_cache_dir())
    built = sorted(builds.glob("llama-server-*/build/bin/llama-server"))
    if built:
        return built[-1]
    raise FileNotFoundError(
        "no llama-server found: build one with `bash .ci/build-llama-server` (about 6-15 minutes on 2 cores), "
        "put one on PATH, or set LLAMA_SERVER to its path"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalLlamaServer:
    """A llama-server child process serving one GGUF file on 127.0.0.1.

    `parallel` slots, each holding `ctx` tokens (default: the model's training
    context). llama-server's `-c` is the KV cache of all slots together, split
    evenly among them, so the server is started with `-c ctx * parallel`.
    Flash attention is off, as in this package's own contexts, so that on the
    same model the server's probabilities match the in-process engine's."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        parallel: int = 1,
        ctx: int | None = None,
        threads: int = 1,
        port: int | None = None,
        api_key: str | None = None,
        binary: str | os.PathLike[str] | None = None,
        log: str | os.PathLike[str] | None = None,
        options: Sequence[str] = (),
    ):
        self.model = Path(model)
        self.parallel = parallel
        self.ctx = ctx
        self.threads = threads
        self.port = port or free_port()
        self.api_key = api_key
        self.binary = Path(binary) if binary else find_llama_server()
        self.log = Path(log) if log else None
        self.options = list(options)
        """More llama-server options, e.g. ["--ubatch-size", "1"]."""
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> LocalLlamaServer:
        """Start it and wait until /health answers ok."""
        command = [
            str(self.binary), "-m", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
            "-t", str(self.threads), "--parallel", str(self.parallel), "-fa", "off", "--no-webui",
            # Sliding-window models (gemma 3) keep every cell, so a slot can re-use any prefix.
            "--swa-full",
        ]
        if self.ctx:
            command += ["-c", str(self.ctx * self.parallel)]
        command += self.options
        env = dict(os.environ)
        if self.api_key:  # through the environment, so it never shows in the process list
            env["LLAMA_API_KEY"] = self.api_key
        output = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with code {self.process.returncode} while starting: {' '.join(command)}")
            if self._healthy():
                return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"llama-server did not answer /health within {timeout} s")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as reply:
                return reply.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> LocalLlamaServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

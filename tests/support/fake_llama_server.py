"""A stand-in for llama-server that answers just enough of its API to be connected
to, then misbehaves as a test asks: for the replies a real llama-server cannot be
made to send (lies, wrong types, endless bodies, a byte a second).

    with FakeLlamaServer() as fake:
        fake.on("/tokenize", lambda request: request.reply({"tokens": [-1]}))
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

N_VOCAB = 100


def _props(n_ctx: int = 256, slots: int = 2, chat_template: str = "") -> dict:
    return {
        "default_generation_settings": {"n_ctx": n_ctx},
        "total_slots": slots,
        "chat_template": chat_template,
        "bos_token": "",
        "eos_token": "",
        "model_path": "",
    }


def offered(tokens: list[int], log_probs: list[float] | None = None) -> dict:
    """A /completion reply offering `tokens` (log-probs spread evenly by default)."""
    log_probs = log_probs or [-1.0 - i for i in range(len(tokens))]
    entries = [{"id": t, "logprob": lp, "bytes": [97 + t % 26]} for t, lp in zip(tokens, log_probs)]
    return {"completion_probabilities": [{"top_logprobs": entries}], "timings": {"prompt_n": 1}}


class Request:
    """One request to the fake server, and the ways to answer it."""

    def __init__(self, handler: BaseHTTPRequestHandler, body: Any):
        self.handler, self.body = handler, body
        self.path = handler.path
        self.headers = handler.headers

    def reply(self, data: Any, status: int = 200, raw: bytes | None = None) -> None:
        payload = raw if raw is not None else json.dumps(data).encode()
        self.handler.send_response(status)
        self.handler.send_header("Content-Type", "application/json")
        self.handler.send_header("Content-Length", str(len(payload)))
        self.handler.end_headers()
        self.handler.wfile.write(payload)

    def drip(self, data: Any, every: float = 1.0) -> None:
        """Send the reply a byte at a time, one byte each `every` seconds."""
        payload = json.dumps(data).encode()
        self.handler.send_response(200)
        self.handler.send_header("Content-Length", str(len(payload)))
        self.handler.end_headers()
        for i in range(len(payload)):
            self.handler.wfile.write(payload[i : i + 1])
            self.handler.wfile.flush()
            time.sleep(every)

    def endless(self, claimed_length: int | None = None) -> None:
        """A body that never ends (chunked), or claims `claimed_length` bytes."""
        self.handler.send_response(200)
        if claimed_length is not None:
            self.handler.send_header("Content-Length", str(claimed_length))
        else:
            self.handler.send_header("Transfer-Encoding", "chunked")
        self.handler.end_headers()
        chunk = b"[" * 65536
        while True:
            if claimed_length is None:
                self.handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            else:
                self.handler.wfile.write(chunk)


Behaviour = Callable[[Request], None]


class FakeLlamaServer:
    """A threaded HTTP server on 127.0.0.1 speaking a llama-server's API with a
    vocabulary of N_VOCAB tokens; `on(path, behaviour)` changes one endpoint."""

    def __init__(self, **props: Any):
        self.props = _props(**props)
        self.models = {"data": [{"id": "fake.gguf", "meta": {"n_vocab": N_VOCAB, "n_ctx_train": 1024}}]}
        self.behaviours: dict[str, Behaviour] = {}
        self.seen: list[Request] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                request = Request(self, body)
                fake.seen.append(request)
                try:
                    fake.behaviours.get(self.path, fake.default)(request)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = handle_one

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def on(self, path: str, behaviour: Behaviour) -> FakeLlamaServer:
        self.behaviours[path] = behaviour
        return self

    def default(self, request: Request) -> None:
        """What a healthy llama-server answers (for this fake vocabulary)."""
        path, body = request.path, request.body or {}
        if path == "/health":
            request.reply({"status": "ok"})
        elif path == "/props":
            request.reply(self.props)
        elif path == "/v1/models":
            request.reply(self.models)
        elif path == "/tokenize":
            request.reply({"tokens": [3 + ord(c) % 90 for c in body["content"]]})
        elif path == "/detokenize":
            request.reply({"content": "".join(chr(97 + t % 26) for t in body["tokens"])})
        elif path == "/completion" and body.get("ignore_eos"):
            request.reply({"generation_settings": {"logit_bias": [{"token": 2, "bias": None}]}})
        elif path == "/completion":
            request.reply(offered(list(range(10, 10 + min(body.get("n_probs", 10), 20)))))
        else:
            request.reply({"error": {"message": "not found"}}, status=404)

    def __enter__(self) -> FakeLlamaServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

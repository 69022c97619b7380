"""A model served by llama.cpp's `llama-server`, driven over its native HTTP API.

`ServerModel` answers what the search asks of a model's vocabulary (tokenize, a
token's bytes, end of generation, chat template, context size) from the server's
`/tokenize`, `/detokenize`, `/props`, `/v1/models` and `/completion`. `ServerContext`
has the branch interface of `Context`: a branch is a token list kept here, and
`next_logits` asks the server for each branch's next-token distribution
(`/completion` with `n_predict: 1`, `n_probs` and `cache_prompt`, so a slot re-reads
only what its cache lacks), all branches at once, so that the server batches them
across its slots.

Every choice is made by the caller from the distributions returned: on the same
model a search makes the same choices as with the in-process engine.
Only the Python standard library speaks HTTP here.
"""

from __future__ import annotations

import functools
import http.client
import json
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait

import numpy as np

from ..errors import ContextOverflowError, ServerError, ServerUnavailableError
from .context import Branch, ContextStats
from .sampling import Utf8Guard

# llama-server's own template when a model has none (common/chat.cpp): seeing it means
# the model brought no chat template, which a chat prompt must be refused for.
_FALLBACK_CHATML = (
    "{%- for message in messages -%}\n"
    "  {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- '<|im_start|>assistant\n' -}}\n"
    "{%- endif -%}"
)
# Special-token spellings a chat template writes: "<|im_start|>", "<start_of_turn>", "[INST]".
_SPECIAL_SPELLING = re.compile(r"<\|?[A-Za-z0-9_.:|-]{1,40}\|?>|\[/?[A-Z_]{2,20}\]")
# Seconds between looks at the caller's interrupt while requests are in flight.
_POLL = 0.05
# Seconds the first request to a server may take.
_FIRST_CONTACT = 10.0
_HOW_TO_START = (
    "start one with `llama-server -m MODEL.gguf --host 127.0.0.1 --port 8080 --parallel 4` "
    "and wait until GET /health answers {\"status\": \"ok\"} (see docs/serving.md)"
)


def is_server_url(name: str) -> bool:
    """Whether a model name is the address of a llama-server (http:// or https://)."""
    return isinstance(name, str) and name.lower().startswith(("http://", "https://"))


def check_server_url(url: str) -> urllib.parse.SplitResult:
    """The parts of a server address, or a ValueError saying how to write one."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not a server address: {url!r}; write it as http://HOST:PORT")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"bad port in server address {url!r}; write it as http://HOST:PORT") from None
    return parts


class _Http:
    """JSON over HTTP to one server. A request that is in flight when the caller
    gives up is cut by closing its socket (llama-server then drops the task)."""

    def __init__(self, url: str, api_key: str | None, timeout: float):
        parts = check_server_url(url)
        self.url = url.rstrip("/")
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._base = parts.path.rstrip("/")
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self._open: set[http.client.HTTPConnection] = set()
        self._open_lock = threading.Lock()

    def request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        kind = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        conn = kind(self._host, self._port, timeout=timeout or self.timeout)
        with self._open_lock:
            self._open.add(conn)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, self._base + path, body=data, headers=self._headers)
            response = conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as err:
            raise ServerUnavailableError(
                f"the llama-server at {self.url} did not answer {method} {path} ({type(err).__name__}: {err}); "
                f"if it is not running, {_HOW_TO_START}"
            ) from None
        finally:
            with self._open_lock:
                self._open.discard(conn)
            conn.close()
        if response.status != 200:
            raise _http_error(self.url, path, response.status, payload)
        try:
            return json.loads(payload)
        except ValueError:
            raise ServerError(f"the server at {self.url} answered {path} with something that is not JSON: is it llama-server?") from None

    def cut_all(self) -> None:
        """Close the sockets of every request in flight: their threads return at once."""
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            if conn.sock is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _http_error(url: str, path: str, status: int, payload: bytes) -> ServerError:
    try:
        message = json.loads(payload)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = payload[:200].decode("utf-8", errors="replace")
    if status == 401:
        return ServerError(f"the llama-server at {url} refused the API key ({message}): set api_key to its --api-key")
    if status == 503:
        return ServerUnavailableError(f"the llama-server at {url} is not ready ({message}): wait until GET /health answers ok")
    return ServerError(f"the llama-server at {url} answered {path} with HTTP {status}: {message}")


class ServerModel:
    """The vocabulary and limits of the model a llama-server serves. Asks the server
    once when made (refusing one that is unreachable or still loading); token
    facts learned later are kept. `timeout`: seconds one request may take (a
    search's own timeout cuts it sooner); `max_requests`: requests in flight at once."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 300.0, max_requests: int = 32):
        self._http = _Http(url, api_key, timeout)
        self.url = self._http.url
        # An address where nothing answers (a host that drops packets) fails in seconds, not `timeout`.
        health = self._http.request("GET", "/health", timeout=_FIRST_CONTACT)
        if health.get("status") != "ok":
            raise ServerUnavailableError(f"the llama-server at {self.url} is not ready: /health answered {health}")
        props = self._http.request("GET", "/props")
        info = self._http.request("GET", "/v1/models")["data"][0]
        self.n_vocab = int(info["meta"]["n_vocab"])
        self.n_ctx_train = int(info["meta"]["n_ctx_train"])
        self.n_ctx = int(props["default_generation_settings"]["n_ctx"])
        """Tokens one slot holds: the longest prompt + answer a branch may reach."""
        self.slots = int(props["total_slots"])
        """Requests the server decodes together (its --parallel)."""
        template = props.get("chat_template") or None
        self.chat_template = None if template is not None and template.strip() == _FALLBACK_CHATML.strip() else template
        self.bos = self._special_id(props.get("bos_token", ""))
        self.eos = self._special_id(props.get("eos_token", ""))
        self.adds_bos = self.bos >= 0 and self.tokenize("a", add_special=True)[:1] == [self.bos]
        self._end_of_generation = self._ask_end_of_generation_ids()
        self.plain_token = self.tokenize("a")[0]
        """A token that is one whole character (see ServerContext.next_logits)."""
        self._bytes: dict[int, bytes] = {}
        self._texts: dict[int, str] = {}
        self._pool = ThreadPoolExecutor(max_workers=max_requests, thread_name_prefix="w2s-server")

    @property
    def name(self) -> str:
        return f"the llama-server at {self.url}"

    def __repr__(self) -> str:
        return f"ServerModel({self.url!r}, n_vocab={self.n_vocab}, n_ctx={self.n_ctx}, slots={self.slots})"

    def _special_id(self, text: str) -> int:
        if not text:
            return -1
        tokens = self.tokenize(text, parse_special=True)
        return tokens[0] if len(tokens) == 1 else -1

    def _ask_end_of_generation_ids(self) -> frozenset[int]:
        """With ignore_eos, llama-server biases every end-of-generation token to -inf
        and lists them in the request's generation settings: the only place its API
        names them all."""
        prompt = [self.bos] if self.bos >= 0 else self.tokenize("a")
        reply = self.request("/completion", {"prompt": prompt, "n_predict": 1, "ignore_eos": True, "temperature": 0})
        biases = reply.get("generation_settings", {}).get("logit_bias", [])
        ids = {int(b["token"]) for b in biases if isinstance(b, dict) and "token" in b}
        ids |= {int(b[0]) for b in biases if isinstance(b, list) and b}
        return frozenset(ids | ({self.eos} if self.eos >= 0 else set()))

    def request(self, path: str, body: dict) -> dict:
        return self._http.request("POST", path, body)

    # --- what prompts.render and the strong sampler need of a model -----------

    def tokenize(self, text: str | bytes, *, add_special: bool = False, parse_special: bool = False) -> list[int]:
        content = text.decode("utf-8") if isinstance(text, bytes) else text
        if not content:
            return [self.bos] if add_special and self.adds_bos else []
        reply = self.request("/tokenize", {"content": content, "add_special": add_special, "parse_special": parse_special})
        return [int(t) for t in reply["tokens"]]

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (b"" for control tokens), as the server
        reported them when it offered the token."""
        piece = self._bytes.get(token)
        if piece is None:  # never offered by the server (not sampled here): its text is all we can ask
            piece = b"" if token in self._end_of_generation else self.token_text(token).encode("utf-8")
            self._bytes[token] = piece
        return piece

    def token_text(self, token: int) -> str:
        """A token's text, special tokens spelled out ("<|im_end|>")."""
        if token not in self._texts:
            self._texts[token] = self.request("/detokenize", {"tokens": [int(token)]}).get("content", "")
        return self._texts[token]

    def is_end_of_generation(self, token: int) -> bool:
        return token in self._end_of_generation

    @functools.cached_property
    def control_texts(self) -> tuple[str, ...]:
        """The special tokens' texts a prompt can hold: BOS, EOS, the end-of-generation
        tokens, and every spelling in the chat template that the tokenizer reads as
        one special token (the server cannot list a vocabulary's token attributes)."""
        candidates = set(_SPECIAL_SPELLING.findall(self.chat_template or ""))
        texts = {self.token_text(t) for t in {self.bos, self.eos, *self._end_of_generation} if t >= 0}
        for text in candidates:
            if len(self.tokenize(text, parse_special=True)) == 1 and len(self.tokenize(text)) > 1:
                texts.add(text)
        return tuple(sorted((t for t in texts if t), key=len, reverse=True))

    # The server offers control tokens' bytes as b"": ServerContext takes them out of
    # each row itself, so the sampler has nothing more to remove.
    never_sampled = np.zeros(0, dtype=np.int64)

    @functools.cached_property
    def utf8_guard(self) -> Utf8Guard:
        """Which tokens may follow an answer's bytes and keep it valid UTF-8 (learned
        from the tokens the server offers, whose bytes it sent)."""
        return Utf8Guard(self.n_vocab)

    def learn(self, offered: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """The ids and log-probs of one position's `top_logprobs`, keeping each
        token's bytes; tokens that an answer must never hold (control tokens other
        than end of generation: their bytes are empty) are dropped."""
        ids, log_probs = [], []
        for entry in offered:
            token, log_prob = int(entry["id"]), entry.get("logprob")
            piece = bytes(entry.get("bytes") or [])
            self._bytes.setdefault(token, piece)
            if log_prob is None or (not piece and token not in self._end_of_generation):
                continue
            ids.append(token)
            log_probs.append(float(log_prob))
        return np.array(ids, dtype=np.int64), np.array(log_probs, dtype=np.float64)

    def run_all(self, bodies: list[dict], interrupt: Callable[[], None] | None) -> list[dict]:
        """POST every body to /completion at once; `interrupt` is called while they
        run, and when it raises, the requests in flight are cut and it propagates."""
        futures: list[Future] = [self._pool.submit(self.request, "/completion", body) for body in bodies]
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=_POLL, return_when=FIRST_EXCEPTION)
                for future in done:
                    future.result()  # a failed request raises here
                if pending and interrupt is not None:
                    interrupt()
        except BaseException:
            for future in futures:
                future.cancel()
            self._http.cut_all()
            raise
        return [future.result() for future in futures]


_servers: dict[tuple[str, str | None], ServerModel] = {}
_servers_lock = threading.Lock()


def connect_server(url: str, api_key: str | None = None) -> ServerModel:
    """The `ServerModel` of a server address and key, shared process-wide (as
    `load_model` shares a loaded file): what it learns of the vocabulary is kept."""
    key = (url.rstrip("/"), api_key)
    with _servers_lock:
        if key not in _servers:
            _servers[key] = ServerModel(url, api_key=api_key)
        return _servers[key]


class ServerContext:
    """Branches of one prompt on a llama-server: `Context`'s branch interface, with
    the KV cache on the server (each request re-uses the longest prefix a slot holds).

    `n_probs`: how many of the most likely next tokens each step returns; the
    sampler draws among them, so it must cover top_k (set by the caller)."""

    def __init__(self, model: ServerModel, *, n_probs: int = 64, seed: int | None = None):
        self.model = model
        self.n_ctx = model.n_ctx
        self.n_probs = n_probs
        self.reuse_prefixes = True
        self.rng = np.random.default_rng(seed)
        self.stats = ContextStats()
        self.interrupt: Callable[[], None] | None = None
        self._stats_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ServerContext({self.model.url!r}, n_ctx={self.n_ctx})"

    def new_branch(self, tokens: list[int]) -> Branch:
        tokens = [int(t) for t in tokens]
        self._check_length(tokens)
        return Branch(tokens)

    def fork(self, branch: Branch, n_tokens: int | None = None) -> Branch:
        n = len(branch) if n_tokens is None else n_tokens
        if not 0 <= n <= len(branch):
            raise ValueError(f"cannot fork {n} tokens of a branch of {len(branch)}")
        return Branch(branch._tokens[:n])

    def append(self, branch: Branch, tokens: list[int]) -> None:
        grown = branch._tokens + [int(t) for t in tokens]
        self._check_length(grown)
        branch._tokens = grown

    def park(self, branch: Branch) -> None:
        """Nothing to give up here: the server's slots hold the prefixes."""

    def release(self, branch: Branch) -> None:
        branch._released = True

    def next_logits(self, branches: list[Branch]) -> np.ndarray:
        """Each branch's next-token log-probs, shape (len(branches), n_vocab): the
        `n_probs` most likely tokens as the server computed them (plain softmax),
        -inf elsewhere. One /completion per branch, all in flight together."""
        for b in branches:
            if not len(b):
                raise ValueError("an empty branch has no next-token logits: start it with at least one token")
        bodies = [
            {
                "prompt": list(b._tokens),
                "n_predict": 1,
                "n_probs": min(self.n_probs, self.model.n_vocab),
                "cache_prompt": self.reuse_prefixes,
                # The server's own pick is not used, but it decides whether the reply
                # carries the probabilities: not for an end-of-generation token, nor for
                # one that ends inside a UTF-8 character. So it is made to pick a plain
                # ASCII token; a bias acts on its pick, not on the probabilities returned.
                "temperature": 0,
                "logit_bias": [[self.model.plain_token, 1e6]],
                "return_tokens": True,
            }
            for b in branches
        ]
        started = time.perf_counter()
        replies = self.model.run_all(bodies, self.interrupt)
        rows = np.full((len(branches), self.model.n_vocab), -np.inf)
        for row, body, reply in zip(rows, bodies, replies):
            ids, log_probs = self.model.learn(reply["completion_probabilities"][0]["top_logprobs"])
            row[ids] = log_probs
            self._count(len(body["prompt"]), reply)
        with self._stats_lock:
            self.stats.decode_calls += len(bodies)  # requests: the server decides how it batches them
            self.stats.decode_seconds += time.perf_counter() - started
        return rows

    def _count(self, n_prompt: int, reply: dict) -> None:
        read = int(reply.get("timings", {}).get("prompt_n", n_prompt))
        with self._stats_lock:
            self.stats.tokens_decoded += read
            self.stats.tokens_reused += max(n_prompt - read, 0)

    def _check_length(self, tokens: list[int]) -> None:
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"{len(tokens)} tokens do not fit a slot of {self.model.name} ({self.n_ctx} tokens): "
                "start the server with a larger -c (tokens per slot), lower max_new_tokens "
                "or shorten the prompt"
            )

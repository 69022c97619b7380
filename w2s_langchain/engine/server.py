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

A server is another process, perhaps another machine: every reply is checked
(`_Reply`) before use, every request is bounded in time (the call's deadline, and
`timeout` for the request as a whole, not per socket read) and in size, and a
caller that gives up cuts only its own requests.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import http.client
import itertools
import json
import math
import re
import socket
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..deadline import Deadline, current_deadline
from ..errors import ChatTemplateError, ContextOverflowError, ModelLoadError, ServerError, ServerUnavailableError
from .context import Branch, ContextStats
from .model import marker_token_ids
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
# Real templates write a few dozen; each costs a /tokenize, so a template with more is refused.
_MAX_SPECIAL_SPELLINGS = 256
# Seconds between looks at the caller's interrupt while requests are in flight.
_POLL = 0.05
# Seconds the first request to a server may take.
_FIRST_CONTACT = 10.0
_HOW_TO_START = (
    "start one with `llama-server -m MODEL.gguf --host 127.0.0.1 --port 8080 --parallel 4` "
    "and wait until GET /health answers {\"status\": \"ok\"} (see docs/serving.md)"
)

# What a reply may claim. The largest vocabularies are about 262k tokens; each branch
# of a step gets a dense row of n_vocab float64, so the bound is also a memory bound.
MAX_N_VOCAB = 1 << 20
_MAX_N_CTX = 1 << 24
_MAX_SLOTS = 4096
# Bytes a reply may take: what the request can need, with room to spare.
_SMALL_REPLY = 64 * 1024  # /health, /v1/models, /detokenize of one token, errors
_PROPS_REPLY = 8 * 1024 * 1024  # /props carries the chat template (chat templates are at most 100k characters)
_COMPLETION_REPLY = 64 * 1024  # a one-token completion, besides its offered tokens
_PER_OFFERED_TOKEN = 1024  # one entry of top_logprobs: id, text, bytes, log-prob
_PER_TOKENIZED_CHAR = 16  # /tokenize: at most about one id per character, each a few digits
_MAX_TOKEN_BYTES = 4096


def is_server_url(name: str) -> bool:
    """Whether a model name is the address of a llama-server (http:// or https://)."""
    return isinstance(name, str) and name.lower().startswith(("http://", "https://"))


def shown_url(url: str) -> str:
    """An address as it may be shown: without any user:password@ part."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def check_server_url(url: str) -> urllib.parse.SplitResult:
    """The parts of a server address, or a ValueError saying how to write one (and
    never repeating credentials written into it)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not a server address: {shown_url(url)!r}; write it as http://HOST:PORT")
    if "@" in parts.netloc:
        raise ValueError(
            f"the server address {shown_url(url)!r} carries credentials (user:password@), which would show in "
            "names, traces and errors and are not sent: write it as http://HOST:PORT and give llama-server's "
            "--api-key as api_key (or LLAMA_API_KEY)"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"the server address {url!r} has a query or fragment: write it as http://HOST:PORT")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"bad port in server address {url!r}; write it as http://HOST:PORT") from None
    return parts


def check_api_key(api_key: str) -> str:
    """The key as sent in the Authorization header: surrounding whitespace (a
    file's last newline) dropped; any other character outside printable ASCII is
    refused, without repeating the key."""
    key = api_key.strip()
    if not key or any(not 0x21 <= ord(c) <= 0x7E for c in key):
        raise ValueError(
            "the API key is empty or holds spaces, line breaks or characters outside printable ASCII, which an "
            "HTTP header cannot carry: give llama-server's --api-key exactly"
        )
    return key


# --- requests ------------------------------------------------------------------------


class _Exchange:
    """One request in flight: its connection, when it must end, and why it was stopped."""

    def __init__(self, ends: float, expiry: str):
        self.ends = ends
        self.expiry = expiry  # "call" (the caller's deadline) or "request" (the request's own limit)
        self.conn: http.client.HTTPConnection | None = None
        self.stopped: str | None = None  # "cut", or the expiry, once stopped
        self._lock = threading.Lock()

    def stop(self, why: str) -> None:
        """Shut its socket: the thread reading it returns at once."""
        with self._lock:
            if self.stopped is None:
                self.stopped = why
            sock = self.conn.sock if self.conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def why_failed(self) -> str | None:
        if self.stopped is None and time.perf_counter() >= self.ends:
            return self.expiry
        return self.stopped


class _Watchdog:
    """Stops each request at its end time: a socket timeout bounds one read, which a
    server sending a byte at a time never trips. One thread for every request."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Exchange]] = []
        self._live = 0  # requests watched that have not ended
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, exchange: _Exchange) -> None:
        with self._changed:
            self._live += 1
            if len(self._heap) > 64 and len(self._heap) > 2 * self._live:  # mostly finished ones: drop them
                self._heap = [entry for entry in self._heap if entry[2].conn is not None]
                heapq.heapify(self._heap)
            heapq.heappush(self._heap, (exchange.ends, next(self._order), exchange))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="w2s-server-watchdog", daemon=True)
                self._thread.start()
            self._changed.notify()

    def forget(self, exchange: _Exchange) -> None:
        """A request that ended (its entry is dropped later, in bulk)."""
        with exchange._lock:
            exchange.conn = None
        with self._changed:
            self._live -= 1

    def _run(self) -> None:
        while True:
            with self._changed:
                while True:
                    # Finished requests leave their entry behind: drop those first.
                    while self._heap and self._heap[0][2].conn is None:
                        heapq.heappop(self._heap)
                    wait = self._heap[0][0] - time.perf_counter() if self._heap else None
                    if wait is not None and wait <= 0:
                        exchange = heapq.heappop(self._heap)[2]
                        break
                    self._changed.wait(wait)
            exchange.stop(exchange.expiry)


_watchdog = _Watchdog()


class _Flight:
    """The requests one caller has in flight: what it cuts when it gives up."""

    def __init__(self) -> None:
        self._open: set[_Exchange] = set()
        self._lock = threading.Lock()
        self.cut_off = False

    def add(self, exchange: _Exchange) -> None:
        with self._lock:
            if self.cut_off:
                raise _Cut()
            self._open.add(exchange)

    def discard(self, exchange: _Exchange) -> None:
        with self._lock:
            self._open.discard(exchange)

    def cut(self) -> None:
        with self._lock:
            self.cut_off = True
            cut = list(self._open)
        for exchange in cut:
            exchange.stop("cut")


class _Cut(Exception):
    """A request its caller cut (the caller raises its own reason)."""


class _Http:
    """JSON over HTTP to one server, each request bounded in time and size."""

    def __init__(self, url: str, api_key: str | None, timeout: float):
        parts = check_server_url(url)
        self.url = url.rstrip("/")
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._base = parts.path.rstrip("/")
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {check_api_key(api_key)}"
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        *,
        limit: int,
        deadline: Deadline | None = None,
        flight: _Flight | None = None,
        seconds: float | None = None,
    ) -> object:
        """The JSON a request answers, at most `limit` bytes of it, within `seconds`
        (default `timeout`) and before `deadline` (default: the calling thread's)."""
        deadline = deadline or current_deadline()
        started = time.perf_counter()
        ends, expiry = started + (seconds or self.timeout), "request"
        if deadline is not None and deadline.at < ends:
            ends, expiry = deadline.at, "call"
        if ends <= started:
            raise deadline.passed(f"waiting to ask {path} of the llama-server at {self.url}")
        exchange = _Exchange(ends, expiry)
        if flight is not None:
            flight.add(exchange)
        kind = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        exchange.conn = conn = kind(self._host, self._port, timeout=ends - started)
        _watchdog.watch(exchange)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, self._base + path, body=data, headers=self._headers)
            response = conn.getresponse()
            payload = _read_bounded(response, limit)
            if exchange.stopped is not None or response.length:  # cut short: what came is not the reply
                raise http.client.IncompleteRead(payload)
        except _TooLarge as err:
            raise ServerError(
                f"the llama-server at {self.url} answered {path} with {err}, more than such a request needs "
                f"({limit:,} bytes): is it llama-server?"
            ) from None
        except (OSError, http.client.HTTPException) as err:
            why = exchange.why_failed()
            if why == "cut":
                raise _Cut() from None
            if why == "call":
                raise deadline.passed(f"waiting for {path} from the llama-server at {self.url}") from None
            if why == "request":
                raise ServerUnavailableError(
                    f"the llama-server at {self.url} did not answer {method} {path} within {ends - started:.3g} s"
                ) from None
            raise ServerUnavailableError(
                f"the llama-server at {self.url} did not answer {method} {path} ({type(err).__name__}: {err}); "
                f"if it is not running, {_HOW_TO_START}"
            ) from None
        finally:
            _watchdog.forget(exchange)
            if flight is not None:
                flight.discard(exchange)
            conn.close()
        if response.status != 200:
            raise _http_error(self.url, path, response.status, payload)
        try:
            return json.loads(payload)
        except (ValueError, RecursionError):
            raise ServerError(f"the server at {self.url} answered {path} with something that is not JSON: is it llama-server?") from None


class _TooLarge(Exception):
    pass


def _read_bounded(response: http.client.HTTPResponse, limit: int) -> bytes:
    """A response's body, refused past `limit` bytes (before reading, when it says so)."""
    length = response.getheader("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise _TooLarge(f"a body of {int(length):,} bytes")
    pieces, total = [], 0
    while True:
        piece = response.read(min(65536, limit + 1 - total))
        if not piece:
            return b"".join(pieces)
        total += len(piece)
        if total > limit:
            raise _TooLarge("a longer body")
        pieces.append(piece)


def _http_error(url: str, path: str, status: int, payload: bytes) -> ServerError:
    try:
        message = str(json.loads(payload)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError, RecursionError):
        message = payload[:200].decode("utf-8", errors="replace")
    if status == 401:
        return ServerError(f"the llama-server at {url} refused the API key ({message}): set api_key to its --api-key")
    if status == 503:
        return ServerUnavailableError(f"the llama-server at {url} is not ready ({message}): wait until GET /health answers ok")
    return ServerError(f"the llama-server at {url} answered {path} with HTTP {status}: {message}")


# --- replies ----------------------------------------------------------------------------


class _BadReply(Exception):
    """What is wrong with a reply (ServerModel names the server and the request)."""


class _Reply:
    """Typed reads of one JSON reply: each names the field and what was wrong with it."""

    def __init__(self, data: object):
        self.data = data

    @staticmethod
    def at(data: object, *path: str | int) -> object:
        for step in path:
            try:
                data = data[step]  # type: ignore[index]
            except (KeyError, IndexError, TypeError):
                raise _BadReply(f"it has no {_path(path)}") from None
        return data

    @classmethod
    def integer(cls, data: object, *path: str | int, low: int, high: int) -> int:
        value = cls.at(data, *path)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _BadReply(f"{_path(path)} is {_short(value)}, not an integer from {low:,} to {high:,}")
        return value

    @classmethod
    def text(cls, data: object, *path: str | int, default: str | None = None) -> str:
        try:
            value = cls.at(data, *path)
        except _BadReply:
            if default is None:
                raise
            return default
        if value is None and default is not None:
            return default
        if not isinstance(value, str):
            raise _BadReply(f"{_path(path)} is {_short(value)}, not a string")
        return value

    @classmethod
    def items(cls, data: object, *path: str | int, most: int) -> list:
        value = cls.at(data, *path)
        if not isinstance(value, list) or len(value) > most:
            raise _BadReply(f"{_path(path)} is not a list of at most {most:,} items")
        return value


def _path(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "reply"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _token_ids(values: list, n_vocab: int, what: str) -> list[int]:
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_vocab:
            raise _BadReply(f"{what} holds {_short(value)}, not a token id (0 to {n_vocab - 1:,})")
    return values


@dataclass(frozen=True)
class ServedIdentity:
    """What a server says it serves: when any of it changes, what was learned of
    the old model (token bytes, end tokens, slot size) no longer holds."""

    model: str
    n_vocab: int
    n_ctx_train: int
    n_params: int
    n_ctx: int
    slots: int
    chat_template: str
    bos_token: str
    eos_token: str
    model_path: str


def _ask_identity(http_: _Http, seconds: float | None = None) -> ServedIdentity:
    props = http_.request("GET", "/props", limit=_PROPS_REPLY, seconds=seconds)
    models = http_.request("GET", "/v1/models", limit=_SMALL_REPLY, seconds=seconds)
    try:
        info = _Reply.at(models, "data", 0)
        meta = _Reply.at(info, "meta")
        return ServedIdentity(
            model=_Reply.text(info, "id"),
            n_vocab=_Reply.integer(meta, "n_vocab", low=2, high=MAX_N_VOCAB),
            n_ctx_train=_Reply.integer(meta, "n_ctx_train", low=1, high=_MAX_N_CTX),
            n_params=_Reply.integer(meta, "n_params", low=0, high=1 << 50) if isinstance(meta, dict) and "n_params" in meta else 0,
            n_ctx=_Reply.integer(props, "default_generation_settings", "n_ctx", low=2, high=_MAX_N_CTX),
            slots=_Reply.integer(props, "total_slots", low=1, high=_MAX_SLOTS),
            chat_template=_Reply.text(props, "chat_template", default=""),
            bos_token=_Reply.text(props, "bos_token", default=""),
            eos_token=_Reply.text(props, "eos_token", default=""),
            model_path=_Reply.text(props, "model_path", default=""),
        )
    except _BadReply as err:
        raise ServerError(
            f"the server at {http_.url} does not describe its model as llama-server does (/props, /v1/models): "
            f"{err}. Is it llama-server (built from llama.cpp, see docs/serving.md)?"
        ) from None


class ServerModel:
    """The vocabulary and limits of the model a llama-server serves. Asks the server
    once when made (refusing one that is unreachable or still loading); token
    facts learned later are kept, for as long as `identity` holds (see
    `connect_server`). `timeout`: seconds one request may take in all (a call's
    deadline cuts it sooner); `max_requests`: requests in flight at once."""

    def __init__(
        self, url: str, *, api_key: str | None = None, model_file: Path | None = None, timeout: float = 300.0,
        max_requests: int = 32,
    ):
        self._http = _Http(url, api_key, timeout)
        self.url = self._http.url
        # An address where nothing answers (a host that drops packets) fails in seconds, not `timeout`.
        health = self._http.request("GET", "/health", limit=_SMALL_REPLY, seconds=_FIRST_CONTACT)
        if not isinstance(health, dict) or health.get("status") != "ok":
            raise ServerUnavailableError(f"the llama-server at {self.url} is not ready: /health answered {_short(health)}")
        self.identity = _ask_identity(self._http, _FIRST_CONTACT)
        self.n_vocab = self.identity.n_vocab
        self.n_ctx_train = self.identity.n_ctx_train
        self.n_ctx = self.identity.n_ctx
        """Tokens one slot holds: the longest prompt + answer a branch may reach."""
        self.slots = self.identity.slots
        """Requests the server decodes together (its --parallel)."""
        template = self.identity.chat_template or None
        self.chat_template = None if template is not None and template.strip() == _FALLBACK_CHATML.strip() else template
        self.bos = self._special_id(self.identity.bos_token)
        self.eos = self._special_id(self.identity.eos_token)
        self.adds_bos = self.bos >= 0 and self.tokenize("a", add_special=True)[:1] == [self.bos]
        self._end_of_generation = self._ask_end_of_generation_ids()
        plain = self.tokenize("a")
        if not plain:
            raise ServerError(f"the llama-server at {self.url} tokenized 'a' as nothing: is it llama-server?")
        self.plain_token = plain[0]
        """A token that is one whole character (see ServerContext.next_logits)."""
        self._markers = self._marker_ids(model_file)
        self._bytes: dict[int, bytes] = {}
        self._texts: dict[int, str] = {}
        self._learn_lock = threading.Lock()
        self.max_requests = max_requests
        """Requests in flight at once (each has a thread while it runs)."""
        self._pool = ThreadPoolExecutor(max_workers=max_requests, thread_name_prefix="w2s-server")

    @property
    def name(self) -> str:
        return f"the llama-server at {self.url}"

    def __repr__(self) -> str:
        return f"ServerModel({self.url!r}, n_vocab={self.n_vocab}, n_ctx={self.n_ctx}, slots={self.slots})"

    def close(self) -> None:
        """Let its request threads end (requests in flight finish first)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def still_serving(self) -> bool:
        """Whether the server still serves what this object describes (same model,
        vocabulary, slot size and slots); raises if it cannot be asked."""
        return _ask_identity(self._http) == self.identity

    def check_still_serving(self, reply: dict) -> None:
        """Each /completion reply names the model that wrote it: a server restarted
        with another model mid-search (even one of the same vocabulary) stops the
        search here rather than mixing two models' tokens in one answer."""
        served = reply.get("model")
        if isinstance(served, str) and served != self.identity.model:
            raise ServerUnavailableError(
                f"{self.name} now serves {_short(served)}, not {_short(self.identity.model)} as when this search "
                "began (restarted with another model): the search stopped; the next call uses what it serves now"
            )

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
        reply = self._ask("/completion", {"prompt": prompt, "n_predict": 1, "ignore_eos": True, "temperature": 0}, _SMALL_REPLY)
        settings = reply.get("generation_settings")
        biases = settings.get("logit_bias") if isinstance(settings, dict) else None
        try:
            biases = _Reply.items({"logit_bias": biases or []}, "logit_bias", most=self.n_vocab)
            ids = [b["token"] for b in biases if isinstance(b, dict) and "token" in b]
            ids += [b[0] for b in biases if isinstance(b, list) and b]
            _token_ids(ids, self.n_vocab, "generation_settings.logit_bias")
        except _BadReply as err:
            raise self._bad("/completion", err) from None
        return frozenset(set(ids) | ({self.eos} if self.eos >= 0 else set()))

    def _marker_ids(self, model_file: Path | None) -> frozenset[int]:
        """The tokens the vocabulary marks as control or user-defined ("<tr>",
        "<start_of_image>"): as in process (`Model.never_sampled`), never sampled.
        llama-server renders user-defined tokens as their text and its API cannot
        list token kinds, so they are read from a model file: `model_file` (a copy
        of what a server on another machine serves), else the file the server's
        /props names when it is on this machine; otherwise only control tokens
        (offered with no bytes) are known."""
        if model_file is not None:
            try:
                ids = marker_token_ids(Path(model_file), self.n_vocab)
            except ModelLoadError as err:
                raise ModelLoadError(f"served_model_file: {err}; give a copy of the file {self.name} serves") from None
        else:
            try:
                ids = marker_token_ids(Path(self.identity.model_path), self.n_vocab) if self.identity.model_path else []
            except ModelLoadError:  # no such file here, or one of that name that is not the served model
                ids = []
        return frozenset(int(t) for t in ids if t not in self._end_of_generation)

    def _ask(self, path: str, body: dict, limit: int, *, deadline: Deadline | None = None, flight: _Flight | None = None) -> dict:
        reply = self._http.request("POST", path, body, limit=limit, deadline=deadline, flight=flight)
        if not isinstance(reply, dict):
            raise self._bad(path, _BadReply(f"it is {_short(reply)}, not a JSON object"))
        return reply

    def _bad(self, path: str, err: _BadReply) -> ServerError:
        return ServerError(f"the llama-server at {self.url} answered {path} wrongly: {err}. Is it llama-server?")

    # --- what prompts.render and the strong sampler need of a model -----------

    def tokenize(self, text: str | bytes, *, add_special: bool = False, parse_special: bool = False) -> list[int]:
        content = text.decode("utf-8") if isinstance(text, bytes) else text
        if not content:
            return [self.bos] if add_special and self.adds_bos else []
        limit = _SMALL_REPLY + _PER_TOKENIZED_CHAR * len(content)
        reply = self._ask("/tokenize", {"content": content, "add_special": add_special, "parse_special": parse_special}, limit)
        try:
            return _token_ids(_Reply.items(reply, "tokens", most=len(content.encode()) + 8), self.n_vocab, "tokens")
        except _BadReply as err:
            raise self._bad("/tokenize", err) from None

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
            if isinstance(token, bool) or not 0 <= int(token) < self.n_vocab:
                raise ValueError(f"token id {token} is outside the vocabulary (0..{self.n_vocab - 1})")
            reply = self._ask("/detokenize", {"tokens": [int(token)]}, _SMALL_REPLY)
            try:
                self._texts[token] = _Reply.text(reply, "content", default="")
            except _BadReply as err:
                raise self._bad("/detokenize", err) from None
        return self._texts[token]

    def is_end_of_generation(self, token: int) -> bool:
        return token in self._end_of_generation

    @property
    def control_texts(self) -> tuple[str, ...]:
        """The special tokens' texts a prompt can hold: BOS, EOS, the end-of-generation
        tokens, every spelling in the chat template that the tokenizer reads as one
        special token (the server cannot list a vocabulary's token attributes).
        Asked once; a call's deadline holds."""
        if self._control_texts is None:
            self._control_texts = self._ask_control_texts()
        return self._control_texts

    _control_texts: tuple[str, ...] | None = None

    def _ask_control_texts(self) -> tuple[str, ...]:
        candidates = sorted(set(_SPECIAL_SPELLING.findall(self.chat_template or "")))
        if len(candidates) > _MAX_SPECIAL_SPELLINGS:
            raise ChatTemplateError(
                f"the chat template of {self.name} writes {len(candidates):,} special-token spellings, more than "
                f"the {_MAX_SPECIAL_SPELLINGS} a chat template has use for: use a plain prompt format or another model"
            )
        texts = {self.token_text(t) for t in {self.bos, self.eos, *self._end_of_generation} if t >= 0}
        for text in candidates:
            if len(self.tokenize(text, parse_special=True)) == 1 and len(self.tokenize(text)) > 1:
                texts.add(text)
        return tuple(sorted((t for t in texts if t), key=len, reverse=True))

    # The server offers control tokens' bytes as b"", and markers are known by id:
    # ServerContext takes both out of each row itself, so the sampler has nothing more to remove.
    never_sampled = np.zeros(0, dtype=np.int64)

    @functools.cached_property
    def utf8_guard(self) -> Utf8Guard:
        """Which tokens may follow an answer's bytes and keep it valid UTF-8 (learned
        from the tokens the server offers, whose bytes it sent)."""
        return Utf8Guard(self.n_vocab)

    def learn(self, offered: list, n_probs: int) -> tuple[np.ndarray, np.ndarray]:
        """The ids and log-probs of one position's `top_logprobs` (checked: ids in
        the vocabulary, log-probs finite and at most 0, bytes bytes), keeping each
        token's bytes; tokens that an answer must never hold (control tokens other
        than end of generation, whose bytes are empty, and marker tokens) are dropped."""
        if not isinstance(offered, list) or len(offered) > n_probs:
            raise _BadReply(f"top_logprobs is not a list of at most {n_probs} entries")
        ids, log_probs = [], []
        for i, entry in enumerate(offered):
            token = _Reply.integer(entry, "id", low=0, high=self.n_vocab - 1)
            log_prob = _Reply.at(entry, "logprob") if isinstance(entry, dict) and "logprob" in entry else None
            if log_prob is not None and (
                isinstance(log_prob, bool) or not isinstance(log_prob, (int, float)) or not -math.inf < log_prob <= 1e-3
            ):
                raise _BadReply(f"top_logprobs[{i}].logprob is {_short(log_prob)}, not a log-probability")
            raw = entry.get("bytes") or []
            if not isinstance(raw, list) or len(raw) > _MAX_TOKEN_BYTES or not all(
                type(b) is int and 0 <= b <= 255 for b in raw
            ):
                raise _BadReply(f"top_logprobs[{i}].bytes is not a list of byte values")
            piece = bytes(raw)
            with self._learn_lock:
                self._bytes.setdefault(token, piece)
            if log_prob is None or token in self._markers or (not piece and token not in self._end_of_generation):
                continue
            ids.append(token)
            log_probs.append(float(log_prob))
        return np.array(ids, dtype=np.int64), np.array(log_probs, dtype=np.float64)

    def run_all(self, bodies: list[dict], interrupt: Callable[[], None] | None) -> list[dict]:
        """POST every body to /completion at once; `interrupt` is called while they
        run, and when it raises, this call's requests in flight (and no one
        else's) are cut and it propagates. The calling thread's deadline holds."""
        deadline, flight = current_deadline(), _Flight()
        limits = [_COMPLETION_REPLY + _PER_OFFERED_TOKEN * body.get("n_probs", 0) for body in bodies]
        futures: list[Future] = []
        try:
            for body, limit in zip(bodies, limits):
                futures.append(self._pool.submit(self._ask, "/completion", body, limit, deadline=deadline, flight=flight))
        except RuntimeError:  # closed: another call found the server serving something else
            flight.cut()
            raise ServerUnavailableError(
                f"{self.name} now serves another model (or another slot size) than when this search began: "
                "it stopped; the next call uses what the server serves now"
            ) from None
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
            flight.cut()
            raise
        return [future.result() for future in futures]


class _Connection:
    """One (address, key)'s cached model, and the lock that makes one handshake at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.model: ServerModel | None = None


# Servers (address, key) a process keeps: more are forgotten, oldest first.
_MAX_SERVERS = 8
_servers: OrderedDict[tuple[str, str, str], _Connection] = OrderedDict()
_servers_lock = threading.Lock()  # held only to look up the table, never across a request


def connect_server(url: str, api_key: str | None = None, model_file: Path | None = None) -> ServerModel:
    """The `ServerModel` of a server address and key (and the local copy of its
    model file, if any), shared process-wide (as `load_model` shares a loaded
    file): what it learns of the vocabulary is kept while the server serves the
    same model. Each call asks the server what it serves: after a restart with
    another model, or another slot size, a new `ServerModel` is made (the old one
    is left to its current users)."""
    key = (url.rstrip("/"), hashlib.sha256((api_key or "").encode()).hexdigest(), str(model_file or ""))
    with _servers_lock:
        connection = _servers.get(key)
        if connection is None:
            connection = _servers[key] = _Connection()
        _servers.move_to_end(key)
        forgotten = [_servers.popitem(last=False)[1] for _ in range(len(_servers) - _MAX_SERVERS)]
    for old in forgotten:
        if old.model is not None:
            old.model.close()
    deadline = current_deadline()
    if not connection.lock.acquire(timeout=-1 if deadline is None else max(deadline.left(), 0)):
        raise deadline.passed(f"waiting for another call's first contact with the llama-server at {shown_url(url)}")
    try:
        if connection.model is not None and connection.model.still_serving():
            return connection.model
        if connection.model is not None:
            connection.model.close()
            connection.model = None
        connection.model = ServerModel(url, api_key=api_key, model_file=model_file)
        return connection.model
    finally:
        connection.lock.release()


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
        tokens = self._checked_tokens(tokens)
        self._check_length(tokens)
        return Branch(tokens)

    def fork(self, branch: Branch, n_tokens: int | None = None) -> Branch:
        n = len(branch) if n_tokens is None else n_tokens
        if not 0 <= n <= len(branch):
            raise ValueError(f"cannot fork {n} tokens of a branch of {len(branch)}")
        return Branch(branch._tokens[:n])

    def append(self, branch: Branch, tokens: list[int]) -> None:
        grown = branch._tokens + self._checked_tokens(tokens)
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
            if len(b) >= self.n_ctx:  # llama-server refuses a prompt that fills the slot
                raise ContextOverflowError(
                    f"a branch of {len(b)} tokens fills a slot of {self.model.name} ({self.n_ctx} tokens): "
                    "no token can follow it. Start the server with a larger -c, lower max_new_tokens or shorten the prompt"
                )
        n_probs = min(self.n_probs, self.model.n_vocab)
        bodies = [
            {
                "prompt": list(b._tokens),
                "n_predict": 1,
                "n_probs": n_probs,
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
            self.model.check_still_serving(reply)
            try:
                ids, log_probs = self.model.learn(_Reply.at(reply, "completion_probabilities", 0, "top_logprobs"), n_probs)
                read = self._prompt_tokens_read(reply, len(body["prompt"]))
            except _BadReply as err:
                raise self.model._bad("/completion", err) from None
            row[ids] = log_probs
            with self._stats_lock:
                self.stats.tokens_decoded += read
                self.stats.tokens_reused += len(body["prompt"]) - read
        with self._stats_lock:
            self.stats.decode_calls += len(bodies)  # requests: the server decides how it batches them
            self.stats.decode_seconds += time.perf_counter() - started
        return rows

    @staticmethod
    def _prompt_tokens_read(reply: dict, n_prompt: int) -> int:
        """How many prompt tokens the server read (the rest came from its cache)."""
        timings = reply.get("timings")
        if not isinstance(timings, dict) or "prompt_n" not in timings:
            return n_prompt
        return _Reply.integer(timings, "prompt_n", low=0, high=n_prompt)

    def _checked_tokens(self, tokens: list[int]) -> list[int]:
        checked = []
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.model.n_vocab:
                raise ValueError(f"token id {t!r} is outside the vocabulary of {self.model.name} (0..{self.model.n_vocab - 1})")
            checked.append(int(t))
        return checked

    def _check_length(self, tokens: list[int]) -> None:
        if len(tokens) > self.n_ctx:  # as in process: a branch may fill the slot exactly
            raise ContextOverflowError(
                f"{len(tokens)} tokens do not fit a slot of {self.model.name} ({self.n_ctx} tokens): "
                "start the server with a larger -c (llama-server splits it among its --parallel slots), "
                "lower max_new_tokens or shorten the prompt"
            )

"""A GGUF model loaded once per process through llama.cpp's low-level API.

`load_model` returns the same `Model` for the same file and load settings for as
long as anybody holds it, so every context (and every LangChain object built on
top) shares one copy of the weights. The weights are freed exactly once, when the
last holder lets go.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import logging
import os
import signal
import struct
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import llama_cpp
import numpy as np

from ..errors import ModelLoadError
from .sampling import Utf8Guard

# --- llama.cpp's log ----------------------------------------------------------------
# llama.cpp reports why a load failed only in its log, so we keep the last lines
# to put into our error messages, and hand everything to Python logging at DEBUG
# (set the "w2s_langchain.llama_cpp" logger to DEBUG to see it).

_log = logging.getLogger("w2s_langchain.llama_cpp")
_recent_log_lines: collections.deque[str] = collections.deque(maxlen=40)
_GGML_LOG_CONT = 5


@llama_cpp.llama_log_callback
def _on_llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    line = text.decode("utf-8", errors="replace")
    if level == _GGML_LOG_CONT and _recent_log_lines:
        _recent_log_lines[-1] += line
    else:
        _recent_log_lines.append(line)
    _log.debug("%s", line.rstrip("\n"))


_backend_lock = threading.Lock()
_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_on_llama_log, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


def _log_tail(n: int = 4) -> str:
    lines = [line.strip() for line in list(_recent_log_lines)[-n:] if line.strip()]
    return " | ".join(lines)


# --- Ctrl-C while llama.cpp works ---------------------------------------------------
# Python runs a signal handler between two bytecodes of the main thread. While
# llama.cpp loads a model or creates a context, the only Python code that runs is
# the log callback above, so Ctrl-C raised its KeyboardInterrupt inside a ctypes
# callback, where ctypes prints it ("Exception ignored on calling ctypes callback
# function") and drops it: the load, and then the whole search, went on. So around
# those calls Ctrl-C is only recorded, a model load is asked to stop (its progress
# callback says so), and the interrupt is delivered when llama.cpp has returned.


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[Callable[[], bool]]:
    """Within the block, SIGINT only sets a flag (the callable it yields reads it);
    the signal's own handler runs when the block ends (KeyboardInterrupt, by default),
    in place of whatever the block raised. Only in the main thread, where Python
    runs signal handlers, and only over a Python handler (not SIG_IGN or SIG_DFL)."""
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if not callable(previous):
        yield lambda: False
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield lambda: bool(received)
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            previous(*received[0])


# --- loading ----------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSettings:
    """How llama.cpp loads the weights (the settings users know from llama.cpp)."""

    n_gpu_layers: int = 0
    """Layers to offload to the GPU (Metal, CUDA, ...); -1 offloads all of them."""
    use_mmap: bool = True
    """Map the file into memory instead of reading it."""
    use_mlock: bool = False
    """Ask the OS to keep the weights in RAM (never swapped out)."""

    def __post_init__(self) -> None:
        n = self.n_gpu_layers
        if isinstance(n, bool) or not isinstance(n, int) or not -1 <= n < 2**31:  # llama.cpp's int32
            raise ValueError(f"n_gpu_layers must be an integer >= -1 (-1 = all layers), got {n!r}")

    def load_mode(self) -> int:
        if self.use_mmap and self.use_mlock:
            return llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK
        if self.use_mmap:
            return llama_cpp.LLAMA_LOAD_MODE_MMAP
        if self.use_mlock:
            return llama_cpp.LLAMA_LOAD_MODE_MLOCK
        return llama_cpp.LLAMA_LOAD_MODE_NONE


_GGUF_MAGIC = b"GGUF"
_loaded: weakref.WeakValueDictionary[tuple[str, LoadSettings], Model] = weakref.WeakValueDictionary()
_loaded_lock = threading.Lock()


def load_model(path: str | os.PathLike[str], settings: LoadSettings | None = None) -> Model:
    """The loaded model of the GGUF file at `path`, shared process-wide. Registry
    names are resolved above the engine (`w2s_langchain.service.aligner.load_named_model`)."""
    settings = settings or LoadSettings()
    path = Path(path).expanduser().resolve()
    key = (str(path), settings)
    with _loaded_lock:
        model = _loaded.get(key)
        if model is None:
            model = Model(path, settings)
            _loaded[key] = model
        return model


def _check_gguf_header(path: Path) -> None:
    """Refuse, with a clear message, a file that is not GGUF, or whose header claims
    more than the file holds, or that would make llama.cpp abort the whole process
    (it checks most things itself, but stops on a few with an assertion)."""
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != _GGUF_MAGIC:
            raise ModelLoadError(
                f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'). "
                "Pass a .gguf model file, or a registry name (see `w2s-models list`)."
            )
        metadata = _GGUFHeaderReader(path, f).metadata()
    _check_hyperparameters(path, metadata)


# llama.cpp's limits (llama-hparams.h): it aborts the process on a model beyond them.
_LLAMA_MAX_LAYERS = 512
_LLAMA_MAX_EXPERTS = 1024

# GGUF value types: the fixed-size ones (struct formats), strings and arrays.
_GGUF_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_TOKENS_KEY = "tokenizer.ggml.tokens"
_TOKEN_TYPES_KEY = "tokenizer.ggml.token_type"
# llama.cpp's token types (llama_token_type) of control and user-defined tokens.
_CONTROL_TYPE, _USER_DEFINED_TYPE = 3, 4


class _GGUFHeaderReader:
    """Reads a GGUF header and its metadata, checking every length and count it
    claims against the bytes left in the file, so that a lying file costs nothing."""

    def __init__(self, path: Path, file: BinaryIO):
        self.path = path
        self.file = file
        self.left = os.fstat(file.fileno()).st_size - file.tell()

    def metadata(self) -> dict[str, object]:
        """The architecture, the integer values, the token list and the token types; {} for a GGUF
        version this reader does not know (llama.cpp explains what it refuses)."""
        if self.number("I", "the version") not in (2, 3):
            return {}
        n_tensors = self.number("Q", "the tensor count")
        n_keys = self.number("Q", "the metadata key count")
        # A tensor's description takes at least 24 bytes, a key and its value 13.
        self.need(24 * n_tensors + 13 * n_keys, f"{n_tensors:,} tensors and {n_keys:,} metadata keys")
        values: dict[str, object] = {}
        for _ in range(n_keys):
            key = self.string("a metadata key").decode("utf-8", errors="replace")
            value = self.value(self.number("I", key), key)
            if value is not None:
                values[key] = value
        return values

    def value(self, kind: int, key: str) -> object:
        """A number, the architecture's name or the token list; None for the rest
        (read past, not kept)."""
        if kind in _GGUF_FIXED:
            return self.number(_GGUF_FIXED[kind], key)
        if kind == _GGUF_STRING:
            text = self.string(key)
            return text.decode("utf-8", errors="replace") if key == "general.architecture" else None
        if kind != _GGUF_ARRAY:
            raise ModelLoadError(f"{self.path} is corrupt: metadata key {key!r} has unknown value type {kind}")
        item_kind, count = self.number("I", key), self.number("Q", key)
        if item_kind in _GGUF_FIXED:
            items = self.take(count * struct.calcsize(_GGUF_FIXED[item_kind]), key)
            return np.frombuffer(items, dtype="<" + _GGUF_FIXED[item_kind]) if key == _TOKEN_TYPES_KEY else None
        if item_kind != _GGUF_STRING:
            raise ModelLoadError(
                f"{self.path} is corrupt: metadata key {key!r} is an array of unknown type {item_kind}"
            )
        self.need(8 * count, f"{key} ({count:,} strings)")
        items = [self.string(key) for _ in range(count)]
        return items if key == _TOKENS_KEY else None

    def number(self, fmt: str, what: str) -> int | float | bool:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> bytes:
        return self.take(self.number("Q", what), what)

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        self.left -= n
        return self.file.read(n)

    def need(self, n: int, what: str) -> None:
        if n > self.left:
            raise ModelLoadError(
                f"{self.path} is corrupt or truncated: {what} would take {n:,} bytes, "
                f"but only {self.left:,} are left in the file"
            )


def marker_token_ids(path: Path, n_vocab: int) -> np.ndarray:
    """Ids of the tokens a GGUF file marks as control or user-defined, except those
    whose text is only whitespace (what `Model.never_sampled` keeps out of answers,
    end-of-generation aside), read from its header without loading the model: for
    a model a llama-server serves. Raises ModelLoadError when the file cannot be
    read or its vocabulary is not of `n_vocab` tokens (then it is not that model)."""
    if not Path(path).is_file():  # a pipe or a device would block the read, or never end it
        raise ModelLoadError(f"{path} is not a regular file")
    try:
        with open(path, "rb") as f:
            if f.read(4) != _GGUF_MAGIC:
                raise ModelLoadError(f"{path} is not a GGUF file")
            metadata = _GGUFHeaderReader(path, f).metadata()
    except OSError as err:
        raise ModelLoadError(f"cannot read {path}: {err.strerror or err}") from None
    types, tokens = metadata.get(_TOKEN_TYPES_KEY), metadata.get(_TOKENS_KEY)
    if types is None or tokens is None:
        raise ModelLoadError(f"{path} holds no vocabulary (no {_TOKENS_KEY} and {_TOKEN_TYPES_KEY})")
    if len(types) != n_vocab or len(tokens) != n_vocab:
        raise ModelLoadError(f"{path} has a vocabulary of {len(tokens):,} tokens, not {n_vocab:,}: it is another model")
    marked = np.flatnonzero((types == _CONTROL_TYPE) | (types == _USER_DEFINED_TYPE))
    # SentencePiece vocabularies write a space as U+2581.
    return np.array([t for t in marked if tokens[t].decode("utf-8", "replace").replace("\u2581", " ").strip()], dtype=np.int64)


def _check_hyperparameters(path: Path, metadata: dict[str, object]) -> None:
    """The values llama.cpp asserts on (aborting the process) instead of reporting."""
    arch = metadata.get("general.architecture")
    layers = metadata.get(f"{arch}.block_count")
    experts = metadata.get(f"{arch}.expert_count", 0)
    used = metadata.get(f"{arch}.expert_used_count", 0)
    problems = []
    if isinstance(layers, int) and not 1 <= layers <= _LLAMA_MAX_LAYERS:
        problems.append(f"{layers:,} layers (llama.cpp handles 1 to {_LLAMA_MAX_LAYERS})")
    if isinstance(experts, int) and not 0 <= experts <= _LLAMA_MAX_EXPERTS:
        problems.append(f"{experts:,} experts (llama.cpp handles up to {_LLAMA_MAX_EXPERTS})")
    if isinstance(experts, int) and isinstance(used, int) and (used > experts or (used > 0) != (experts > 0)):
        problems.append(f"{used:,} experts used for each token out of {experts:,}")
    duplicate = _first_duplicate(metadata.get(_TOKENS_KEY, []))
    if duplicate is not None:
        problems.append(f"the token {duplicate!r} twice in its vocabulary")
    if problems:
        raise ModelLoadError(
            f"{path} is corrupt: it declares {'; '.join(problems)}. llama.cpp would abort the process on it."
        )


def _first_duplicate(items: list[bytes]) -> bytes | None:
    if len(set(items)) == len(items):  # the common case, at C speed
        return None
    seen: set[bytes] = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


class Model:
    """One GGUF file in memory: its vocabulary, metadata and weights.

    Build it with `load_model`, which shares instances; contexts keep it alive.
    """

    def __init__(self, path: Path, settings: LoadSettings):
        _init_backend()
        _check_gguf_header(path)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = settings.n_gpu_layers
        params.load_mode = settings.load_mode()
        _recent_log_lines.clear()
        with interrupts_deferred() as interrupted:
            # Returning False stops the load (and it returns NULL) once Ctrl-C was pressed.
            keep_loading = llama_cpp.llama_progress_callback(lambda progress, user_data: not interrupted())
            params.progress_callback = keep_loading
            handle = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
            if not handle:
                raise ModelLoadError(
                    f"llama.cpp could not load {path}: the file may be truncated, corrupt or of an "
                    f"unsupported architecture. llama.cpp said: {_log_tail() or 'nothing'}"
                )
            # Registered before any further check (or a deferred Ctrl-C), so a refused
            # or abandoned model is freed too.
            self._finalizer = weakref.finalize(self, llama_cpp.llama_model_free, handle)
        self.handle = handle
        self.path = path
        self.settings = settings
        self.architecture = self.metadata("general.architecture") or "unknown"
        if llama_cpp.llama_model_is_recurrent(handle) or llama_cpp.llama_model_is_hybrid(handle):
            self._finalizer()
            raise ModelLoadError(
                f"{path} is a recurrent model ({self.architecture}): its state cannot be cut back "
                "to an earlier position, which tree search needs. Use a transformer model."
            )
        self.vocab = llama_cpp.llama_model_get_vocab(handle)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(handle)
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)
        self.adds_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.chat_template = self.metadata("tokenizer.chat_template")
        self._pieces: dict[int, bytes] = {}

    @property
    def name(self) -> str:
        """The file's name, for messages."""
        return self.path.name

    def __repr__(self) -> str:
        return f"Model({self.path.name!r}, arch={self.architecture}, n_vocab={self.n_vocab})"

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as a string, or None when the key is absent."""
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_model_meta_val_str(self.handle, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    # --- tokens ---------------------------------------------------------------

    def tokenize(self, text: str | bytes, *, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids of `text`. `add_special` adds BOS (when the model wants one);
        `parse_special` turns special-token text such as "<|im_end|>" into its id."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        n_max = len(data) + 8
        while True:
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            n_max = -n

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for; control tokens (BOS, EOS, ...) give b""."""
        piece = self._pieces.get(token)
        if piece is None:
            if not 0 <= token < self.n_vocab:
                raise ValueError(f"token id {token} is outside the vocabulary (0..{self.n_vocab - 1})")
            size = 32
            while True:
                buf = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, size, 0, False)
                if n >= 0:
                    piece = buf.raw[:n]
                    break
                size = -n
            self._pieces[token] = piece
        return piece

    def detokenize(self, tokens: list[int]) -> bytes:
        """The bytes of a token sequence. Bytes, not str: a token can end inside a
        UTF-8 character, so decode only text you know is complete."""
        return b"".join(self.token_bytes(t) for t in tokens)

    @functools.cached_property
    def control_texts(self) -> tuple[str, ...]:
        """The text of every control token ("<|im_start|>", "<bos>", ...): where a
        rendered prompt's special tokens end and plain text begins."""
        control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
        texts = (
            self.token_text(t) for t in range(self.n_vocab) if llama_cpp.llama_vocab_get_attr(self.vocab, t) & control
        )
        return tuple(sorted({t for t in texts if t}, key=len, reverse=True))

    @functools.cached_property
    def never_sampled(self) -> np.ndarray:
        """Ids of the tokens an answer must never contain: the ones the vocabulary
        marks as control or user-defined (markers such as "<start_of_image>" or
        "<bos>"), except those that end generation (they keep their role) and
        those whose text is only whitespace (gemma spells "\n" and runs of spaces
        with user-defined tokens: they are text)."""
        marked = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        return np.array(
            [
                t for t in range(self.n_vocab)
                if llama_cpp.llama_vocab_get_attr(self.vocab, t) & marked
                and not self.is_end_of_generation(t)
                and self.token_text(t).strip()
            ],
            dtype=np.int64,
        )

    @functools.cached_property
    def utf8_guard(self) -> Utf8Guard:
        """Which tokens may follow an answer's bytes and keep it valid UTF-8."""
        return Utf8Guard(self.n_vocab)

    def token_text(self, token: int) -> str:
        """A token's text in the vocabulary, special tokens included ("<|im_end|>")."""
        return llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        """True for EOS, end-of-turn and the other tokens that end an answer."""
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

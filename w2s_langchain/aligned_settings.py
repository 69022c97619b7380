"""The settings and the search call shared by the LangChain and LlamaIndex components.

Every component starts from a preset (a JSON config, see w2s_langchain/presets/)
and overrides any of its settings with the fields below. Models load on first
use and are shared by every component with the same models and runtime settings.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from langchain_core.callbacks import CallbackManager
from pydantic import BaseModel, Field, PrivateAttr

from .aligner import DEFAULT_PRESET, Aligner, AlignerConfig, load_preset
from .engine import load_model
from .prompts import Prompt
from .search import SearchResult, SearchSettings

# Search settings a field (or a per-call keyword) may override.
_SEARCH_FIELDS = tuple(f.name for f in dataclasses.fields(SearchSettings))
_ROLES = ("strong", "weak", "weak_ref")
_RUNTIME_FIELDS = ("n_ctx", "n_batch", "n_threads", "n_seq_max", "n_gpu_layers", "use_mmap", "use_mlock")

# The cancel event of the async call a worker thread runs for (see `in_thread`).
_cancel_event: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("w2s_cancel", default=None)

_T = TypeVar("_T")


async def in_thread(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run a blocking call (one that searches) in a worker thread without
    blocking the event loop. Cancelling the awaiting task stops the search at
    its next decode step, so it frees its sequences and the models' lock
    instead of running on unseen."""
    cancel = threading.Event()
    token = _cancel_event.set(cancel)  # to_thread copies this context into the thread
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except asyncio.CancelledError:
        cancel.set()
        raise
    finally:
        _cancel_event.reset(token)


# Weak values: an aligner, its contexts and its models live as long as some
# component uses them, and are freed with the last one.
_aligners: weakref.WeakValueDictionary[tuple, Aligner] = weakref.WeakValueDictionary()
_aligners_lock = threading.Lock()


def _shared_aligner(config: AlignerConfig) -> Aligner:
    """One aligner (its contexts) per set of models and runtime settings, process-wide."""
    key = (config.strong, config.weak, config.weak_ref, config.runtime)
    with _aligners_lock:
        aligner = _aligners.get(key)
        if aligner is None:
            aligner = _aligners[key] = Aligner(config)
        return aligner


class AlignedModelSettings(BaseModel):
    """The fields of every aligned component, and the search they run."""

    preset: str = DEFAULT_PRESET
    """Preset name or path of a preset .json: the base of every setting below."""
    strong: str | None = None
    """Strong model: registry name or path to a .gguf file."""
    weak: str | None = None
    """Weak aligned model."""
    weak_ref: str | None = None
    """Weak reference model (may be the same file as `weak`: then the prompts differ)."""
    strong_prompt: dict[str, Any] | None = None
    """How the strong model sees the prompt (PromptFormat fields: format, system, user, ...)."""
    weak_prompt: dict[str, Any] | None = None
    """How the aligned weak model sees it, e.g. {"format": "chat", "system": "You always ..."}."""
    weak_ref_prompt: dict[str, Any] | None = None
    """How the weak reference sees it."""

    strategy: str | None = None
    """"w2s", "bon", "cbs" or "base"."""
    iterations: int | None = None
    """m: MCTS iterations."""
    token_budget: int | None = None
    """Stop the tree search once the strong model has sampled this many tokens."""
    children: int | None = None
    """K: children per expansion (chunks per beam for cbs)."""
    chunk_tokens: int | None = None
    """L: tokens per chunk."""
    selection: str | Callable[..., float] | None = None
    """Selection rule of w2s: "ea-puct" (the paper's), "puct", "uct", or a function rule(child, parent, c, w) -> float."""
    c: float | None = None
    """Exploration constant."""
    entropy_weight: float | None = None
    """w of EA-PUCT."""
    num_select: int | None = None
    """Stage-2 candidates."""
    samples: int | None = None
    """N for Best-of-N."""
    beam_width: int | None = None
    """W for beam search."""
    max_new_tokens: int | None = Field(default=None, alias="max_tokens")
    """Most answer tokens (also accepted as LangChain's `max_tokens`)."""
    stop: list[str] | None = None
    """Stop strings (a call's `stop` adds to them)."""
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    """Same seed, same settings, same models: same answer."""
    beta: float | None = None
    backup: str | None = None
    terminal_reward: str | None = None
    stage2_nonterminal: bool | None = None
    fallback: str | None = None
    timeout: float | None = None
    """Seconds one search may run; then it raises SearchTimeoutError (a TimeoutError)."""
    partial_answer: bool | None = None
    """With `timeout` (or a KV cache too small to go on): answer with the best found so far instead of raising."""
    naive: bool | None = None

    n_ctx: int | None = None
    """KV cells per model context."""
    n_batch: int | None = None
    n_threads: int | None = None
    n_seq_max: int | None = None
    n_gpu_layers: int | None = None
    """Layers offloaded to the GPU (-1: all), for Metal / CUDA builds of llama.cpp."""
    use_mmap: bool | None = None
    use_mlock: bool | None = None

    streaming: bool = False
    """Make `invoke` stream internally (callbacks then receive the answer in pieces)."""
    model_name: str = Field(default="w2s-aligntree")
    """Name shown in traces."""

    _aligner: Aligner | None = PrivateAttr(default=None)  # keeps the shared models alive

    def model_post_init(self, __context: Any) -> None:
        self._build_config()  # checks every setting now; loads nothing

    @property
    def _config(self) -> AlignerConfig:
        # Built on each use (cheap), so a field changed after construction counts.
        return self._build_config()

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """Everything that changes the answer, so a cache never serves another's."""
        cfg = self._config
        return {
            "model_name": self.model_name,
            "strong": dataclasses.asdict(cfg.strong),
            "weak": dataclasses.asdict(cfg.weak),
            "weak_ref": dataclasses.asdict(cfg.weak_ref),
            "search": cfg.search.to_dict(),
        }

    def get_num_tokens(self, text: str) -> int:
        """Tokens of `text` for the strong model's tokenizer."""
        runtime = self._config.runtime
        return len(load_model(self._config.strong.model, runtime.load_settings()).tokenize(text))

    def _build_config(self) -> AlignerConfig:
        return load_preset(self.preset).with_overrides(
            models={name: getattr(self, name) for name in _ROLES},
            prompts={name: getattr(self, f"{name}_prompt") for name in _ROLES},
            search={k: getattr(self, k) for k in _SEARCH_FIELDS},
            runtime={k: getattr(self, k) for k in _RUNTIME_FIELDS},
        )

    def _search(self, prompt: Prompt, stop: list[str] | None, run_manager, overrides: dict[str, Any]) -> SearchResult:
        config = self._config
        if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) for s in stop)):
            raise TypeError(f"stop must be a list of strings, got {stop!r}")
        settings = config.search.with_(**overrides)
        if stop:
            settings = settings.with_(stop=tuple(settings.stop) + tuple(stop))

        # Progress reaches the callbacks as custom events of this LLM run (they
        # show up in astream_events as "on_custom_event").
        events = (
            CallbackManager(run_manager.handlers, tags=run_manager.tags, metadata=run_manager.metadata)
            if run_manager
            else None
        )

        def progress(done: int, total: int, what: str) -> None:
            if events is not None:
                events.on_custom_event("w2s_progress", {"done": done, "total": total, "what": what}, run_id=run_manager.run_id)

        self._aligner = _shared_aligner(config)
        return self._aligner.search(prompt, settings, progress, _cancel_event.get())


class LangChainAligned(AlignedModelSettings):
    """What the LangChain components (LLM and chat model) add: tracing parameters."""

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        """What tracing (LangSmith) records about a call."""
        params = super()._get_ls_params(stop=stop, **kwargs)
        search = self._config.search
        params.update(
            ls_provider="w2s_langchain",
            ls_model_name=kwargs.get("model", self.model_name),
            ls_temperature=kwargs.get("temperature", search.temperature),
            ls_max_tokens=kwargs.get("max_new_tokens", search.max_new_tokens),
        )
        return params


def generation_info(result: SearchResult) -> dict[str, Any]:
    info = result.to_dict()
    info.pop("prompt")
    info.pop("text")
    return info


def answer_pieces(text: str, words: int = 3) -> list[str]:
    """Split text into pieces of a few words, keeping every character."""
    parts, current, count = [], "", 0
    for ch in text:
        current += ch
        if ch.isspace() and current.strip():
            count += 1
            if count == words:
                parts.append(current)
                current, count = "", 0
    if current or not parts:
        parts.append(current)
    return parts

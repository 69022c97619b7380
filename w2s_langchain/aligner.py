"""From a plain config (a preset) to answers: loads the models, keeps their
contexts between searches, and runs the search.

A preset is a JSON file (see presets/): which model plays each role, how each
sees the prompt, the search settings and the llama.cpp runtime settings. Copy
one, edit it, and pass its path wherever a preset name is accepted.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import llama_cpp

from .engine import Context, LoadSettings, Model, load_model
from .engine.context import MAX_THREADS, check_int_range, default_n_ctx
from .engine.server import ServerContext, ServerModel, check_server_url, connect_server, is_server_url
from .errors import ContextOverflowError
from .prompts import Prompt, PromptFormat, check_prompt, render
from .registry import resolve_model
from .search import Proxy, SearchModels, SearchResult, SearchSettings, WeakScorer, search
from .search.strategies import Progress, stop_check
from .template_sandbox import search_time_limit

PRESETS_DIR = Path(__file__).with_name("presets")
# Answers `Aligner.values` scores together.
_VALUES_BATCH = 8
# Seconds between looks at the timeout and cancel while waiting for the models.
_WAIT_STEP = 0.05
DEFAULT_PRESET = "sentiment"


@dataclass(frozen=True)
class Role:
    """One model and how it is shown the prompt."""

    model: str
    """Registry name, path to a .gguf file, or (strong role) the http:// address of a llama-server."""
    prompt: PromptFormat = field(default_factory=PromptFormat)

    def check(self, role: str) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"{role} must name a model (a registry name or a .gguf path), got {self.model!r}")
        if is_server_url(self.model):
            if role != "strong":
                raise ValueError(
                    f"{role} is {self.model!r}, a llama-server: only the strong model may be served "
                    "(the weak models score locally); give a registry name or a .gguf path"
                )
            check_server_url(self.model)


_MAX_N_CTX = 2**24
# The largest n_ctx accepted before a model is known: above the longest training
# context of any GGUF model (10M tokens), far below llama.cpp's uint32 limit.


@dataclass(frozen=True)
class Runtime:
    """llama.cpp settings shared by the three models.

    The one declaration of the runtime settings: the components' fields, the
    `w2s-align` flags and their help, and a preset's "runtime" keys are all read
    from it (see declared_settings.py)."""

    n_ctx: int | None = None
    """KV cells per model context, for all its branches together (llama.cpp rounds
    it up to a multiple of 256); default: the model's training context, at most 4096."""
    n_batch: int | None = None
    """Most tokens one llama_decode call reads; default: min(512, n_ctx)."""
    n_threads: int | None = None
    """CPU threads per model; default: half the CPUs."""
    n_seq_max: int = 64
    """Branches a context keeps in its KV cache at once; more are evicted and read again on use."""
    n_gpu_layers: int = 0
    """Layers offloaded to the GPU (-1: all), for Metal / CUDA builds of llama.cpp."""
    use_mmap: bool = True
    """Map the model files into memory instead of reading them."""
    use_mlock: bool = False
    """Ask the OS to keep the weights in RAM (never swapped out)."""
    api_key: str | None = field(default=None, repr=False)
    """The --api-key of the llama-server a strong model's http:// address names
    (default: the LLAMA_API_KEY environment variable). Never logged or shown."""

    def __post_init__(self) -> None:
        # Checked when the settings are made, so a bad value fails at construction
        # with its name, not at the first call (or deep inside llama.cpp). Limits
        # that depend on the model (n_ctx <= its training context) wait for it.
        if self.n_ctx is not None:
            check_int_range("n_ctx", self.n_ctx, 16, _MAX_N_CTX, "no model is trained on more")
        if self.n_batch is not None:
            check_int_range("n_batch", self.n_batch, 1, self.n_ctx or _MAX_N_CTX, "n_ctx")
        if self.n_threads is not None:
            check_int_range("n_threads", self.n_threads, 1, MAX_THREADS, "llama.cpp's thread limit")
        max_seq = llama_cpp.llama_max_parallel_sequences()
        check_int_range("n_seq_max", self.n_seq_max, 1, max_seq, "llama.cpp's sequence limit")
        for name in ("use_mmap", "use_mlock"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.api_key is not None and not isinstance(self.api_key, str):
            raise ValueError("api_key must be a string (the server's --api-key)")
        self.load_settings()  # checks n_gpu_layers

    def load_settings(self) -> LoadSettings:
        return LoadSettings(self.n_gpu_layers, self.use_mmap, self.use_mlock)

    def server_api_key(self) -> str | None:
        return self.api_key if self.api_key is not None else os.environ.get("LLAMA_API_KEY") or None

    def context_size(self, model: Model | ServerModel) -> int:
        """The n_ctx a context of `model` gets (a served model's is the server's slot size)."""
        if isinstance(model, ServerModel):
            return model.n_ctx
        return self.n_ctx if self.n_ctx is not None else default_n_ctx(model)

    def new_context(self, model: Model) -> Context:
        return Context(
            model, n_ctx=self.context_size(model), n_batch=self.n_batch, n_threads=self.n_threads, n_seq_max=self.n_seq_max
        )


@dataclass(frozen=True)
class AlignerConfig:
    """Everything that decides an answer."""

    strong: Role
    weak: Role
    weak_ref: Role
    search: SearchSettings = field(default_factory=SearchSettings)
    runtime: Runtime = field(default_factory=Runtime)
    description: str = ""
    ensemble_prompts: tuple[tuple[PromptFormat, PromptFormat], ...] = ()
    """More (aligned, reference) prompts for the weak and weak_ref models:
    paraphrases of the preference, averaged into V with the search setting `ensemble`."""

    def __post_init__(self) -> None:
        for name in ("strong", "weak", "weak_ref"):
            getattr(self, name).check(name)
        if len(self.ensemble_prompts) > _MAX_ENSEMBLE:
            raise ValueError(f"ensemble_prompts holds {len(self.ensemble_prompts)} pairs: at most {_MAX_ENSEMBLE}")

    def with_overrides(
        self,
        *,
        models: Mapping[str, str | None] | None = None,
        prompts: Mapping[str, dict[str, Any] | None] | None = None,
        search: Mapping[str, Any] | None = None,
        runtime: Mapping[str, Any] | None = None,
    ) -> AlignerConfig:
        """A copy with some settings changed (each checked); a None value keeps the
        config's own. `models` and `prompts` are keyed by role: strong, weak, weak_ref."""
        models, prompts = models or {}, prompts or {}
        roles = {}
        for name in ("strong", "weak", "weak_ref"):
            role, prompt = getattr(self, name), prompts.get(name)
            model = models.get(name)  # "" is a (bad) model name, not "keep the preset's"
            roles[name] = Role(role.model if model is None else model, PromptFormat(**prompt) if prompt is not None else role.prompt)
        new_runtime = replace(self.runtime, **_given(runtime))
        return replace(self, search=self.search.with_(**_given(search)), runtime=new_runtime, **roles)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlignerConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown preset keys: {', '.join(sorted(unknown))}")
        try:
            return cls(
                strong=_role(data["strong"]),
                weak=_role(data["weak"]),
                weak_ref=_role(data["weak_ref"]),
                search=SearchSettings(**data.get("search", {})),
                runtime=Runtime(**data.get("runtime", {})),
                description=data.get("description", ""),
                ensemble_prompts=_ensemble_prompts(data.get("ensemble_prompts", [])),
            )
        except KeyError as err:
            raise ValueError(f"a preset needs {err.args[0]!r}") from None
        except TypeError as err:  # an unknown field name inside a section
            raise ValueError(f"bad preset: {err}") from None


def _given(changes: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (changes or {}).items() if v is not None}


_MAX_ENSEMBLE = 16  # pairs of prompts beyond the main one; each costs two weak readings per answer


def _ensemble_prompts(data: Any) -> tuple[tuple[PromptFormat, PromptFormat], ...]:
    """A preset's `ensemble_prompts`: a list of {"weak": {prompt}, "weak_ref": {prompt}}."""
    if not isinstance(data, list):
        raise ValueError('ensemble_prompts must be a list of {"weak": {...prompt...}, "weak_ref": {...prompt...}} objects')
    pairs = []
    for i, pair in enumerate(data):
        if not isinstance(pair, dict) or set(pair) != {"weak", "weak_ref"} or not all(isinstance(v, dict) for v in pair.values()):
            raise ValueError(f'ensemble_prompts[{i}] must be an object with exactly "weak" and "weak_ref" prompt objects')
        pairs.append((PromptFormat(**pair["weak"]), PromptFormat(**pair["weak_ref"])))
    return tuple(pairs)


def _role(data: dict[str, Any]) -> Role:
    return Role(model=data["model"], prompt=PromptFormat(**data.get("prompt", {})))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(name_or_path: str = DEFAULT_PRESET) -> AlignerConfig:
    """A packaged preset by name, or a preset file by path."""
    path = Path(name_or_path)
    if not path.suffix == ".json":
        path = PRESETS_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise ValueError(f"unknown preset {name_or_path!r}: choose one of {', '.join(preset_names())} or give a .json file")
    elif not path.is_file():
        raise FileNotFoundError(f"no such preset file: {path}")
    with open(path, encoding="utf-8") as f:
        return AlignerConfig.from_dict(json.load(f))


def load_named_model(name_or_path: str | Path, runtime: Runtime | None = None) -> Model | ServerModel:
    """The model a name means, shared process-wide: the model a llama-server serves
    for an http:// or https:// address, else the loaded GGUF file of a registry
    name or a path (told apart as `registry.resolve_model` says)."""
    runtime = runtime or Runtime()
    if isinstance(name_or_path, str) and is_server_url(name_or_path):
        return connect_server(name_or_path, runtime.server_api_key())
    return load_model(resolve_model(name_or_path), runtime.load_settings())


class Aligner:
    """Runs searches for one config. Models load on first use and are shared
    process-wide. A search runs on a lane: a set of contexts (the strong model's and
    the weak ones'), reused between searches. With an in-process strong model there
    is one lane, so searches run one at a time; with a llama-server there is one per
    server slot, so that many searches run at once and the server batches them."""

    def __init__(self, config: AlignerConfig):
        self.config = config
        self._models: SearchModels | None = None  # the first lane
        self._free: list[SearchModels] = []
        self._lanes = 0
        self._max_lanes = 1  # until a llama-server says how many slots it has
        self._lanes_changed = threading.Condition()
        self._warned: set[int] = set()  # ids of the contexts already found too small

    def search(
        self,
        prompt: Prompt,
        settings: SearchSettings | None = None,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> SearchResult:
        """One search (see `search.search`); `cancel`, set from another thread, stops it.
        The timeout bounds the whole call: waiting for a free lane, loading the
        models on first use (which cannot be interrupted: a load that ends past the
        deadline stops the call right after), and the search."""
        started = time.perf_counter()
        check_prompt(prompt)  # before anything else: a bad prompt must not wait for models to load
        settings = settings or self.config.search
        check = stop_check(settings, cancel, started)
        models = self._take_lane(check)
        try:
            check()
            if isinstance(models.strong, ServerContext):
                models.strong.n_probs = _server_n_probs(settings, models.strong.model)
            with search_time_limit(settings.timeout, started):  # chat templates render within the search's time
                self._check_fits(models, prompt, settings)
                contexts = [models.strong, *models.proxy.contexts]
                evicted_before = [c.stats.evictions_for_cells for c in contexts]
                result = search(models, prompt, settings, progress, cancel, started)
            self._warn_if_cramped(contexts, evicted_before)
            return result
        finally:
            self._give_back(models)

    def values(self, prompt: Prompt, answers: list[str], settings: SearchSettings | None = None) -> list[float]:
        """The proxy value V of each answer to `prompt`, as a search computes it
        (the same weak prompts, beta, ensemble and length normalization), for the
        answer text as it is: no end token is scored. Used by `check`."""
        check_prompt(prompt)
        settings = settings or self.config.search
        if settings.ensemble and not self.config.ensemble_prompts:
            raise ValueError("the ensemble setting needs `ensemble_prompts` in the preset, or turn `ensemble` off")
        for answer in answers:
            if not isinstance(answer, str):
                raise ValueError(f"an answer must be a string, got {type(answer).__name__}")
        models = self._take_lane(stop_check(settings, None))
        proxy = models.proxy
        proxy.beta, proxy.use_ensemble, proxy.length_normalized = settings.beta, settings.ensemble, settings.length_normalized
        values: list[float] = []
        try:
            self._check_fits(models, prompt, settings)
            root = proxy.start(prompt)
            try:
                # A few at a time: each answer holds a branch per weak role until released.
                for i in range(0, len(answers), _VALUES_BATCH):
                    states = proxy.extend([root] * len(answers[i : i + _VALUES_BATCH]), answers[i : i + _VALUES_BATCH])
                    values += [state.value for state in states]
                    for state in states:
                        proxy.release(state)
            finally:
                proxy.release(root)
        finally:
            self._give_back(models)
        return values

    def _take_lane(self, check) -> SearchModels:
        """A free lane, a new one while there are fewer than the slots allow, or
        (waiting in short steps, so a timeout or a cancel ends the wait) the next one
        given back."""
        with self._lanes_changed:
            while not self._free and self._lanes >= self._max_lanes:
                self._lanes_changed.wait(_WAIT_STEP)
                check()
            if self._free:
                return self._free.pop()
            self._lanes += 1
        try:
            return self._load() if self._models is None else self._new_lane()
        except BaseException:
            with self._lanes_changed:
                self._lanes -= 1
                self._lanes_changed.notify()
            raise

    def _give_back(self, models: SearchModels) -> None:
        with self._lanes_changed:
            self._free.append(models)
            self._lanes_changed.notify()

    def _warn_if_cramped(self, contexts: list[Context], evicted_before: list[int]) -> None:
        """Say so, once per context, when its KV cache was too small for a search to
        keep its branches: they were evicted and read again, which can make a search
        several times slower. n_ctx itself stays what the user set."""
        for context, before in zip(contexts, evicted_before):
            evicted = context.stats.evictions_for_cells - before
            if not evicted or id(context) in self._warned:
                continue
            self._warned.add(id(context))
            asked = self.config.runtime.n_ctx
            rounded = f" (n_ctx={asked}, which llama.cpp rounds up to a multiple of 256)" if asked not in (None, context.n_ctx) else ""
            warnings.warn(
                f"the KV cache of {context.model.name} holds {context.n_ctx} tokens{rounded}, too few for this "
                f"search: it evicted {evicted} branches to make room and read them again, which slows the search. "
                f"Raise n_ctx (e.g. to {2 * context.n_ctx}) or search less (iterations, children, max_new_tokens).",
                RuntimeWarning,
                stacklevel=2,
            )

    def _load(self) -> SearchModels:
        """The first lane (loading the models)."""
        if self._models is None:
            self._models = self._new_lane()
            if isinstance(self._models.strong, ServerContext):
                with self._lanes_changed:
                    self._max_lanes = max(1, self._models.strong.model.slots)
                    self._lanes_changed.notify_all()
        return self._models

    def _new_lane(self) -> SearchModels:
        cfg, rt = self.config, self.config.runtime
        contexts: dict[str, Context] = {}

        def context_for(role: Role) -> Context:
            model = load_named_model(role.model, rt)  # a local model: Role.check refused addresses
            key = str(model.path)
            if key not in contexts:  # one context per model: roles sharing it score together
                contexts[key] = rt.new_context(model)
            return contexts[key]

        aligned, reference = context_for(cfg.weak), context_for(cfg.weak_ref)
        proxy = Proxy(
            WeakScorer(aligned, cfg.weak.prompt),
            WeakScorer(reference, cfg.weak_ref.prompt),
            ensemble=tuple((WeakScorer(aligned, a), WeakScorer(reference, r)) for a, r in cfg.ensemble_prompts),
        )
        strong_model = load_named_model(cfg.strong.model, rt)
        # The strong model gets a context of its own even when it is also a weak one.
        strong = ServerContext(strong_model) if isinstance(strong_model, ServerModel) else rt.new_context(strong_model)
        return SearchModels(strong, cfg.strong.prompt, proxy)

    @staticmethod
    def _check_fits(models: SearchModels, prompt: Prompt, settings: SearchSettings) -> None:
        """One answer path must fit each context (more branches are evicted and
        rebuilt as needed). A weak tokenizer may need more tokens than the strong
        one for the same text: we allow it twice as many."""
        paths = [(models.strong, models.strong_format, settings.max_new_tokens)]
        paths += [(s.context, s.prompt_format, 2 * settings.max_new_tokens) for s in models.proxy.scorers_for(settings.ensemble)]
        for context, prompt_format, answer_tokens in paths:
            prompt_tokens = len(render(context.model, prompt_format, prompt).tokenize_with(context.model, ""))
            if prompt_tokens + answer_tokens > context.n_ctx:
                raise ContextOverflowError(
                    f"{prompt_tokens} prompt tokens + {answer_tokens} answer tokens do not fit the context of "
                    f"{context.model.name} ({context.n_ctx} tokens): raise n_ctx (a llama-server's -c), "
                    "lower max_new_tokens or shorten the prompt"
                )


# Tokens besides top_k that a server's list may hold and the sampler drops (control tokens).
_N_PROBS_MARGIN = 16


def _server_n_probs(settings: SearchSettings, model: ServerModel) -> int:
    """How many of the most likely next tokens to ask a server for: all that top_k
    keeps (the whole vocabulary when top_k is 0), and a margin for dropped ones."""
    return model.n_vocab if settings.top_k == 0 else min(model.n_vocab, settings.top_k + _N_PROBS_MARGIN)

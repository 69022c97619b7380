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
from collections.abc import Callable, Mapping
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
    it up to a multiple of 256). Default (None): the model's training context, at
    most 4096, and more (up to the training context) for a search whose prompts and
    tree need more. Set, a search that needs more is warned before it starts, and
    one that cannot hold its prompts is refused."""
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
        """The n_ctx a context of `model` starts with (a served model's is the server's slot size)."""
        if isinstance(model, ServerModel):
            return model.n_ctx
        return self.n_ctx if self.n_ctx is not None else default_n_ctx(model)

    def largest_context(self, model: Model | ServerModel) -> int:
        """The most KV cells a context of `model` may get: n_ctx when it is set (as
        llama.cpp rounds it), a server's slot size, else the model's training context
        (a search that needs more than a context holds gets a bigger one, up to that)."""
        if isinstance(model, ServerModel):
            return model.n_ctx
        return _rounded_n_ctx(self.n_ctx) if self.n_ctx is not None else model.n_ctx_train

    def new_context(self, model: Model, n_ctx: int | None = None) -> Context:
        return Context(
            model, n_ctx=n_ctx or self.context_size(model), n_batch=self.n_batch, n_threads=self.n_threads,
            n_seq_max=self.n_seq_max,
        )


# llama.cpp rounds a context's n_ctx up to a multiple of this.
_N_CTX_STEP = 256


def _rounded_n_ctx(n: int) -> int:
    return -(-n // _N_CTX_STEP) * _N_CTX_STEP


@dataclass
class ContextNeed:
    """What one search needs of one context: the prompt of each role it holds (a
    weak model in both roles holds two), and the answer tokens beside them."""

    context: Context | ServerContext
    roles: list[str]
    prompt_tokens: list[int]
    """Each role's prompt, as that role's model reads it."""
    path_tokens: int
    """Tokens one answer may take in this model's tokens, per role: max_new_tokens,
    or twice that for a weak model that is not the strong model's file (its
    tokenizer may need more tokens for the same text)."""
    tree_tokens: int
    """Tokens the search's tree may hold, per role (SearchSettings.tree_tokens)."""

    @property
    def least(self) -> int:
        """Cells without which the search cannot run: every prompt and one answer each."""
        return sum(self.prompt_tokens) + len(self.roles) * self.path_tokens

    @property
    def working_set(self) -> int:
        """Cells that keep the whole tree resident (no branch evicted and read again)."""
        return sum(self.prompt_tokens) + len(self.roles) * self.tree_tokens

    def describe(self) -> str:
        """Whose context this is and what its prompts take."""
        prompts = " + ".join(f"{n} ({role})" for n, role in zip(self.prompt_tokens, self.roles))
        return f"{self.context.model.name} (the {' and '.join(self.roles)} role{'s' if len(self.roles) > 1 else ''}): prompts {prompts}"


def context_needs(models: SearchModels, prompt: Prompt, settings: SearchSettings) -> list[ContextNeed]:
    """What a search of `prompt` needs of each context of a lane, before it starts."""
    strong = models.strong
    needs = {
        id(strong): ContextNeed(strong, ["strong"], [_prompt_tokens(strong.model, models.strong_format, prompt)],
                                settings.max_new_tokens, settings.tree_tokens())
    }
    if models.proxy is None:
        return list(needs.values())
    for role, scorer in zip(("weak", "weak_ref"), models.proxy.scorers):
        context = scorer.context
        same_tokenizer = getattr(context.model, "path", None) == getattr(strong.model, "path", "")
        path = settings.max_new_tokens * (1 if same_tokenizer else 2)
        need = needs.setdefault(id(context), ContextNeed(context, [], [], path, settings.tree_tokens()))
        need.roles.append(role)
        need.prompt_tokens.append(_prompt_tokens(context.model, scorer.prompt_format, prompt))
    return list(needs.values())


def prompt_room(config: AlignerConfig, settings: SearchSettings | None = None) -> int:
    """The longest prompt, in the strong model's tokens, that a search with these
    settings can take while its whole tree stays resident in every context (each
    at its largest: see `Runtime.largest_context`): the context window to report
    to a framework that fills it with retrieved text. A weak model in both roles
    holds the prompt twice. Loads the models (or asks the server)."""
    settings = settings or config.search
    runtime, tree = config.runtime, settings.tree_tokens()
    strong = load_named_model(config.strong.model, runtime)
    # Each context and the prompt formats of the roles it holds (the strong model has its own).
    contexts: dict[str, tuple[Model | ServerModel, list[PromptFormat]]] = {"strong": (strong, [config.strong.prompt])}
    for role in (config.weak, config.weak_ref):
        model = load_named_model(role.model, runtime)
        contexts.setdefault(str(model.path), (model, []))[1].append(role.prompt)
    rooms = []
    for model, formats in contexts.values():
        around_prompt = sum(_prompt_tokens(model, prompt_format, "") + tree for prompt_format in formats)
        rooms.append((runtime.largest_context(model) - around_prompt) // len(formats))
    return max(0, min(rooms))


def _prompt_tokens(model: Model | ServerModel, prompt_format: PromptFormat, prompt: Prompt) -> int:
    return len(render(model, prompt_format, prompt).tokenize_with(model, ""))


@dataclass(frozen=True)
class AlignerConfig:
    """Everything that decides an answer."""

    strong: Role
    weak: Role
    weak_ref: Role
    search: SearchSettings = field(default_factory=SearchSettings)
    runtime: Runtime = field(default_factory=Runtime)
    description: str = ""

    def __post_init__(self) -> None:
        for name in ("strong", "weak", "weak_ref"):
            getattr(self, name).check(name)

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
            )
        except KeyError as err:
            raise ValueError(f"a preset needs {err.args[0]!r}") from None
        except TypeError as err:  # an unknown field name inside a section
            raise ValueError(f"bad preset: {err}") from None


def _given(changes: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (changes or {}).items() if v is not None}


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
        on_commit: Callable[[str], None] | None = None,
    ) -> SearchResult:
        """One search (see `search.search`); `cancel`, set from another thread, stops it;
        `on_commit` gets the answer's pieces as a streaming search commits them.
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
                self._make_room(models, prompt, settings)
                contexts = [models.strong, *models.proxy.contexts]
                evicted_before = [c.stats.evictions_for_cells for c in contexts]
                result = search(models, prompt, settings, progress, cancel, started, on_commit)
            self._warn_if_cramped(contexts, evicted_before)
            return result
        finally:
            self._give_back(models)

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
                f"{_OVERFLOW_ADVICE}",
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

        proxy = Proxy(WeakScorer(context_for(cfg.weak), cfg.weak.prompt), WeakScorer(context_for(cfg.weak_ref), cfg.weak_ref.prompt))
        strong_model = load_named_model(cfg.strong.model, rt)
        # The strong model gets a context of its own even when it is also a weak one.
        strong = ServerContext(strong_model) if isinstance(strong_model, ServerModel) else rt.new_context(strong_model)
        return SearchModels(strong, cfg.strong.prompt, proxy)

    def _make_room(self, models: SearchModels, prompt: Prompt, settings: SearchSettings) -> None:
        """Size every context of the lane for this search before it starts. A
        search that cannot fit (its prompts and one answer per role) is refused
        with the numbers. One whose tree would not stay resident gets a bigger
        context, up to the model's training context, when n_ctx is not set;
        otherwise it is told, before it starts, that it will evict and re-read."""
        for need in context_needs(models, prompt, settings):
            context = need.context
            largest = self.config.runtime.largest_context(context.model)
            if need.least > largest:
                answer = "max_new_tokens" if need.path_tokens == settings.max_new_tokens else (
                    "twice max_new_tokens: a weak model with another tokenizer than the strong model's may "
                    "need more tokens for the same text"
                )
                raise ContextOverflowError(
                    f"this search needs at least {need.least} tokens of context in {need.describe()}, and one "
                    f"answer of up to {need.path_tokens} tokens per role ({answer}); it can have at most {largest} "
                    f"({_limit_source(context, self.config.runtime)}). {_OVERFLOW_ADVICE}"
                )
            if not isinstance(context, Context):  # a server's slot re-reads what it lacks: no tree to keep
                continue
            wanted = _rounded_n_ctx(min(largest, need.working_set))
            if wanted > context.n_ctx and self.config.runtime.n_ctx is None:
                grown = self.config.runtime.new_context(context.model, wanted)
                self._replace_context(models, context, grown)
                context = grown
            if need.working_set > context.n_ctx and id(context) not in self._warned:
                self._warned.add(id(context))
                warnings.warn(
                    f"this search's tree needs about {need.working_set} tokens of context to stay resident in "
                    f"{need.describe()}, and the tree about {need.tree_tokens} per role; the context holds "
                    f"{context.n_ctx} ({_limit_source(context, self.config.runtime)}): branches will be evicted "
                    f"and read again, which slows the search. {_OVERFLOW_ADVICE}",
                    RuntimeWarning,
                    stacklevel=3,
                )

    @staticmethod
    def _replace_context(models: SearchModels, old: Context, new: Context) -> None:
        """Put `new` in the lane wherever `old` was (the old one is freed with its last branch)."""
        if models.strong is old:
            models.strong = new
        for scorer in models.proxy.scorers if models.proxy else ():
            if scorer.context is old:
                scorer.context = new


def _limit_source(context: Context | ServerContext, runtime: Runtime) -> str:
    if isinstance(context, ServerContext):
        return "a slot of the llama-server"
    if runtime.n_ctx is not None:
        return f"n_ctx={runtime.n_ctx}"
    return "the model's training context"


_OVERFLOW_ADVICE = (
    "Shorten the prompt, search less (iterations, children, chunk_tokens, max_new_tokens), or leave n_ctx unset "
    "(contexts then grow to what a search needs, up to the model's training context) or raise it (a "
    "llama-server's -c)."
)


# Tokens besides top_k that a server's list may hold and the sampler drops (control tokens).
_N_PROBS_MARGIN = 16


def _server_n_probs(settings: SearchSettings, model: ServerModel) -> int:
    """How many of the most likely next tokens to ask a server for: all that top_k
    keeps (the whole vocabulary when top_k is 0), and a margin for dropped ones."""
    return model.n_vocab if settings.top_k == 0 else min(model.n_vocab, settings.top_k + _N_PROBS_MARGIN)

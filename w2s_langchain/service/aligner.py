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
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from ..deadline import search_time_limit
from ..engine import Context, LoadSettings, Model, load_model
from ..engine.context import MAX_THREADS, check_int_range, default_n_ctx, max_sequences
from ..engine.server import ServerContext, ServerModel, check_api_key, check_server_url, connect_server, is_server_url
from ..errors import ContextOverflowError
from ..models.registry import resolve_model
from ..prompts import Prompt, PromptFormat, check_prompt, render
from ..search import Proxy, SearchModels, SearchResult, SearchSettings, WeakScorer, search
from ..search.strategies import Progress, stop_check

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
    api_key: SecretStr | None = field(default=None, repr=False)
    """The --api-key of the llama-server a strong model's http:// address names
    (default: the LLAMA_API_KEY environment variable, sent only to an address given
    directly, not one read from a preset file). Never logged or shown."""

    served_model_file: str | None = None
    """A copy on this machine of the GGUF file that the strong model's llama-server
    serves on another machine: only its header is read, for the marker tokens an
    answer must never hold (gemma's `<tr>`), which a server's API cannot list. Not
    needed for a server on this machine (its /props names the file)."""

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
        check_int_range("n_seq_max", self.n_seq_max, 1, max_sequences(), "llama.cpp's sequence limit")
        for name in ("use_mmap", "use_mlock"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.api_key, str):  # kept as SecretStr: never shown by repr, dumps or logs
            object.__setattr__(self, "api_key", SecretStr(self.api_key))
        if self.api_key is not None:
            if not isinstance(self.api_key, SecretStr) or not isinstance(self.api_key.get_secret_value(), str):
                raise ValueError("api_key must be a string (the server's --api-key)")
            object.__setattr__(self, "api_key", SecretStr(check_api_key(self.api_key.get_secret_value())))
        self.load_settings()  # checks n_gpu_layers

    def load_settings(self) -> LoadSettings:
        return LoadSettings(self.n_gpu_layers, self.use_mmap, self.use_mlock)

    def server_api_key(self, address_given_directly: bool) -> str | None:
        """The key to send to the strong model's server: api_key, else LLAMA_API_KEY,
        but the environment's key only to an address the caller gave directly (a
        preset file could name anyone's server)."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        from_env = os.environ.get("LLAMA_API_KEY", "").strip() if address_given_directly else ""
        return check_api_key(from_env) if from_env else None

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
    # The roles this search's values read: the main pair, and the ensemble's pairs when it is on.
    for i, scorer in enumerate(models.proxy.scorers_for(settings.ensemble)):
        role = ("weak", "weak_ref")[i % 2] + (f" of ensemble pair {i // 2}" if i >= 2 else "")
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
    strong = config.strong_model()
    # Each context and the prompt formats of the roles it holds (the strong model has its own).
    contexts: dict[str, tuple[Model | ServerModel, list[PromptFormat]]] = {"strong": (strong, [config.strong.prompt])}
    weak_prompts = [(config.weak, config.weak.prompt), (config.weak_ref, config.weak_ref.prompt)]
    if settings.ensemble:
        weak_prompts += [(role, p) for pair in config.ensemble_prompts for role, p in zip((config.weak, config.weak_ref), pair)]
    for role, prompt_format in weak_prompts:
        model = load_named_model(role.model, runtime)
        contexts.setdefault(str(model.path), (model, []))[1].append(prompt_format)
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
    strong_from_preset_file: bool = False
    """Whether the strong model's address came from a preset file rather than from
    the caller: LLAMA_API_KEY is then not sent to it (see Runtime.server_api_key)."""
    ensemble_prompts: tuple[tuple[PromptFormat, PromptFormat], ...] = ()
    """More (aligned, reference) prompts for the weak and weak_ref models:
    paraphrases of the preference, averaged into V with the search setting `ensemble`."""

    def __post_init__(self) -> None:
        for name in ("strong", "weak", "weak_ref"):
            getattr(self, name).check(name)
        if len(self.ensemble_prompts) > _MAX_ENSEMBLE:
            raise ValueError(f"ensemble_prompts holds {len(self.ensemble_prompts)} pairs: at most {_MAX_ENSEMBLE}")
        if self.runtime.served_model_file and not is_server_url(str(self.strong.model)):
            raise ValueError(
                f"served_model_file is for a strong model that a llama-server serves (an http:// address); "
                f"the strong model here is {self.strong.model!r}, read in process: leave served_model_file out"
            )

    def with_overrides(
        self,
        *,
        models: Mapping[str, str | None] | None = None,
        prompts: Mapping[str, dict[str, Any] | None] | None = None,
        search: Mapping[str, Any] | None = None,
        runtime: Mapping[str, Any] | None = None,
    ) -> AlignerConfig:
        """A copy with some settings changed (each checked); a None value keeps the
        config's own. `models` and `prompts` are keyed by role: strong, weak, weak_ref.
        A new weak or weak_ref prompt drops the preset's `ensemble_prompts` and,
        unless `search` sets it, its ensemble: they paraphrase the preset's own
        preference, which they would pull the new one back toward."""
        models, prompts = models or {}, prompts or {}
        roles = {}
        for name in ("strong", "weak", "weak_ref"):
            role, prompt = getattr(self, name), prompts.get(name)
            model = models.get(name)  # "" is a (bad) model name, not "keep the preset's"
            roles[name] = Role(role.model if model is None else model, PromptFormat(**prompt) if prompt is not None else role.prompt)
        search = _given(search)
        ensemble_prompts = self.ensemble_prompts
        if (roles["weak"].prompt, roles["weak_ref"].prompt) != (self.weak.prompt, self.weak_ref.prompt):
            ensemble_prompts = ()
            search.setdefault("ensemble", False)
        new_runtime = replace(self.runtime, **_given(runtime))
        from_file = self.strong_from_preset_file and models.get("strong") is None
        return replace(
            self, search=self.search.with_(**search), runtime=new_runtime, strong_from_preset_file=from_file,
            ensemble_prompts=ensemble_prompts, **roles
        )

    def strong_model(self) -> Model | ServerModel:
        """The strong model, loaded or (for a server address) asked of its server."""
        return load_named_model(self.strong.model, self.runtime, address_given_directly=not self.strong_from_preset_file)

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


_MAX_PRESET_BYTES = 1_000_000


def load_preset(name_or_path: str = DEFAULT_PRESET) -> AlignerConfig:
    """A packaged preset by name ("chat"), or a preset file by path: one ending in
    .json or naming a folder ("./mine", "presets/chat")."""
    path = Path(name_or_path)
    is_path = path.suffix == ".json" or "/" in str(name_or_path) or os.sep in str(name_or_path)
    if not is_path:
        path = PRESETS_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise ValueError(f"unknown preset {name_or_path!r}: choose one of {', '.join(preset_names())} or give a .json file")
    elif not path.is_file():
        raise FileNotFoundError(f"no such preset file: {path} (a regular .json file)")
    with open(path, encoding="utf-8") as f:
        text = f.read(_MAX_PRESET_BYTES + 1)
    try:
        if len(text) > _MAX_PRESET_BYTES:
            raise ValueError(f"it is longer than {_MAX_PRESET_BYTES:,} characters")
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
        return replace(AlignerConfig.from_dict(data), strong_from_preset_file=True)
    except RecursionError:
        raise ValueError(f"preset {path}: nested too deeply to be a preset") from None
    except (ValueError, AttributeError) as err:
        raise ValueError(f"preset {path}: {err}") from None


def load_named_model(
    name_or_path: str | Path, runtime: Runtime | None = None, *, address_given_directly: bool = True
) -> Model | ServerModel:
    """The model a name means, shared process-wide: the model a llama-server serves
    for an http:// or https:// address, else the loaded GGUF file of a registry
    name or a path (told apart as `registry.resolve_model` says)."""
    runtime = runtime or Runtime()
    if isinstance(name_or_path, str) and is_server_url(name_or_path):
        model_file = Path(runtime.served_model_file) if runtime.served_model_file else None
        return connect_server(name_or_path, runtime.server_api_key(address_given_directly), model_file)
    return load_model(resolve_model(name_or_path), runtime.load_settings())


MAX_LANES = 8
# Searches one Aligner runs at once on a llama-server (each lane holds its own weak
# contexts: memory); more wait their turn.
IDLE_LANE_SECONDS = 60.0
# A lane not used for this long is freed when another is given back.


class Aligner:
    """Runs searches for one config. Models load on first use and are shared
    process-wide. A search runs on a lane: a set of contexts (the strong model's and
    the weak ones'), reused between searches. With an in-process strong model there
    is one lane, so searches run one at a time; with a llama-server there is one per
    server slot, so that many searches run at once and the server batches them."""

    def __init__(self, config: AlignerConfig):
        self.config = config
        self._models: SearchModels | None = None  # the first lane
        self._free: list[tuple[float, SearchModels]] = []  # (when given back, lane)
        self._lanes = 0
        self._max_lanes = 1  # until a llama-server says how many slots it has
        self._waiting: deque[object] = deque()  # callers waiting for a lane, first come first served
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
        deadline stops the call right after), every request to a llama-server, and
        the search."""
        started = time.perf_counter()
        check_prompt(prompt)  # before anything else: a bad prompt must not wait for models to load
        settings = settings or self.config.search
        check = stop_check(settings, cancel, started)
        with search_time_limit(settings.timeout, started):  # renders and server requests end with the call
            models = self._take_lane(check)
            try:
                check()
                if isinstance(models.strong, ServerContext):
                    self._follow_server(models)
                    models.strong.n_probs = _server_n_probs(settings, models.strong.model)
                self._make_room(models, prompt, settings)
                contexts = [models.strong, *models.proxy.contexts]
                evicted_before = [c.stats.evictions_for_cells for c in contexts]
                result = search(models, prompt, settings, progress, cancel, started, on_commit)
                self._warn_if_cramped(contexts, evicted_before)
                return result
            finally:
                self._give_back(models)

    def _follow_server(self, models: SearchModels) -> None:
        """Ask the strong model's server what it serves now: after a restart with
        another model or slot size, the lane gets a context of the new one (what was
        learned of the old vocabulary is not used on the new)."""
        served = self.config.strong_model()
        if served is not models.strong.model:
            models.strong = ServerContext(served)
            with self._lanes_changed:
                self._max_lanes = min(served.slots, MAX_LANES)
                self._lanes_changed.notify_all()

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
            # Room for what this holds at once: the prompt and a batch of answers
            # (as long as the longest), not the tree of the settings' search.
            longest = max((len(models.strong.model.tokenize(a)) for a in answers), default=0)
            batch = settings.with_(
                strategy="bon", samples=max(1, min(len(answers), _VALUES_BATCH)), max_new_tokens=max(1, longest),
                token_budget=None,
            )
            self._make_room(models, prompt, batch)
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
        given back. Waiting callers are served in the order they came."""
        me = object()
        with self._lanes_changed:
            self._waiting.append(me)
            try:
                while self._waiting[0] is not me or (not self._free and self._lanes >= self._max_lanes):
                    self._lanes_changed.wait(_WAIT_STEP)
                    check()
            finally:
                self._waiting.remove(me)
                self._lanes_changed.notify_all()  # the next in line may go now
            if self._free:
                return self._free.pop()[1]
            self._lanes += 1
        try:
            return self._load() if self._models is None else self._new_lane()
        except BaseException:
            with self._lanes_changed:
                self._lanes -= 1
                self._lanes_changed.notify_all()
            raise

    def _give_back(self, models: SearchModels) -> None:
        """Return a lane; lanes idle for IDLE_LANE_SECONDS (the first one aside) are
        freed, so that a burst of concurrent calls does not hold its memory forever."""
        now = time.monotonic()
        with self._lanes_changed:
            self._free.append((now, models))
            kept = [lane for lane in self._free if now - lane[0] <= IDLE_LANE_SECONDS or lane[1] is self._models]
            self._lanes -= len(self._free) - len(kept)
            self._free = kept
            self._lanes_changed.notify_all()

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
                    self._max_lanes = min(self._models.strong.model.slots, MAX_LANES)
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
        strong_model = cfg.strong_model()
        # The strong model gets a context of its own even when it is also a weak one.
        strong = ServerContext(strong_model) if isinstance(strong_model, ServerModel) else rt.new_context(strong_model)
        return SearchModels(strong, cfg.strong.prompt, proxy)

    def _make_room(self, models: SearchModels, prompt: Prompt, settings: SearchSettings) -> None:
        """Size every context of the lane for this search before it starts. A
        search that cannot fit (its prompts and one answer per role, or one step's
        next-token rows in memory) is refused with the numbers. One whose tree
        would not stay resident gets a bigger context, up to the model's training
        context, when n_ctx is not set; otherwise it is told, before it starts,
        that it will evict and re-read."""
        rows = settings.branches_per_step * models.strong.model.n_vocab * 8  # a float64 row per branch
        if rows > _MAX_ROW_BYTES:
            raise ValueError(
                f"a step of {settings.branches_per_step:,} branches over the {models.strong.model.n_vocab:,}-token "
                f"vocabulary of {models.strong.model.name} needs {rows / 2**30:.1f} GB of next-token rows, more than "
                f"{_MAX_ROW_BYTES // 2**30} GB: lower samples, beam_width, parallel_leaves or children"
            )
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
        for scorer in models.proxy.all_scorers if models.proxy else ():
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


_MAX_ROW_BYTES = 2 * 2**30
# Memory one step's next-token rows may take (each branch a row of n_vocab numbers).

# Tokens besides top_k that a server's list may hold and the sampler drops (control tokens).
_N_PROBS_MARGIN = 16


# Beyond this many tokens a step, a served top_k=0 costs megabytes of JSON per branch and step.
_LARGE_N_PROBS = 4096


def _server_n_probs(settings: SearchSettings, model: ServerModel) -> int:
    """How many of the most likely next tokens to ask a server for: all that top_k
    keeps (the whole vocabulary when top_k is 0, with a warning for a large one),
    and a margin for dropped ones."""
    if settings.top_k == 0 and model.n_vocab > _LARGE_N_PROBS:
        warnings.warn(
            f"top_k=0 asks {model.name} for all {model.n_vocab:,} tokens' probabilities at every step of every "
            f"branch (about {model.n_vocab * 100 / 1e6:.0f} MB of JSON each), which is slow: set top_k "
            "(e.g. 50) unless the whole distribution matters",
            RuntimeWarning,
            stacklevel=3,
        )
    return model.n_vocab if settings.top_k == 0 else min(model.n_vocab, settings.top_k + _N_PROBS_MARGIN)

"""From a plain config (a preset) to answers: loads the models, keeps their
contexts between searches, and runs the search.

A preset is a JSON file (see presets/): which model plays each role, how each
sees the prompt, the search settings and the llama.cpp runtime settings. Copy
one, edit it, and pass its path wherever a preset name is accepted.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .engine import Context, LoadSettings, Model, load_model
from .errors import ContextOverflowError
from .prompts import Prompt, PromptFormat, render
from .search import Proxy, SearchModels, SearchResult, SearchSettings, WeakScorer, search
from .search.strategies import Progress

PRESETS_DIR = Path(__file__).with_name("presets")
DEFAULT_PRESET = "sentiment"


@dataclass(frozen=True)
class Role:
    """One model and how it is shown the prompt."""

    model: str
    """Registry name or path to a .gguf file."""
    prompt: PromptFormat = field(default_factory=PromptFormat)


@dataclass(frozen=True)
class Runtime:
    """llama.cpp settings shared by the three models."""

    n_ctx: int | None = None
    """KV cells per model context; default: the model's training context, at most 4096."""
    n_batch: int | None = None
    n_threads: int | None = None
    n_seq_max: int = 64
    n_gpu_layers: int = 0
    use_mmap: bool = True
    use_mlock: bool = False

    def load_settings(self) -> LoadSettings:
        return LoadSettings(self.n_gpu_layers, self.use_mmap, self.use_mlock)

    def context_size(self, model: Model) -> int:
        """The n_ctx a context of `model` gets."""
        return self.n_ctx if self.n_ctx is not None else min(model.n_ctx_train, 4096)

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
            roles[name] = Role(models.get(name) or role.model, PromptFormat(**prompt) if prompt is not None else role.prompt)
        new_runtime = replace(self.runtime, **_given(runtime))
        new_runtime.load_settings()  # checks n_gpu_layers
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


class Aligner:
    """Runs searches for one config. Models load on first use and are shared
    process-wide; this object's contexts are reused between searches, which run
    one at a time."""

    def __init__(self, config: AlignerConfig):
        self.config = config
        self._models: SearchModels | None = None
        self._lock = threading.Lock()

    def search(
        self,
        prompt: Prompt,
        settings: SearchSettings | None = None,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> SearchResult:
        """One search (see `search.search`); `cancel`, set from another thread, stops it."""
        settings = settings or self.config.search
        with self._lock:
            models = self._load()
            self._check_fits(models, prompt, settings)
            return search(models, prompt, settings, progress, cancel)

    def _load(self) -> SearchModels:
        if self._models is None:
            cfg, rt = self.config, self.config.runtime
            contexts: dict[str, Context] = {}

            def context_for(role: Role) -> Context:
                model = load_model(role.model, rt.load_settings())
                key = str(model.path)
                if key not in contexts:  # one context per model: roles sharing it score together
                    contexts[key] = rt.new_context(model)
                return contexts[key]

            proxy = Proxy(
                WeakScorer(context_for(cfg.weak), cfg.weak.prompt),
                WeakScorer(context_for(cfg.weak_ref), cfg.weak_ref.prompt),
            )
            # The strong model gets a context of its own even when it is also a weak one.
            strong = rt.new_context(load_model(cfg.strong.model, rt.load_settings()))
            self._models = SearchModels(strong, cfg.strong.prompt, proxy)
        return self._models

    @staticmethod
    def _check_fits(models: SearchModels, prompt: Prompt, settings: SearchSettings) -> None:
        """One answer path must fit each context (more branches are evicted and
        rebuilt as needed). A weak tokenizer may need more tokens than the strong
        one for the same text: we allow it twice as many."""
        paths = [(models.strong, models.strong_format, settings.max_new_tokens)]
        paths += [(s.context, s.prompt_format, 2 * settings.max_new_tokens) for s in models.proxy.scorers]
        for context, prompt_format, answer_tokens in paths:
            prompt_tokens = len(render(context.model, prompt_format, prompt).tokenize_with(context.model, ""))
            if prompt_tokens + answer_tokens > context.n_ctx:
                raise ContextOverflowError(
                    f"{prompt_tokens} prompt tokens + {answer_tokens} answer tokens do not fit the context of "
                    f"{context.model.path.name} ({context.n_ctx} tokens): raise n_ctx, lower max_new_tokens "
                    "or shorten the prompt"
                )

"""The fields every aligned component (LangChain and LlamaIndex) has.

A component starts from a preset (a JSON config, see w2s_langchain/service/presets/) and
overrides any of its settings with these fields. The search and runtime fields
are not written here: each is read from its declaration (`SearchSettings`,
`Runtime`), with the declaration's docstring as its description.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator, model_validator

from ..service.aligner import DEFAULT_PRESET, AlignerConfig, Runtime, load_preset
from ..declared_settings import declared_settings
from ..search import SearchSettings

# The names LangChain and LlamaIndex users pass for a search setting (LlamaCpp,
# ChatOllama and OpenAI all call it `max_tokens`).
ALIASES = {"max_tokens": "max_new_tokens"}
_ROLES = ("strong", "weak", "weak_ref")


def setting_fields(declaration: type) -> dict[str, Any]:
    """The component fields of a settings dataclass, for `pydantic.create_model`:
    each an optional override (None keeps the preset's value), described by the
    setting's docstring."""
    alias_of = {name: alias for alias, name in ALIASES.items()}
    return {
        s.name: (Optional[s.type], Field(default=None, alias=alias_of.get(s.name), description=s.doc, repr=not s.secret))
        for s in declared_settings(declaration)
    }


def search_overrides(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A call's keyword settings under their search names (`max_tokens` is
    `max_new_tokens`); names and values are checked by `SearchSettings.with_`."""
    overrides = dict(kwargs)
    for alias, name in ALIASES.items():
        if alias in overrides:
            value = overrides.pop(alias)
            if overrides.get(name, value) != value:
                raise ValueError(f"{alias}={value!r} and {name}={overrides[name]!r} disagree: give one of them")
            overrides[name] = value
    return overrides


class _ComponentFields(BaseModel):
    """The fields that are not declared settings (the preset, the models and how
    each sees the prompt, streaming, the name in traces), and the config all the
    fields make. Fields are checked when set after construction too
    (`chat.iterations = -3` is refused there, and the old value stays)."""

    # A refused setting's error must not repeat the fields given (an API key among them).
    model_config = ConfigDict(hide_input_in_errors=True)

    preset: str = Field(DEFAULT_PRESET, description="Preset name or path of a preset .json: the base of every setting.")
    strong: str | None = Field(
        None, description="Strong model: registry name, path to a .gguf file, or http://HOST:PORT of a llama-server."
    )
    weak: str | None = Field(None, description="Weak aligned model: registry name or path to a .gguf file.")
    weak_ref: str | None = Field(
        None, description="Weak reference model (may be the same file as `weak`: then the prompts differ)."
    )
    strong_prompt: dict[str, Any] | None = Field(
        None, description="How the strong model sees the prompt (PromptFormat fields: format, system, user, ...)."
    )
    weak_prompt: dict[str, Any] | None = Field(
        None, description='How the aligned weak model sees it, e.g. {"format": "chat", "system": "You always ..."}.'
    )
    weak_ref_prompt: dict[str, Any] | None = Field(None, description="How the weak reference sees it.")
    streaming: bool = Field(
        False, description="Make `invoke` stream internally (callbacks then receive the answer in pieces)."
    )
    model_name: str | None = Field(
        None,
        description="Name shown in traces and metadata; default: the strong model's (registry name or file name).",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """Pydantic would take True for 1 (n_seq_max=True ran with one sequence)."""
        annotation = cls.model_fields[info.field_name].annotation
        types = (annotation, *get_args(annotation))
        if isinstance(value, bool) and bool not in types and (int in types or float in types):
            raise ValueError(f"{info.field_name} must be a number, got {value!r}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _one_name_for_max_tokens(cls, data: Any) -> Any:
        """`max_tokens` is `max_new_tokens` under its usual name: given both, they must agree."""
        if isinstance(data, dict):
            for alias, name in ALIASES.items():
                if alias in data and name in data:
                    if data[alias] != data[name]:
                        raise ValueError(
                            f"{alias}={data[alias]!r} and {name}={data[name]!r} disagree: give one of them "
                            f"({alias} is {name} under the name LangChain and LlamaIndex use)"
                        )
                    data = {k: v for k, v in data.items() if k != alias}
        return data

    def model_post_init(self, __context: Any) -> None:
        self._build_config()  # checks every setting now; loads nothing

    def __setattr__(self, name: str, value: Any) -> None:
        """A setting assigned after construction is checked with all the others
        (the config they make); a refused one leaves the old value in place.
        (Not pydantic's validate_assignment: it re-runs every model validator on
        each assignment, and LangChain's assign fields themselves.)"""
        if name not in _SETTING_FIELDS:
            return super().__setattr__(name, value)
        old = self.__dict__[name]
        super().__setattr__(name, value)
        try:
            self._build_config()
        except ValueError:
            self.__dict__[name] = old
            raise

    @property
    def _config(self) -> AlignerConfig:
        # Built on each use (cheap), so a field changed after construction counts.
        return self._build_config()

    @property
    def max_tokens(self) -> int | None:
        """`max_new_tokens` under the name LangChain and LlamaIndex users know."""
        return self.max_new_tokens

    @max_tokens.setter
    def max_tokens(self, value: int | None) -> None:
        self.max_new_tokens = value

    @property
    def _model_name(self) -> str:
        return self.model_name or Path(self._config.strong.model).name

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """Everything that changes the answer, so a cache never serves another's."""
        cfg = self._config
        return {
            "model_name": self._model_name,
            "strong": dataclasses.asdict(cfg.strong),
            "weak": dataclasses.asdict(cfg.weak),
            "weak_ref": dataclasses.asdict(cfg.weak_ref),
            "search": cfg.search.to_dict(),
        }

    def _build_config(self) -> AlignerConfig:
        return load_preset(self.preset).with_overrides(
            models={name: getattr(self, name) for name in _ROLES},
            prompts={name: getattr(self, f"{name}_prompt") for name in _ROLES},
            search={s.name: getattr(self, s.name) for s in declared_settings(SearchSettings)},
            runtime={s.name: getattr(self, s.name) for s in declared_settings(Runtime)},
        )


AlignedModelSettings = create_model(
    "AlignedModelSettings",
    __base__=_ComponentFields,
    __module__=__name__,
    __doc__="The fields of every aligned component: the preset's, then each search and runtime setting.",
    **setting_fields(SearchSettings),
    **setting_fields(Runtime),
)

# The fields that make the config (the ones above, not a framework's own).
_SETTING_FIELDS = frozenset(AlignedModelSettings.model_fields)

"""Each setting is declared once, as a field of `SearchSettings` or `Runtime` with
its type, default, check and docstring; the components' fields, the `w2s-align`
flags and the preset keys are derived from that declaration."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import get_args

import pytest

from w2s_langchain.cli import align as cli
from w2s_langchain.service.aligner import Runtime
from w2s_langchain.chat_models import ChatW2SAligned
from w2s_langchain.declared_settings import declared_settings
from w2s_langchain.llamaindex_llm import W2SAlignedLlamaIndexLLM
from w2s_langchain.llms import W2SAlignedLLM
from w2s_langchain.search import SearchSettings
from w2s_langchain.search.settings import Backup, SelectionName, Strategy
from w2s_langchain.search.strategies import _STRATEGIES
from w2s_langchain.search.tree import BACKUPS, SELECTIONS

SETTINGS = [s for declaration in (SearchSettings, Runtime) for s in declared_settings(declaration)]
COMPONENTS = [W2SAlignedLLM, ChatW2SAligned, W2SAlignedLlamaIndexLLM]


def _words(text: str) -> str:
    return " ".join(text.split())


def _schema_fields(component: type) -> dict:
    """The fields of a component's JSON schema. LangChain's own callable fields
    have no validation-mode schema, and LlamaIndex's model serializes as a plain
    object: each is read in the mode that lists the fields."""
    mode = "validation" if issubclass(component, W2SAlignedLlamaIndexLLM) else "serialization"
    return component.model_json_schema(mode=mode)["properties"]


def test_every_setting_has_one_docstring():
    assert len(SETTINGS) > 30
    assert [s.name for s in SETTINGS if not s.doc] == []


def test_string_choices_are_literals_and_the_tables_that_run_them_match():
    assert set(_STRATEGIES) == set(get_args(Strategy))
    assert set(SELECTIONS) == set(get_args(SelectionName))
    assert set(BACKUPS) == set(get_args(Backup))
    choices = {s.name: s.choices for s in SETTINGS if s.choices}
    assert set(choices) == {"strategy", "selection", "backup", "terminal_reward", "fallback"}
    with pytest.raises(ValueError, match="unknown fallback 'never': fallback must be one of truncate, finish"):
        SearchSettings(fallback="never")


@pytest.mark.parametrize("component", COMPONENTS, ids=lambda c: c.__name__)
def test_every_setting_is_a_component_field_described_by_its_docstring(component):
    schema = _schema_fields(component)
    for setting in SETTINGS:
        field = component.model_fields[setting.name]
        assert field.description == setting.doc, setting.name
        assert schema[field.alias or setting.name]["description"] == setting.doc
        assert field.default is None  # an override: the preset's value holds


def test_string_choices_are_listed_in_the_schema():
    assert _schema_fields(W2SAlignedLlamaIndexLLM)["strategy"]["anyOf"][0]["enum"] == ["w2s", "bon", "cbs", "base"]


def test_every_setting_is_a_flag_with_its_docstring_as_help():
    helps = {action.dest: action.help for action in cli.build_parser()._actions}
    for setting in SETTINGS:
        assert _words(helps[setting.name].replace("%%", "%")).startswith(_words(setting.doc)), setting.name


def test_flags_take_names_bools_and_repeated_strings():
    args = cli.build_parser().parse_args(
        ["p", "--selection", "uct", "--no-stage2-nonterminal", "--use-mlock", "--stop", "a", "--stop", "b"]
    )
    config = cli.config_from_args(args)
    assert config.search.selection == "uct" and config.search.stage2_nonterminal is False
    assert config.search.stop == ("a", "b") and config.runtime.use_mlock is True
    unset = cli.config_from_args(cli.build_parser().parse_args(["p"]))
    assert unset.search.stage2_nonterminal is True and unset.runtime.use_mmap is True  # the preset's


# A declaration that gains a setting each; the script puts them in place of the
# package's before the components and the command are built, as an edit would.
_PROBE_DECLARATIONS = '''
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from w2s_langchain.service.aligner import Runtime
from w2s_langchain.search import SearchSettings


@dataclass(frozen=True)
class ProbeSearchSettings(SearchSettings):
    tie_break: Literal["first", "last"] = "first"
    """Which of two equal children wins (added by a test)."""


@dataclass(frozen=True)
class ProbeRuntime(Runtime):
    flash_attn: bool = False
    """Use llama.cpp's flash attention (added by a test)."""
'''

_PROBE_SCRIPT = '''
import json

import probe_declarations
import w2s_langchain.service.aligner as aligner
import w2s_langchain.search as search

aligner.Runtime = probe_declarations.ProbeRuntime
aligner.SearchSettings = search.SearchSettings = probe_declarations.ProbeSearchSettings

from w2s_langchain.cli import align as cli
from w2s_langchain.chat_models import ChatW2SAligned
from w2s_langchain.llamaindex_llm import W2SAlignedLlamaIndexLLM
from w2s_langchain.llms import W2SAlignedLLM

found = {}
for component in (W2SAlignedLLM, ChatW2SAligned, W2SAlignedLlamaIndexLLM):
    mode = "validation" if component is W2SAlignedLlamaIndexLLM else "serialization"
    schema = component.model_json_schema(mode=mode)["properties"]
    found[component.__name__] = [schema[name]["description"] for name in ("tie_break", "flash_attn")]
    config = component(tie_break="last", flash_attn=True)._config
    found[component.__name__] += [config.search.tie_break, config.runtime.flash_attn]
parser = cli.build_parser()
found["help"] = " ".join(parser.format_help().split())
config = cli.config_from_args(parser.parse_args(["p", "--tie-break", "last", "--flash-attn"]))
found["flags"] = [config.search.tie_break, config.runtime.flash_attn]
try:
    cli.config_from_args(parser.parse_args(["p", "--tie-break", "middle"]))
except ValueError as err:
    found["checked"] = str(err)
preset = aligner.AlignerConfig.from_dict({
    "strong": {"model": "a.gguf"}, "weak": {"model": "b.gguf"}, "weak_ref": {"model": "b.gguf"},
    "search": {"tie_break": "last"}, "runtime": {"flash_attn": True},
})
found["preset"] = [preset.search.tie_break, preset.runtime.flash_attn]
print(json.dumps(found))
'''


def test_a_setting_added_to_the_declaration_shows_up_everywhere(tmp_path):
    (tmp_path / "probe_declarations.py").write_text(textwrap.dedent(_PROBE_DECLARATIONS), encoding="utf-8")
    (tmp_path / "probe.py").write_text(_PROBE_SCRIPT, encoding="utf-8")
    run = subprocess.run([sys.executable, "probe.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    tie_break, flash_attn = "Which of two equal children wins (added by a test).", "Use llama.cpp's flash attention (added by a test)."
    for component in COMPONENTS:
        assert found[component.__name__] == [tie_break, flash_attn, "last", True]
    assert f"--tie-break TIE_BREAK {tie_break}" in found["help"]
    assert f"--flash-attn, --no-flash-attn {flash_attn}" in found["help"]
    assert found["flags"] == ["last", True]
    assert found["checked"] == "unknown tie_break 'middle': tie_break must be one of first, last"
    assert found["preset"] == ["last", True]

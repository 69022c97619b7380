"""The package's import rules (docs/architecture.md): each folder or top-level
module of w2s_langchain sits on a layer and imports only from lower layers or
from itself; llama.cpp is the engine's alone, LangChain and LlamaIndex the
components'."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "w2s_langchain"

# Lowest first. A unit is a folder or a top-level module of the package.
LAYERS = [
    {"errors", "declared_settings"},
    {"models", "deadline"},
    {"engine"},
    {"prompts"},
    {"search"},
    {"service"},
    {"_component"},
    {"llms", "chat_models", "llamaindex_llm", "cli"},
    {"__init__"},
]
LAYER_OF = {unit: n for n, units in enumerate(LAYERS) for unit in units}
# Third-party packages that only some units may import.
OWNED = {
    "llama_cpp": {"engine"},
    "langchain_core": {"_component", "llms", "chat_models"},
    "llama_index": {"llamaindex_llm"},
}


def unit_of(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, nested ones too."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    here = parts if parts[-1] != "__init__" else parts + ["__init__"]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # `from . import x` and `from .pkg import mod` name modules too.
            found.extend((node.lineno, f"{module}.{alias.name}") for alias in node.names)
    return found


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = unit_of(path)
        assert unit in LAYER_OF, f"{path.relative_to(PACKAGE)} is on no layer: add its unit to LAYERS and docs/architecture.md"
        for line, module in imports(path):
            top, _, rest = module.partition(".")
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if top == "w2s_langchain":
                target = rest.split(".")[0] or "__init__"
                if target not in LAYER_OF:
                    continue  # a name, not a module (from w2s_langchain.x import Name)
                if target != unit and LAYER_OF[target] >= LAYER_OF[unit]:
                    found.append(f"{where}: {unit} (layer {LAYER_OF[unit]}) may not import {target} (layer {LAYER_OF[target]})")
            elif top in OWNED and unit not in OWNED[top]:
                found.append(f"{where}: only {', '.join(sorted(OWNED[top]))} may import {top}")
    return list(dict.fromkeys(found))  # `from .x import y` names x and x.y: one finding


def test_every_import_follows_the_layers():
    assert violations() == []


def test_the_rules_catch_an_upward_import(tmp_path, monkeypatch):
    engine = PACKAGE / "engine" / "context.py"
    source = engine.read_text()
    copy = tmp_path / "w2s_langchain"
    for path in PACKAGE.rglob("*.py"):
        target = copy / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    (copy / "engine" / "context.py").write_text(source + "\nfrom ..search import tree\nimport langchain_core\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", copy)
    found = violations()
    assert len(found) == 2
    assert "engine (layer 2) may not import search (layer 4)" in found[0]
    assert "only" in found[1] and "langchain_core" in found[1]

"""Golden W2S-AlignTree trees: what one leaf per step builds on the tiny models,
held exactly (tests/search/test_w2s.py), so that a change to the search that
should not change the tree cannot.

tests/data/w2s_trees.json is written by this module, from the repository root
(only when the search is meant to change, saying why in the commit):

    PYTHONPATH=.:tests python tests/support/golden_trees.py

Each case records every node in walk order and the answer and cost counters
(wall times left out: they are not reproducible).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from w2s_langchain.search import SearchResult

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "w2s_trees.json"

_SMALL = dict(children=3, chunk_tokens=3, max_new_tokens=12, seed=5)
CASES: dict[str, dict[str, Any]] = {
    "default": {**_SMALL, "iterations": 30},
    # The budget's reserve for the "finish" fallback, and the shorter last chunks.
    "token_budget": {**_SMALL, "iterations": 1000, "max_new_tokens": 24, "token_budget": 80, "fallback": "finish"},
    # Finished leaves valued at once, selected and backed up again.
    "terminal_eos": {**_SMALL, "iterations": 60, "chunk_tokens": 2, "max_new_tokens": 9, "terminal_reward": "eos"},
    "uct_mean_backup": {**_SMALL, "iterations": 30, "selection": "uct", "backup": "mean", "c": 4.0},
}

COUNTERS = (
    "prompt_tokens", "strong_tokens_sampled", "answer_tokens", "strong_tokens_decoded", "weak_tokens_scored",
    "tokens_from_cache", "decode_calls", "iterations", "tree_nodes",
)

# How the engine reads tokens: these change with its caching (which cached token it
# decodes when), not with the search, so the search's fixed point leaves them out.
ENGINE_COUNTERS = ("strong_tokens_decoded", "weak_tokens_scored", "tokens_from_cache", "decode_calls")

# Floats equal to within the noise of F16 KV cells read in other batch shapes (the
# engine's tolerance on these F32 models, tests/engine/test_engine.py); the tree's shape,
# texts and visits must be exactly the same.
ABS_TOL = 1e-3


def record(result: SearchResult) -> dict[str, Any]:
    """A search as plain data: answer, cost counters and every node, in walk order."""
    return {
        "answer": result.text,
        "value": result.value,
        "source": result.source,
        "finish_reason": result.finish_reason,
        "cost": {name: getattr(result.cost, name) for name in COUNTERS},
        "nodes": [
            {
                "text": node.chunk.text,
                "children": len(node.children),
                "prior": node.prior,
                "visits": node.visits,
                "value": node.value,
                "own_value": node.own_value,
                "eos_value": node.eos_value,
                "entropy": node.entropy,
                "finish_reason": node.chunk.finish_reason,
            }
            for node in result.tree.walk()
        ],
    }


def differences(got: Any, expected: Any, where: str = "") -> list[str]:
    """Where two records differ (floats compared to ABS_TOL; infinities exactly)."""
    if isinstance(expected, dict) and isinstance(got, dict):
        if got.keys() != expected.keys():
            return [f"{where}: keys {sorted(got)} != {sorted(expected)}"]
        return [d for key in expected for d in differences(got[key], expected[key], f"{where}.{key}")]
    if isinstance(expected, list) and isinstance(got, list):
        if len(got) != len(expected):
            return [f"{where}: {len(got)} items != {len(expected)}"]
        return [d for i, (g, e) in enumerate(zip(got, expected)) for d in differences(g, e, f"{where}[{i}]")]
    if isinstance(expected, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        same = got == expected or math.isclose(got, expected, rel_tol=0, abs_tol=ABS_TOL)
        return [] if same else [f"{where}: {got!r} != {expected!r}"]
    return [] if got == expected and type(got) is type(expected) else [f"{where}: {got!r} != {expected!r}"]


def main() -> None:
    from support.search_models import PROMPT, make_models
    from support.tiny_gguf import write_tiny_models

    from w2s_langchain.search import SearchSettings, search

    with tempfile.TemporaryDirectory() as folder:
        tiny_models = write_tiny_models(folder)
        golden = {
            name: record(search(make_models(tiny_models), PROMPT, SearchSettings(**settings)))
            for name, settings in CASES.items()
        }
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Shows that the tests notice small wrong changes to the search, the engine and
the proxy: each mutation below is applied to a copy of the package, the tests
named for it run against that copy, and the mutation is "caught" when they fail.

    python tests/support/mutations.py [NAME ...]

Each mutation is a (file, old text, new text) replacement that must match the
source exactly once, so a mutation that no longer applies is reported, not
silently skipped. The unchanged copy runs every named test first: they must pass.
Run from the repository root, in the environment the tests use.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "w2s_langchain"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    """Path inside the package."""
    old: str
    new: str
    tests: tuple[str, ...]
    """pytest arguments (files, -k expressions) that should fail with it."""


SCRIPTED = "tests/search/test_search_scripted.py"

MUTATIONS = [
    Mutation(
        "virtual loss taken back only on a normal return",
        "search/tree.py",
        "    finally:\n        for path in paths:\n            virtual_loss(path, -1)\n",
        "    except BaseException:\n        raise\n    for path in paths:\n        virtual_loss(path, -1)\n",
        ("tests/search/test_tree.py",),
    ),
    Mutation(
        "the budget stop `left <= 0` written `left < 0`",
        "search/strategies.py",
        "if open_leaves == 0 or left <= 0:",
        "if open_leaves == 0 or left < 0:",
        (SCRIPTED,),
    ),
    Mutation(
        "open leaves decremented by 1, not by the leaves grown",
        "search/strategies.py",
        "open_leaves += sum(not c.terminal for c in children) - len(growing)",
        "open_leaves += sum(not c.terminal for c in children) - 1",
        (SCRIPTED,),
    ),
    Mutation(
        "`rankable` counting the root",
        "search/strategies.py",
        "any(leaf is not root and any(c.terminal for c in leaf.children) for leaf in growing)",
        "any(any(c.terminal for c in leaf.children) for leaf in growing)",
        (SCRIPTED,),
    ),
    Mutation(
        "the fallback's reserve short by K",
        "search/strategies.py",
        "reserve = 0 if end.terminal else s.max_new_tokens - len(end.chunk.tokens)",
        "reserve = 0 if end.terminal else s.max_new_tokens - len(end.chunk.tokens) - s.children",
        (SCRIPTED,),
    ),
    Mutation(
        "the fallback's greedy step costed at one chunk, not K",
        "search/strategies.py",
        "if left >= s.children * s.chunk_tokens + max(to_go - s.chunk_tokens, 0):",
        "if left >= s.chunk_tokens + max(to_go - s.chunk_tokens, 0):",
        (SCRIPTED,),
    ),
    Mutation(
        "the fallback's plain sample drawing the whole remainder",
        "search/strategies.py",
        "run.expand([node], 1, min(to_go, left), distinct=False)",
        "run.expand([node], 1, to_go, distinct=False)",
        (SCRIPTED,),
    ),
    Mutation(
        "the reserve not capped below the first step (the empty-answer bug)",
        "search/strategies.py",
        "        reserve = min(reserve, max(s.token_budget - s.children * s.chunk_tokens, 0))\n",
        "",
        (SCRIPTED, "tests/components/test_llms.py", "-k", "budget_below"),
    ),
    Mutation(
        "every parent of a step given parent 0's entropy",
        "search/strategies.py",
        "            parent.entropy = entropy\n",
        "            parent.entropy = families[0][0]\n",
        (SCRIPTED,),
    ),
    Mutation(
        "EA-PUCT reading the child's entropy",
        "search/tree.py",
        "(1 + w * (parent.entropy or 0.0))",
        "(1 + w * (child.entropy or 0.0))",
        ("tests/search/test_tree.py",),
    ),
    Mutation(
        "fork claiming cells that were never decoded",
        "engine/context.py",
        "shared = min(n, branch._n_cached) if branch.resident",
        "shared = n if branch.resident",
        ("tests/engine/test_engine.py", "-k", "fork"),
    ),
    Mutation(
        "eos scored with the other role's end token",
        "search/proxy.py",
        "log_softmax_at(r, ends[1])",
        "log_softmax_at(r, ends[0])",
        ("tests/search/test_scoring.py",),
    ),
    Mutation(
        "answer_start ignoring an answer that merges into the prompt",
        "search/proxy.py",
        "answer_start = common_prefix_length(prompt_tokens, tokens)",
        "answer_start = len(prompt_tokens)",
        ("tests/search/test_scoring.py",),
    ),
]


def run_tests(package_parent: Path, tests: tuple[str, ...]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    # -P: without it `python -m` puts the working directory (this checkout, with
    # the unchanged package) ahead of PYTHONPATH.
    command = [sys.executable, "-P", "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)


def copy_package(into: Path) -> Path:
    target = into / PACKAGE
    shutil.copytree(ROOT / PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="run only the mutations whose name contains one of these")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.names or any(n in m.name for n in args.names)]
    missed = 0
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "clean"
        copy_package(clean)
        for tests in dict.fromkeys(m.tests for m in chosen):
            baseline = run_tests(clean, tests)
            if baseline.returncode != 0:
                print(f"the unchanged package fails {' '.join(tests)}:\n{baseline.stdout[-3000:]}")
                return 2
        for m in chosen:
            where = Path(tmp) / "mutant"
            shutil.rmtree(where, ignore_errors=True)
            source = copy_package(where) / m.file
            text = source.read_text()
            if text.count(m.old) != 1:
                print(f"NOT APPLIED  {m.name}: the text to change is in {m.file} {text.count(m.old)} times, not once")
                missed += 1
                continue
            source.write_text(text.replace(m.old, m.new))
            result = run_tests(where, m.tests)
            failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
            if result.returncode == 1:
                print(f"caught       {m.name}: {failed[0] if failed else 'a test failed'}")
            elif result.returncode == 0:
                print(f"MISSED       {m.name} ({' '.join(m.tests)} all pass)")
                missed += 1
            else:
                print(f"ERROR        {m.name}: pytest exited {result.returncode}\n{result.stdout[-2000:]}")
                missed += 1
    print(f"{len(chosen) - missed} of {len(chosen)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

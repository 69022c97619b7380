"""Serving benchmark: the strong model behind llama-server, the weak ones local.

    python benchmarks/serving.py [--iterations 100] [--threads 1]

On the default preset (gemma-3-270m strong, SmolLM2-135M-Instruct as the weak pair,
w2s, 1 llama.cpp thread per model), measured side by side in one run:
  (a) one search with the strong model in-process vs the same search against a
      local llama-server (started here with --parallel 4): what HTTP and the
      server's own scheduling add;
  (b) 1, 2 and 4 searches at once (asyncio `ainvoke`) against that server, and the
      same 4 one after another: wall time, and whether each answer equals its
      solo run. Target: 4 at once in <= 0.6x the time of 4 in a row. Twice: with the
      server's default batching, and with --ubatch-size 1 (no batching, so an answer
      cannot depend on what else the server decodes).
The server binary comes from .ci/build-llama-server (or $LLAMA_SERVER).
Writes benchmarks/results/serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from w2s_langchain.llms import W2SAlignedLLM
from w2s_langchain.engine.local_server import LocalLlamaServer
from w2s_langchain.models.registry import resolve_model

PROMPTS = ["The restaurant on the corner", "I bought this blender last week and", "The hotel room was", "Our guide on the tour"]
RESULTS = Path(__file__).resolve().parent / "results"
SLOTS = 4


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    fields = dict(iterations=args.iterations, n_threads=args.threads)
    strong_file = resolve_model("gemma-3-270m")
    lines = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    # The server's default batches the slots' tokens into one decode; quantized kernels
    # then round differently than for one token, so an answer can change with what runs
    # beside it. --ubatch-size 1 decodes one token at a time: answers independent of
    # concurrency, no batching (which, on this CPU, saves little at these sizes).
    configurations = [("default batching", []), ("--ubatch-size 1", ["--ubatch-size", "1"])]
    for name, options in configurations:
        with LocalLlamaServer(strong_file, parallel=SLOTS, ctx=2048, threads=args.threads, options=options) as server:
            served = W2SAlignedLLM(strong=server.url, **fields)
            served.invoke(PROMPTS[0], iterations=2)  # the first call asks the server what it serves
            if name == configurations[0][0]:
                one_search(say, served, fields)
            concurrent_searches(say, served, name)

    header = [
        "# Serving benchmark",
        "",
        f"- command: `python benchmarks/serving.py --iterations {args.iterations} --threads {args.threads}`",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; commit {_commit()}; load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}",
        f"- preset `sentiment` with {args.iterations} iterations; llama-server (built from llama-cpp-python's llama.cpp) "
        f"serves gemma-3-270m with --parallel {SLOTS}, -t {args.threads}, -fa off, --swa-full on this same machine; "
        "the weak model runs in-process, one context per concurrent search",
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving.md").write_text("\n".join(header + lines) + "\n", encoding="utf-8")


def one_search(say, served: W2SAlignedLLM, fields: dict) -> None:
    """(a): the same search with the strong model in-process and on the server."""
    in_process = W2SAlignedLLM(**fields)
    in_process.invoke(PROMPTS[0], iterations=2)  # load the models before timing
    say("## (a) one search: strong model in-process vs on a local llama-server")
    say()
    say("| strong model | wall time | answer |")
    say("|---|---|---|")
    local_answer, local_time = timed(lambda: in_process.invoke(PROMPTS[0]))
    served_answer, served_time = timed(lambda: served.invoke(PROMPTS[0]))
    say(f"| in-process | {local_time:.1f} s | {local_answer[:40]!r}... |")
    say(f"| llama-server | {served_time:.1f} s ({served_time / local_time:.2f}x) | {served_answer[:40]!r}... |")
    say(f"\nSame answer: {served_answer == local_answer} (quantized kernels differ between batch shapes and builds).")


def concurrent_searches(say, served: W2SAlignedLLM, name: str) -> None:
    """(b): 1, 2 and 4 searches at once against the server, each against its solo run."""
    say(f"\n## (b) searches at once against one server (--parallel {SLOTS}), {name}")
    say()
    solo, solo_times = [], []
    for prompt in PROMPTS:
        answer, seconds = timed(lambda p=prompt: served.invoke(p))
        solo.append(answer)
        solo_times.append(seconds)
    say("| searches | wall time | the same searches one after another | ratio | answers equal to their solo runs |")
    say("|---|---|---|---|---|")
    for n in (1, 2, 4):
        async def together(n=n):
            return await asyncio.gather(*(served.ainvoke(p) for p in PROMPTS[:n]))

        answers, seconds = timed(lambda: asyncio.run(together()))
        one_by_one = sum(solo_times[:n])
        equal = sum(a == b for a, b in zip(answers, solo))
        say(f"| {n} at once | {seconds:.1f} s | {one_by_one:.1f} s | **{seconds / one_by_one:.2f}x** | {equal} of {n} |")
    say(f"\nThe solo runs took {', '.join(f'{t:.1f}' for t in solo_times)} s.")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())

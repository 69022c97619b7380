"""Latency of the chat preset on a RAG-size prompt: time to first token and total
time of the whole-tree search and of the streaming mode (`commit_every`), at
the same budget (the preset's iterations), alternated in one run.

    python benchmarks/latency.py                 # 3 pairs, commit_every 4
    python benchmarks/latency.py --pairs 1 --commit-every 4 --threads 1

The prompt is a RAG prompt as a LangChain chain builds it: a system message
holding 9 retrieved passages of examples/town_guide.txt (about 1,000 tokens in
all) and a question. Each search streams through `ChatW2SAligned.stream`; the
first token is the first non-empty piece. Results go to
benchmarks/results/latency.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from langchain_core.prompts import ChatPromptTemplate

from w2s_langchain.chat_models import ChatW2SAligned

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GUIDE = HERE.parent / "examples" / "town_guide.txt"
QUESTION = "When does the library open on Saturday, and which bus goes there from the station?"
PROMPT = ChatPromptTemplate.from_messages(
    [("system", "Answer from the context only.\nContext:\n{context}"), ("human", "{question}")]
)


def rag_messages(passages: int = 9):
    context = "\n\n".join(GUIDE.read_text(encoding="utf-8").split("\n\n")[:passages])
    return PROMPT.invoke({"context": context, "question": QUESTION}).to_messages()


def timed_stream(chat: ChatW2SAligned, messages) -> dict:
    started = time.perf_counter()
    first, pieces, last = None, [], None
    for chunk in chat.stream(messages):
        if chunk.content and first is None:
            first = time.perf_counter() - started
        pieces.append(chunk.content)
        last = chunk
    total = time.perf_counter() - started
    return {
        "first": first if first is not None else total,
        "total": total,
        "answer": "".join(pieces),
        "input_tokens": last.usage_metadata["input_tokens"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="whole-tree / streaming pairs, alternated")
    parser.add_argument("--commit-every", type=int, default=4, help="the streaming mode's commit_every")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per model")
    args = parser.parse_args()
    args.commit = _commit()  # the code measured: the checkout as the run starts
    messages = rag_messages()
    fields = dict(preset="chat", n_threads=args.threads)
    whole = ChatW2SAligned(**fields)
    streaming = ChatW2SAligned(**fields, commit_every=args.commit_every)
    whole.invoke("Hi", max_tokens=2, iterations=1)  # load the models and size the contexts outside the timings
    runs: dict[str, list[dict]] = {"whole-tree": [], "streaming": []}
    for pair in range(args.pairs):
        for name, chat in (("whole-tree", whole), ("streaming", streaming)):
            run = timed_stream(chat, messages)
            runs[name].append(run)
            print(f"pair {pair + 1} {name}: first token {run['first']:.1f} s, total {run['total']:.1f} s", flush=True)
        report(args, whole, runs)  # after each pair: a long run leaves what it measured


def report(args: argparse.Namespace, whole: ChatW2SAligned, runs: dict[str, list[dict]]) -> None:
    lane = whole._aligner._models
    cells = ", ".join(f"{c.model.name} {c.n_ctx} cells, {c.stats.evictions_for_cells} evictions for cells"
                      for c in [lane.strong, *lane.proxy.contexts])

    def med(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    lines = [
        "# Latency: the chat preset on a RAG-size prompt",
        "",
        f"- command: `python benchmarks/latency.py --pairs {args.pairs} --commit-every {args.commit_every} "
        f"--threads {args.threads}`",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; commit {args.commit}; load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} (other work shared the machine: times are slower than "
        "on a quiet one, the ratios are from alternated runs)",
        f"- preset `chat` (SmolLM2-135M-Instruct in all three roles, {whole._config.search.iterations} iterations, "
        f"K = {whole._config.search.children}, L = {whole._config.search.chunk_tokens}, max_new_tokens "
        f"{whole._config.search.max_new_tokens}), {args.threads} llama.cpp thread(s) per model; prompt: "
        f"{runs['whole-tree'][0]['input_tokens']} tokens (9 passages of examples/town_guide.txt and a question); "
        f"contexts after the run: {cells}",
        "",
        f"- pairs measured: {len(runs['streaming'])} of {args.pairs}",
        "",
        "| | time to first token (median) | total time (median) | first token / total |",
        "|---|---|---|---|",
    ]
    for name in runs:
        lines.append(f"| {name} | {med(name, 'first'):.1f} s | {med(name, 'total'):.1f} s | "
                     f"{med(name, 'first') / med(name, 'total'):.2f} |")
    lines += [
        "",
        f"Streaming / whole-tree: time to first token {med('streaming', 'first') / med('whole-tree', 'first'):.2f}x, "
        f"total time {med('streaming', 'total') / med('whole-tree', 'total'):.2f}x.",
        "",
        "Each run (seconds, first token / total) and its answer:",
        "",
    ]
    for name, name_runs in runs.items():
        for run in name_runs:
            lines.append(f"- {name}: {run['first']:.1f} / {run['total']:.1f}: {run['answer']!r}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latency.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    return done.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())

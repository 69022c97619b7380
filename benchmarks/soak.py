"""Soak test: many sequential calls on one component, watching for leaks and drift.

    python benchmarks/soak.py [--tiny-calls 1000] [--packaged-calls 100] [--threads 1]

Two runs, one after the other, each on one W2SAlignedLLM under a fixed seed:
  tiny      the test suite's tiny GGUF models (written into a temporary folder)
  packaged  a packaged preset ("sentiment": gemma-3-270m steered by SmolLM2-135M)
            with a small search
Calls cycle through a few prompts and through invoke, stream and ainvoke.

Checks (the exit status is 1 if any fails):
  - after every call, no branch holds a sequence id and no KV cell is used;
  - every answer equals the first answer to the same prompt;
  - after the last call, open file descriptors and threads are where they were
    after warm-up (one full cycle of prompts and call forms), and RSS has grown
    by less than the run's bound (see RSS_BOUND_MB);
  - once the component is deleted, its models are freed and file descriptors and
    threads are back where they were before the first call.
The report goes to stdout and to benchmarks/results/soak.md.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import os
import platform
import shlex
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from w2s_langchain.engine import Context
from w2s_langchain.llms import W2SAlignedLLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the suite's tiny model writer
from support.tiny_gguf import write_tiny_models  # noqa: E402

RESULTS = Path(__file__).with_name("results") / "soak.md"
TINY_PROMPTS = ["Once upon a time", "The cat sat", "Hello there", "A long way from home", "The dog ran"]
PACKAGED_PROMPTS = ["The hotel room was", "The film was", "I bought this blender last week and", "Our guide", "The café"]
FORMS = ("invoke", "stream", "ainvoke")

# Most RSS may grow between warm-up and the last call. Nothing lasts from one call
# to the next, so what moves RSS is the allocator: its free lists and per-thread
# arenas (+2 MB over 3,000 tiny ainvoke calls with regular full collections, then
# flat) and garbage waiting for Python's next full collection. A leak worth catching
# is far above: a tiny search drops ~300 KB, so keeping 5% of it per call passes
# 16 MB within 1,000 calls; a gemma-3-270m logits row is 1 MB (262,144 floats), so
# keeping one row per call passes 32 MB within 35 calls.
RSS_BOUND_MB = {"tiny": 16, "packaged": 32}


@dataclass(frozen=True)
class Snapshot:
    """The resources of the process (and of the component's contexts) at one point."""

    label: str
    kv_cells: int | None  # None: no context yet
    resident: int | None  # branches holding a sequence id
    fds: int
    threads: int
    rss_mb: float
    seconds: float

    def row(self) -> str:
        def shown(value):
            return "-" if value is None else str(value)

        return (
            f"| {self.label} | {shown(self.kv_cells)} | {shown(self.resident)} | {self.fds} | {self.threads} "
            f"| {self.rss_mb:.1f} | {self.seconds:.0f} |"
        )


TABLE_HEAD = [
    "| after | KV cells used | sequence ids in use | open fds | threads | RSS (MB) | wall (s) |",
    "|---|---|---|---|---|---|---|",
]


def proc_status(field: str) -> int:
    """A number from /proc/self/status (VmRSS is in kB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def lasting_threads() -> int:
    """Threads of the process, leaving out any on its way out (the threads of
    asyncio.run's executor end just after it returns): the fewest over half a second."""
    counts = []
    for _ in range(10):
        counts.append(proc_status("Threads"))
        time.sleep(0.05)
    return min(counts)


def contexts_of(llm: W2SAlignedLLM) -> list[Context]:
    """The component's llama.cpp contexts; none before its first call."""
    aligner = llm._aligner
    if aligner is None or aligner._models is None:
        return []
    return [aligner._models.strong] + aligner._models.proxy.contexts


def held(llm: W2SAlignedLLM) -> tuple[int | None, int | None]:
    """KV cells used and branches resident, summed over the component's contexts."""
    contexts = contexts_of(llm)
    if not contexts:
        return None, None
    return sum(c.kv_cells_used() for c in contexts), sum(c.n_resident for c in contexts)


def snapshot(label: str, llm: W2SAlignedLLM | None, started: float) -> Snapshot:
    cells, resident = held(llm) if llm is not None else (None, None)
    return Snapshot(
        label, cells, resident, fds=len(os.listdir("/proc/self/fd")), threads=lasting_threads(),
        rss_mb=proc_status("VmRSS") / 1024, seconds=time.perf_counter() - started,
    )


def answer(llm: W2SAlignedLLM, form: str, prompt: str) -> str:
    if form == "stream":
        return "".join(llm.stream(prompt))
    if form == "ainvoke":
        return asyncio.run(llm.ainvoke(prompt))
    return llm.invoke(prompt)


class Report:
    """Lines printed as they come, and kept for the results file."""

    def __init__(self):
        self.lines: list[str] = []
        self.failures: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def check(self, ok: bool, what: str) -> None:
        self(f"- {'PASS' if ok else 'FAIL'}: {what}")
        if not ok:
            self.failures.append(what)


def soak(name: str, make_llm: Callable[[], W2SAlignedLLM], prompts: list[str], n_calls: int, every: int, report: Report) -> None:
    """`n_calls` sequential calls on one component, then delete it; report and check."""
    started = time.perf_counter()
    warm_up = min(len(prompts) * len(FORMS), n_calls)
    report(f"\n## {name}: {n_calls} calls\n")
    report("\n".join(TABLE_HEAD))
    before = snapshot("start (nothing loaded)", None, started)
    report(before.row())
    llm = make_llm()
    first_answers: dict[str, str] = {}
    drifted, left_held = [], []
    for n in range(1, n_calls + 1):
        prompt, form = prompts[(n - 1) % len(prompts)], FORMS[(n - 1) % len(FORMS)]
        text = answer(llm, form, prompt)
        if text != first_answers.setdefault(prompt, text):
            drifted.append(f"call {n} ({form} {prompt!r})")
        if held(llm) != (0, 0):
            left_held.append(f"call {n}: {held(llm)}")
        if n in (warm_up, n_calls) or n % every == 0:
            label = f"call {n}" + (" (warm-up done)" if n == warm_up else "")
            now = snapshot(label, llm, started)
            report(now.row())
            if n == warm_up:
                warm = now
    end = now
    models = [weakref.ref(c.model) for c in contexts_of(llm)]
    del llm
    gc.collect()
    freed = snapshot("component deleted", None, started)
    report(freed.row())
    # What glibc keeps of the freed memory for reuse, handed back: leaks stay.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = snapshot("heap trimmed (malloc_trim)", None, started)
    report(trimmed.row())

    report()
    bound = RSS_BOUND_MB[name]
    report.check(not left_held, f"no KV cell or sequence id held after any call ({len(left_held)} calls left some: {left_held[:3]})")
    report.check(not drifted, f"every answer equal to the first to its prompt ({len(drifted)} differ: {drifted[:3]})")
    report.check(end.fds == warm.fds, f"open fds after the last call = after warm-up ({end.fds} vs {warm.fds})")
    report.check(end.threads == warm.threads, f"threads after the last call = after warm-up ({end.threads} vs {warm.threads})")
    growth = end.rss_mb - warm.rss_mb
    report.check(growth < bound, f"RSS growth after warm-up {growth:+.1f} MB < {bound} MB")
    report.check(all(model() is None for model in models), "models freed with the component")
    report.check(freed.fds == before.fds, f"open fds back to the start ({freed.fds} vs {before.fds})")
    report.check(freed.threads == before.threads, f"threads back to the start ({freed.threads} vs {before.threads})")


def tiny_llm(models_dir: Path, threads: int) -> Callable[[], W2SAlignedLLM]:
    models = write_tiny_models(models_dir)
    plain = {"format": "plain"}
    return lambda: W2SAlignedLLM(
        strong=str(models.tiny_c), weak=str(models.tiny_a), weak_ref=str(models.tiny_b),
        strong_prompt=plain, weak_prompt=plain, weak_ref_prompt=plain,
        iterations=8, children=3, chunk_tokens=3, max_new_tokens=24, n_ctx=512, n_threads=threads, seed=3,
    )


def packaged_llm(preset: str, threads: int) -> Callable[[], W2SAlignedLLM]:
    return lambda: W2SAlignedLLM(preset=preset, iterations=4, max_new_tokens=24, n_threads=threads, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny-calls", type=int, default=1000)
    parser.add_argument("--packaged-calls", type=int, default=100)
    parser.add_argument("--preset", default="sentiment", help="packaged preset for the second run")
    parser.add_argument("--every", type=int, default=100, help="a row of figures every this many tiny calls")
    parser.add_argument("--packaged-every", type=int, default=10, help="... and packaged calls")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per context")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    report = Report()
    report("# Soak test\n")
    report(f"- command: `python benchmarks/soak.py {shlex.join(sys.argv[1:])}`")
    report(f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    report(
        f"- machine: {os.cpu_count()} CPUs, {platform.machine()}, {platform.system()} {platform.release()}, "
        f"Python {sys.version.split()[0]}; load average at the start {os.getloadavg()[0]:.1f}"
    )
    report(f"- llama.cpp threads per context: {args.threads}; calls cycle through {', '.join(FORMS)}")
    report(
        f"- memory bound: RSS may grow by less than {RSS_BOUND_MB['tiny']} MB (tiny) and "
        f"{RSS_BOUND_MB['packaged']} MB (packaged) from warm-up to the last call. Nothing lasts from "
        "one call to the next, so only the allocator and garbage awaiting collection move RSS; keeping "
        "5% of what a tiny search drops (~300 KB), or one gemma-3-270m logits row (1 MB), per call would pass it."
    )
    with tempfile.TemporaryDirectory() as models_dir:
        soak("tiny", tiny_llm(Path(models_dir), args.threads), TINY_PROMPTS, args.tiny_calls, args.every, report)
    if args.packaged_calls:
        make = packaged_llm(args.preset, args.threads)
        soak("packaged", make, PACKAGED_PROMPTS, args.packaged_calls, args.packaged_every, report)

    report(f"\n**{'FAIL: ' + '; '.join(report.failures) if report.failures else 'PASS: every check'}**")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report.lines) + "\n", encoding="utf-8")
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()

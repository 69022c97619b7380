"""Served soak: concurrent searches on a real llama-server under faults, watching
for leaks, wrong answers and foreign errors.

    python benchmarks/served_soak.py [--minutes 60] [--callers 6] [--slots 4]

One W2SAlignedLLM whose strong model is a llama-server (LocalLlamaServer) serving
a tiny GGUF model; the weak models are tiny GGUF models in process. `--callers`
threads call it at once until the time is up, each call one of: a plain call, a
call with a short timeout, an async call cancelled after a random delay. Halfway,
the server is stopped and started again on the same port with another model (of
another vocabulary).

Checks (the exit status is 1 if any fails):
  - every answer equals the in-process answer of the model served when the call
    ran (calls that overlap the restart may have either model's answer);
  - every error is one of the package's own (W2SError): timeouts, cancels, the
    server being away during the restart; nothing else;
  - after the last call every lane is given back, none holds a weak branch, and
    there are at most as many lanes as the server has slots;
  - RSS and threads at the end are where they were after warm-up (RSS within
    RSS_BOUND_MB; threads equal, leaving out the request threads, which a
    connection keeps up to its bound).
The report is printed and written as the "Served soak" section of
benchmarks/results/soak.md (the rest of that file is left as it is).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import random
import shlex
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from w2s_langchain.errors import W2SError
from w2s_langchain.llms import W2SAlignedLLM
from w2s_langchain.engine.local_server import LocalLlamaServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from soak import lasting_threads, proc_status  # noqa: E402
from support.tiny_gguf import write_tiny_models  # noqa: E402

RESULTS = Path(__file__).with_name("results") / "soak.md"
SECTION = "# Served soak"
PROMPTS = ["Once upon a time", "The cat sat", "Hello there", "A long way from home", "The dog ran", "It was late"]
RSS_BOUND_MB = 48
# Each caller's first calls load and warm what lasts (weak contexts of its lane, the
# server's vocabulary facts); a leak of one 8 KB row per request would pass the bound
# within a few thousand calls.
PLAIN = {"format": "plain"}


def server_request_threads() -> list[threading.Thread]:
    """The threads that send requests to llama-server: a connection's pool starts them
    as concurrent requests need them, up to its bound, and keeps them while it lives
    (a connection replaced after a restart lets its own end)."""
    return [t for t in threading.enumerate() if t.name.startswith("w2s-server_")]


def other_threads() -> int:
    """The process's threads (llama.cpp's included) other than request threads."""
    return lasting_threads() - len(server_request_threads())


def make_llm(strong: str, models, threads: int, **more) -> W2SAlignedLLM:
    return W2SAlignedLLM(
        strong=strong, weak=str(models.tiny_a), weak_ref=str(models.tiny_b),
        strong_prompt=PLAIN, weak_prompt=PLAIN, weak_ref_prompt=PLAIN,
        iterations=10, children=3, chunk_tokens=2, max_new_tokens=16, n_ctx=512, n_threads=threads, seed=7, **more,
    )


class Tally:
    """What the callers saw, under a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()
        self.wrong: list[str] = []
        self.foreign: list[str] = []

    def add(self, outcome: str) -> None:
        with self.lock:
            self.outcomes[outcome] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--callers", type=int, default=6)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (server and weak models)")
    parser.add_argument("--every", type=float, default=5.0, help="a row of figures every this many minutes")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    lines: list[str] = []
    failures: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    def check(ok: bool, what: str) -> None:
        say(f"- {'PASS' if ok else 'FAIL'}: {what}")
        if not ok:
            failures.append(what)

    say(SECTION + "\n")
    say(f"- command: `python benchmarks/served_soak.py {shlex.join(sys.argv[1:])}`")
    say(f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    say(
        f"- machine: {os.cpu_count()} CPUs, {platform.machine()}, {platform.system()} {platform.release()}, "
        f"Python {sys.version.split()[0]}; load average at the start {os.getloadavg()[0]:.1f}"
    )
    say(
        f"- {args.callers} callers on one component; llama-server with {args.slots} slots serving tiny_c, "
        f"restarted halfway with tiny_a (another vocabulary); weak models tiny_a / tiny_b in process"
    )
    say("- each call at random: plain invoke; invoke with timeout 0.1-1.0 s; ainvoke cancelled after 0.05-1.0 s\n")

    with tempfile.TemporaryDirectory() as folder:
        models = write_tiny_models(Path(folder))
        expected = {
            "tiny_c": {p: make_llm(str(models.tiny_c), models, args.threads).invoke(p) for p in PROMPTS},
            "tiny_a": {p: make_llm(str(models.tiny_a), models, args.threads).invoke(p) for p in PROMPTS},
        }
        gc.collect()
        server = LocalLlamaServer(models.tiny_c, parallel=args.slots, ctx=512, threads=args.threads).start()
        restart: dict[str, float | None] = {"down": None, "up": None}  # when tiny_c went away, when tiny_a came
        llm = make_llm(server.url, models, args.threads)
        tally = Tally()
        stop_at = time.monotonic() + args.minutes * 60
        restart_at = time.monotonic() + args.minutes * 30

        def one_call(rng: random.Random) -> None:
            prompt = rng.choice(PROMPTS)
            kind = rng.choice(["plain", "timeout", "cancel"])
            began = time.monotonic()
            try:
                if kind == "plain":
                    text = llm.invoke(prompt)
                elif kind == "timeout":
                    text = llm.invoke(prompt, timeout=rng.uniform(0.1, 1.0))
                else:
                    text = asyncio.run(asyncio.wait_for(llm.ainvoke(prompt), timeout=rng.uniform(0.05, 1.0)))
            except W2SError as err:  # first: SearchTimeoutError is also a TimeoutError
                tally.add(type(err).__name__)
                return
            except (asyncio.TimeoutError, asyncio.CancelledError):
                tally.add("cancelled")
                return
            except Exception as err:  # noqa: BLE001 (a foreign error is what this soak looks for)
                with tally.lock:
                    tally.foreign.append(f"{kind} {prompt!r}: {type(err).__name__}: {err}"[:300])
                return
            ended = time.monotonic()
            down, up = restart["down"], restart["up"]
            if down is None or ended < down:
                possible = {"tiny_c"}
            elif up is not None and began > up:
                possible = {"tiny_a"}
            else:  # the call overlapped the restart: either model's answer
                possible = {"tiny_c", "tiny_a"}
            if not any(text == expected[m][prompt] for m in possible):
                with tally.lock:
                    tally.wrong.append(f"{kind} {prompt!r} ({sorted(possible)}): {text!r}"[:300])
            tally.add("answered")

        def caller(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < stop_at:
                one_call(rng)

        # Warm-up: every caller's lane made, every prompt asked once.
        warm_threads = [threading.Thread(target=lambda p=p: llm.invoke(p)) for p in PROMPTS[: args.slots]]
        for t in warm_threads:
            t.start()
        for t in warm_threads:
            t.join()
        gc.collect()
        warm_rss, warm_threads_n = proc_status("VmRSS") / 1024, other_threads()
        say("| minutes | answered | timeouts | cancelled | server away | wrong | foreign | lanes | RSS (MB) | threads |")
        say("|---|---|---|---|---|---|---|---|---|---|")
        started = time.monotonic()

        def row() -> None:
            o = tally.outcomes
            aligner = llm._aligner
            say(
                f"| {(time.monotonic() - started) / 60:.1f} | {o['answered']} | {o['SearchTimeoutError']} | "
                f"{o['cancelled'] + o['SearchCancelledError']} | {o['ServerUnavailableError'] + o['ServerError']} | "
                f"{len(tally.wrong)} | {len(tally.foreign)} | {aligner._lanes} | {proc_status('VmRSS') / 1024:.1f} | "
                f"{proc_status('Threads')} |"
            )

        row()
        callers = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(args.callers)]
        for t in callers:
            t.start()
        next_row, restarted = time.monotonic() + args.every * 60, False
        while any(t.is_alive() for t in callers):
            time.sleep(1)
            if not restarted and time.monotonic() >= restart_at:
                restart["down"] = time.monotonic()
                server.stop()
                server = LocalLlamaServer(models.tiny_a, parallel=args.slots, ctx=512, threads=args.threads, port=server.port).start()
                restart["up"] = time.monotonic()
                restarted = True
                say(f"| restart: now tiny_a ({(time.monotonic() - started) / 60:.1f} min) | | | | | | | | | |")
            if time.monotonic() >= next_row:
                row()
                next_row += args.every * 60
        row()
        aligner = llm._aligner
        lanes, free = aligner._lanes, len(aligner._free)
        weak_held = sum(c.n_resident for _, lane in aligner._free for c in lane.proxy.contexts)
        gc.collect()
        end_rss, end_threads = proc_status("VmRSS") / 1024, other_threads()
        request_threads, request_bound = len(server_request_threads()), aligner._models.strong.model.max_requests
        server.stop()

    o = tally.outcomes
    say()
    say(f"- calls: {sum(o.values()) + len(tally.foreign)}; outcomes: {dict(o)}")
    check(not tally.wrong, f"no wrong answer ({len(tally.wrong)}: {tally.wrong[:3]})")
    check(not tally.foreign, f"only the package's own errors ({len(tally.foreign)} others: {tally.foreign[:3]})")
    check(o["answered"] > 0 and restarted, "answers before and after the restart with another model")
    check(lanes == free and lanes <= args.slots, f"every lane given back ({free} of {lanes}), at most {args.slots}")
    check(weak_held == 0, f"no weak branch held after the last call ({weak_held})")
    growth = end_rss - warm_rss
    check(growth < RSS_BOUND_MB, f"RSS growth after warm-up {growth:+.1f} MB < {RSS_BOUND_MB} MB ({warm_rss:.1f} -> {end_rss:.1f})")
    check(end_threads == warm_threads_n, f"threads other than request threads after the last call = after warm-up ({end_threads} vs {warm_threads_n})")
    check(request_threads <= request_bound, f"request threads at most the live connection's pool ({request_threads} <= {request_bound})")
    say(f"\n**{'FAIL: ' + '; '.join(failures) if failures else 'PASS: every check'}**")

    previous = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
    kept = previous.split("\n" + SECTION)[0].rstrip("\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text((kept + "\n\n" if kept else "") + "\n".join(lines) + "\n", encoding="utf-8")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

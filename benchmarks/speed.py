"""Speed benchmark: what a search costs and where its time goes, side by side in one run.

    python benchmarks/speed.py [--before PATH] [--prompts 2] [--naive-prompts 1] [--iterations 60]
                               [--threads 1] [--strong NAME ...] [--sections ensemble ...]

Every search runs in a worker process (this script with --worker) that imports
w2s_langchain from one source tree: this checkout, and with --before another
checkout (a `git worktree` of the code before a change). The worker wraps
llama_cpp.llama_decode from outside the package, so any commit is measured by the
same instrumentation, and the two trees' searches alternate (before, after; after,
before; ...) so that the load of a shared machine falls on both alike.

  (0) Where the time of the default preset's search goes (`sentiment`, its own
      settings, seed 0): seconds per phase, inside the strong and the weak
      models' llama_decode, tokens per llama_decode call, weak tokens per scored
      child, evictions. Goal: the search in at most 0.5x the time before.
On the preset's models, for its strong model and any larger pulled one (--strong),
w2s with m iterations of K=3 chunks of L=4 tokens, answers of up to 64 tokens:
  (a) w2s with the KV cache vs the same search re-reading every prefix (`naive`,
      the reference code's cost profile), this checkout only. Goal: naive at least 10x slower.
  (b) w2s vs Best-of-N vs chunk-level beam search at a matched budget of strong
      tokens sampled (B = what w2s sampled, rounded to whole answers), before and
      after. Goal: Best-of-N and CBS no slower than before.
  (c) the floor: the time these searches spent inside llama_decode, against their
      total: what the search's own work (sampling, scoring, bookkeeping) adds.
  (d) peak memory of a fresh process that loads the preset and searches, against
      the size of the model files it maps.
  (e) the P curve of `parallel_leaves` (1, 2, 4, 8) on the default preset, this
      checkout only: wall time, steps, tokens per llama_decode (its quality:
      benchmarks/parallel_leaves.py).
  (f) the ensemble's cost: the default preset's search as shipped (V averaged over
      three prompt pairs) against its main pair alone (`ensemble=False`, the
      paper's V), this checkout only, taking turns on each prompt.
Writes benchmarks/results/speed.md; with --sections, only those sections, into
benchmarks/results/speed_<sections>.md.

A section is a function of (bench, out) listed in SECTIONS. A job's "settings"
are SearchSettings overrides, any the measured tree knows (a curve over
`parallel_leaves`, say, is a section of such jobs).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

PROMPTS = ["The restaurant on the corner", "I bought this blender last week and", "The hotel room was"]
RESULTS = Path(__file__).resolve().parent / "results"
CHECKOUT = Path(__file__).resolve().parents[1]
PRESET = "sentiment"
MAX_NEW_TOKENS = 64
SIZE_BINS = ((1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63), (64, None))


# --- the worker: searches on one source tree, instrumented from outside ---------


def empty_log() -> dict:
    return {"calls": 0, "tokens": 0, "rows": 0, "seconds": 0.0, "sizes": Counter()}


class DecodeLog:
    """llama_decode wrapped: per context, calls, tokens, logits rows, seconds and
    how many calls read how many tokens."""

    def __init__(self, llama_cpp):
        self.by_context: dict[int, dict] = {}
        real = llama_cpp.llama_decode

        def decode(handle, batch):
            n = batch.n_tokens
            rows = sum(1 for i in range(n) if batch.logits[i])
            started = time.perf_counter()
            status = real(handle, batch)
            seconds = time.perf_counter() - started
            log = self.by_context.setdefault(_address(handle), empty_log())
            log["calls"] += 1
            log["tokens"] += n
            log["rows"] += rows
            log["seconds"] += seconds
            log["sizes"][n] += 1
            return status

        llama_cpp.llama_decode = decode


def _address(handle) -> int:
    return ctypes.cast(handle, ctypes.c_void_p).value


def worker(threads: int) -> None:
    """Answer jobs (JSON lines on stdin) with measurements (JSON lines on stdout)."""
    import llama_cpp

    from w2s_langchain.service.aligner import Aligner, load_preset
    from w2s_langchain.search import strategies

    decodes = DecodeLog(llama_cpp)
    stage2 = {"seconds": 0.0}
    real_stage2 = strategies._stage2

    def timed_stage2(run, root):  # the same clock on every commit (not all report stage 2)
        started = time.perf_counter()
        try:
            return real_stage2(run, root)
        finally:
            stage2["seconds"] += time.perf_counter() - started

    strategies._stage2 = timed_stage2
    aligners: dict = {}
    for line in sys.stdin:
        job = json.loads(line)
        if job["strong"] not in aligners:
            models = {"strong": job["strong"]} if job["strong"] else {}
            config = load_preset(PRESET).with_overrides(models=models, runtime={"n_threads": threads})
            aligner = Aligner(config)
            aligner.search("warm-up", config.search.with_(strategy="base", max_new_tokens=4))  # loads the models
            aligners[job["strong"]] = aligner
        aligner = aligners[job["strong"]]
        models = aligner._load()
        contexts = {"strong": [models.strong], "weak": [c for c in models.proxy.contexts if c is not models.strong]}
        evicted = {role: sum(c.stats.evictions for c in cs) for role, cs in contexts.items()}
        decodes.by_context.clear()
        stage2["seconds"] = 0.0
        settings = dict(job["settings"])
        # Naive: contexts that re-read every prefix (the engine's switch, for checks like this one).
        reuse = not settings.pop("naive", False)
        for c in contexts["strong"] + contexts["weak"]:
            c.reuse_prefixes = reuse
        result = aligner.search(job["prompt"], aligner.config.search.with_(**settings))
        decode = {}
        for role, cs in contexts.items():
            logs = [decodes.by_context.get(_address(c._handle)) for c in cs]
            decode[role] = _merged([log for log in logs if log])
        out = {
            "text": result.text,
            "cost": asdict(result.cost),
            "stage2_seconds": stage2["seconds"],
            "children": result.settings["children"],
            "children_scored": sum(1 for n in result.tree.walk() if n.parent is not None and n.proxy is not None),
            "decode": decode,
            "evictions": {role: sum(c.stats.evictions for c in cs) - evicted[role] for role, cs in contexts.items()},
        }
        print(json.dumps(out), flush=True)


def _merged(logs: list[dict]) -> dict:
    total = empty_log()
    for log in logs:
        for key in ("calls", "tokens", "rows", "seconds"):
            total[key] += log[key]
        total["sizes"].update(log["sizes"])
    return total


# --- the bench: workers per tree, jobs alternated ----------------------------------


@dataclass
class Tree:
    name: str  # "before" or "after"
    path: Path
    commit: str


def describe(name: str, path: Path) -> Tree:
    def git(*argv: str) -> str:
        return subprocess.run(["git", "-C", str(path), *argv], capture_output=True, text=True, check=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return Tree(name, path, git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if dirty else ""))


class Worker:
    def __init__(self, tree: Tree, threads: int):
        self.tree = tree
        env = os.environ | {"PYTHONPATH": str(tree.path)}
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", "--threads", str(threads)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def run(self, job: dict) -> dict:
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker on {self.tree.path} stopped (see its error above)")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


class Bench:
    """The trees measured ("after" is this checkout, "before" the one given),
    one worker each, and the order their searches take turns in."""

    def __init__(self, args):
        self.args = args
        self.trees = [describe("after", CHECKOUT)]
        if args.before:
            self.trees.insert(0, describe("before", Path(args.before).resolve()))
        self.workers = {tree.name: Worker(tree, args.threads) for tree in self.trees}
        self.turn = 0

    def side_by_side(self, job: dict) -> dict[str, dict]:
        """The job on every tree, the first tree alternating from job to job."""
        order = self.trees if self.turn % 2 == 0 else self.trees[::-1]
        self.turn += 1
        return {tree.name: self.workers[tree.name].run(job) for tree in order}

    def after(self, job: dict) -> dict:
        return self.workers["after"].run(job)

    def close(self) -> None:
        for w in self.workers.values():
            w.close()


def job(prompt: str, settings: dict, strong: str | None = None) -> dict:
    return {"prompt": prompt, "settings": settings, "strong": strong}


# --- sections ----------------------------------------------------------------------


def where_time_goes(bench: Bench, out) -> None:
    """(0): the default preset's own search, before and after."""
    prompts = PROMPTS[: bench.args.prompts]
    runs = [bench.side_by_side(job(p, {"seed": 0})) for p in prompts]
    names = [t.name for t in bench.trees]
    totals = {name: [r[name] for r in runs] for name in names}
    out("\n## (0) Where the time of the default preset's search goes\n")
    out(f"Preset `{PRESET}` with its own settings (seed 0), one search per prompt, {len(prompts)} prompts "
        f"({', '.join(repr(p) for p in prompts)}), summed; the trees' searches alternated.\n")
    header = " | ".join(f"{t.name} ({t.commit})" for t in bench.trees)
    ratio = len(names) == 2
    out(f"| | {header} |{' after / before |' if ratio else ''}")
    out("|---|" + "---|" * (len(names) + ratio))

    def row(label, value, fmt="{:.1f}"):
        values = [value(totals[name]) for name in names]
        change = "" if not ratio else f" **{values[1] / values[0]:.2f}x** |" if values[0] else " |"
        out(f"| {label} | {' | '.join(fmt.format(v) for v in values)} |{change}")

    def seconds(phase):
        return lambda rs: sum(r["cost"]["seconds"].get(phase, 0.0) for r in rs)

    row("wall time of the searches, s", seconds("total"))
    row("select, s", seconds("select"))
    row("expand (strong model), s", seconds("expand"))
    row("evaluate (weak models), s", seconds("evaluate"))
    row("stage 2 (ranking, eos scoring, any fallback), s", lambda rs: sum(r["stage2_seconds"] for r in rs))
    row("inside the strong model's llama_decode, s", lambda rs: sum(r["decode"]["strong"]["seconds"] for r in rs))
    row("inside the weak models' llama_decode, s", lambda rs: sum(r["decode"]["weak"]["seconds"] for r in rs))
    row("outside llama_decode, s", lambda rs: sum(r["cost"]["seconds"]["total"] - r["decode"]["strong"]["seconds"]
                                                   - r["decode"]["weak"]["seconds"] for r in rs))
    for role in ("strong", "weak"):
        for key in ("calls", "tokens", "rows"):
            row(f"{role} llama_decode {key}", lambda rs, role=role, key=key: sum(r["decode"][role][key] for r in rs), "{:d}")
    row("scored children", lambda rs: sum(r["children_scored"] for r in rs), "{:d}")
    row("weak tokens per scored child (both roles)",
        lambda rs: sum(r["decode"]["weak"]["tokens"] for r in rs) / sum(r["children_scored"] for r in rs), "{:.2f}")
    row("weak tokens per K x iterations", lambda rs: sum(r["decode"]["weak"]["tokens"] for r in rs)
        / sum(r["children"] * r["cost"]["iterations"] for r in rs), "{:.2f}")
    row("evictions, weak", lambda rs: sum(r["evictions"]["weak"] for r in rs), "{:d}")
    row("evictions, strong", lambda rs: sum(r["evictions"]["strong"] for r in rs), "{:d}")
    same = sum(len({r[name]["text"] for name in names}) == 1 for r in runs)
    out(f"\n(stage 2 is timed by the benchmark on both trees; expand and evaluate include stage 2's own; "
        f"answers equal between the trees: {same} of {len(runs)}, quantized kernels depend on the batch)\n")
    out("Calls to llama_decode by the tokens each read:\n")
    cells = [(role, name) for role in ("strong", "weak") for name in names]
    out("| tokens per call | " + " | ".join(f"{role}, {name}" for role, name in cells) + " |")
    out("|---|" + "---|" * len(cells))
    for lo, hi in SIZE_BINS:
        counts = [sum(n for r in totals[name] for size, n in r["decode"][role]["sizes"].items()
                      if int(size) >= lo and (hi is None or int(size) <= hi)) for role, name in cells]
        label = f"{lo}" if lo == hi else f"{lo}+" if hi is None else f"{lo}-{hi}"
        out(f"| {label} | " + " | ".join(str(c) for c in counts) + " |")


def tokens_read(result: dict) -> int:
    return result["cost"]["strong_tokens_decoded"] + result["cost"]["weak_tokens_scored"]


def strong_models(args) -> list[str]:
    from w2s_langchain.service.aligner import load_preset

    preset_strong = load_preset(PRESET).strong.model
    return args.strong or [preset_strong, *larger_pulled_models(preset_strong)]


def larger_pulled_models(preset_strong: str) -> list[str]:
    """Registry models larger than the preset's strong one that are already pulled."""
    from w2s_langchain.errors import W2SError
    from w2s_langchain.models.registry import load_registry, resolve_model

    registry = load_registry()
    names = []
    for name, entry in registry.items():
        if entry.size > registry[preset_strong].size:
            try:
                resolve_model(name)
            except W2SError:
                continue
            names.append(name)
    return names


def strategies_at_a_matched_budget(bench: Bench, out) -> None:
    """(a), (b) and (c), per strong model."""
    for strong in strong_models(bench.args):
        compare_strategies(bench, strong, out)


def compare_strategies(bench: Bench, strong: str, out) -> None:
    args = bench.args
    w2s = {"iterations": args.iterations, "chunk_tokens": 4, "children": 3, "max_new_tokens": MAX_NEW_TOKENS, "seed": 0}
    out(f"\n## strong model: {strong}\n")
    out(f"w2s: m={args.iterations} K=3 L=4 max_new_tokens={MAX_NEW_TOKENS} seed=0, the rest the preset's\n")
    names = [t.name for t in bench.trees]
    # tree: strategy: [seconds, seconds in llama_decode, tokens sampled]
    totals = {name: {} for name in names}

    def record(name, strategy, result):
        t = totals[name].setdefault(strategy, [0.0, 0.0, 0])
        c = result["cost"]
        t[0] += c["seconds"]["total"]
        t[1] += c["decode_seconds"]
        t[2] += c["strong_tokens_sampled"]

    naive_rows = []
    for n, prompt in enumerate(PROMPTS[: args.prompts]):
        cached = bench.side_by_side(job(prompt, w2s, strong))
        for name, result in cached.items():
            record(name, "w2s", result)
        if n < args.naive_prompts:
            naive = bench.after(job(prompt, w2s | {"naive": True}, strong))
            record("after", "w2s naive", naive)
            naive_rows.append((prompt, cached["after"], naive))
        answers = max(2, round(cached["after"]["cost"]["strong_tokens_sampled"] / MAX_NEW_TOKENS))
        for strategy, settings in (("bon", {"strategy": "bon", "samples": answers}),
                                   ("cbs", {"strategy": "cbs", "beam_width": 2, "children": max(1, answers // 2)})):
            for name, result in bench.side_by_side(job(prompt, w2s | settings, strong)).items():
                record(name, strategy, result)

    if naive_rows:
        out(f"(a) w2s with the KV cache vs re-reading every prefix ({bench.trees[-1].commit})\n")
        out("| prompt | cached s | naive s | time ratio | cached tokens read | naive tokens read | token ratio "
            "| same answer |")
        out("|---|---|---|---|---|---|---|---|")
        for prompt, cached, naive in naive_rows:
            c, v = cached["cost"]["seconds"]["total"], naive["cost"]["seconds"]["total"]
            out(f"| {prompt!r} | {c:.1f} | {v:.1f} | **{v / c:.1f}x** | {tokens_read(cached)} | {tokens_read(naive)} | "
                f"{tokens_read(naive) / tokens_read(cached):.1f}x | {'yes' if naive['text'] == cached['text'] else 'no'} |")
        out("\n(answers differ between cached and naive on quantized models: batch-dependent kernels, see README)\n")

    out(f"(b) matched budget of strong tokens sampled, {args.prompts} prompts; (c) time inside llama_decode\n")
    out("| strategy | tree | seconds | after / before | strong tokens sampled | ms / strong token | time vs bon "
        "| in llama_decode | search's own work over the floor |")
    out("|---|---|---|---|---|---|---|---|---|")
    for strategy in ("w2s", "bon", "cbs", "w2s naive"):
        for name in names:
            if strategy not in totals[name]:
                continue
            seconds, floor, sampled = totals[name][strategy]
            before = totals.get("before", {}).get(strategy)
            change = f"**{seconds / before[0]:.2f}x**" if before and name == "after" else ""
            out(f"| {strategy} | {name} | {seconds:.1f} | {change} | {sampled} | {1000 * seconds / sampled:.1f} | "
                f"{seconds / totals[name]['bon'][0]:.2f}x | {floor:.1f} s | **{(seconds - floor) / floor:.0%}** |")


# Peak RSS from VmHWM: getrusage's ru_maxrss survives exec, so a child would
# report this (already large) process's peak instead of its own.
PEAK_RSS = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024"
PEAK_MEMORY_CHILD = textwrap.dedent(
    f"""
    import sys
    from w2s_langchain.service.aligner import Aligner, load_preset
    config = load_preset("{PRESET}").with_overrides(runtime={{"n_threads": int(sys.argv[1])}})
    Aligner(config).search("The hotel room was", config.search.with_(iterations=40))
    print({PEAK_RSS})
    """
)


def peak_memory(bench: Bench, out) -> None:
    """(d), in fresh processes, so nothing loaded before counts."""
    from w2s_langchain.service.aligner import load_preset
    from w2s_langchain.models.registry import resolve_model

    config = load_preset(PRESET)
    files = {resolve_model(role.model) for role in (config.strong, config.weak, config.weak_ref)}
    size = sum(f.stat().st_size for f in files)
    mb = 1 << 20
    out(f"\n(d) peak memory, default preset (a fresh process: load, one w2s search of 40 iterations); "
        f"model files mapped: {size / mb:.0f} MB ({', '.join(f.name for f in sorted(files))})\n")
    out("| tree | peak RSS | peak RSS minus Python and imports | ratio to the files |")
    out("|---|---|---|---|")
    for tree in bench.trees:
        env = os.environ | {"PYTHONPATH": str(tree.path)}

        def child(code: str, *argv: str) -> int:
            done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, check=True)
            return int(done.stdout.strip().splitlines()[-1])

        peak = child(PEAK_MEMORY_CHILD, str(bench.args.threads))
        imports = child(f"import w2s_langchain.service.aligner; print({PEAK_RSS})")
        out(f"| {tree.name} ({tree.commit}) | {peak / mb:.0f} MB | {(peak - imports) / mb:.0f} MB "
            f"(imports alone: {imports / mb:.0f} MB) | {(peak - imports) / size:.2f}x |")


def leaf_parallelism_curve(bench: Bench, out) -> None:
    """(e): the default preset's search at parallel_leaves P = 1, 2, 4, 8, this
    checkout only (the P values take turns on each prompt)."""
    prompts = PROMPTS[: bench.args.prompts]
    curve = {p: [] for p in P_CURVE}
    for prompt in prompts:
        for p in P_CURVE:
            curve[p].append(bench.after(job(prompt, {"seed": 0, "parallel_leaves": p})))
    out("\n## (e) Leaf parallelism: the P curve\n")
    out(f"Preset `{PRESET}` with its own settings (seed 0, {len(prompts)} prompts, summed): every P runs the same "
        "iterations, so the same budget of strong tokens. Quality at each P, on the quality benchmark's task at "
        "B = 64: benchmarks/results/parallel_leaves.md (`python benchmarks/parallel_leaves.py`).\n")
    out("| P | wall time, s | vs P = 1 | steps | iterations | strong tokens sampled | strong tokens / llama_decode "
        "| weak tokens / llama_decode |")
    out("|---|---|---|---|---|---|---|---|")
    base = sum(r["cost"]["seconds"]["total"] for r in curve[P_CURVE[0]])
    for p, runs in curve.items():
        wall = sum(r["cost"]["seconds"]["total"] for r in runs)

        def per_decode(role, runs=runs):
            return sum(r["decode"][role]["tokens"] for r in runs) / max(1, sum(r["decode"][role]["calls"] for r in runs))

        out(f"| {p} | {wall:.1f} | **{wall / base:.2f}x** | {sum(r['cost']['steps'] for r in runs)} "
            f"| {sum(r['cost']['iterations'] for r in runs)} | {sum(r['cost']['strong_tokens_sampled'] for r in runs)} "
            f"| {per_decode('strong'):.2f} | {per_decode('weak'):.2f} |")


P_CURVE = (1, 2, 4, 8)


def ensemble_cost(bench: Bench, out) -> None:
    """(f): the default preset's search with its ensemble and with the main pair
    alone, this checkout only (the two take turns, the first alternating)."""
    prompts = PROMPTS[: bench.args.prompts]
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for i, prompt in enumerate(prompts):
        for on in (True, False) if i % 2 == 0 else (False, True):
            runs[on].append(bench.after(job(prompt, {"seed": 0, "ensemble": on})))
    out("\n## (f) The ensemble's cost\n")
    out(f"Preset `{PRESET}` with its own settings (seed 0, {len(prompts)} prompts, summed). Each V gives a different "
        "tree, so the strong tokens sampled can differ too. Quality: benchmarks/results/quality.md.\n")
    out("| V | wall time, s | vs the main pair alone | weak tokens read | strong tokens sampled | iterations |")
    out("|---|---|---|---|---|---|")
    total = {on: sum(r["cost"]["seconds"]["total"] for r in rs) for on, rs in runs.items()}
    for on, name in ((False, "main pair alone (`ensemble=False`)"), (True, "three pairs (as shipped)")):
        rs = runs[on]
        out(f"| {name} | {total[on]:.1f} | **{total[on] / total[False]:.2f}x** | "
            f"{sum(r['cost']['weak_tokens_scored'] for r in rs)} | {sum(r['cost']['strong_tokens_sampled'] for r in rs)} | "
            f"{sum(r['cost']['iterations'] for r in rs)} |")


SECTIONS = {
    "time": where_time_goes,
    "strategies": strategies_at_a_matched_budget,
    "memory": peak_memory,
    "parallel": leaf_parallelism_curve,
    "ensemble": ensemble_cost,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", help="a checkout of the code to compare with (e.g. a git worktree)")
    parser.add_argument("--prompts", type=int, default=3, help="prompts for (0) and (b)")
    parser.add_argument("--naive-prompts", type=int, default=1, help="of those, how many also run naive in (a)")
    parser.add_argument("--iterations", type=int, default=60, help="m of the w2s search in (a) and (b)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--strong", action="append",
                        help="strong model(s) for (a)-(c): default the preset's and any pulled larger one")
    parser.add_argument("--sections", nargs="+", choices=tuple(SECTIONS), help="sections to run (default: all)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.threads)

    lines: list[str] = []

    def out(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    started = time.perf_counter()
    bench = Bench(args)
    out("# Speed benchmark\n")
    out(f"- command: `{' '.join(['python', 'benchmarks/speed.py', *sys.argv[1:]])}`; each tree's searches ran in "
        f"`PYTHONPATH=<tree> python benchmarks/speed.py --worker --threads {args.threads}`")
    for tree in bench.trees:
        out(f"- {tree.name}: `{tree.path}` at {tree.commit}")
    out(f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} CPUs, {platform.machine()}, "
        f"Python {sys.version.split()[0]}; llama.cpp threads: {args.threads}; load average at the start: "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    out(f"- preset `{PRESET}`; weak pair: SmolLM2-135M-Instruct in both roles")
    try:
        for name in args.sections or SECTIONS:
            SECTIONS[name](bench, out)
    finally:
        bench.close()
    out(f"\n(the benchmark ran {(time.perf_counter() - started) / 60:.1f} min; load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; this process peaked at "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB RSS)")
    name = "speed" + ("_" + "_".join(args.sections) if args.sections else "")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Speed benchmark: what a search costs, side by side in one run.

    python benchmarks/speed.py [--prompts 3] [--naive-prompts 1] [--iterations 60] [--threads 1] [--strong NAME ...]

On the default preset's models and prompts (w2s with m iterations of K=3 chunks of
L=4 tokens, answers of up to 64 tokens), for its strong model and for any larger
registry model given with --strong (or already pulled):
  (a) w2s with the KV cache vs the same search re-reading every prefix (`naive`,
      the reference code's cost profile): same seed, same tree; wall time and
      tokens the models read. Target: naive at least 8x slower.
  (b) w2s vs Best-of-N vs chunk-level beam search at a matched budget of strong
      tokens sampled (B = what (a)'s w2s sampled, rounded to whole answers).
      Target: w2s within 1.5x of bon.
  (c) the floor: the time these same searches spent inside llama_decode (the
      same batches on the same cache), against their total: what the search's
      own work (sampling, scoring, bookkeeping) adds. Target: at most 25%.
  (d) peak memory of a fresh process that loads the preset and searches, against
      the size of the model files it maps.
Writes benchmarks/results/speed.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

from w2s_langchain.aligner import Aligner, load_preset
from w2s_langchain.errors import W2SError
from w2s_langchain.registry import load_registry, resolve_model

PROMPTS = ["The restaurant on the corner", "I bought this blender last week and", "The hotel room was"]
RESULTS = Path(__file__).resolve().parent / "results"
MAX_NEW_TOKENS = 64


def tokens_read(result) -> int:
    return result.cost.strong_tokens_decoded + result.cost.weak_tokens_scored


def larger_pulled_models(preset_strong: str) -> list[str]:
    """Registry models larger than the preset's strong one that are already pulled."""
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


def bench_strong_model(strong: str, args, out) -> None:
    config = load_preset("sentiment").with_overrides(models={"strong": strong}, runtime={"n_threads": args.threads})
    w2s = config.search.with_(
        iterations=args.iterations, chunk_tokens=4, children=3, max_new_tokens=MAX_NEW_TOKENS, seed=0
    )
    aligner = Aligner(config)
    aligner.search("warm-up", w2s.with_(strategy="base", max_new_tokens=4))  # loads the models
    out(f"\n## strong model: {strong}\n")
    out(f"w2s: m={w2s.iterations} K={w2s.children} L={w2s.chunk_tokens} c={w2s.c} w={w2s.entropy_weight} "
        f"max_new_tokens={w2s.max_new_tokens} seed={w2s.seed}\n")

    totals: dict[str, list[float]] = {}  # strategy: [seconds, seconds in llama_decode, tokens read, tokens sampled]

    def record(name, result):
        t = totals.setdefault(name, [0.0, 0.0, 0, 0])
        c = result.cost
        t[0] += c.seconds["total"]
        t[1] += c.decode_seconds
        t[2] += tokens_read(result)
        t[3] += c.strong_tokens_sampled

    out("(a) w2s with the KV cache vs re-reading every prefix\n")
    out("| prompt | cached s | naive s | time ratio | cached tokens read | naive tokens read | token ratio | same answer |")
    out("|---|---|---|---|---|---|---|---|")
    for n, prompt in enumerate(PROMPTS[: args.prompts]):
        cached = aligner.search(prompt, w2s)
        record("w2s", cached)
        if n < args.naive_prompts:
            naive = aligner.search(prompt, w2s.with_(naive=True))
            record("w2s naive", naive)
            c, v = cached.cost.seconds["total"], naive.cost.seconds["total"]
            out(f"| {prompt!r} | {c:.1f} | {v:.1f} | **{v / c:.1f}x** | {tokens_read(cached)} | {tokens_read(naive)} | "
                f"{tokens_read(naive) / tokens_read(cached):.1f}x | {'yes' if naive.text == cached.text else 'no'} |")
        budget = cached.cost.strong_tokens_sampled
        answers = max(2, round(budget / MAX_NEW_TOKENS))
        record("bon", aligner.search(prompt, w2s.with_(strategy="bon", samples=answers)))
        record("cbs", aligner.search(prompt, w2s.with_(strategy="cbs", beam_width=2, children=max(1, answers // 2))))
    out("\n(answers differ between cached and naive on quantized models: batch-dependent kernels, see README)\n")

    out(f"(b) matched budget of strong tokens sampled, {args.prompts} prompts; (c) time inside llama_decode\n")
    out("| strategy | seconds | strong tokens sampled | ms / strong token | time vs bon | in llama_decode | search's own work over the floor |")
    out("|---|---|---|---|---|---|---|")
    for name in ("w2s", "bon", "cbs", "w2s naive"):
        if name not in totals:
            continue
        seconds, floor, _, sampled = totals[name]
        out(f"| {name} | {seconds:.1f} | {sampled} | {1000 * seconds / sampled:.1f} | {seconds / totals['bon'][0]:.2f}x | "
            f"{floor:.1f} s | **{(seconds - floor) / floor:.0%}** |")


# Peak RSS from VmHWM: getrusage's ru_maxrss survives exec, so a child would
# report this (already large) process's peak instead of its own.
PEAK_RSS = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024"
PEAK_MEMORY_CHILD = textwrap.dedent(
    f"""
    import sys
    from w2s_langchain.aligner import Aligner, load_preset
    config = load_preset("sentiment").with_overrides(runtime={{"n_threads": int(sys.argv[1])}})
    Aligner(config).search("The hotel room was", config.search.with_(iterations=40))
    print({PEAK_RSS})
    """
)


def peak_memory(args, out) -> None:
    """In a fresh process, so nothing loaded before counts."""
    config = load_preset("sentiment")
    files = {resolve_model(role.model) for role in (config.strong, config.weak, config.weak_ref)}
    size = sum(f.stat().st_size for f in files)
    done = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_CHILD, str(args.threads)], capture_output=True, text=True, check=True
    )
    peak = int(done.stdout.strip().splitlines()[-1])
    baseline = subprocess.run(
        [sys.executable, "-c", f"import w2s_langchain.aligner; print({PEAK_RSS})"], capture_output=True, text=True, check=True
    )
    imports = int(baseline.stdout.strip())
    mb = 1 << 20
    out("\n(d) peak memory, default preset (a fresh process: load, one w2s search of 40 iterations)\n")
    out("| model files (mapped) | peak RSS | peak RSS minus Python and imports | ratio to the files |")
    out("|---|---|---|---|")
    out(f"| {size / mb:.0f} MB ({', '.join(f.name for f in sorted(files))}) | {peak / mb:.0f} MB | "
        f"{(peak - imports) / mb:.0f} MB (imports alone: {imports / mb:.0f} MB) | {(peak - imports) / size:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=3, help="prompts for (b)")
    parser.add_argument("--naive-prompts", type=int, default=1, help="of those, how many also run naive in (a)")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--strong", action="append", help="strong model(s): default the preset's and any pulled larger one")
    args = parser.parse_args()

    lines: list[str] = []

    def out(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    preset_strong = load_preset("sentiment").strong.model
    strong_models = args.strong or [preset_strong, *larger_pulled_models(preset_strong)]
    out("# Speed benchmark\n")
    out(f"- command: `{' '.join(['python', 'benchmarks/speed.py', *sys.argv[1:]])}`")
    out(f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} CPUs, {platform.machine()}, "
        f"Python {sys.version.split()[0]}; llama.cpp threads: {args.threads}")
    out(f"- preset `sentiment`; strong models: {', '.join(strong_models)}; weak pair: SmolLM2-135M-Instruct in both roles")
    for strong in strong_models:
        bench_strong_model(strong, args, out)
    peak_memory(args, out)
    out(f"\n(the benchmark process itself peaked at {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB RSS)")
    (RESULTS / "speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

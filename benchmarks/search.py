"""Search benchmark on the default preset, side by side in one run.

    python benchmarks/search.py [--iterations 60] [--max-new-tokens 64] [--threads 1]

  (a) W2S-AlignTree with the KV cache vs the same search re-reading every prefix
      (`naive`, the reference code's cost profile): same seed and settings, so
      the same tree; wall time and tokens the models had to read.
  (b) w2s vs Best-of-N vs chunk-level beam search at a matched budget of strong
      tokens sampled: N and the beam's K are set from what w2s sampled.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
from datetime import datetime, timezone

from w2s_langchain.aligner import Aligner, load_preset

PROMPTS = ["The restaurant on the corner", "I bought this blender last week and", "The hotel room was"]


def tokens_read(result) -> int:
    return result.cost.strong_tokens_decoded + result.cost.weak_tokens_scored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--chunk-tokens", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()

    config = load_preset("sentiment")
    config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, n_threads=args.threads))
    base = config.search.with_(
        iterations=args.iterations, chunk_tokens=args.chunk_tokens, max_new_tokens=args.max_new_tokens, seed=0
    )
    aligner = Aligner(config)
    print(
        f"# search benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, preset sentiment "
        f"(strong {config.strong.model}, weak {config.weak.model} in both roles)\n"
        f"# {args.threads} thread(s), {os.cpu_count()} CPUs, {platform.machine()}, Python {sys.version.split()[0]}\n"
        f"# command: python benchmarks/search.py {' '.join(sys.argv[1:])}\n"
        f"# w2s: m={base.iterations} K={base.children} L={base.chunk_tokens} c={base.c} w={base.entropy_weight} "
        f"max_new_tokens={base.max_new_tokens} seed={base.seed}"
    )
    aligner.search("warm-up", base.with_(strategy="base", max_new_tokens=4))  # loads the models

    totals: dict[str, list[float]] = {}

    def record(name, result):
        t = totals.setdefault(name, [0.0, 0, 0, 0.0])
        t[0] += result.cost.seconds["total"]
        t[1] += tokens_read(result)
        t[2] += result.cost.strong_tokens_sampled
        t[3] += result.value if result.value is not None else 0.0

    for prompt in PROMPTS[: args.prompts]:
        cached = aligner.search(prompt, base)
        record("w2s", cached)
        if not args.skip_naive:
            naive = aligner.search(prompt, base.with_(naive=True))
            record("w2s naive", naive)
            same = "same answer" if naive.text == cached.text else "answers differ (quantized kernels, see README)"
            print(f"  {prompt!r}: cached {cached.cost.seconds['total']:.1f} s, naive {naive.cost.seconds['total']:.1f} s, {same}")
        budget = cached.cost.strong_tokens_sampled
        n = max(1, round(budget / base.max_new_tokens))
        record("bon", aligner.search(prompt, base.with_(strategy="bon", samples=n)))
        k = max(1, round(budget / (2 * base.max_new_tokens)))
        record("cbs", aligner.search(prompt, base.with_(strategy="cbs", beam_width=2, children=k, chunk_tokens=5)))

    print("\n(a) w2s with the KV cache vs re-reading every prefix")
    w = totals["w2s"]
    if "w2s naive" in totals:
        nv = totals["w2s naive"]
        print(f"    cached  {w[0]:8.1f} s   {w[1]:9d} tokens read")
        print(f"    naive   {nv[0]:8.1f} s   {nv[1]:9d} tokens read   {nv[0] / w[0]:5.1f}x time, {nv[1] / w[1]:5.1f}x tokens")
    print("\n(b) matched budget of strong tokens sampled (all prompts)")
    print(f"    {'strategy':8} {'seconds':>8} {'strong tok':>10} {'s/strong tok':>12} {'mean value':>10} {'time vs bon':>11}")
    for name in ("w2s", "bon", "cbs"):
        t = totals[name]
        print(
            f"    {name:8} {t[0]:8.1f} {t[2]:10d} {t[0] / t[2]:12.3f} {t[3] / args.prompts:10.2f} "
            f"{t[0] / totals['bon'][0]:10.2f}x"
        )


if __name__ == "__main__":
    main()

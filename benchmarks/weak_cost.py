"""Where the weak models' tokens go in one w2s search (issue 14, item 1).

    python benchmarks/weak_cost.py [--iterations 100] [--threads 1] [--repeats 1] [--n-seq-max N] [--strong NAME]

Runs the default preset (`sentiment`) on "The restaurant on the corner" with seed 0
and prints wall time, the weak tokens read per scored child (both roles together,
and per role), sequence-id and KV-cell evictions, and what the weak tokens were
read for, from the weak context's own counters (`ContextStats`) and the proxy's.
`--strong smollm2-135m-instruct` gives the strong model the weak one's tokenizer.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

from w2s_langchain.service.aligner import Aligner, load_preset

PROMPT = "The restaurant on the corner"


def one_search(aligner: Aligner, settings) -> dict:
    models = aligner._load()
    proxy = models.proxy
    (weak,) = proxy.contexts  # the preset's two roles share one model, so one context
    stage2, prompt = {"tokens": 0}, {}
    eos_values, extend = proxy.eos_values, proxy.extend

    def counted_eos_values(states):
        before = weak.stats.tokens_decoded
        try:
            return eos_values(states)
        finally:
            stage2["tokens"] += weak.stats.tokens_decoded - before

    def counted_extend(parents, answers, **options):
        before = weak.stats.tokens_refilled
        try:
            return extend(parents, answers, **options)
        finally:  # the root's expansion refills exactly the roles' prompts
            prompt.setdefault("tokens", weak.stats.tokens_refilled - before)

    proxy.eos_values, proxy.extend = counted_eos_values, counted_extend
    before, remerged = asdict(weak.stats), proxy.tokens_remerged
    started = time.perf_counter()
    try:
        result = aligner.search(PROMPT, settings)
    finally:
        del proxy.eos_values, proxy.extend
    seconds = time.perf_counter() - started
    d = {k: v - before[k] for k, v in asdict(weak.stats).items()}
    children = sum(1 for n in result.tree.walk() if n.proxy is not None and n.parent is not None)
    return {
        "seconds": seconds,
        "weak_tokens": result.cost.weak_tokens_scored,
        "children": children,
        "remerged": proxy.tokens_remerged - remerged,
        "stage2": stage2["tokens"],
        "prompt": prompt["tokens"],
        "answer": result.text,
        **d,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--n-seq-max", type=int, help="the runtime's n_seq_max (default: the preset's)")
    parser.add_argument("--strong", help="the strong model (default: the preset's)")
    args = parser.parse_args()
    runtime = {"n_threads": args.threads} | ({"n_seq_max": args.n_seq_max} if args.n_seq_max else {})
    config = load_preset("sentiment").with_overrides(runtime=runtime, models={"strong": args.strong})
    settings = config.search.with_(iterations=args.iterations, seed=0)
    aligner = Aligner(config)
    aligner.search("warm-up", settings.with_(strategy="base", max_new_tokens=2))  # loads the models
    for _ in range(args.repeats):
        r = one_search(aligner, settings)
        print(f"wall {r['seconds']:.1f} s (in the weak llama_decode {r['decode_seconds']:.1f} s); "
              f"weak tokens read {r['weak_tokens']} for {r['children']} scored children = "
              f"{r['weak_tokens'] / r['children']:.2f} per child ({r['weak_tokens'] / r['children'] / 2:.2f} per role)")
        print(f"  evictions: {r['evictions']} ({r['evictions_for_seqs']} for sequence ids, "
              f"{r['evictions_for_cells']} for KV cells); weak decode calls {r['decode_calls']}")
        print(f"  weak tokens: {r['prompt']} first prompt read, {r['tokens_refilled'] - r['prompt']} rebuilding "
              f"evicted branches, {r['tokens_reread']} re-read for a logits row, "
              f"{r['tokens_decoded'] - r['tokens_refilled'] - r['tokens_reread']} new "
              f"(of which {r['remerged']} re-merged parent tails); {r['stage2']} of all in stage 2 eos scoring")
        print(f"  answer: {r['answer']!r}", flush=True)


if __name__ == "__main__":
    main()

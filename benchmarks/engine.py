"""Engine benchmark: what the shared-prefix tree of branches buys, side by side.

    python benchmarks/engine.py [--model gemma-3-270m] [--threads 1]

Prints, in one run on one model:
  (a) scoring K continuations of L tokens after a P-token prefix: the cached
      prefix in one batch, the cached prefix one continuation at a time, and
      re-reading the prefix for every continuation (what a cache-less search does);
  (b) extending K branches by one token per step in one batch vs one by one;
  (c) generation with this engine vs `llama_cpp.Llama` on the same model and
      prompt: Llama generates greedily, and the engine decodes the very same tokens
      one step at a time (still picking its own greedy token each step, the same
      work), so the wrapper is shown not to be slower.
Each figure is the best of --repeats runs; the ratios are what to read (this
machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone

import numpy as np

from w2s_langchain.engine import Context, load_model
from w2s_langchain.models.registry import resolve_model

TEXT = (
    "The old lighthouse stood at the edge of the cliff, its white paint peeling after "
    "decades of salt and wind. Every evening the keeper climbed the spiral stairs, "
    "counted the steps out of habit, and lit the lamp that ships had trusted for a "
    "hundred years. The village below had grown quieter; the fishing boats were fewer, "
    "and the children who once raced along the harbour wall had moved to the cities. "
)


def best_of(repeats: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def prefix_tokens(model, n: int) -> list[int]:
    tokens = model.tokenize(TEXT * (1 + n // 60), add_special=True)
    if len(tokens) < n:
        raise SystemExit(f"benchmark text too short for a {n}-token prefix")
    return tokens[:n]


def bench_scoring(model, args) -> None:
    P, K, L = args.prefix, args.branches, args.chunk
    rng = np.random.default_rng(0)
    prefix = prefix_tokens(model, P)
    pool = prefix_tokens(model, P + K * L)[P:]
    spans = [list(rng.permutation(pool)[:L]) for _ in range(K)]
    n_ctx = P + K * (L + 1) + 64

    def cached(batched: bool):
        ctx = Context(model, n_ctx=n_ctx, n_threads=args.threads, n_seq_max=K + 1)
        root = ctx.new_branch(prefix)
        ctx.next_logits([root])  # the prompt is read once, outside the timing

        def run():
            kids = [ctx.fork(root) for _ in range(K)]
            if batched:
                out = ctx.score(kids, spans)
            else:
                out = [ctx.score([kid], [span])[0] for kid, span in zip(kids, spans)]
            for kid in kids:
                ctx.release(kid)
            return out

        return run

    def reread():
        ctx = Context(model, n_ctx=n_ctx, n_threads=args.threads, n_seq_max=2)
        out = []
        for span in spans:
            branch = ctx.new_branch(prefix)
            out.append(ctx.score([branch], [span])[0])
            ctx.release(branch)
        return out

    t_batch, lp_batch = best_of(args.repeats, cached(True))
    t_single, lp_single = best_of(args.repeats, cached(False))
    t_reread, lp_reread = best_of(args.repeats, reread)
    diff = max(np.abs(a - b).max() for a, b in zip(lp_batch, lp_reread))
    diff_single = max(np.abs(a - b).max() for a, b in zip(lp_batch, lp_single))
    print(f"(a) scoring K={K} continuations of L={L} tokens after a P={P}-token prefix")
    print(f"    cached prefix, one batch      {t_batch:8.3f} s   1.00x")
    print(f"    cached prefix, one at a time  {t_single:8.3f} s   {t_single / t_batch:5.2f}x")
    print(f"    prefix re-read each time      {t_reread:8.3f} s   {t_reread / t_batch:5.2f}x")
    print(f"    max |log-prob difference| batch vs re-read {diff:.2e}, batch vs one at a time {diff_single:.2e}")


def bench_extend(model, args) -> None:
    K, steps = args.branches, args.chunk
    prefix = prefix_tokens(model, 32)
    tokens = prefix_tokens(model, 32 + steps)[32:]

    def run(batched: bool):
        def go():
            ctx = Context(model, n_ctx=64 + K * (steps + 1) + 32, n_threads=args.threads, n_seq_max=K + 1)
            root = ctx.new_branch(prefix)
            ctx.next_logits([root])
            kids = [ctx.fork(root) for _ in range(K)]
            start = time.perf_counter()
            for t in tokens:
                if batched:
                    ctx.extend(kids, [t] * K)
                else:
                    for kid in kids:
                        ctx.extend([kid], [t])
            return time.perf_counter() - start

        return go

    t_batch = min(run(True)() for _ in range(args.repeats))
    t_single = min(run(False)() for _ in range(args.repeats))
    print(f"(b) extending K={K} branches by {steps} tokens each")
    print(f"    one batch per step            {t_batch:8.3f} s   1.00x")
    print(f"    one decode per branch         {t_single:8.3f} s   {t_single / t_batch:5.2f}x")


def bench_generation(model, args) -> None:
    import llama_cpp

    n_new = args.generate
    prompt = TEXT[:200]
    ctx = Context(model, n_ctx=512, n_threads=args.threads, n_seq_max=1)
    llm = llama_cpp.Llama(
        model_path=str(model.path), n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads,
        n_batch=512, verbose=False, seed=0,
    )

    def library_greedy():
        llm.reset()
        out = []
        for token in llm.generate(llm.tokenize(prompt.encode(), add_bos=True), top_k=1, temp=0.0, reset=True):
            out.append(token)
            if len(out) == n_new:
                break
        return out

    theirs = library_greedy()

    def engine_same_tokens():
        branch = ctx.new_branch(model.tokenize(prompt, add_special=True))
        logits = ctx.next_logits([branch])[0]
        agree = 0
        for token in theirs:
            agree += int(np.argmax(logits)) == token
            logits = ctx.extend([branch], [token])[0]
        ctx.release(branch)
        return agree

    # Interleaved, so both see the same machine load.
    t_engine = t_library = float("inf")
    for _ in range(args.repeats):
        t, agree = best_of(1, engine_same_tokens)
        t_engine = min(t_engine, t)
        t_library = min(t_library, best_of(1, library_greedy)[0])
    n_prompt = len(model.tokenize(prompt, add_special=True))
    print(f"(c) generating {n_new} tokens after a {n_prompt}-token prompt (prefill included)")
    print(f"    this engine                   {t_engine:8.3f} s   {n_new / t_engine:6.1f} tok/s   1.00x")
    print(f"    llama_cpp.Llama               {t_library:8.3f} s   {n_new / t_library:6.1f} tok/s   {t_library / t_engine:5.2f}x")
    print(f"    the engine's greedy pick equals Llama's at {agree}/{n_new} steps (ties break differently across kernels)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prefix", type=int, default=256)
    parser.add_argument("--branches", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--generate", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = load_model(resolve_model(args.model))
    print(
        f"# engine benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"# model {model.path.name}, {args.threads} thread(s), {os.cpu_count()} CPUs, "
        f"{platform.machine()}, Python {sys.version.split()[0]}\n"
        f"# command: python benchmarks/engine.py {' '.join(sys.argv[1:])}"
    )
    bench_scoring(model, args)
    bench_extend(model, args)
    bench_generation(model, args)


if __name__ == "__main__":
    main()

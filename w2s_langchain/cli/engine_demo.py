"""The engine's own demo: plain sampling from one model, streamed to stdout.

    python -m w2s_langchain.cli.engine_demo "The film was" --model gemma-3-270m

It shows the engine end to end (load, tokenize, batched decode, warped sampling)
without the search; `w2s-align` is the command that searches.
"""

from __future__ import annotations

import argparse
import codecs
import sys
import time

from ..errors import W2SError
from ..models.registry import resolve_model
from ..engine.context import Context
from ..engine.model import LoadSettings, load_model
from ..engine.sampling import SamplingSettings, warp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m w2s_langchain.cli.engine_demo", description=__doc__.split("\n")[0])
    parser.add_argument("prompt")
    parser.add_argument("--model", default="gemma-3-270m", help="registry name or path to a .gguf file")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--n-threads", type=int, default=None)
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if not args.prompt.strip():
            raise ValueError("the prompt is empty: give some text to continue")
        sampling = SamplingSettings(args.temperature, args.top_k, args.top_p)
        model = load_model(resolve_model(args.model), LoadSettings(n_gpu_layers=args.n_gpu_layers))
        context = Context(model, n_ctx=args.n_ctx, n_threads=args.n_threads, seed=args.seed)
        stream_sample(context, args.prompt, sampling, args.max_new_tokens)
    except (W2SError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def stream_sample(context: Context, prompt: str, sampling: SamplingSettings, max_new_tokens: int) -> None:
    model = context.model
    branch = context.new_branch(model.tokenize(prompt, add_special=True))
    # Bytes go through an incremental decoder: a token may end mid-character.
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(prompt)
    start = time.perf_counter()
    logits = context.next_logits([branch])[0]
    n = 0
    while n < max_new_tokens:
        token = warp(logits, sampling, model.never_sampled).sample(context.rng)
        if model.is_end_of_generation(token):
            break
        sys.stdout.write(text.decode(model.token_bytes(token)))
        sys.stdout.flush()
        n += 1
        logits = context.extend([branch], [token])[0]
    sys.stdout.write(text.decode(b"", final=True) + "\n")
    seconds = time.perf_counter() - start
    print(f"[{n} tokens in {seconds:.2f} s, {n / seconds:.1f} tok/s, {context.n_threads} threads]", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

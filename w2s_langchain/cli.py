"""`w2s-align`: answer a prompt with a strong model steered by two weak ones.

    w2s-align "The restaurant on the corner" --iterations 40
    w2s-align "The film was" --strategy bon --samples 8 --json
    w2s-align "The film was" --tree tree.html

Settings come from a preset (a JSON file: `--preset PATH`, or a packaged name),
then from the flags. Everything is checked before any model loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .aligner import DEFAULT_PRESET, Aligner, load_preset, preset_names
from .errors import W2SError
from .search import STRATEGIES, SearchResult

# Search flags: (flag, settings field, type, help).
_SEARCH_FLAGS = [
    ("--strategy", "strategy", str, f"one of {', '.join(STRATEGIES)}"),
    ("--iterations", "iterations", int, "m: MCTS iterations (w2s)"),
    ("--token-budget", "token_budget", int, "stop w2s once the strong model sampled this many tokens"),
    ("--children", "children", int, "K: children per expansion (w2s), chunks per beam (cbs)"),
    ("--chunk-tokens", "chunk_tokens", int, "L: tokens per chunk (w2s, cbs)"),
    ("--samples", "samples", int, "N: samples (bon)"),
    ("--beam-width", "beam_width", int, "W: beams (cbs)"),
    ("--selection", "selection", str, "ea-puct (the paper's), puct or uct"),
    ("--c", "c", float, "exploration constant"),
    ("--entropy-weight", "entropy_weight", float, "w of EA-PUCT (0: plain PUCT)"),
    ("--num-select", "num_select", int, "stage-2 candidates"),
    ("--max-new-tokens", "max_new_tokens", int, "most answer tokens"),
    ("--temperature", "temperature", float, "sampling temperature (0: greedy)"),
    ("--top-k", "top_k", int, "top-k (0: off)"),
    ("--top-p", "top_p", float, "top-p in (0, 1]"),
    ("--seed", "seed", int, "same seed, same answer"),
    ("--beta", "beta", float, "scale of the proxy value"),
    ("--backup", "backup", str, "max (paper) or mean"),
    ("--terminal-reward", "terminal_reward", str, "-inf (quirk) or eos"),
    ("--fallback", "fallback", str, "truncate or finish"),
    ("--timeout", "timeout", float, "seconds the search may run"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="w2s-align", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("prompt", help="the text to answer or continue")
    parser.add_argument("--preset", default=DEFAULT_PRESET, help=f"packaged ({', '.join(preset_names())}) or a .json file")
    parser.add_argument("--strong", help="strong model: registry name or .gguf path")
    parser.add_argument("--weak", help="weak aligned model")
    parser.add_argument("--weak-ref", help="weak reference model")
    for flag, _, kind, text in _SEARCH_FLAGS:
        parser.add_argument(flag, type=kind, help=text)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--partial-answer", action="store_true", help="on timeout, print the best answer found so far")
    parser.add_argument("--naive", action="store_true", help="re-read every prefix (to measure the cache)")
    parser.add_argument("--n-ctx", type=int, help="KV cells per model")
    parser.add_argument("--n-threads", type=int, help="CPU threads")
    parser.add_argument("--n-gpu-layers", type=int, help="layers offloaded to the GPU (-1: all)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--tree", type=Path, help="write the search tree: .json for data, else an HTML view")
    return parser


def config_from_args(args: argparse.Namespace):
    if not args.prompt.strip():
        raise ValueError("the prompt is empty: give the text to answer or continue")
    search = {field: getattr(args, field) for _, field, _, _ in _SEARCH_FLAGS}
    search["stop"] = tuple(args.stop) if args.stop else None
    search["naive"] = True if args.naive else None
    search["partial_answer"] = True if args.partial_answer else None
    return load_preset(args.preset).with_overrides(
        models={"strong": args.strong, "weak": args.weak, "weak_ref": args.weak_ref},
        search=search,
        runtime={"n_ctx": args.n_ctx, "n_threads": args.n_threads, "n_gpu_layers": args.n_gpu_layers},
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        progress = _ProgressBar() if sys.stderr.isatty() else None
        result = Aligner(config).search(args.prompt, progress=progress)
        if progress:
            progress.close()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (W2SError, ValueError, FileNotFoundError) as err:
        print(f"w2s-align: error: {err}", file=sys.stderr)
        return 1
    if args.tree:
        args.tree.write_text(
            json.dumps(result.tree_dict(), indent=1) if args.tree.suffix == ".json" else result.tree_html(),
            encoding="utf-8",
        )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(args.prompt + result.text)
        print(summary(result), file=sys.stderr)
    return 0


def summary(result: SearchResult) -> str:
    """One paragraph on how the answer was found and what it cost."""
    c = result.cost
    how = {
        "stage2": "chosen by stage-2 re-ranking of finished answers",
        "fallback_truncated": "no answer finished: the best unfinished one, as it is",
        "fallback_finished": "nothing for stage 2 to re-rank: the best path, finished (greedily by V where it was not)",
        "best_of_n": "the best of the samples",
        "beam": "the top beam",
        "sample": "a plain sample",
        "partial": f"the search was cut short ({result.stopped}): the best answer found so far",
    }[result.source]
    value = "n/a" if result.value is None else f"{result.value:.2f}"
    steps = f"{c.iterations} iterations, " if result.strategy in ("w2s", "cbs") else ""
    return (
        f"[{result.strategy}: {steps}{c.tree_nodes} nodes, {c.seconds.get('total', 0):.1f} s. "
        f"Strong model sampled {c.strong_tokens_sampled} tokens, weak models read {c.weak_tokens_scored}; "
        f"{c.tokens_from_cache} tokens came from the KV cache; {c.decode_calls} llama_decode calls. "
        f"Answer: {how} (value {value}, ended by {result.finish_reason or 'nothing'}).]"
    )


class _ProgressBar:
    """A one-line bar on stderr, redrawn in place."""

    def __init__(self, width: int = 30):
        self.width = width

    def __call__(self, done: int, total: int, what: str) -> None:
        filled = int(self.width * min(done, total) / max(total, 1))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {what}")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\r" + " " * (self.width + 40) + "\r")


if __name__ == "__main__":
    sys.exit(main())

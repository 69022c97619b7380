"""`w2s-align`: answer a prompt with a strong model steered by two weak ones.

    w2s-align "The restaurant on the corner" --iterations 40
    w2s-align "The film was" --strategy bon --samples 8 --json
    w2s-align "The film was" --tree tree.html
    w2s-align check --preset my_preset.json --pairs my_pairs.jsonl
    w2s-align check --preset sentiment --prompt "The film was" --samples 8

`w2s-align check` (the word check first) asks whether a preset's weak pair agrees
with your preference before you pay for searches (see preference_check.py).
To answer the prompt "check" itself, write `w2s-align -- check`.

Settings come from a preset (a JSON file: `--preset PATH`, or a packaged name),
then from the flags. Everything is checked before any model loads, the `--tree`
file's directory included.

Exit codes: 0 answered; 1 no answer (a bad setting, prompt or preset, a model that
is unknown, not pulled, damaged or refused, a search error or timeout); 2 bad
command-line usage; 3 answered, but the tree file could not be written; 130
interrupted (Ctrl-C). With `--json`, a failure prints a JSON object too:
{"error": {"type": ..., "message": ..., "exit_code": ...}} (with exit code 3, the
result's object carries it).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path
from typing import Literal, get_origin

from pydantic import SecretStr

from ..declared_settings import declared_settings
from ..errors import W2SError
from ..service.aligner import DEFAULT_PRESET, Aligner, Runtime, load_preset, preset_names
from ..service.preference_check import (
    SPLITS,
    AgreementReport,
    RankedAnswers,
    check_pairs,
    rank_samples,
    read_pairs,
    shipped_pairs,
)
from .launch import EXIT_INTERRUPTED, error_dict, report_failure
from .progress import ProgressBar
from ..search import SearchResult, SearchSettings
from .treeview import tree_to_html

# The settings that get a flag each, by the config section they override (as in a preset).
_SETTINGS = {"search": SearchSettings, "runtime": Runtime}


PROGRAM = "w2s-align"
EXIT_NO_ANSWER, EXIT_USAGE, EXIT_TREE_NOT_WRITTEN = 1, 2, 3


class _UsageError(Exception):
    """A command line argparse refuses (reported by `main`, as JSON when asked)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print and exit; main reports it
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="w2s-align", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Before running searches with your own preset, see `w2s-align check --help`: does its weak pair agree "
        "with your preference? (To align the prompt \"check\" itself: w2s-align -- check)",
    )
    parser.add_argument("prompt", help="the text to answer or continue")
    parser.add_argument("--preset", default=DEFAULT_PRESET, help=f"packaged ({', '.join(preset_names())}) or a .json file")
    parser.add_argument("--strong", help="strong model: registry name, .gguf path or http://HOST:PORT of a llama-server")
    parser.add_argument("--weak", help="weak aligned model")
    parser.add_argument("--weak-ref", help="weak reference model")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--tree", type=Path, help="write the search tree: .json for data, else an HTML view")
    for section, declaration in _SETTINGS.items():
        add_setting_flags(parser.add_argument_group(f"{section} settings (the preset's, unless given)"), declaration)
    return parser


def add_setting_flags(parser: argparse._ActionsContainer, declaration: type) -> None:
    """A flag for each setting the dataclass declares (`chunk_tokens` is
    --chunk-tokens), its help the setting's docstring. A flag not given is None:
    the preset's value holds. Values are checked by the dataclass, as a preset's
    are: a bad one is exit code 1 with the dataclass's message, like a bad preset."""
    for setting in declared_settings(declaration):
        flag = "--" + setting.name.replace("_", "-")
        text = " ".join(setting.doc.split()).replace("%", "%%")  # argparse formats help with %
        kind = _value_type(setting.options)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif kind is tuple:
            parser.add_argument(flag, action="append", help=f"{text} Repeatable.")
        else:
            parser.add_argument(flag, type=kind, help=text)


def _value_type(options: tuple) -> type:
    """What a flag's text becomes: the first of bool, int, float, str a setting's
    type allows (a Literal's name, or a selection rule's, is a str); tuple for a
    tuple of strings, given by repeating the flag."""
    for option in options:
        if option in (bool, int, float, str):
            return option
        if option is SecretStr:  # an API key: text, kept secret once read
            return str
        if get_origin(option) is Literal:
            return str
        if get_origin(option) is tuple:
            return tuple
    raise TypeError(f"no command-line form for a setting of type {options}")


def config_from_args(args: argparse.Namespace):
    if not args.prompt.strip():
        raise ValueError("the prompt is empty: give the text to answer or continue")
    return _preset_with_flags(args)


def _preset_with_flags(args: argparse.Namespace):
    return load_preset(args.preset).with_overrides(
        models={"strong": args.strong, "weak": args.weak, "weak_ref": args.weak_ref},
        **{
            section: {s.name: getattr(args, s.name) for s in declared_settings(declaration)}
            for section, declaration in _SETTINGS.items()
        },
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:  # the subcommand; `w2s-align -- check` answers the prompt "check"
        return check_main(argv[1:])
    parser = build_parser()
    as_json = "--json" in argv  # known even when the rest of the command line is wrong
    try:
        args = parser.parse_args(argv)
    except _UsageError as err:
        if not as_json:
            parser.print_usage(sys.stderr)
        return report_failure(err, EXIT_USAGE, PROGRAM, as_json)
    try:
        config = config_from_args(args)
        if args.tree:
            check_writable(args.tree)
        progress = ProgressBar(leave=False)  # the answer replaces it
        try:
            result = Aligner(config).search(args.prompt, progress=progress)
        finally:
            progress.close()
    except KeyboardInterrupt as err:
        return report_failure(err, EXIT_INTERRUPTED, PROGRAM, as_json)
    except (W2SError, ValueError, OSError) as err:
        return report_failure(err, EXIT_NO_ANSWER, PROGRAM, as_json)
    except Exception as err:  # a bug, or memory running out: still JSON for a caller that parses it
        if not as_json:
            raise
        return report_failure(err, EXIT_NO_ANSWER, PROGRAM, as_json)
    tree_error = None
    if args.tree:
        try:
            text = json.dumps(result.tree_dict(), indent=1) if args.tree.suffix == ".json" else tree_to_html(result.tree_dict())
            with open(_open_for_writing(args.tree), "w", encoding="utf-8") as tree_file:
                tree_file.write(text)
        except OSError as err:  # a disk that filled up during the search: the answer still counts
            tree_error = OSError(f"the tree was not written to {args.tree}: {err.strerror or err}")
    if args.json:
        data = result.to_dict()
        if tree_error:
            data["error"] = error_dict(tree_error, EXIT_TREE_NOT_WRITTEN)
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print(args.prompt + result.text)
        print(summary(result), file=sys.stderr)
        if tree_error:
            report_failure(tree_error, EXIT_TREE_NOT_WRITTEN, PROGRAM)
    return EXIT_TREE_NOT_WRITTEN if tree_error else 0


_CHECK_SAMPLES = 8  # strong samples ranked per --prompt, unless --samples says otherwise


def build_check_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="w2s-align check",
        description="Does a preset's weak pair agree with your preference? With --pairs (a JSONL file of "
        '{"prompt", "chosen", "rejected"} objects): how often V(chosen) > V(rejected), with a 95% Wilson interval, '
        "the mean margin and the pairs it gets most wrong. With --prompt: plain samples of the strong model ranked "
        "by V (--samples of them, default 8). With neither, a packaged preset is checked on the held-out split of the pairs it ships with.",
    )
    parser.add_argument("--preset", default=DEFAULT_PRESET, help=f"packaged ({', '.join(preset_names())}) or a .json file")
    parser.add_argument("--pairs", type=Path, help="labelled pairs, one JSON object per line")
    parser.add_argument("--split", choices=SPLITS, help="only the pairs of this split (the shipped files have both)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt to sample and rank answers for; repeatable")
    parser.add_argument("--show", type=int, default=5, help="pairs (or answers at each end) to show (default 5)")
    parser.add_argument("--strong", help="strong model: registry name, .gguf path or http://HOST:PORT of a llama-server")
    parser.add_argument("--weak", help="weak aligned model")
    parser.add_argument("--weak-ref", help="weak reference model")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    for section, declaration in _SETTINGS.items():
        add_setting_flags(parser.add_argument_group(f"{section} settings (the preset's, unless given)"), declaration)
    return parser


def check_main(argv: list[str]) -> int:
    """`w2s-align check ...`: exit code 0 with a report (a warning in it when the
    agreement's interval includes 50%), 1 when no report could be made, 2 bad usage."""
    parser = build_check_parser()
    as_json = "--json" in argv
    try:
        args = parser.parse_args(argv)
        if args.pairs and args.prompt:
            raise _UsageError("give either --pairs (labelled) or --prompt (unlabelled), not both")
        if args.show < 1:
            raise _UsageError("--show must be at least 1")
    except _UsageError as err:
        if not as_json:
            parser.print_usage(sys.stderr)
        return report_failure(err, EXIT_USAGE, PROGRAM, as_json)
    try:
        config = _preset_with_flags(args)
        aligner = Aligner(config)
        if args.prompt:
            ranked = rank_samples(aligner, args.prompt, args.samples or _CHECK_SAMPLES)  # --samples: bon's N
            print(json.dumps([{"prompt": r.prompt, "answers": [{"answer": a, "value": v} for a, v in r.answers]}
                              for r in ranked], indent=2, ensure_ascii=False) if args.json else ranking_text(ranked, args.show))
            return 0
        pairs_file, split = args.pairs, args.split
        if pairs_file is None:
            pairs_file = shipped_pairs(args.preset)
            if pairs_file is None:
                raise ValueError(
                    f"{args.preset!r} ships no labelled pairs: give --pairs FILE (JSONL of prompt, chosen, rejected) "
                    "or --prompt TEXT to see how it ranks samples"
                )
            split = split or "heldout"
        report = check_pairs(aligner, read_pairs(pairs_file, split))
    except KeyboardInterrupt as err:
        return report_failure(err, EXIT_INTERRUPTED, PROGRAM, as_json)
    except (W2SError, ValueError, OSError) as err:
        return report_failure(err, EXIT_NO_ANSWER, PROGRAM, as_json)
    if args.json:
        print(json.dumps({"pairs_file": str(pairs_file), "split": split, **report.to_dict(args.show)}, indent=2, ensure_ascii=False))
    else:
        print(agreement_text(report, args.show, f"{pairs_file}" + (f" ({split} split)" if split else "")))
    return 0


def agreement_text(report: AgreementReport, show: int, source: str) -> str:
    lines = [
        f"{source}: the weak pair agrees with the label on {report.agreement:.0%} of {len(report.pairs)} pairs "
        f"[{report.low:.0%}, {report.high:.0%}] (95% Wilson interval); mean margin V(chosen) - V(rejected) = "
        f"{report.mean_margin:+.2f}",
    ]
    if report.includes_chance:
        lines.append(
            "WARNING: the interval includes 50%: on these pairs the weak pair may not tell the chosen answers from the "
            "rejected ones, and a search would push toward something other than your preference. Change the preset's "
            "weak prompts (weak, weak_ref) or models, or check more pairs."
        )
    lines.append(f"\nThe {min(show, len(report.pairs))} pairs it gets most wrong (lowest margin first):")
    for p in report.most_wrong(show):
        lines += [f"  margin {p.margin:+.2f}  prompt: {_short(p.pair.prompt)}",
                  f"      chosen   (V {p.chosen_value:+.2f}): {_short(p.pair.chosen)}",
                  f"      rejected (V {p.rejected_value:+.2f}): {_short(p.pair.rejected)}"]
    return "\n".join(lines)


def ranking_text(ranked: list[RankedAnswers], show: int) -> str:
    lines = []
    for r in ranked:
        lines.append(f"prompt: {_short(r.prompt)}  ({len(r.answers)} distinct samples)")
        top, bottom = r.answers[:show], r.answers[max(show, len(r.answers) - show):]
        lines += ["  ranked highest:"] + [f"    V {v:+.2f}  {_short(a)}" for a, v in top]
        if bottom:
            lines += ["  ranked lowest:"] + [f"    V {v:+.2f}  {_short(a)}" for a, v in bottom]
    return "\n".join(lines)


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_writable(path: Path) -> None:
    """Refuse an output file that cannot be written, before the work that fills it."""
    if path.is_dir():
        raise IsADirectoryError(f"--tree {path} is a directory: give a file name")
    if path.is_fifo() or path.is_socket():  # writing one waits for a reader, maybe forever
        raise OSError(f"--tree {path} is a pipe or a socket, not a file: give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"--tree {path}: there is no directory {folder}")
    if not os.access(folder if not path.exists() else path, os.W_OK):
        raise PermissionError(f"--tree {path}: not allowed to write there")


def _open_for_writing(path: Path) -> int:
    """A descriptor to write `path` with, opened without waiting: a pipe made during
    the search that no process reads is refused at once, instead of blocking."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK, 0o666)
    except OSError as err:
        if err.errno == errno.ENXIO:
            raise OSError(errno.ENXIO, f"--tree {path} is a pipe that no process reads: give a file name") from None
        raise
    os.set_blocking(descriptor, True)
    return descriptor


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
    if c.steps not in (0, c.iterations):  # leaves grown several at a time
        steps = f"{c.iterations} iterations in {c.steps} steps, "
    return (
        f"[{result.strategy}: {steps}{c.tree_nodes} nodes, {c.seconds.get('total', 0):.1f} s. "
        f"Strong model sampled {c.strong_tokens_sampled} tokens, weak models read {c.weak_tokens_scored}; "
        f"{c.tokens_from_cache} tokens came from the KV cache; {c.decode_calls} llama_decode calls. "
        f"Answer: {how} (value {value}, ended by {result.finish_reason or 'nothing'}).]"
    )


if __name__ == "__main__":
    sys.exit(main())

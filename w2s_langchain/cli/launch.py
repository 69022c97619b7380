"""The console scripts' entry points, and how a command reports a failure.

A command's module imports numpy, llama.cpp and pydantic before its `main()` runs
(about 0.7 s). Ctrl-C in that time ends the command as Ctrl-C during its work does:
exit code 130 and "interrupted" on stderr, or the JSON error with `--json`; not a
traceback. So this module imports only the standard library.
"""

from __future__ import annotations

import importlib
import json
import sys

EXIT_INTERRUPTED = 130


def w2s_align() -> int:
    return _start("align", "w2s-align", json_flag="--json")


def w2s_models() -> int:
    return _start("models", "w2s-models")


def _start(module: str, program: str, json_flag: str | None = None) -> int:
    argv = sys.argv[1:]
    try:
        main = importlib.import_module(f"{__package__}.{module}").main
    except KeyboardInterrupt as err:
        return report_failure(err, EXIT_INTERRUPTED, program, as_json=json_flag in argv)
    return main(argv)


def error_dict(err: BaseException, code: int) -> dict:
    message = "interrupted" if isinstance(err, KeyboardInterrupt) else str(err)
    return {"type": type(err).__name__, "message": message, "exit_code": code}


def report_failure(err: BaseException, code: int, program: str, as_json: bool = False) -> int:
    """Say why the command failed (on stdout as JSON with --json, else a line on
    stderr); return `code`."""
    if as_json:
        print(json.dumps({"error": error_dict(err, code)}, ensure_ascii=False))
    elif isinstance(err, KeyboardInterrupt):
        print(f"\n{program}: interrupted", file=sys.stderr)
    else:
        print(f"{program}: error: {err}", file=sys.stderr)
    return code

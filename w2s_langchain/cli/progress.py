"""The progress bar both commands draw on stderr: tqdm's, with rate and ETA, and
nothing at all when stderr is not a terminal (logs should not fill with redraws)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class ProgressBar:
    """A progress callback, `(done, total)` or the search's `(done, total, what)`
    (`what` names the unit): the bar starts at the first report, so a step that
    reports nothing (a model already pulled) draws nothing."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._bar: tqdm | None = None

    def __call__(self, done: int, total: int, what: str | None = None) -> None:
        if self._bar is None:
            unit = {"unit": f" {what}"} if what else {}
            # disable=None: tqdm stays silent when its stream is not a terminal.
            self._bar = tqdm(total=total, file=sys.stderr, disable=None, dynamic_ncols=True, **unit, **self._options)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

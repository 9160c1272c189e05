"""Progress bars that read well both in a terminal and in a log.

In a terminal a tqdm bar redraws itself in place with carriage returns. Where the output is a
log (a pipeline task under kfp, a Kubernetes pod, CI, `make demo | tee`), those redraws arrive as
one endless line that shows nothing until the work ends. `progress_bar` gives a tqdm bar that, when
its stream is not a terminal, writes a whole line at most every `LOG_INTERVAL_S` seconds (and
the final state), so the log says how far long work has come and how long it still needs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

LOG_INTERVAL_S = 15.0


class _Lines:
    """A text stream for tqdm: each redraw (carriage return, bar, padding) becomes one line."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(
    iterable: Iterable | None = None, *, disable: bool = False, file: IO[str] | None = None, **kwargs: Any
):
    """A tqdm bar on `file` (stderr by default): redrawn in place on a terminal, whole lines in a log."""
    stream = file if file is not None else sys.stderr
    if not _is_terminal(stream):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("ascii", True)
        kwargs.setdefault("ncols", 100)
        stream = _Lines(stream)
    return tqdm(iterable, disable=disable, file=stream, **kwargs)

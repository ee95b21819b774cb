"""Progress bars that read well in a terminal and in a log file.

`progress_bar(...)` takes tqdm's arguments. On a terminal it is tqdm as usual. When stderr is a file or a pipe (a sweep's log
written with `> log 2>&1`), a bar shorter than LOG_INTERVAL seconds prints nothing, a longer one a plain line
every LOG_INTERVAL seconds and its final state, instead of a carriage-return frame per update.
"""
from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL = 30.0  # seconds between two lines of one bar in a log file


class _Null:
    def write(self, s: str) -> None:
        pass

    def flush(self) -> None:
        pass


class _LogBar(tqdm):
    """A bar for log files: silent for its first LOG_INTERVAL seconds (short steps print nothing), then one line
    per LOG_INTERVAL seconds and its final state when it closes."""

    def __init__(self, *args: Any, log_stream: TextIO, **kwargs: Any):
        self._log_stream, self._log_started = log_stream, False
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        start = getattr(self, "start_t", None)  # None while tqdm's __init__ draws the empty bar
        if msg == "" or self.disable or start is None:  # msg "": tqdm clearing a bar that does not stay
            return True
        if self._log_started or self._time() - start >= LOG_INTERVAL:
            self._log_started = True
            self._log_stream.write(self.__str__().strip() + "\n")
            self._log_stream.flush()
        return True


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether `stream` (default stderr) is an interactive terminal; CSR_PROGRESS=tty forces it, =log forbids it."""
    forced = os.environ.get("CSR_PROGRESS", "")
    if forced in ("tty", "log"):
        return forced == "tty"
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def progress_bar(*args: Any, **kwargs: Any) -> tqdm:
    """tqdm(*args, **kwargs) on a terminal; in a log file, nothing for a step shorter than LOG_INTERVAL seconds,
    else one line per LOG_INTERVAL seconds and one at the end."""
    stream = kwargs.pop("file", None) or sys.stderr
    if is_terminal(stream):
        return tqdm(*args, file=stream, **kwargs)
    kwargs["mininterval"] = kwargs["maxinterval"] = LOG_INTERVAL
    kwargs.update(dynamic_ncols=False, ncols=100)
    return _LogBar(*args, file=_Null(), log_stream=stream, **kwargs)

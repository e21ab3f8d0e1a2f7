"""stdout and stderr that a closed pipe or a full disk cannot turn into a traceback or a wrong exit code.

`--dry-run | head` closes the pipe after ten lines; cron's `>> log` can meet a full disk. A write then raises
BrokenPipeError or OSError (ENOSPC), from whichever line of the program happened to print; and text still in the
buffer when the interpreter exits makes it print "Exception ignored ... BrokenPipeError" and exit 120, whatever
the run decided. Nobody reads the rest, so the rest is dropped: the first write that fails points the stream's
file descriptor at /dev/null (the interpreter's last flush then succeeds) and every later write is a no-op.

What the program does never depends on being read: a run goes on delivering and ends with its own exit code
(the journal, the metrics file and the healthcheck pings still tell); a dry run, whose output is all it does,
stops (dispatch.SendLoop asks `lost`).
"""

from __future__ import annotations

import os
import sys
from typing import TextIO


class GuardedStream:
    """A text stream whose writes never raise; `lost` says why output stopped ("" while it is written)."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self.lost = ""

    def write(self, text: str) -> int:
        if not self.lost:
            try:
                return self._stream.write(text)
            except OSError as exc:
                self._lose(exc)
        return len(text)

    def flush(self) -> None:
        if not self.lost:
            try:
                self._stream.flush()
            except OSError as exc:
                self._lose(exc)

    def __getattr__(self, name: str):  # fileno, isatty, encoding...: as the stream has them
        return getattr(self._stream, name)

    def _lose(self, exc: OSError) -> None:
        self.lost = exc.strerror or type(exc).__name__
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError):
            pass  # no file descriptor of its own (a test's StringIO): the dropped writes are enough


def guard_standard_streams() -> None:
    """sys.stdout and sys.stderr as GuardedStreams, for the rest of the process."""
    if not isinstance(sys.stdout, GuardedStream):
        sys.stdout = GuardedStream(sys.stdout)  # type: ignore[assignment]
    if not isinstance(sys.stderr, GuardedStream):
        sys.stderr = GuardedStream(sys.stderr)  # type: ignore[assignment]


def output_lost(stream: object) -> str:
    """Why `stream` no longer takes output ("" while it does, or when it is not a GuardedStream)."""
    return getattr(stream, "lost", "") if isinstance(stream, GuardedStream) else ""

"""The run's event output: one line per event on stdout, as text (the default) or JSON; and its progress.

Text, as the log has always read:
    2026-11-27T18:21:36Z data-tracker record=64b0...0506 activity=506 sr=24-00012003 FAILED: activity ...
JSON (`--log-format json` / LOG_FORMAT=json), one object per line, for log shippers:
    {"ts": "2026-11-27T18:21:36.512Z", "level": "error", "app": "data-tracker", "event": "failed",
     "message": "activity ...", "record_id": "64b0...0506", "atd_activity_id": "506", "sr_number": "24-00012003"}
The last line of a run is the summary (event "summary"), its counts as numbers.

Both go through the standard logging module; JSON is python-json-logger's formatter. Text that comes from
Knack records (SR numbers, details quoted in a reason) may hold newlines or terminal escapes: the text format
shows every control character escaped, so one event is always one line and an SR number cannot forge a line
or recolour the terminal; JSON escapes them by its own rules (and writes ASCII only, so no Unicode line
separator reaches a line-based reader raw).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

from .errors import ConfigError
from .outcomes import (
    DRY_RUN_MESSAGE,
    ERROR,
    EXIT_LOCKED,
    EXIT_OK,
    FAILED,
    HELD,
    RECORD_OUTCOMES,
    WARNING,
    Event,
    Reader,
    RunReport,
)

LOG_FORMATS = ("text", "json")
PROGRESS_INTERVAL = 10.0  # seconds between progress lines while a backlog drains

# Events whose text line carries a tag the operator (and grep) looks for; others are tagged by level.
_TAGS = {FAILED: "FAILED", HELD: "HELD", "skipped": "SKIPPED"}
_UNTAGGED = frozenset({"summary", "progress"})  # their level is for JSON readers; the text reads "summary: ..."

# C0 and C1 controls (a newline forges a line such as a fake `summary:`, an ANSI escape rewrites the terminal, a
# NUL cuts the line in log shippers), DEL, the Unicode line and paragraph separators (some viewers break lines
# there), invisible and bidirectional formatting characters (a line that reads differently from what it holds),
# and lone surrogates (which cannot even be written as UTF-8).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff"
                          "\ufff9-\ufffb\ud800-\udfff]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

_loggers = itertools.count(1)


def printable(text: object) -> str:
    """`text` on one line: every control character shown as an escape (\\n, \\x1b, \\u2028)."""
    def escape(match: re.Match) -> str:
        char = match.group()
        if char in _SHORT_ESCAPES:
            return _SHORT_ESCAPES[char]
        return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"

    return _UNPRINTABLE.sub(escape, str(text))


def _utc(created: float, *, millis: bool) -> str:
    stamp = dt.datetime.fromtimestamp(created, dt.UTC)
    if millis:
        return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def _text_tag(event: Event) -> str:
    if event.name in _UNTAGGED:
        return ""
    return _TAGS.get(event.name) or ("ERROR" if event.level >= ERROR else "WARNING" if event.level >= WARNING else "")


def _event_of(record: logging.LogRecord) -> Event:
    return record.knack311_event  # type: ignore[attr-defined]  # set by EventLog.event


class TextFormatter(logging.Formatter):
    """`TIMESTAMP APP [record=ID activity=ATD sr=SR] [TAG: ]message`, control characters escaped."""

    def __init__(self, app: str):
        super().__init__()
        self.app = app

    def format(self, record: logging.LogRecord) -> str:
        event = _event_of(record)
        where = ""
        if event.atd_activity_id is not None:
            where = (f" record={printable(event.record_id)} activity={printable(event.atd_activity_id)}"
                     f" sr={printable(event.sr_number or '-')}")
        elif event.record_id is not None:
            where = f" record={printable(event.record_id)} sr={printable(event.sr_number or '-')}"
        tag = _text_tag(event)
        message = printable(record.getMessage())
        line = f"{_utc(record.created, millis=False)} {printable(self.app)}{where} {tag + ': ' if tag else ''}{message}"
        if event.name == DRY_RUN_MESSAGE:
            # the message as the ESB would receive it, after its line, as a dry run has always printed it
            return f"{line}\n{event.fields.get('xml', '')}"
        return line


class EventJsonFormatter(JsonFormatter):
    """python-json-logger's formatter, with the keys the log's readers rely on, in a readable order."""

    FIRST = ("ts", "level", "app", "event", "message")

    def __init__(self, app: str):
        super().__init__(["levelname", "message"], rename_fields={"levelname": "level"}, static_fields={"app": app},
                         timestamp="ts", json_ensure_ascii=True)

    def process_log_record(self, log_data: dict) -> dict:
        event: Event = log_data.pop("knack311_event")
        log_data["ts"] = _utc(log_data["ts"].timestamp(), millis=True)
        log_data["level"] = str(log_data["level"]).lower()
        log_data["event"] = event.name
        if event.about_a_record:
            log_data.update(record_id=event.record_id, atd_activity_id=event.atd_activity_id,
                            sr_number=event.sr_number or None)
        ordered = {key: log_data.pop(key) for key in self.FIRST}
        ordered.update(log_data)
        for key, value in event.fields.items():
            ordered.setdefault(key, value)  # an extra field never hides a standard one
        return ordered


class _QuietStreamHandler(logging.StreamHandler):
    """A closed or broken stdout (the reader went away) must not print a logging traceback mid-run."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


class EventLog(Reader):
    """The log: every event as one line on `stream` (stdout by default), the summary last."""

    def __init__(self, app: str, log_format: str = "text", stream: TextIO | None = None):
        if log_format not in LOG_FORMATS:
            raise ValueError(f"log format must be one of {LOG_FORMATS}, not {log_format!r}")
        self.app = app
        self.log_format = log_format
        # A logger of its own (not the root): libraries' log records never land in the event stream.
        self.logger = logging.getLogger(f"knack311.events.{next(_loggers)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.DEBUG)
        self.handler = _QuietStreamHandler(stream if stream is not None else sys.stdout)
        self.handler.setFormatter(EventJsonFormatter(app) if log_format == "json" else TextFormatter(app))
        self.logger.addHandler(self.handler)

    def event(self, event: Event) -> None:
        self.logger.log(event.level, "%s", event.message, extra={"knack311_event": event})

    def finished(self, report: RunReport) -> None:
        level = logging.INFO if report.exit_code in (EXIT_OK, EXIT_LOCKED) else ERROR
        self.event(Event("summary", report.summary_text(), level, fields=report.summary_fields()))

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


class ProgressLines(Reader):
    """While a backlog drains, a progress line at least every `interval` seconds: done/total, rate, time left.

    A background thread keeps the promise even when one record takes longer than the interval (a slow ESB).
    A run that finishes within the interval prints none.
    """

    def __init__(self, emit: Callable[[Event], None], *, interval: float = PROGRESS_INTERVAL,
                 clock: Callable[[], float] = time.monotonic, background: bool = True,
                 stopping: Callable[[], bool] = lambda: False):
        """`stopping()`: True once the run starts no new record (a signal, the time budget, an outage); the
        lines then give no time estimate, which would promise work that is not going to be done."""
        self._emit = emit
        self._stopping = stopping
        self.interval = interval
        self._clock = clock
        self._background = background
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.total = self.done = 0
        self._began = self._last = 0.0

    def planned(self, total: int) -> None:
        with self._lock:
            self.total, self.done = total, 0
            self._began = self._last = self._clock()
        if self._background and total > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._tick_forever, name="knack311-progress", daemon=True)
            self._thread.start()

    def event(self, event: Event) -> None:
        if event.name in RECORD_OUTCOMES:
            with self._lock:
                self.done += 1

    def tick(self) -> Event | None:
        """Emit a progress line if one is due; returns it (for tests)."""
        with self._lock:
            now = self._clock()
            if not self.total or self.done >= self.total or now - self._last < self.interval:
                return None
            self._last = now
            event = progress_event(self.done, self.total, now - self._began, stopping=self._stopping())
        self._emit(event)
        return event

    def _tick_forever(self) -> None:
        while True:
            with self._lock:
                due_in = self._last + self.interval - self._clock()
            if self._stop.wait(max(0.05, due_in)):
                return
            self.tick()

    def finished(self, report: RunReport) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


def progress_event(done: int, total: int, elapsed: float, *, stopping: bool = False) -> Event:
    rate = done / elapsed if elapsed > 0 else 0.0
    left = (total - done) / rate if rate > 0 and not stopping else None
    if stopping:
        eta = "stopping: no new record starts"
    else:
        eta = f"about {_duration(left)} left" if left is not None else "time left unknown"
    return Event("progress", f"progress: {done}/{total} records, {rate:.1f} records/s, {eta}",
                 fields={"done": done, "total": total, "rate_per_s": round(rate, 2),
                         "eta_s": round(left, 1) if left is not None else None})


class ProgressBar(Reader):
    """A live bar (tqdm) on stderr, only on request (--progress / PROGRESS=1): the city's scheduler attaches a
    terminal, and bar redraws there would fill the task log. While the bar is up, the log's console lines are
    written through tqdm so they do not tear it."""

    def __init__(self, log: EventLog | None = None, *, file: TextIO | None = None):
        self._log = log
        self._file = file
        self._bar = None
        self._redirect = contextlib.ExitStack()
        self._lock = threading.Lock()  # the delivery workers report their records' outcomes from their threads

    def planned(self, total: int) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._bar = tqdm(total=total, unit="record", file=self._file if self._file is not None else sys.stderr,
                         dynamic_ncols=True, mininterval=0.5)
        if self._log is not None and self._log.handler.stream in (sys.stdout, sys.stderr):
            self._redirect.enter_context(logging_redirect_tqdm(loggers=[self._log.logger]))

    def event(self, event: Event) -> None:
        if event.name in RECORD_OUTCOMES:
            with self._lock:
                if self._bar is not None:
                    self._bar.update(1)

    def finished(self, report: RunReport) -> None:
        self.close()

    def close(self) -> None:
        self._redirect.close()
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None


def progress_reader(bar: bool, log: EventLog, *, interval: float = PROGRESS_INTERVAL,
                    stopping: Callable[[], bool] = lambda: False) -> Reader:
    """The progress reader for a run: the bar when asked for, else the periodic lines in the log."""
    return ProgressBar(log) if bar else ProgressLines(log.event, interval=interval, stopping=stopping)


def log_format_setting(flag: str | None, env: Mapping[str, str]) -> str:
    """--log-format, else LOG_FORMAT, else text."""
    value = (flag or env.get("LOG_FORMAT", "")).strip().lower() or "text"
    if value not in LOG_FORMATS:
        source = "--log-format" if flag else "LOG_FORMAT"
        raise ConfigError(f"{source} must be text or json, not {printable(value)!r}")
    return value


def progress_setting(flag: bool, env: Mapping[str, str]) -> bool:
    """--progress, else PROGRESS=1 (true/yes); PROGRESS=0 or unset means no bar."""
    value = env.get("PROGRESS", "").strip().lower()
    if value not in ("", "0", "1", "true", "false", "yes", "no"):
        raise ConfigError(f"PROGRESS must be 1 or 0, not {printable(value)!r}")
    return flag or value in ("1", "true", "yes")

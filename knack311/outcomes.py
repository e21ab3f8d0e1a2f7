"""What a run did, and the readers that report it.

The run tells one `Readers` what happens (started, planned N records, each event, finished with a
`RunReport`); every output is a reader of that same stream: the log lines (text or JSON, logs.py), the
progress line or bar (logs.py), the metrics file (metrics.py), the dead man's switch pings (healthcheck.py).
A new output is a new reader, not a new branch in the run's loop.

A reader that cannot do its job (metrics directory gone, ping timed out) raises ReportError; the fan-out turns
it into a warning event for the other readers and the run goes on: reporting never changes a run's outcome.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

DEBUG, INFO, WARNING, ERROR = logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR

# Events that conclude one record; progress counts these.
SENT, DO_NOT_SEND, FAILED, HELD = "sent", "do_not_send", "failed", "held"
RECORD_OUTCOMES = frozenset({SENT, DO_NOT_SEND, FAILED, HELD})
# A dry run's rendered message: the XML rides in the event's `xml` field (logs.py prints it in text, carries it in
# JSON)
DRY_RUN_MESSAGE = "dry_run_message"

# The counts of a run, under the names the text summary, the JSON summary and the metrics all use.
COUNT_NAMES = ("fetched", "sent", "do_not_send", "failed", "held", "deferred", "not_attempted", "skipped")
LISTED_IDS = 20  # record ids named in the summary per kind, then "+N more"
OUTCOME_NAMES = COUNT_NAMES[1:7]  # what became of the fetched records (the metrics' outcome labels)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_LOCKED = 0, 1, 2, 75


class ReportError(Exception):
    """A reader could not report (the message is safe to print: no secret, no URL path)."""


class RecordRef(Protocol):
    """Anything that names a record the way the log does (message.Activity fits)."""

    record_id: str
    atd_activity_id: str
    sr_number: str


@dataclass(frozen=True)
class Event:
    """One thing that happened. `message` is readable prose without a FAILED/HELD/WARNING tag: the text
    format adds the tag from `name` and `level`, the JSON format carries them as fields."""

    name: str
    message: str
    level: int = INFO
    record_id: str | None = None
    atd_activity_id: str | None = None
    sr_number: str | None = None
    fields: Mapping[str, object] = field(default_factory=dict)  # extra JSON fields (numbers stay numbers)

    @property
    def about_a_record(self) -> bool:
        return self.record_id is not None


@dataclass(frozen=True)
class RunReport:
    """The outcome of one run, as every reader sees it."""

    app: str
    exit_code: int
    fetched: int = 0
    sent: int = 0
    do_not_send: int = 0
    failed: int = 0
    held: int = 0
    deferred: int = 0
    not_attempted: int = 0
    skipped: int = 0  # listed by Knack although not READY_TO_SEND: never posted
    duration_s: float = 0.0
    stop_reason: str = ""
    finished_at: float = field(default_factory=time.time)  # Unix time
    dry_run: bool = False
    rendered: int = 0  # dry run only
    knack_calls_remaining: int | None = None  # unknown unless Knack said
    failed_ids: tuple[str, ...] = ()
    held_ids: tuple[str, ...] = ()
    esb_in_flight: tuple[int, int] | None = None  # the lowest and highest limit of ESB POSTs at once

    def counts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNT_NAMES}

    def summary_text(self) -> str:
        """The summary line's text, as the log has always printed it."""
        parts = [f"fetched={self.fetched}"]
        if self.dry_run:
            parts.append(f"rendered={self.rendered}")
        parts += [f"{name}={getattr(self, name)}" for name in COUNT_NAMES[1:]]
        parts.append(f"duration={self.duration_s:.1f}s")
        if self.knack_calls_remaining is not None:
            parts.append(f"knack_calls_left_today={self.knack_calls_remaining}")
        if self.esb_in_flight is not None:
            parts.append(f"esb_in_flight={self.esb_in_flight[0]}..{self.esb_in_flight[1]}")
        for name, ids in (("failed_ids", self.failed_ids), ("held_ids", self.held_ids)):
            if ids:
                more = len(ids) - LISTED_IDS
                parts.append(f"{name}={','.join(ids[:LISTED_IDS])}" + (f" +{more} more" if more > 0 else ""))
        tail = f" stopped: {self.stop_reason}" if self.stop_reason else ""
        return f"summary{' (dry run)' if self.dry_run else ''}: {' '.join(parts)}{tail}"

    def summary_fields(self) -> dict[str, object]:
        """The summary's machine-readable fields (JSON): counts as numbers, the stop reason or null."""
        values: dict[str, object] = dict(self.counts())
        if self.dry_run:
            values["rendered"] = self.rendered
            values["dry_run"] = True
        values.update(duration_s=round(self.duration_s, 3), exit_code=self.exit_code,
                      stop_reason=self.stop_reason or None, knack_calls_left_today=self.knack_calls_remaining,
                      failed_ids=list(self.failed_ids[:LISTED_IDS]), held_ids=list(self.held_ids[:LISTED_IDS]))
        if self.esb_in_flight is not None:
            values["esb_in_flight"] = list(self.esb_in_flight)
        return values



class Reader:
    """Base of every reader: each hook does nothing unless overridden."""

    def started(self, app: str) -> None:
        """The run holds its lock and is about to read Knack."""

    def planned(self, total: int) -> None:
        """`total` records were fetched and will be worked through."""

    def event(self, event: Event) -> None:
        """Something happened (see Event)."""

    def finished(self, report: RunReport) -> None:
        """The run is over; `report` is final."""

    def close(self) -> None:
        """Release what the reader holds (threads, handlers)."""


class Readers(Reader):
    """The fan-out the run talks to. Readers are called in the order given: put the log last, so that the
    warning about a metrics file or a ping that failed comes before the summary line."""

    def __init__(self, readers: Iterable[Reader]):
        self.readers = list(readers)

    def started(self, app: str) -> None:
        self._each("started", app)

    def planned(self, total: int) -> None:
        self._each("planned", total)

    def event(self, event: Event) -> None:
        for reader in self.readers:
            reader.event(event)

    def finished(self, report: RunReport) -> None:
        self._each("finished", report)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()

    def emit(self, name: str, message: str, *, level: int = INFO, record: RecordRef | None = None,
             record_id: str | None = None, atd_activity_id: str | None = None, sr_number: str | None = None,
             **extra: object) -> None:
        """Build an Event and hand it to every reader. `record` (an Activity) fills in the three ids; a
        record that could not be read whole passes `record_id` (and `sr_number` if known) instead."""
        if record is not None:
            record_id, atd_activity_id, sr_number = record.record_id, record.atd_activity_id, record.sr_number
        self.event(Event(name, message, level, record_id, atd_activity_id, sr_number, extra))

    def _each(self, hook: str, argument) -> None:
        for reader in self.readers:
            try:
                getattr(reader, hook)(argument)
            except ReportError as exc:
                self.event(Event("report_failed", str(exc), WARNING))


@dataclass
class Summary:
    """The run's counts as they grow; `report()` turns them into the RunReport every reader gets."""

    fetched: int = 0
    sent: int = 0
    do_not_send: int = 0
    failed: int = 0
    held: int = 0
    deferred: int = 0
    not_attempted: int = 0
    skipped: int = 0           # listed by Knack although not READY_TO_SEND: never posted
    rendered: int = 0
    stop_reason: str = ""
    failed_ids: list[str] = field(default_factory=list)
    held_ids: list[str] = field(default_factory=list)
    esb_in_flight: tuple[int, int] | None = None

    def account_for_the_rest(self) -> None:
        """Every fetched record is in one count: what no count holds yet was not attempted."""
        rest = self.fetched - self.rendered - sum(getattr(self, name) for name in COUNT_NAMES[1:])
        if rest > 0:
            self.not_attempted += rest

    def counts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNT_NAMES}

    def exit_code(self) -> int:
        trouble = self.failed or self.held or self.not_attempted or self.stop_reason
        return EXIT_FAILED if trouble else EXIT_OK

    def report(self, app: str, exit_code: int, duration: float, dry_run: bool,
               calls_left: int | None = None) -> RunReport:
        return RunReport(app=app, exit_code=exit_code, duration_s=duration, stop_reason=self.stop_reason,
                         dry_run=dry_run, rendered=self.rendered, knack_calls_remaining=calls_left,
                         failed_ids=tuple(self.failed_ids), held_ids=tuple(self.held_ids),
                         esb_in_flight=self.esb_in_flight, **self.counts())

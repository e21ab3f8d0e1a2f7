"""One run: settings -> Knack metadata -> ready records -> per record (render, deliver, mark) -> summary.

The handling of one record is a single unit, `RecordSender.send`, with one outcome. Around it, the run keeps
311's order (ascending atd_activity_id; a failed activity holds back the later ones of the same service
request), the time budget, the signals, and the stop on an outage.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO
from zoneinfo import ZoneInfo

from .errors import ConfigError, OutageError, RecordError
from .esb import ESBClient, ESBUncertain, ESBUnreachable
from .fields import activity_from_record, format_value, resolve_timezone
from .journal import DELIVERED, DONE, SENDING, Journal, RunLock, prepare_state_dir
from .knack import DO_NOT_SEND, SENT, KnackClient
from .message import Activity, NotFor311, message_values, render_message
from .settings import Settings
from .stopping import Stop

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_LOCKED = 0, 1, 2, 75
ESB_OUTAGE_AFTER = 3    # records in a row that could not reach the ESB: stop instead of waiting out each one
KNACK_OUTAGE_AFTER = 3  # status updates in a row that failed: Knack is down


class Outcome(enum.Enum):
    SENT = "sent"
    DO_NOT_SEND = "do_not_send"
    FAILED = "failed"          # left READY_TO_SEND for a later run
    UNMARKED = "unmarked"      # ESB has it (or 311 does not want it), Knack's status update failed
    RENDERED = "rendered"      # dry run


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    reason: str = ""
    esb_down: bool = False     # the failure says the ESB is unreachable
    esb_lasting: bool = False  # ... and will stay so in this run (TLS trust)
    status: str = ""           # UNMARKED: the Knack status still to set


class Log:
    """Plain lines on stdout, one event per line."""

    def __init__(self, app: str, out: TextIO):
        self.app = app
        self.out = out

    def __call__(self, event: str, activity: Activity | None = None, record_id: str = "", sr: str = "") -> None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        where = ""
        if activity is not None:
            record_id, sr = activity.record_id, activity.sr_number
            where = f" record={record_id} activity={activity.atd_activity_id} sr={sr or '-'}"
        elif record_id:
            where = f" record={record_id} sr={sr or '-'}"
        print(f"{stamp} {self.app}{where} {event}", file=self.out, flush=True)


class RecordSender:
    """Render, deliver and mark one record, with the journal keeping every step durable."""

    def __init__(self, settings: Settings, knack: KnackClient, esb: ESBClient | None, journal: Journal | None,
                 tz: ZoneInfo, log: Log, out: TextIO):
        self.settings = settings
        self.knack = knack
        self.esb = esb
        self.journal = journal
        self.tz = tz
        self.log = log
        self.out = out

    def send(self, activity: Activity) -> Result:
        app = self.settings.app
        try:
            values = message_values(activity, app.activity_codes)
        except NotFor311:
            if self.settings.dry_run:
                self.log(f"would set {DO_NOT_SEND} (activity {activity.activity_name!r} is not for 311)", activity)
                return Result(Outcome.RENDERED)
            return self.mark(activity, DO_NOT_SEND, f"activity {activity.activity_name!r} is not for 311")
        except RecordError as exc:
            return Result(Outcome.FAILED, str(exc))
        try:
            body = render_message(values, dt.datetime.now(self.tz).replace(microsecond=0).isoformat())
        except RecordError as exc:
            return Result(Outcome.FAILED, str(exc))
        if self.settings.dry_run:
            self.log("rendered (dry run, not sent)", activity)
            self.out.write(body.decode("ascii") + "\n")
            self.out.flush()
            return Result(Outcome.RENDERED)

        assert self.journal is not None and self.esb is not None
        entry = self.journal.get(activity.record_id)
        if entry is not None and entry.state == DELIVERED:
            self.log("ESB already accepted this message in an earlier run: setting SENT without resending", activity)
        else:
            if entry is not None and entry.state == SENDING:
                self.log("WARNING: an earlier run died while posting this message: sending again, "
                         "311 may receive it twice", activity)
            self.journal.set(activity.record_id, SENDING, activity.emi_id, _values_hash(values))
            try:
                delivery = self.esb.deliver(body)
            except RecordError as exc:
                self.journal.forget(activity.record_id)  # rejected: the ESB does not have it
                return Result(Outcome.FAILED, str(exc))
            except ESBUncertain as exc:
                return Result(Outcome.FAILED, str(exc), esb_down=True)  # stays "sending": outcome unknown
            except ESBUnreachable as exc:
                self.journal.forget(activity.record_id)  # never reached the ESB
                return Result(Outcome.FAILED, str(exc), esb_down=True, esb_lasting=exc.lasting)
            self.journal.set(activity.record_id, DELIVERED)
            self.log(f"delivered to ESB (HTTP {delivery.status}, attempt {delivery.attempts})", activity)
        return self.mark(activity, SENT)

    def already_delivered(self, activity: Activity) -> bool:
        """The ESB accepted this record's message in an earlier run (only the Knack update is missing)."""
        entry = self.journal.get(activity.record_id) if self.journal is not None else None
        return entry is not None and entry.state == DELIVERED

    def mark(self, activity: Activity, status: str, why: str = "") -> Result:
        """Set the Knack status; for SENT, close the journal entry."""
        app = self.settings.app
        try:
            self.knack.set_status(app.obj, activity.record_id, app.fields["esb_status"], status)
        except OutageError as exc:
            return Result(Outcome.UNMARKED, f"Knack status update to {status} failed: {exc}", status=status)
        if status == SENT and self.journal is not None:
            self.journal.set(activity.record_id, DONE)
        self.log(f"set {status}" + (f" ({why})" if why else ""), activity)
        return Result(Outcome.SENT if status == SENT else Outcome.DO_NOT_SEND)


@dataclass
class Summary:
    fetched: int = 0
    sent: int = 0
    do_not_send: int = 0
    failed: int = 0
    held: int = 0
    deferred: int = 0
    not_attempted: int = 0
    rendered: int = 0
    stop_reason: str = ""
    started: float = field(default_factory=time.monotonic)

    def line(self, dry_run: bool) -> str:
        parts = [f"fetched={self.fetched}"]
        if dry_run:
            parts.append(f"rendered={self.rendered}")
        parts += [f"sent={self.sent}", f"do_not_send={self.do_not_send}", f"failed={self.failed}",
                  f"held={self.held}", f"deferred={self.deferred}", f"not_attempted={self.not_attempted}",
                  f"duration={time.monotonic() - self.started:.1f}s"]
        tail = f" stopped: {self.stop_reason}" if self.stop_reason else ""
        return f"summary{' (dry run)' if dry_run else ''}: {' '.join(parts)}{tail}"

    def exit_code(self) -> int:
        trouble = self.failed or self.held or self.not_attempted or self.stop_reason
        return EXIT_FAILED if trouble else EXIT_OK


def _values_hash(values: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def _order_key(record: dict, atd_field: str) -> tuple:
    raw = record.get(f"{atd_field}_raw", record.get(atd_field))
    text = str(raw).strip() if raw not in (None, "") else ""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def run(settings: Settings, out: TextIO = sys.stdout, clock: Callable[[], float] = time.monotonic) -> int:
    """The whole run; returns the exit code. ConfigError propagates (exit 2, handled by the entry script)."""
    app = settings.app
    log = Log(app.name, out)
    if settings.esb_verify is False:
        log("WARNING: ESB_VERIFY_TLS=false: the ESB's certificate is NOT verified")

    stop = Stop(max_runtime=settings.max_runtime, request_timeout=settings.esb_timeout, clock=clock)
    stop.install()
    lock = journal = esb = knack = None
    summary = Summary(started=stop.started)
    try:
        if not settings.dry_run:
            prepare_state_dir(settings.state_dir)
            lock = RunLock(settings.state_dir / f"{app.name}.lock")
            if not lock.acquire():
                log(f"another run for {app.name} is active (lock {lock.path}); this run sends nothing")
                return EXIT_LOCKED
            journal = Journal(settings.state_dir / f"{app.name}.journal.sqlite3")
            esb = ESBClient(settings.esb_endpoint, cert=str(settings.esb_cert), key=str(settings.esb_key),
                            verify=settings.esb_verify, timeout=settings.esb_timeout, stop=stop)
        knack = KnackClient(settings.knack_api_url, settings.knack_app_id, settings.knack_api_key,
                            timeout=settings.esb_timeout, max_rps=settings.knack_max_rps, stop=stop, log=log)
        try:
            _process(settings, knack, esb, journal, log, out, summary, stop)
        except OutageError as exc:
            summary.stop_reason = str(exc)
            log(f"ERROR: {exc}")
        if stop.signal_name and not summary.stop_reason:
            summary.stop_reason = f"received {stop.signal_name}"
        log(summary.line(settings.dry_run))
        return summary.exit_code()
    finally:
        stop.restore()
        for client in (knack, esb, journal):
            if client is not None:
                client.close()
        if lock is not None:
            lock.release()  # a no-op when this run never got the lock


def _process(settings: Settings, knack: KnackClient, esb: ESBClient | None, journal: Journal | None, log: Log,
             out: TextIO, summary: Summary, stop: Stop) -> None:
    app = settings.app
    schema = knack.app_schema(app.obj, app.view)
    missing = [f"{key} ({variable})" for variable, key in app.fields.items()
               if variable != "id" and key not in schema.field_types]
    if missing:
        raise ConfigError(f"config.py {app.name!r}: field(s) not in Knack object {app.obj}: {', '.join(missing)}")
    tz = resolve_timezone(schema.timezone_name, app.timezone)

    records = knack.ready_records(schema.scene, app.view, app.fields["emi_id"], app.fields["esb_status"])
    records.sort(key=lambda r: _order_key(r, app.fields["atd_activity_id"]))
    summary.fetched = len(records)
    log(f"fetched {len(records)} record(s) ready to send")
    if journal is not None:
        closed = journal.close_delivered_except({str(r.get("id", "")) for r in records})
        if closed:
            log(f"{closed} journal entr{'y' if closed == 1 else 'ies'} closed: Knack already says SENT")

    sender = RecordSender(settings, knack, esb, journal, tz, log, out)
    failed_srs: set[str] = set()
    unmarked: list[tuple[Activity, Result]] = []
    esb_down_streak = knack_down_streak = 0

    for index, record in enumerate(records):
        if not stop.work_time_left() or summary.stop_reason:
            left = len(records) - index
            if stop.signal_name:
                summary.not_attempted += left
                log(f"{stop.signal_name} received: {left} record(s) left for the next run")
            elif summary.stop_reason:
                summary.not_attempted += left
            else:
                summary.deferred += left
                log(f"time budget of {settings.max_runtime:g}s used: {left} record(s) deferred to the next run")
            break
        try:
            activity = activity_from_record(record, app.fields, schema.field_types, tz)
        except RecordError as exc:
            summary.failed += 1
            sr = _sr_number(record, app.fields["sr_number"], schema.field_types, tz)
            if sr:  # records without an SR number have no order to keep
                failed_srs.add(sr)
            log(f"FAILED: {exc}", record_id=str(record.get("id", "")), sr=sr)
            continue
        if activity.sr_number in failed_srs and not sender.already_delivered(activity):
            summary.held += 1
            log("HELD: an earlier activity of this service request failed; kept for a later run to keep 311's order",
                activity)
            continue

        result = sender.send(activity)
        if result.outcome is Outcome.SENT:
            summary.sent += 1
        elif result.outcome is Outcome.DO_NOT_SEND:
            summary.do_not_send += 1
        elif result.outcome is Outcome.RENDERED:
            summary.rendered += 1
        elif result.outcome is Outcome.UNMARKED:
            unmarked.append((activity, result))
            log(f"WARNING: {result.reason}; will retry before the run ends", activity)
        else:
            summary.failed += 1
            if activity.sr_number:
                failed_srs.add(activity.sr_number)
            log(f"FAILED: {result.reason}", activity)

        esb_down_streak = esb_down_streak + 1 if result.esb_down else 0
        knack_down_streak = knack_down_streak + 1 if result.outcome is Outcome.UNMARKED else 0
        if result.esb_lasting or esb_down_streak >= ESB_OUTAGE_AFTER:
            summary.stop_reason = "the ESB cannot be reached" + (
                "" if result.esb_lasting else f" ({esb_down_streak} records in a row)")
        elif knack_down_streak >= KNACK_OUTAGE_AFTER:
            summary.stop_reason = f"Knack status updates keep failing ({knack_down_streak} in a row)"

    # One more try for the status updates that failed: the ESB has these messages, so they are not resent.
    # Not after a signal, past the budget or with Knack down: the journal lets the next run do it.
    retry_now = stop.work_time_left() and knack_down_streak < KNACK_OUTAGE_AFTER
    for activity, result in unmarked:
        if retry_now:
            result = sender.mark(activity, result.status)
        if result.outcome is Outcome.SENT:
            summary.sent += 1
        elif result.outcome is Outcome.DO_NOT_SEND:
            summary.do_not_send += 1
        else:
            summary.failed += 1
            left_for = "the next run sets it without resending" if result.status == SENT else "the next run retries"
            log(f"FAILED: {result.reason}; {left_for}", activity)


def _sr_number(record: dict, key: str, field_types: dict[str, str], tz: ZoneInfo) -> str:
    """The SR number of a record that could not be read whole, to hold its later activities ("" if unreadable)."""
    try:
        return format_value(record.get(f"{key}_raw", record.get(key)), field_types.get(key, ""), tz).strip()
    except RecordError:
        return ""

"""One run: settings -> Knack metadata -> ready records -> per record (render, deliver, mark) -> summary.

The handling of one record is a single unit, `RecordSender`, with one outcome. Around it, `SendLoop` keeps 311's
order (ascending atd_activity_id; a failed activity holds back the later ones of the same service request),
the time budget, the signals, the stop on an outage, and the counts. `report` reads the journal for an operator.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO
from zoneinfo import ZoneInfo

from .errors import ConfigError, OutageError, RecordError
from .esb import ESBClient, ESBUncertain, ESBUnreachable
from .fields import activity_from_record, format_value, resolve_timezone
from .journal import (
    DELIVERED,
    DONE,
    SENDING,
    Journal,
    JournalError,
    RunLock,
    message_hash,
    prepare_state_dir,
    read_report,
)
from .knack import DO_NOT_SEND, READY_TO_SEND, SENT, KnackClient
from .message import Activity, NotFor311, message_values, render_message
from .settings import Settings
from .stopping import Stop

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_LOCKED = 0, 1, 2, 75
ESB_OUTAGE_AFTER = 3    # records in a row that could not reach the ESB (or got no answer): stop, do not wait out each
KNACK_OUTAGE_AFTER = 3  # status updates in a row that failed: Knack is down
REQUIRED_VALUES = ("atd_activity_id", "emi_id", "sr_number")  # 311 cannot place a message without them
LISTED_IDS = 20         # record ids named in the summary per kind, then "+N more"


class Outcome(enum.Enum):
    SENT = "sent"
    DO_NOT_SEND = "do_not_send"
    FAILED = "failed"          # left READY_TO_SEND for a later run
    UNMARKED = "unmarked"      # ESB has it (or 311 does not want it), Knack's status update failed
    RENDERED = "rendered"      # dry run


class ESBTrouble(enum.Enum):
    NONE = ""
    UNREACHABLE = "unreachable"  # the request certainly never reached the ESB
    NO_ANSWER = "no answer"      # it may have: timeout, gateway error, cut short


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    reason: str = ""
    esb: ESBTrouble = ESBTrouble.NONE
    esb_lasting: bool = False  # ... and will stay so in this run (TLS trust)
    status: str = ""           # UNMARKED: the Knack status still to set


# Characters that must never reach a log line raw: C0/C1 controls (a newline forges a line such as a fake
# `summary:`, an ANSI escape rewrites the terminal, a NUL cuts the line in log shippers), Unicode line and
# paragraph separators (some viewers break lines there), invisible and bidirectional formatting characters (a line
# that reads differently from what it holds), and lone surrogates (which cannot even be written as UTF-8).
_UNSAFE_IN_LOG = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff"
                            "\ufff9-\ufffb\ud800-\udfff]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def log_safe(text: str) -> str:
    """Any text made safe for one log line: the characters above are shown as escapes (\\n, \\x1b, \\u202e)."""
    return _UNSAFE_IN_LOG.sub(_escape, text)


def _escape(match: re.Match) -> str:
    char = match.group()
    return _NAMED_ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def _when(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Log:
    """Plain lines on stdout, one event per line, whatever the records hold."""

    def __init__(self, app: str, out: TextIO):
        self.app = app
        self.out = out

    def __call__(self, event: str, activity: Activity | None = None, record_id: str = "", sr: str = "") -> None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        where = ""
        if activity is not None:
            record_id, sr = activity.record_id, activity.sr_number
            where = f" record={record_id} activity={activity.atd_activity_id or '-'} sr={sr or '-'}"
        elif record_id:
            where = f" record={record_id} sr={sr or '-'}"
        print(log_safe(f"{stamp} {self.app}{where} {event}"), file=self.out, flush=True)


class RecordSender:
    """Render, deliver and mark one record, with the journal keeping every step durable."""

    def __init__(self, settings: Settings, knack: KnackClient, esb: ESBClient | None, journal: Journal | None,
                 tz: ZoneInfo, log: Log, out: TextIO, stop: Stop):
        self.settings = settings
        self.knack = knack
        self.esb = esb
        self.journal = journal
        self.tz = tz
        self.log = log
        self.out = out
        self.stop = stop

    def render(self, activity: Activity) -> bytes | None:
        """The ESB message, or None when 311 does not want the activity. RecordError: this record cannot go."""
        codes = self.settings.app.activity_codes
        try:
            values = message_values(activity, codes)
        except NotFor311:
            return None
        except RecordError as exc:
            raise RecordError(f"{exc}{self._activity_fix(activity)}") from None
        return render_message(values, dt.datetime.now(self.tz).replace(microsecond=0).isoformat())

    def _activity_fix(self, activity: Activity) -> str:
        app = self.settings.app
        if activity.csr_activity_code or activity.activity_name in app.activity_codes:
            return ""
        if not activity.activity_name:
            return ": fill in the activity name in Knack"
        return (f": add {activity.activity_name!r} to activity_codes of {app.name!r} in config.py, mapped to its "
                "311 code (or to None if 311 does not want it)")

    def unchanged_delivery(self, activity: Activity, body: bytes | None) -> bool:
        """The ESB accepted this very message in an earlier run (only the Knack update is missing)."""
        entry = self.journal.get(activity.record_id) if self.journal is not None and body is not None else None
        return (entry is not None and entry.state == DELIVERED
                and entry.message_hash in ("", message_hash(body)))  # type: ignore[arg-type]

    def dry_run(self, activity: Activity, body: bytes | None) -> Result:
        if body is None:
            self.log(f"would set {DO_NOT_SEND} (activity {activity.activity_name!r} is not for 311)", activity)
            return Result(Outcome.DO_NOT_SEND)
        self.log("rendered (dry run, not sent)", activity)
        self.out.write(body.decode("ascii") + "\n")
        self.out.flush()
        return Result(Outcome.RENDERED)

    def deliver(self, activity: Activity, body: bytes | None) -> Result:
        if body is None:
            return self.mark(activity, DO_NOT_SEND, f"activity {activity.activity_name!r} is not for 311")
        assert self.journal is not None and self.esb is not None
        record_id = activity.record_id
        digest = message_hash(body)
        entry = self.journal.get(record_id)
        if entry is not None and entry.state == DELIVERED:
            if entry.message_hash in ("", digest):
                self.log("ESB already accepted this message in an earlier run: setting SENT without resending",
                         activity)
                return self.mark(activity, SENT)
            self.log(f"the record changed since the ESB accepted its message ({_when(entry.updated)}): "
                     "sending the corrected message", activity)
        elif entry is not None and entry.state == SENDING:
            if entry.note:
                why = f"the answer to an earlier post never came ({entry.note}; {_when(entry.updated)})"
            else:
                why = f"an earlier run died while posting this message ({_when(entry.updated)})"
            self.log(f"WARNING: {why}: sending again, 311 may receive it twice", activity)
        self.journal.set(record_id, SENDING, activity.emi_id, digest)
        try:
            delivery = self.esb.deliver(body)
        except RecordError as exc:
            self.journal.forget(record_id)  # rejected: the ESB does not have it
            return Result(Outcome.FAILED, f"{exc}: fix what the ESB names, then the next run sends it again")
        except ESBUncertain as exc:
            # stays "sending": the outcome is unknown; the note tells the next run why
            note = (f"this run was stopped by {self.stop.signal_name} before the ESB answered"
                    if self.stop.stopped else str(exc))
            self.journal.set(record_id, SENDING, note=note)
            return Result(Outcome.FAILED, str(exc), esb=ESBTrouble.NO_ANSWER)
        except ESBUnreachable as exc:
            self.journal.forget(record_id)  # never reached the ESB
            return Result(Outcome.FAILED, str(exc), esb=ESBTrouble.UNREACHABLE, esb_lasting=exc.lasting)
        accepted = f"delivered to ESB (HTTP {delivery.status}, attempt {delivery.attempts})"
        try:
            self.journal.set(record_id, DELIVERED)
        except JournalError as exc:
            # The ESB has it: Knack must say so, or the next run sends it again. The run stops after this record.
            self.log(f"{accepted}: the ESB accepted this message, but the journal cannot record it ({exc}); "
                     f"setting {SENT} in Knack so that it is not sent again", activity)
            return self.mark(activity, SENT)
        self.log(accepted, activity)
        return self.mark(activity, SENT)

    def mark(self, activity: Activity, status: str, why: str = "") -> Result:
        """Set the Knack status; for SENT, close the journal entry."""
        app = self.settings.app
        try:
            self.knack.set_status(app.obj, activity.record_id, app.fields["esb_status"], status)
        except OutageError as exc:
            return Result(Outcome.UNMARKED, f"Knack status update to {status} failed: {exc}", status=status)
        if status == SENT and self.journal is not None and not self.journal.failure:
            try:
                self.journal.set(activity.record_id, DONE)
            except JournalError:
                pass  # the run stops (journal.failure); the next run confirms SENT with Knack and closes the entry
        self.log(f"set {status}" + (f" ({why})" if why else ""), activity)
        return Result(Outcome.SENT if status == SENT else Outcome.DO_NOT_SEND)


COUNTS = ("sent", "do_not_send", "failed", "held", "deferred", "not_attempted", "skipped")


@dataclass
class Summary:
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
    started: float = field(default_factory=time.monotonic)
    failed_ids: list[str] = field(default_factory=list)
    held_ids: list[str] = field(default_factory=list)

    def account_for_the_rest(self) -> None:
        """Every fetched record is in one count: what no count holds yet was not attempted."""
        rest = self.fetched - self.rendered - sum(getattr(self, name) for name in COUNTS)
        if rest > 0:
            self.not_attempted += rest

    def counts(self) -> dict[str, int]:
        return {"fetched": self.fetched, **{name: getattr(self, name) for name in COUNTS}}

    def line(self, dry_run: bool) -> str:
        parts = [f"fetched={self.fetched}"]
        if dry_run:
            parts.append(f"rendered={self.rendered}")
        parts += [f"{name}={getattr(self, name)}" for name in COUNTS]
        parts.append(f"duration={time.monotonic() - self.started:.1f}s")
        for name, ids in (("failed_ids", self.failed_ids), ("held_ids", self.held_ids)):
            if ids:
                more = len(ids) - LISTED_IDS
                parts.append(f"{name}={','.join(ids[:LISTED_IDS])}" + (f" +{more} more" if more > 0 else ""))
        tail = f" stopped: {self.stop_reason}" if self.stop_reason else ""
        return f"summary{' (dry run)' if dry_run else ''}: {' '.join(parts)}{tail}"

    def exit_code(self) -> int:
        trouble = self.failed or self.held or self.not_attempted or self.stop_reason
        return EXIT_FAILED if trouble else EXIT_OK



def _order_key(record: dict, atd_field: str) -> tuple:
    raw = record.get(f"{atd_field}_raw", record.get(atd_field))
    text = str(raw).strip() if raw not in (None, "") else ""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def journal_path(state_dir: Path, app_name: str) -> Path:
    return state_dir / f"{app_name}.journal.sqlite3"


def run(settings: Settings, out: TextIO = sys.stdout, clock: Callable[[], float] = time.monotonic) -> int:
    """The whole run; returns the exit code. ConfigError propagates (exit 2, handled by the entry script)."""
    app = settings.app
    log = Log(app.name, out)
    if settings.esb_verify is False:
        log("WARNING: ESB_VERIFY_TLS=false: the ESB's certificate is NOT verified")

    stop = Stop(max_runtime=settings.max_runtime, request_timeout=settings.esb_timeout, clock=clock)
    stop.install()
    lock = journal = esb = knack = None
    run_id: int | None = None
    summary = Summary(started=stop.started)
    try:
        if not settings.dry_run:
            prepare_state_dir(settings.state_dir)
            lock = RunLock(settings.state_dir / f"{app.name}.lock")
            if not lock.acquire():
                log(f"another run for {app.name} is active (lock {lock.path}); this run sends nothing")
                return EXIT_LOCKED
            journal = Journal(journal_path(settings.state_dir, app.name))
            try:
                run_id = journal.start_run()
            except JournalError as exc:
                raise ConfigError(str(exc)) from None
            esb = ESBClient(settings.esb_endpoint, cert=str(settings.esb_cert), key=str(settings.esb_key),
                            verify=settings.esb_verify, timeout=settings.esb_timeout, stop=stop)
        knack = KnackClient(settings.knack_api_url, settings.knack_app_id, settings.knack_api_key,
                            timeout=settings.esb_timeout, max_rps=settings.knack_max_rps, stop=stop)
        try:
            _process(settings, knack, esb, journal, log, out, summary, stop, run_id)
        except OutageError as exc:
            # a call cut short by the stop signal fails like an outage, but the signal is the reason
            summary.stop_reason = summary.stop_reason or _stop_reason(stop, str(exc))
            log(f"stopped by {stop.signal_name} during: {exc}" if stop.stopped else f"ERROR: {exc}")
        if stop.stopped and not summary.stop_reason:
            summary.stop_reason = f"received {stop.signal_name}"
        summary.account_for_the_rest()
        exit_code = summary.exit_code()
        _keep_run(journal, run_id, summary, exit_code, log)  # before the summary line, which stays the last line
        run_id = None
        log(summary.line(settings.dry_run))
        return exit_code
    except ConfigError as exc:
        _keep_run(journal, run_id, summary, EXIT_CONFIG, log, str(exc))
        raise
    finally:
        stop.restore()
        for client in (knack, esb, journal):
            if client is not None:
                client.close()
        if lock is not None:
            lock.release()  # a no-op when this run never got the lock


def _stop_reason(stop: Stop, outage: str) -> str:
    return f"received {stop.signal_name}" if stop.stopped else outage


def _keep_run(journal: Journal | None, run_id: int | None, summary: Summary, exit_code: int, log: Log,
              reason: str = "") -> None:
    """This run's counts in the journal's runs table (for --report); never changes the run's outcome."""
    if journal is None or run_id is None:
        return
    try:
        journal.finish_run(run_id, summary.counts(), exit_code, reason or summary.stop_reason)
    except JournalError as exc:
        log(f"WARNING: this run's counts could not be kept in the journal ({exc})")


def _process(settings: Settings, knack: KnackClient, esb: ESBClient | None, journal: Journal | None, log: Log,
             out: TextIO, summary: Summary, stop: Stop, run_id: int | None) -> None:
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

    # Knack's view filter is not to be trusted alone (seen: a view answering without applying it): a record
    # that does not say READY_TO_SEND itself is never posted, whatever the listing says.
    ready = []
    status_key = app.fields["esb_status"]
    for record in records:
        status = _field_text(record, status_key, schema.field_types, tz)
        if status is not None and status != READY_TO_SEND:
            summary.skipped += 1
            log(f"SKIPPED: Knack says {status_key} is {status!r}, not {READY_TO_SEND} (the view answered without "
                "its filter?); not sent", record_id=str(record.get("id", "")),
                sr=_field_text(record, app.fields["sr_number"], schema.field_types, tz) or "")
        else:
            ready.append(record)

    if journal is not None:
        ready_ids = {str(r.get("id", "")) for r in ready}
        _close_confirmed(journal, knack, settings, ready_ids, log, stop)
        journal.clear_failures_except(ready_ids)

    sender = RecordSender(settings, knack, esb, journal, tz, log, out, stop)
    SendLoop(settings, sender, journal, log, summary, stop, run_id, schema.field_types, tz).run(ready)


def _close_confirmed(journal: Journal, knack: KnackClient, settings: Settings, ready_ids: set[str], log: Log,
                     stop: Stop) -> None:
    """Close the journal entries of records Knack no longer lists as ready, once Knack confirms they are SENT.

    Not being listed is not proof: a staff edit between two page reads shifts the pages, and a record that is
    still READY_TO_SEND can be missing from one listing. Closing its `delivered` entry would make the next run
    post it again; so each is confirmed with one read of the record.
    """
    app = settings.app
    closed = 0
    for entry in journal.unfinished_except(ready_ids):
        if not stop.work_time_left():
            break
        try:
            status = knack.record_status(app.obj, entry.record_id, app.fields["esb_status"])
        except OutageError as exc:
            if getattr(exc, "status", None) == 404:  # deleted in Knack: there is nothing left to mark or resend
                journal.set(entry.record_id, DONE)
                log(f"journal entry ({entry.state}) closed: the record no longer exists in Knack",
                    record_id=entry.record_id)
                continue
            log(f"WARNING: could not confirm with Knack that this record is {SENT} ({exc}); its journal entry stays "
                f"{entry.state}", record_id=entry.record_id)
            break  # Knack is in trouble: do not spend the run's budget on confirmations
        if status == SENT:
            journal.set(entry.record_id, DONE)
            closed += 1
    if closed:
        log(f"{closed} journal entr{'y' if closed == 1 else 'ies'} closed: Knack confirms {SENT}")


class SendLoop:
    """The ready records in 311's order: holds, the stop rules, the counts and each record's failure history."""

    def __init__(self, settings: Settings, sender: RecordSender, journal: Journal | None, log: Log, summary: Summary,
                 stop: Stop, run_id: int | None, field_types: dict[str, str], tz: ZoneInfo):
        self.settings = settings
        self.sender = sender
        self.journal = journal
        self.log = log
        self.summary = summary
        self.stop = stop
        self.run_id = run_id
        self.field_types = field_types
        self.tz = tz
        self.failed_srs: set[str] = set()
        self.unmarked: list[tuple[Activity, Result]] = []
        self.unreachable_streak = self.no_answer_streak = self.knack_down_streak = 0

    def run(self, records: list[dict]) -> None:
        for index, record in enumerate(records):
            if self._stopping(len(records) - index):
                break
            self._one(record)
        self._retry_unmarked()

    def _stopping(self, left: int) -> bool:
        summary = self.summary
        if self.stop.stopped:
            summary.not_attempted += left
            self.log(f"{self.stop.signal_name} received: {left} record(s) left for the next run")
        elif summary.stop_reason:
            summary.not_attempted += left
        elif not self.stop.work_time_left():
            summary.deferred += left
            self.log(f"time budget of {self.settings.max_runtime:g}s used: {left} record(s) deferred to the next run")
        else:
            return False
        return True

    def _one(self, record: dict) -> None:
        app = self.settings.app
        record_id = str(record.get("id", ""))
        try:
            activity = activity_from_record(record, app.fields, self.field_types, self.tz)
        except RecordError as exc:
            sr = _field_text(record, app.fields["sr_number"], self.field_types, self.tz) or ""
            self._fail(f"{exc}: correct the record in Knack", record_id, sr)
            return
        blank = [f"{name} ({app.fields[name]})" for name in REQUIRED_VALUES if not getattr(activity, name)]
        if blank:
            self._fail(f"required value blank: {', '.join(blank)}: fill it in in Knack; the next run sends the "
                       "record", record_id, activity.sr_number, activity)
            return
        try:
            body = self.sender.render(activity)
        except RecordError as exc:
            self._fail(str(exc), record_id, activity.sr_number, activity)
            return
        try:
            if activity.sr_number in self.failed_srs and not self.sender.unchanged_delivery(activity, body):
                self.summary.held += 1
                self.summary.held_ids.append(record_id)
                self.log("HELD: an earlier activity of this service request failed; kept for a later run to keep "
                         "311's order", activity)
                return
            result = self.sender.dry_run(activity, body) if self.settings.dry_run else self.sender.deliver(activity,
                                                                                                            body)
        except JournalError as exc:
            result = Result(Outcome.FAILED, str(exc))
        self._count(activity, result)

    def _count(self, activity: Activity, result: Result) -> None:
        summary = self.summary
        if result.outcome is Outcome.SENT:
            summary.sent += 1
            self._clear_failure(activity.record_id)
        elif result.outcome is Outcome.DO_NOT_SEND:
            summary.do_not_send += 1
            self._clear_failure(activity.record_id)
        elif result.outcome is Outcome.RENDERED:
            summary.rendered += 1
        elif result.outcome is Outcome.UNMARKED:
            self.unmarked.append((activity, result))
            self.log(f"WARNING: {result.reason}; will retry before the run ends", activity)
        else:
            self._fail(result.reason, activity.record_id, activity.sr_number, activity)

        # Each streak counts what its stop line says: "cannot be reached" only failures where the request never
        # reached the ESB, "not answering" only those whose outcome is unknown.
        self.unreachable_streak = self.unreachable_streak + 1 if result.esb is ESBTrouble.UNREACHABLE else 0
        self.no_answer_streak = self.no_answer_streak + 1 if result.esb is ESBTrouble.NO_ANSWER else 0
        self.knack_down_streak = self.knack_down_streak + 1 if result.outcome is Outcome.UNMARKED else 0
        if self.stop.stopped or summary.stop_reason:
            return
        if self.journal is not None and self.journal.failure:
            summary.stop_reason = self.journal.failure
        elif result.esb_lasting:
            summary.stop_reason = "the ESB cannot be reached"
        elif self.unreachable_streak >= ESB_OUTAGE_AFTER:
            summary.stop_reason = f"the ESB cannot be reached ({self.unreachable_streak} records in a row)"
        elif self.no_answer_streak >= ESB_OUTAGE_AFTER:
            summary.stop_reason = (f"the ESB is not answering ({self.no_answer_streak} records in a row whose "
                                   "outcome is unknown; the next run sends them again with a warning)")
        elif self.knack_down_streak >= KNACK_OUTAGE_AFTER:
            summary.stop_reason = f"Knack status updates keep failing ({self.knack_down_streak} in a row)"

    def _retry_unmarked(self) -> None:
        """One more try for the status updates that failed: the ESB has these messages, so they are not resent.

        Not after a signal, past the budget or with Knack down: the journal lets the next run do it.
        """
        retry_now = self.stop.work_time_left() and self.knack_down_streak < KNACK_OUTAGE_AFTER
        for activity, result in self.unmarked:
            if retry_now:
                result = self.sender.mark(activity, result.status)
            if result.outcome is Outcome.SENT:
                self.summary.sent += 1
                self._clear_failure(activity.record_id)
            elif result.outcome is Outcome.DO_NOT_SEND:
                self.summary.do_not_send += 1
                self._clear_failure(activity.record_id)
            else:
                if result.status != SENT:
                    left_for = "the next run retries"
                elif self.journal is not None and self.journal.failure:
                    left_for = ("the ESB has the message but the journal could not record it: the next run "
                                "sends it again")
                else:
                    left_for = "the next run sets it without resending"
                self._fail(f"{result.reason}; {left_for}", activity.record_id, activity.sr_number, activity)

    def _fail(self, reason: str, record_id: str, sr: str, activity: Activity | None = None) -> None:
        self.summary.failed += 1
        self.summary.failed_ids.append(record_id)
        if sr:  # records without an SR number have no order to keep
            self.failed_srs.add(sr)
        history = ""
        if self.journal is not None and self.run_id is not None and not self.journal.failure:
            try:
                failure = self.journal.record_failure(record_id, sr, reason, self.run_id)
            except JournalError:
                pass  # the loop stops on journal.failure
            else:
                if failure.runs > 1:
                    history = f" (failing since {_when(failure.first_failed)}, in {failure.runs} runs)"
        self.log(f"FAILED: {reason}{history}", activity, record_id=record_id, sr=sr)

    def _clear_failure(self, record_id: str) -> None:
        if self.journal is not None and not self.journal.failure:
            try:
                self.journal.clear_failure(record_id)
            except JournalError:
                pass  # the loop stops on journal.failure


def _field_text(record: dict, key: str, field_types: dict[str, str], tz: ZoneInfo) -> str | None:
    """One field of a record that may not be readable whole, as text (None if absent or unreadable)."""
    if key not in record and f"{key}_raw" not in record:
        return None
    try:
        return format_value(record.get(f"{key}_raw", record.get(key)), field_types.get(key, ""), tz).strip()
    except RecordError:
        return None


# ----- --report: what the journal knows, without Knack or the ESB ------------------------------------------------

def report(app_name: str, state_dir: Path, out: TextIO = sys.stdout, last_runs: int = 10) -> int:
    path = journal_path(state_dir, app_name)
    found = read_report(path, last_runs=last_runs)  # ConfigError (exit 2) on a layout it does not know

    def say(text: str) -> None:
        print(log_safe(text), file=out, flush=True)

    if found is None:
        say(f"no delivery journal at {path}: no run of {app_name} has written one there (check STATE_DIR)")
        return EXIT_OK
    say(f"delivery journal {path}")
    if found.layout_version == 0:
        say("  (the layout of an earlier version: the next run upgrades it; it keeps no failures or runs yet)")

    say(f"delivered to the ESB, not yet marked {SENT} in Knack: {len(found.delivered) or 'none'}"
        + (" (the next run sets them SENT without resending)" if found.delivered else ""))
    for entry in found.delivered:
        say(f"  record={entry.record_id} emi={entry.emi or '-'} accepted {_when(entry.updated)}")
    say(f"delivery in doubt ({SENDING}): {len(found.sending) or 'none'}"
        + (" (the next run sends them again; 311 may receive them twice)" if found.sending else ""))
    for entry in found.sending:
        why = entry.note or "a run died while posting it"
        say(f"  record={entry.record_id} emi={entry.emi or '-'} since {_when(entry.updated)}: {why}")
    say(f"records that keep failing: {len(found.failures) or 'none'}")
    for failure in found.failures:
        say(f"  record={failure.record_id} sr={failure.sr_number or '-'} failing since {_when(failure.first_failed)}"
            f", in {failure.runs} run{'s' if failure.runs != 1 else ''}; last {_when(failure.last_failed)}: "
            f"{failure.last_reason}")
    say(f"last runs, newest first: {len(found.runs) or 'none'}")
    for row in found.runs:
        if row.ended is None:
            say(f"  {_when(row.started)} did not finish (killed, or still running)")
            continue
        counts = " ".join(f"{name}={row.counts.get(name) or 0}" for name in ("fetched", *COUNTS))
        tail = f" stopped: {row.stop_reason}" if row.stop_reason else ""
        say(f"  {_when(row.started)} to {_when(row.ended)} exit={row.exit_code} {counts}{tail}")
    return EXIT_OK

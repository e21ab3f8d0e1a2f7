"""One record's delivery: render -> journal `sending` -> ESB POST -> journal `delivered` -> Knack status -> `done`.

Each journal state is committed before the next network step, so a run killed at any point leaves an exact
account for the next run (see journal.py). The unit has one outcome, a `Result`; it knows nothing of order,
holds or budgets (dispatch.py and schedule.py do), so it can run in a pool of workers. `limiter.ESBGate` bounds
the ESB POSTs in flight across those workers, and learns from each POST's latency and outcome.
"""

from __future__ import annotations

import datetime as dt
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO
from zoneinfo import ZoneInfo

from .errors import OutageError, RecordError
from .esb import ESBClient, ESBUncertain, ESBUnreachable
from .journal import DELIVERED, DONE, SENDING, Journal, JournalError, message_hash
from .knack import DO_NOT_SEND, SENT, KnackClient
from .limiter import ESBGate
from .limiter import Outcome as LimitOutcome
from .message import Activity, NotFor311, message_values, render_message
from .outcomes import DO_NOT_SEND as DO_NOT_SEND_EVENT
from .outcomes import ERROR, INFO, WARNING
from .outcomes import SENT as SENT_EVENT
from .settings import Settings
from .stopping import Stop


class Outcome(enum.Enum):
    SENT = "sent"
    DO_NOT_SEND = "do_not_send"
    FAILED = "failed"          # left READY_TO_SEND for a later run
    UNMARKED = "unmarked"      # ESB has it (or 311 does not want it), Knack's status update failed
    RENDERED = "rendered"      # dry run
    NOT_STARTED = "not_started"  # the run began stopping before this record's POST could start: nothing done


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
    esb_has_it: bool = False   # the ESB accepted this message (now or in an earlier run)


def when(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


Emit = Callable[..., None]  # outcomes.Readers.emit
TIMED_OUT_SHARE = 0.9  # a failed POST that took this share of ESB_TIMEOUT or more ran out of time


def _limiter_outcome(exc: ESBUnreachable, latency: float, timeout: float) -> LimitOutcome:
    """What a failed POST tells the concurrency limit."""
    if isinstance(exc, ESBUncertain):
        if exc.by_signal:
            return LimitOutcome.STOPPED
        # a POST waits ESB_TIMEOUT for its answer (the socket's read timeout and the stoppable call's alike)
        if latency >= TIMED_OUT_SHARE * timeout:
            return LimitOutcome.TIMEOUT
        # the rest came quickly: a gateway's or the ESB's 5xx, or a connection that broke after the request
        return LimitOutcome.SERVER_ERROR if " answered HTTP 5" in str(exc) else LimitOutcome.DROPPED
    return LimitOutcome.UNREACHABLE


class RecordSender:
    """Render, deliver and mark one record, with the journal keeping every step durable. Thread-safe as long as
    the journal is (it serialises its own writes)."""

    def __init__(self, settings: Settings, knack: KnackClient, esb: ESBClient | None, journal: Journal | None,
                 tz: ZoneInfo, emit: Emit, out: TextIO, stop: Stop, esb_gate: ESBGate | None = None):
        self.settings = settings
        self.esb_gate = esb_gate
        self.knack = knack
        self.esb = esb
        self.journal = journal
        self.tz = tz
        self.emit = emit
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
            self.emit("would_do_not_send", f"would set {DO_NOT_SEND} (activity {activity.activity_name!r} is not "
                      "for 311)", record=activity)
            return Result(Outcome.DO_NOT_SEND)
        self.emit("rendered", "rendered (dry run, not sent)", record=activity)
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
        if entry is not None and entry.state == DELIVERED and entry.message_hash in ("", digest):
            self.emit("already_delivered", "ESB already accepted this message in an earlier run: setting SENT "
                      "without resending", record=activity)
            return self.mark(activity, SENT, esb_has_it=True)
        ticket = self.esb_gate.take() if self.esb_gate is not None else None
        if self.esb_gate is not None and ticket is None:
            return Result(Outcome.NOT_STARTED)
        posted = time.monotonic()
        how = LimitOutcome.STOPPED  # until the POST ends: nothing learnt from a POST that never went
        try:
            if entry is not None and entry.state == DELIVERED:
                self.emit("corrected_resend", f"the record changed since the ESB accepted its message "
                          f"({when(entry.updated)}): sending the corrected message", record=activity)
            elif entry is not None and entry.state == SENDING:
                if entry.note:
                    why = f"the answer to an earlier post never came ({entry.note}; {when(entry.updated)})"
                else:
                    why = f"an earlier run died while posting this message ({when(entry.updated)})"
                self.emit("resend_in_doubt", f"{why}: sending again, 311 may receive it twice", level=WARNING,
                          record=activity)
            self.journal.set(record_id, SENDING, activity.emi_id, digest)
            posted = time.monotonic()
            delivery = self.esb.deliver(body)
            # answers after retries of 503/429/408 say the ESB is busy, whatever came last
            how = LimitOutcome.ANSWERED if delivery.attempts == 1 else LimitOutcome.SERVER_ERROR
        except RecordError as exc:
            how = LimitOutcome.ANSWERED  # rejected, but answered: its latency counts
            self.journal.forget(record_id)  # rejected: the ESB does not have it
            return Result(Outcome.FAILED, f"{exc}: fix what the ESB names, then the next run sends it again")
        except ESBUncertain as exc:
            how = _limiter_outcome(exc, time.monotonic() - posted, self.settings.esb_timeout)
            # stays "sending": the outcome is unknown; the note tells the next run why
            # the signal is the reason only when it cut this POST short, not when it merely came meanwhile
            note = (f"this run was stopped by {self.stop.signal_name} before the ESB answered"
                    if exc.by_signal else str(exc))
            self.journal.set(record_id, SENDING, note=note)
            return Result(Outcome.FAILED, str(exc), esb=ESBTrouble.NO_ANSWER)
        except ESBUnreachable as exc:
            how = _limiter_outcome(exc, time.monotonic() - posted, self.settings.esb_timeout)
            self.journal.forget(record_id)  # never reached the ESB
            return Result(Outcome.FAILED, str(exc), esb=ESBTrouble.UNREACHABLE, esb_lasting=exc.lasting)
        finally:
            if self.esb_gate is not None and ticket is not None:
                # the POST is over; the Knack update does not hold an ESB slot
                self.esb_gate.give_back(ticket, time.monotonic() - posted, how)
        accepted = f"delivered to ESB (HTTP {delivery.status}, attempt {delivery.attempts})"
        try:
            self.journal.set(record_id, DELIVERED)
        except JournalError as exc:
            # The ESB has it: Knack must say so, or the next run sends it again. The run stops after this record.
            self.emit("delivered", f"{accepted}: the ESB accepted this message, but the journal cannot record it "
                      f"({exc}); setting {SENT} in Knack so that it is not sent again", level=ERROR, record=activity)
            return self.mark(activity, SENT, esb_has_it=True)
        self.emit("delivered", accepted, record=activity)
        return self.mark(activity, SENT, esb_has_it=True)

    def mark(self, activity: Activity, status: str, why: str = "", *, esb_has_it: bool = False) -> Result:
        """Set the Knack status; for SENT, close the journal entry."""
        app = self.settings.app
        try:
            self.knack.set_status(app.obj, activity.record_id, app.fields["esb_status"], status)
        except OutageError as exc:
            return Result(Outcome.UNMARKED, f"Knack status update to {status} failed: {exc}", status=status,
                          esb_has_it=esb_has_it)
        if status == SENT and self.journal is not None and not self.journal.failure:
            try:
                self.journal.set(activity.record_id, DONE)
            except JournalError:
                pass  # the run stops (journal.failure); the next run confirms SENT with Knack and closes the entry
        self.emit(SENT_EVENT if status == SENT else DO_NOT_SEND_EVENT,
                  f"set {status}" + (f" ({why})" if why else ""), level=INFO, record=activity)
        return Result(Outcome.SENT if status == SENT else Outcome.DO_NOT_SEND, esb_has_it=esb_has_it)

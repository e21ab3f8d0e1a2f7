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
from dataclasses import dataclass, replace
from typing import TextIO
from zoneinfo import ZoneInfo

from .errors import OutageError, RecordError
from .esb import ESBClient, ESBUncertain, ESBUnreachable
from .in_doubt import must_park, parked_reason, repost_wait
from .journal import DELIVERED, DONE, PARKED, SENDING, Journal, JournalError, message_hash
from .knack import DO_NOT_SEND, SENT, KnackClient, KnackNotSent
from .limiter import ESBGate
from .limiter import Outcome as LimitOutcome
from .message import Activity, NotFor311, message_values, render_message
from .outcomes import DO_NOT_SEND as DO_NOT_SEND_EVENT
from .outcomes import DRY_RUN_MESSAGE, ERROR, INFO, WARNING
from .outcomes import SENT as SENT_EVENT
from .settings import Settings
from .stopping import Stop
from .streams import output_lost


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
    parked: bool = False       # posted a second time without an answer: parked (not posted again)
    answered_in: float | None = None  # seconds the ESB took to accept it


class Prior(enum.Enum):
    """What the journal says of a record before this run delivers it."""

    NEW = "new"              # nothing pending: a first POST
    DELIVERED = "delivered"  # the ESB accepted this very message: only the Knack update is left
    IN_DOUBT = "in doubt"    # posted, no answer: posted again alone, waiting longer
    PARKED = "parked"        # posted twice without an answer: not posted until a person decides


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

    def prior(self, activity: Activity, body: bytes | None) -> tuple[Prior, str]:
        """What the journal says of this record's message, and for a parked one the reason to report. A message
        in doubt posted as often as a person must allow is parked now (a run killed during its second POST)."""
        entry = self.journal.get(activity.record_id) if self.journal is not None and body is not None else None
        if entry is None:
            return Prior.NEW, ""
        if entry.state == DELIVERED and entry.message_hash in ("", message_hash(body)):  # type: ignore[arg-type]
            return Prior.DELIVERED, ""
        if entry.state == SENDING and must_park(entry.posts):
            self.journal.park(entry.record_id, entry.note)  # type: ignore[union-attr]
        elif entry.state != PARKED:
            return (Prior.IN_DOUBT if entry.state == SENDING else Prior.NEW), ""
        return Prior.PARKED, parked_reason(entry.record_id, entry.emi or activity.emi_id, entry.posts, entry.note)

    def dry_run(self, activity: Activity, body: bytes | None) -> Result:
        if body is None:
            self.emit("would_do_not_send", f"would set {DO_NOT_SEND} (activity {activity.activity_name!r} is not "
                      "for 311)", record=activity)
            return Result(Outcome.DO_NOT_SEND)
        # one event with the message in it: the text log prints the XML after the line, the JSON log carries it
        # in the event's `xml` field, so a log shipper never meets raw XML lines among the JSON
        self.emit(DRY_RUN_MESSAGE, "rendered (dry run, not sent)", record=activity, xml=body.decode("ascii"))
        return Result(Outcome.RENDERED)

    def output_lost(self) -> str:
        """Why the run's output can no longer be written ("" while it can): a dry run then stops."""
        return output_lost(self.out)

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
        if entry is not None and entry.state == PARKED:  # the loop holds parked records; never post one
            return Result(Outcome.FAILED, parked_reason(record_id, entry.emi, entry.posts, entry.note))
        in_doubt = entry if entry is not None and entry.state == SENDING else None
        if in_doubt is not None and must_park(in_doubt.posts):  # the loop parks these; never post a third time
            self.journal.park(record_id, in_doubt.note)
            return Result(Outcome.FAILED, parked_reason(record_id, in_doubt.emi, in_doubt.posts, in_doubt.note))
        # a message in doubt waits longer than a first POST: an ESB that is slow but working answers it
        wait = repost_wait(self.settings.esb_timeout, self.stop.remaining()) if in_doubt else None
        ticket = self.esb_gate.take() if self.esb_gate is not None else None
        if self.esb_gate is not None and ticket is None:
            return Result(Outcome.NOT_STARTED)
        posted = time.monotonic()
        how = LimitOutcome.STOPPED  # until the POST ends: nothing learnt from a POST that never went
        answered_in = None
        try:
            if entry is not None and entry.state == DELIVERED:
                self.emit("corrected_resend", f"the record changed since the ESB accepted its message "
                          f"({when(entry.updated)}): sending the corrected message", record=activity)
            elif in_doubt is not None:
                if in_doubt.note:
                    why = f"the answer to an earlier post never came ({in_doubt.note}; {when(in_doubt.updated)})"
                else:
                    why = f"an earlier run died while posting this message ({when(in_doubt.updated)})"
                self.emit("resend_in_doubt", f"{why}: sending again (waiting up to {wait:.0f}s for the answer), "
                          "311 may receive it twice", level=WARNING, record=activity)
            posts = self.journal.posting(record_id, activity.emi_id, digest, activity.sr_number,
                                         activity.atd_activity_id)

            def before_try(number: int, tries: int, previous: str) -> None:
                # still `sending`: should the run die during this try, the next run warns, and says which try
                self.journal.set(record_id, SENDING, note=f"try {number} of {tries}, after: {previous}")

            posted = time.monotonic()
            delivery = self.esb.deliver(body, before_try, timeout=wait)
            answered_in = delivery.seconds
            if answered_in > self.settings.esb_timeout:
                how = LimitOutcome.TIMEOUT  # a re-post answered late: the ESB is slower than ESB_TIMEOUT
            else:  # answers after retries of 503/429/408 (or 500) say the ESB is busy, whatever came last
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
            if must_park(posts):
                self.journal.park(record_id, note)
                return Result(Outcome.FAILED, parked_reason(record_id, activity.emi_id, posts, note),
                              esb=ESBTrouble.NO_ANSWER, parked=True)
            self.journal.set(record_id, SENDING, note=note)
            return Result(Outcome.FAILED, str(exc), esb=ESBTrouble.NO_ANSWER)
        except ESBUnreachable as exc:
            how = _limiter_outcome(exc, time.monotonic() - posted, self.settings.esb_timeout)
            if in_doubt is not None:
                self.journal.restore(in_doubt)  # never reached the ESB: the doubt of the earlier POSTs stands
            else:
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
        else:
            self.emit("delivered", accepted, record=activity)
        return replace(self.mark(activity, SENT, esb_has_it=True), answered_in=answered_in)

    def mark(self, activity: Activity, status: str, why: str = "", *, esb_has_it: bool = False) -> Result:
        """Set the Knack status; for SENT, close the journal entry."""
        app = self.settings.app
        try:
            self.knack.set_status(app.obj, activity.record_id, app.fields["esb_status"], status)
        except KnackNotSent as exc:
            # Never sent (no Knack request slot before the run's time was up: the app's other users had the
            # second): no answer from Knack, so no sign of Knack trouble. Left as it is for the next run, the
            # journal still saying what the ESB has.
            if esb_has_it:
                self.emit("status_not_sent", f"the ESB has the message; the Knack status update to {status} was not "
                          f"sent ({exc}): the next run sets it without resending", level=WARNING, record=activity)
            return Result(Outcome.NOT_STARTED, str(exc), status=status, esb_has_it=esb_has_it)
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

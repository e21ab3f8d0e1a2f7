"""The run's account of its records: the counts, the holds, each record's failure history in the journal, and the
stop rules that read them (an ESB that cannot be reached or does not answer, Knack status updates that keep
failing, a journal that stopped taking writes). `dispatch.SendLoop` hands it each record's `delivery.Result`; only
the main thread calls it.
"""

from __future__ import annotations

from .delivery import ESBTrouble, Outcome, RecordSender, Result, when
from .in_doubt import Doubt
from .journal import SENDING, Journal, JournalError
from .knack import SENT
from .message import Activity
from .outcomes import ERROR, FAILED, HELD, WARNING, Summary
from .schedule import Held, HeldReason
from .stopping import Stop

ESB_OUTAGE_AFTER = 3    # records in a row that could not reach the ESB (or got no answer): stop, do not wait out each
KNACK_OUTAGE_AFTER = 3  # status updates in a row that failed: Knack is down


class Tally:
    def __init__(self, summary: Summary, journal: Journal | None, run_id: int | None, emit, stop: Stop,
                 sender: RecordSender, doubt: Doubt):
        self.summary = summary
        self.journal = journal
        self.run_id = run_id
        self.emit = emit
        self.stop = stop
        self.sender = sender  # for the end-of-run retry of the status updates that failed
        self.doubt = doubt
        self.unmarked: list[tuple[Activity, Result]] = []
        self.unreachable_streak = self.no_answer_streak = self.knack_down_streak = 0

    def held(self, held: list[Held]) -> None:
        for item in held:
            activity = item.record.payload.activity
            self.summary.held += 1
            self.summary.held_ids.append(activity.record_id)
            reason = item.reason.value if item.reason is HeldReason.AFTER_FAILURE else (
                "a later activity of this service request was already sent in this run")
            self.emit(HELD, f"{reason}; kept for a later run to keep 311's order", level=WARNING, record=activity)

    def count(self, activity: Activity, result: Result) -> None:
        summary = self.summary
        if result.outcome is Outcome.SENT:
            summary.sent += 1
            self.clear_failure(activity.record_id)
        elif result.outcome is Outcome.DO_NOT_SEND:
            summary.do_not_send += 1
            self.clear_failure(activity.record_id)
        elif result.outcome is Outcome.RENDERED:
            summary.rendered += 1
        elif result.outcome is Outcome.UNMARKED:
            self.unmarked.append((activity, result))
            self.emit("unmarked", f"{result.reason}; will retry before the run ends", level=WARNING, record=activity)
        else:
            self.fail(result.reason, activity.record_id, activity.sr_number, activity)
        self.doubt.answered(result.answered_in)

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
        elif result.parked or self.no_answer_streak >= ESB_OUTAGE_AFTER:
            # while a message posted again goes unanswered, nothing new starts either
            summary.stop_reason = self.doubt.not_answering(parked=result.parked, in_a_row=self.no_answer_streak)
        elif self.knack_down_streak >= KNACK_OUTAGE_AFTER:
            summary.stop_reason = f"Knack status updates keep failing ({self.knack_down_streak} in a row)"

    def tell_doubt(self) -> None:
        """Once the run's POSTs are over: the stop line of an ESB not answering counts what the journal holds in
        doubt, and answers that came after ESB_TIMEOUT get their one WARNING."""
        warning = self.doubt.warning()
        if warning:
            self.emit("esb_slow", warning, level=WARNING)
        if self.doubt.silence and self.journal is not None:
            try:
                in_doubt = self.journal.counts().get(SENDING, 0)
            except JournalError:
                return  # the stop line keeps its cause; --report tells what is in doubt
            self.summary.stop_reason = self.doubt.stop_line(self.summary.stop_reason, in_doubt)

    def retry_unmarked(self) -> None:
        """One more try for the status updates that failed: the ESB has these messages, so they are not resent.

        Not after a signal, past the budget or with Knack down: the journal lets the next run do it.
        """
        retry_now = self.stop.work_time_left() and self.knack_down_streak < KNACK_OUTAGE_AFTER
        for activity, result in self.unmarked:
            if retry_now:
                result = self.sender.mark(activity, result.status)
            if result.outcome is Outcome.SENT:
                self.summary.sent += 1
                self.clear_failure(activity.record_id)
            elif result.outcome is Outcome.DO_NOT_SEND:
                self.summary.do_not_send += 1
                self.clear_failure(activity.record_id)
            else:
                if result.status != SENT:
                    left_for = "the next run retries"
                elif self.journal is not None and self.journal.failure:
                    left_for = ("the ESB has the message but the journal could not record it: the next run "
                                "sends it again")
                else:
                    left_for = "the next run sets it without resending"
                self.fail(f"{result.reason}; {left_for}", activity.record_id, activity.sr_number, activity)

    def fail(self, reason: str, record_id: str, sr: str, activity: Activity | None = None) -> None:
        self.summary.failed += 1
        self.summary.failed_ids.append(record_id)
        history = ""
        if self.journal is not None and self.run_id is not None and not self.journal.failure:
            try:
                failure = self.journal.record_failure(record_id, sr, reason, self.run_id,
                                                      activity.atd_activity_id if activity is not None else "")
            except JournalError:
                pass  # the loop stops on journal.failure
            else:
                if failure.runs > 1:
                    history = f" (failing since {when(failure.first_failed)}, in {failure.runs} runs)"
        if activity is not None:
            self.emit(FAILED, f"{reason}{history}", level=ERROR, record=activity)
        else:
            self.emit(FAILED, f"{reason}{history}", level=ERROR, record_id=record_id, sr_number=sr)

    def clear_failure(self, record_id: str) -> None:
        if self.journal is not None and not self.journal.failure:
            try:
                self.journal.clear_failure(record_id)
            except JournalError:
                pass  # the loop stops on journal.failure

"""Deliver in order: the ready records as the listing reads them, N at a time, in 311's order.

`SendLoop` runs in the main thread. It checks and renders each record as its page arrives (`_plan`), hands the
records `schedule.Scheduler` frees to a pool of workers (each runs `delivery.RecordSender` for one record), and
decides when to read the next page and when no new record may start (the time budget, a signal, the daily Knack
budget, or a stop rule of `tally.Tally`, which keeps the counts, the holds and each record's failure history). The
workers only deliver and hand back a `delivery.Result`. Messages
left in doubt by an earlier run go first and alone (in_doubt.py).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from .admission import order_key, value_problem
from .delivery import Outcome, Prior, RecordSender, Result
from .errors import OutageError, RecordError
from .fields import activity_from_record, format_value
from .in_doubt import Doubt
from .intake import CLEAN, Intake
from .journal import Journal, JournalError
from .knack import READY_TO_SEND, KnackClient, KnackNotSent
from .limiter import ESBGate
from .listing import Listing
from .message import Activity
from .outcomes import ERROR, WARNING, Summary
from .schedule import ScheduledRecord, Scheduler
from .settings import Settings
from .stopping import POLL, Stop
from .tally import Tally

WRAP_UP = 1.0  # seconds kept, after a stop signal, for the summary and the journal's run row


def stop_reason(stop: Stop, outage: str) -> str:
    return f"received {stop.signal_name}" if stop.stopped else outage


@dataclass(frozen=True)
class _Planned:
    """A record checked and rendered in the main thread, ready for a worker."""

    activity: Activity
    for_311: bool       # False: 311 does not want the activity (set DO_NOT_SEND)
    position: int       # in 311's order over the whole run: among the records free to start, the earliest goes first
    body: bytes | None = None  # kept for a dry run only: a delivery renders its message again when it starts
    in_doubt: bool = False  # posted in an earlier run without an answer: posted again alone, before anything new


class _InPlace:
    """Runs each record at once in the calling thread: a dry run sends nothing, and its printed messages must not
    interleave."""

    def submit(self, fn: Callable[..., Result], *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # handed to the loop, as a pool would
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


class SendLoop:
    """The ready records in 311's order, N at a time: holds, the stop rules, the counts and each record's failure
    history. Only the main thread runs this class's methods, except `_one`, which the workers run."""

    def __init__(self, settings: Settings, sender: RecordSender, journal: Journal | None, emit, summary: Summary,
                 stop: Stop, run_id: int | None, field_types: dict[str, str], tz: ZoneInfo,
                 esb_gate: ESBGate | None = None, budget: KnackClient | None = None, intake: Intake | None = None):
        self.settings = settings
        self.intake = intake  # what intake found in each record (cleaned text, an unusable id)
        self.budget = budget  # the Knack client: whether the app's daily calls allow another record
        self.skipped_ids: set[str] = set()
        self.low_water = 2 * settings.pool_size  # records waiting to start below which the next page is read
        self._arrivals = 0
        self._finished_since_read = 0
        self.workers = settings.pool_size
        self.sender = sender
        self.journal = journal
        self.emit = emit
        self.summary = summary
        self.stop = stop
        self.run_id = run_id
        self.field_types = field_types
        self.tz = tz
        self.esb_gate = esb_gate
        self.doubt = Doubt(settings.esb_timeout)
        self.tally = Tally(summary, journal, run_id, emit, stop, sender, self.doubt)

    def run(self, listing: Listing, planned: Callable[[int], None] = lambda total: None,
            waiting: Callable[[], int | None] | None = None) -> None:
        """Deliver the ready records as the listing reads them, page by page. `waiting()`: Knack's count of the
        ready records in one cheap read, asked only when the time budget ends before the first page is read."""
        self._listing, self._planned, self._waiting = listing, planned, waiting
        scheduler = Scheduler()
        self._leave(self._deliver(scheduler))
        self.tally.retry_unmarked()
        self.tally.tell_doubt()

    def use_formatting(self, field_types: dict[str, str], tz: ZoneInfo) -> None:
        """The field types and the app's zone records are read with, from fresh metadata (run.py hands them over
        when the first records arrive, before any of them is read)."""
        self.field_types, self.tz = field_types, tz
        self.sender.tz = tz

    def _read(self, scheduler: Scheduler, settled: bool) -> None:
        """The next page: its new records checked, rendered and added to the scheduler. A read that fails stops
        the run (nothing new starts) while the records in flight finish."""
        listing = self._listing
        first = listing.reads == 0
        try:
            read = listing.read(settled)
        except OutageError as exc:
            if isinstance(exc, KnackNotSent) and not self.stop.stopped and not self.stop.work_time_left():
                return  # the time budget ended while the read waited for a Knack slot: Knack is fine, the rest waits
            self.summary.stop_reason = self.summary.stop_reason or stop_reason(self.stop, str(exc))
            if self.stop.stopped:
                self.emit("stopped", f"stopped by {self.stop.signal_name} during: {exc}", level=WARNING)
            else:
                self.emit("outage", str(exc), level=ERROR)
            return
        self._finished_since_read = 0
        statuses = [self._status_if_not_ready(record) for record in read.records]
        skipped = sum(status is not None for status in statuses)
        total = read.total_records if read.total_records is not None else len(read.records)
        if first or read.records:  # before the lines about its records
            self._fetched(read.records, skipped, total, read.page, first)
        for record, status in zip(read.records, statuses, strict=True):
            self.summary.fetched += 1
            if status is not None:
                self._skip(record, status)
                continue
            self._plan(scheduler, self._arrivals, record)
            self._arrivals += 1
        if first:
            self._planned(max(0, total - skipped))
        if read.listed_all:
            scheduler.listed_all()
        elif read.listed_through is not None:
            scheduler.listed_through(read.listed_through)

    def _fetched(self, records: list[dict], skipped: int, total: int, page: int, first: bool) -> None:
        """The log's count of fetched records is the summary's: each read's new records, skipped ones included, so
        the `fetched` lines of a run add up to its summary's fetched=N."""
        text = f"fetched {len(records)}{'' if first else ' more'} record(s)"
        text += f", {skipped} of them not {READY_TO_SEND} (skipped)" if skipped else " ready to send"
        if first and total > len(records):
            text += f"; Knack lists {total}, the rest are read as these go"
        elif not first:
            text += f" (page {page})"
        self.emit("fetched", text, fetched=len(records), skipped=skipped, page=page, listed=total)

    def _status_if_not_ready(self, record: dict) -> str | None:
        """Knack's view filter is not to be trusted alone (seen: a view answering without applying it): a record
        that does not say READY_TO_SEND itself is never posted, whatever the listing says. Its status, else None."""
        status = _field_text(record, self.settings.app.fields["esb_status"], self.field_types, self.tz)
        return None if status is None or status == READY_TO_SEND else status

    def _skip(self, record: dict, status: str) -> None:
        app = self.settings.app
        status_key = app.fields["esb_status"]
        self.summary.skipped += 1
        self.skipped_ids.add(str(record.get("id", "")))
        self.emit("skipped", f"Knack says {status_key} is {status!r}, not {READY_TO_SEND} (the view answered without "
                  "its filter?); not sent", level=WARNING, record_id=str(record.get("id", "")),
                  sr_number=_field_text(record, app.fields["sr_number"], self.field_types, self.tz) or "")

    def _wants_more(self, scheduler: Scheduler, startable: list, in_flight: dict) -> bool:
        """Read the next page when the records waiting run low and a record finished since the last read (page 1
        read again before that would bring nothing new), or when nothing is left to wait for."""
        if self._listing.complete:
            return False
        if scheduler.waiting + len(startable) >= self.low_water:
            return False
        return self._finished_since_read > 0 or not in_flight or self._listing.reads == 0

    def _may_start(self, in_flight: int) -> bool:
        """Whether the app's daily Knack budget allows one more record (its status update) and leaves the reserve
        for the app's other users. No: the run stops starting records, loudly."""
        may = getattr(self.budget, "may_start_record", None)
        if may is None or may(in_flight=in_flight):
            return True
        if not self.summary.stop_reason:
            budget = self.budget.plan_budget()
            self.summary.stop_reason = "the app's daily Knack API budget is down to its reserve"
            self.emit("daily_budget", f"the app's daily Knack API budget is down to the calls kept for its other "
                      f"users ({budget.describe()}); no new record starts, the rest wait for the next run after "
                      "the reset (or set KNACK_PLAN_RESERVE lower)", level=ERROR)
        return False

    def _plan(self, scheduler: Scheduler, position: int, record: dict) -> None:
        """Read, check and render one record; one that cannot go is reported now and still holds its SR's later
        activities (the scheduler holds them once its turn comes)."""
        app = self.settings.app
        record_id = str(record.get("id", ""))
        key = order_key(record, app.fields["atd_activity_id"])
        note = self.intake.note(record_id) if self.intake is not None else CLEAN
        activity: Activity | None = None
        problem = ""
        try:
            activity = activity_from_record(record, app.fields, self.field_types, self.tz)
        except RecordError as exc:
            problem = f"{exc}: correct the record in Knack"
        if note.unusable_id:
            problem = (f"{note.unusable_id}: it is not sent, and its status cannot be set in Knack; find it by its "
                       "activity id or SR number")
        elif activity is not None:
            problem = value_problem(activity, app.fields, note.cleaned, key)
        if problem:
            sr = activity.sr_number if activity is not None else (
                _field_text(record, app.fields["sr_number"], self.field_types, self.tz) or "")
            self.tally.fail(problem, record_id, sr, activity)
            scheduler.add(record_id, sr, key, failed=True)
            return
        assert activity is not None
        if note.cleaned:
            cleaned = ", ".join(f"{name} ({app.fields[name]})" for name in note.cleaned)
            self.emit("text_cleaned", f"{cleaned} held characters no encoding can write (half an emoji?); removed "
                      "from the text 311 gets", level=WARNING, record=activity)
        try:
            body = self.sender.render(activity)
        except RecordError as exc:
            self.tally.fail(str(exc), record_id, activity.sr_number, activity)
            scheduler.add(record_id, activity.sr_number, key, failed=True)
            return
        try:
            prior, parked = (Prior.NEW, "") if self.settings.dry_run else self.sender.prior(activity, body)
        except JournalError:
            prior = Prior.NEW  # nothing starts: the loop stops on journal.failure
        if prior is Prior.PARKED:  # a person decides; it holds its SR's later activities meanwhile
            self.tally.fail(parked, record_id, activity.sr_number, activity)
            scheduler.add(record_id, activity.sr_number, key, failed=True)
            return
        planned = _Planned(activity, body is not None, position, body if self.settings.dry_run else None,
                           in_doubt=prior is Prior.IN_DOUBT)
        scheduler.add(record_id, activity.sr_number, key, planned, already_delivered=prior is Prior.DELIVERED)

    def _deliver(self, scheduler: Scheduler) -> int:
        """Start what the scheduler allows, at most `workers` at once, until done or stopping; returns the number
        of records that were not started."""
        pool = _InPlace() if self.settings.dry_run else ThreadPoolExecutor(self.workers, "knack311-deliver")
        # handed out by the scheduler, waiting for a worker: messages in doubt first, then the longest chains
        startable: list[tuple[bool, int, Any, int, ScheduledRecord]] = []
        in_flight: dict[Future, ScheduledRecord] = {}
        not_started = 0
        told = abandoned = False
        try:
            while True:
                if not self._stopping() and self._wants_more(scheduler, startable, in_flight):
                    self._read(scheduler, settled=not in_flight)
                if not self._stopping():
                    for record in scheduler.ready():
                        heapq.heappush(startable, (not record.payload.in_doubt, self._chain(scheduler, record),
                                                   record.order_key, record.payload.position, record))
                    self.tally.held(scheduler.take_held())
                    while startable and self._next_may_go(startable[0][-1], in_flight):
                        record = heapq.heappop(startable)[-1]
                        in_flight[pool.submit(self._one, record.payload)] = record
                elif in_flight and self.stop.stopped:
                    if not told:
                        told = True
                        self.emit("stopping", f"{self.stop.signal_name} received: starting nothing new; waiting for "
                                  f"the {len(in_flight)} record(s) in flight", level=WARNING)
                    if self.stop.clock() >= self.stop.exit_by() - WRAP_UP:
                        self._abandon(in_flight.values())
                        abandoned = True
                        break
                if not in_flight:
                    if self._stopping() or self._listing.complete:
                        break
                    if not startable and not self._wants_more(scheduler, startable, in_flight):
                        break  # defensive: nothing can start and nothing more would be read
                    continue
                finished, _ = wait(in_flight, timeout=POLL, return_when=FIRST_COMPLETED)
                for future in sorted(finished, key=lambda f: in_flight[f].payload.position):
                    record = in_flight.pop(future)
                    self._finished_since_read += 1
                    result = future.result()
                    # a record the ESB has is not a failure for 311's order, even if its status update failed
                    scheduler.done(record.record_id, failed=result.outcome in (Outcome.FAILED, Outcome.NOT_STARTED)
                                   and not result.esb_has_it)
                    if result.outcome is Outcome.NOT_STARTED:
                        not_started += 1
                    else:
                        self.tally.count(record.payload.activity, result)
        finally:
            # after a stop signal, the workers' calls end within the stop grace (stopping.Stop.call) on their own
            pool.shutdown(wait=not abandoned, cancel_futures=True)
        return scheduler.waiting + len(startable) + not_started

    def _chain(self, scheduler: Scheduler, record: ScheduledRecord) -> int:
        """Among the service requests free to go, the one with the most activities still to come goes first: its
        activities can only go one after another, so started late it would be the run's tail (each takes an ESB
        answer and a Knack update). 311's order within a service request is the scheduler's and stays. One at a
        time (--workers 1, or messages in doubt, which go alone) keeps the order of the whole backlog."""
        return 0 if self.workers == 1 or record.payload.in_doubt else -scheduler.behind(record)

    def _next_may_go(self, record: ScheduledRecord, in_flight: dict) -> bool:
        """A worker is free, messages in doubt go alone and first (in_doubt.Doubt), the daily budget allows it."""
        return (len(in_flight) < self.workers
                and self.doubt.may_start(record.payload.in_doubt, len(in_flight),
                                         any(r.payload.in_doubt for r in in_flight.values()), self.stop.remaining())
                and self._may_start(len(in_flight)))

    def _one(self, planned: _Planned) -> Result:
        """One record, in a worker thread (it touches no count: the main thread reads the Result)."""
        if not self.stop.work_time_left():
            return Result(Outcome.NOT_STARTED)
        activity = planned.activity
        try:
            if self.settings.dry_run:
                return self.sender.dry_run(activity, planned.body)
            # rendered again: the header's timestamp is the publication time, not the time the record was read
            body = self.sender.render(activity) if planned.for_311 else None
            return self.sender.deliver(activity, body)
        except (JournalError, RecordError) as exc:
            return Result(Outcome.FAILED, str(exc))

    def _stopping(self) -> bool:
        """True once no new record may start: a stop signal, an outage, a failed journal or the time budget."""
        summary = self.summary
        if self.journal is not None and self.journal.failure and not summary.stop_reason and not self.stop.stopped:
            summary.stop_reason = self.journal.failure
        if self.settings.dry_run and not summary.stop_reason and (lost := self.sender.output_lost()):
            # its output is all a dry run does: once nobody reads it (`--dry-run | head`), reading on costs Knack
            # calls for nothing
            summary.stop_reason = f"the dry run's output cannot be written ({lost})"
        stopping = (self.stop.stopped or bool(summary.stop_reason) or not self.stop.work_time_left()
                    or self.doubt.out_of_time)
        if stopping and self.esb_gate is not None:
            self.esb_gate.close()  # a worker waiting for an ESB slot gives up rather than post
        return stopping

    def _leave(self, left: int) -> None:
        """The records this run did not start: for the next run."""
        if (self._listing.reads == 0 and not self.stop.stopped and not self.summary.stop_reason
                and not self.stop.work_time_left()):
            self._budget_used_before_the_first_read()
            return
        if not left:
            return
        summary = self.summary
        if self.stop.stopped:
            summary.not_attempted += left
            self.emit("stopping", f"{self.stop.signal_name} received: {left} record(s) left for the next run",
                      level=WARNING)
        elif summary.stop_reason or (self.stop.work_time_left() and not self.doubt.out_of_time):
            summary.not_attempted += left
        else:
            summary.deferred += left
            used = (f"too little of the time budget of {self.settings.max_runtime:g}s left to wait for the answer to "
                    "a message in doubt" if self.stop.work_time_left() else
                    f"time budget of {self.settings.max_runtime:g}s used")
            self.emit("deferred", f"{used}: {left} record(s) deferred to the next run")

    def _budget_used_before_the_first_read(self) -> None:
        """The time budget ended before a page of records was read (a slow metadata read, a tiny --max-runtime):
        the summary still counts what waits, from Knack's count in one one-record read, as fetched and deferred."""
        waiting = None
        if self._waiting is not None:
            try:
                waiting = self._waiting()
            except OutageError:
                waiting = None
        used = f"time budget of {self.settings.max_runtime:g}s used before the first read"
        if waiting is None:
            self.emit("deferred", f"{used}: how many records wait is unknown (Knack's count could not be read); "
                      "the next run reads them")
            return
        self.summary.fetched += waiting
        self.summary.deferred += waiting
        self.emit("deferred", f"{used}: {waiting} record(s) waiting in Knack, deferred to the next run",
                  deferred=waiting)

    def _abandon(self, records) -> None:
        """Records still in flight when the process must end: their journal entries (`sending` or `delivered`)
        tell the next run what to do; the summary counts them as not attempted."""
        for record in records:
            self.emit("abandoned", "still in flight when the run had to end: the journal tells the next run "
                      "whether to send it again", level=WARNING, record=record.payload.activity)


def _field_text(record: dict, key: str, field_types: dict[str, str], tz: ZoneInfo) -> str | None:
    """One field of a record that may not be readable whole, as text (None if absent or unreadable)."""
    if key not in record and f"{key}_raw" not in record:
        return None
    try:
        return format_value(record.get(f"{key}_raw", record.get(key)), field_types.get(key, ""), tz).strip()
    except RecordError:
        return None

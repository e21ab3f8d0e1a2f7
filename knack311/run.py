"""One run: plan, deliver in order, report.

settings -> clients -> Knack metadata (metadata_cache.AppMetadata) -> the listing of ready records ->
dispatch.SendLoop (in 311's order, each record through delivery.RecordSender) -> journal entries Knack settled ->
summary. Everything the run has to say goes to one `outcomes.Readers`: the log (text or JSON), progress, the
metrics file and the healthcheck pings all read the same events and the same final `RunReport`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .admission import order_key
from .delivery import RecordSender
from .dispatch import SendLoop, stop_reason
from .errors import ConfigError, OutageError
from .esb import ESBClient
from .healthcheck import Healthcheck
from .intake import Intake
from .journal import RECHECK_AFTER, Journal, JournalError, RunLock, journal_path, prepare_state_dir
from .knack import DO_NOT_SEND, READY_TO_SEND, SENT, KnackClient, KnackHTTPError, RecordGone
from .limiter import ConcurrencyLimit, ESBGate
from .listing import Listing
from .logs import EventLog, progress_reader
from .metadata_cache import AppMetadata
from .metrics import MetricsFile
from .outcomes import (
    DEBUG,
    ERROR,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_LOCKED,
    EXIT_OK,
    INFO,
    WARNING,
    Reader,
    Readers,
    Summary,
)
from .settings import Settings
from .stopping import Stop

__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_LOCKED", "EXIT_OK", "Reporting", "run"]


@dataclass(frozen=True)
class Reporting:
    """How a run reports, from flags and the environment (send_esb_message.py checks them with the settings)."""

    log_format: str = "text"
    progress_bar: bool = False
    metrics_file: Path | None = None
    healthcheck_url: str | None = None


def _readers(settings: Settings, reporting: Reporting, out: TextIO, stop: Stop,
             summary: Summary) -> tuple[Readers, EventLog]:
    log = EventLog(settings.app.name, reporting.log_format, stream=out)
    readers: list[Reader] = [progress_reader(reporting.progress_bar, log, stopping=lambda: (
        not stop.work_time_left() or bool(summary.stop_reason)))]
    if not settings.dry_run:
        if reporting.metrics_file is not None:
            readers.append(MetricsFile(reporting.metrics_file))
        if reporting.healthcheck_url:
            # a ping must never hold the process past its stop time (the scheduler's SIGKILL follows)
            readers.append(Healthcheck(reporting.healthcheck_url, deadline=lambda: stop.exit_by() - 1.0,
                                       clock=stop.clock))
    readers.append(log)  # last: a failed ping's warning comes before the summary line
    return Readers(readers), log


def run(settings: Settings, out: TextIO = sys.stdout, clock: Callable[[], float] = time.monotonic,
        reporting: Reporting = Reporting()) -> int:
    """The whole run; returns the exit code. ConfigError propagates (exit 2, handled by the entry script)."""
    app = settings.app
    stop = Stop(max_runtime=settings.max_runtime, request_timeout=settings.esb_timeout, clock=clock)
    stop.install()
    summary = Summary()
    readers, _log = _readers(settings, reporting, out, stop, summary)
    emit = readers.emit
    if settings.esb_verify is False:
        emit("tls_unverified", "ESB_VERIFY_TLS=false: the ESB's certificate is NOT verified", level=WARNING)

    lock = journal = esb = knack = None
    run_id: int | None = None

    def finish(exit_code: int) -> int:
        calls_left = knack.calls_left_today() if knack is not None and hasattr(knack, "calls_left_today") else None
        readers.finished(summary.report(app.name, exit_code, clock() - stop.started, settings.dry_run, calls_left))
        return exit_code

    try:
        if not settings.dry_run:
            prepare_state_dir(settings.state_dir)
            lock = RunLock(settings.state_dir / f"{app.name}.lock")
            if not lock.acquire():
                emit("locked", f"another run for {app.name} is active (lock {lock.path}); this run sends nothing")
                summary.stop_reason = "another run is active"
                return finish(EXIT_LOCKED)
            journal = Journal(journal_path(settings.state_dir, app.name))
            try:
                run_id = journal.start_run()
            except JournalError as exc:
                raise ConfigError(str(exc)) from None
        readers.started(app.name)
        if not settings.dry_run:
            esb = ESBClient(settings.esb_endpoint, cert=str(settings.esb_cert), key=str(settings.esb_key),
                            key_password=settings.esb_key_password, verify=settings.esb_verify,
                            timeout=settings.esb_timeout, stop=stop, proxy=settings.esb_proxy,
                            connections=settings.esb_in_flight)
        knack = KnackClient(settings.knack_api_url, settings.knack_app_id, settings.knack_api_key,
                            timeout=settings.knack_timeout, max_rps=settings.knack_max_rps,
                            plan_reserve=settings.knack_plan_reserve, stop=stop,
                            log=lambda line: _knack_said(emit, line))
        try:
            _process(settings, knack, esb, journal, readers, out, summary, stop, run_id)
        except OutageError as exc:
            # a call cut short by the stop signal fails like an outage, but the signal is the reason
            summary.stop_reason = summary.stop_reason or stop_reason(stop, str(exc))
            if stop.stopped:
                emit("stopped", f"stopped by {stop.signal_name} during: {exc}", level=WARNING)
            else:
                emit("outage", str(exc), level=ERROR)
        if stop.stopped and not summary.stop_reason:
            summary.stop_reason = f"received {stop.signal_name}"
        summary.account_for_the_rest()
        exit_code = summary.exit_code()
        _keep_run(journal, run_id, summary, exit_code, emit)  # before the summary line, which stays the last line
        run_id = None
        return finish(exit_code)
    except ConfigError as exc:
        _keep_run(journal, run_id, summary, EXIT_CONFIG, emit, str(exc))
        # The entry script prints the one error line; the metrics file and the dead man's switch must still learn
        # that this run ended with exit 2 (a config.py entry broken by an app edit shows up only here, mid-run).
        summary.stop_reason = f"configuration error: {exc}"
        summary.account_for_the_rest()
        calls_left = knack.calls_left_today() if knack is not None and hasattr(knack, "calls_left_today") else None
        report = summary.report(app.name, EXIT_CONFIG, clock() - stop.started, settings.dry_run, calls_left)
        Readers(r for r in readers.readers if r is not _log).finished(report)
        raise
    finally:
        stop.restore()
        for client in (knack, esb, journal):
            if client is not None:
                client.close()
        if lock is not None:
            lock.release()  # a no-op when this run never got the lock
        readers.close()


def _knack_said(emit, line: str) -> None:
    """The Knack client's own lines (each retry as it happens, paging warnings) as events."""
    warning = line.startswith("WARNING: ")
    emit("knack_warning" if warning else "knack_retry", line.removeprefix("WARNING: "),
         level=WARNING if warning else INFO)


def _keep_run(journal: Journal | None, run_id: int | None, summary: Summary, exit_code: int, emit,
              reason: str = "") -> None:
    """This run's counts in the journal's runs table (for --report); never changes the run's outcome."""
    if journal is None or run_id is None:
        return
    try:
        journal.finish_run(run_id, summary.counts(), exit_code, reason or summary.stop_reason)
    except JournalError as exc:
        emit("journal_warning", f"this run's counts could not be kept in the journal ({exc})", level=WARNING)


def _process(settings: Settings, knack: KnackClient, esb: ESBClient | None, journal: Journal | None,
             readers: Readers, out: TextIO, summary: Summary, stop: Stop, run_id: int | None) -> None:
    app = settings.app
    emit = readers.emit
    metadata = AppMetadata(settings, knack)
    metadata.schema()  # the scene of the view, all an idle run needs: from the cache when it fits
    # Messages are built only with field types and a zone from metadata this run fetched: at once when the schema
    # is fresh (a configuration error stops the run before any read), else when the first records arrive.
    formatting = None if metadata.from_cache else metadata.for_messages()

    def fetch(page: int) -> tuple[list[dict], int, int | None]:
        nonlocal formatting

        def read_page():
            return knack.ready_page(metadata.scene, app.view, app.fields["emi_id"], app.fields["esb_status"], page,
                                    sort_field=app.fields["atd_activity_id"])
        try:
            read = read_page()
        except KnackHTTPError as exc:
            # a view moved to another scene in the builder: the cached metadata names the old one
            if exc.status not in (400, 404) or not metadata.refresh():
                raise
            read = read_page()
        records = intake.admit(read.records)
        if records and formatting is None:
            # before the first record is read into a message; nothing is in flight yet, so a ConfigError here
            # ends the run (exit 2) with nothing sent
            formatting = metadata.for_messages()
            loop.use_formatting(*formatting)
        return records, read.total_pages, read.total_records

    intake = Intake(app.fields)  # before the listing: nothing of the run sees a record intake has not cleaned
    listing = Listing(fetch, key=lambda r: order_key(r, app.fields["atd_activity_id"]),
                      log=lambda line: _knack_said(emit, line), sequential=settings.dry_run, view=app.view)
    gate = _esb_gate(settings, stop, emit) if esb is not None else None
    # (until fetch supplies them, no field types and no zone: nothing can be read into a message)
    field_types, tz = formatting if formatting is not None else ({}, None)
    sender = RecordSender(settings, knack, esb, journal, tz, emit, out, stop, esb_gate=gate)
    loop = SendLoop(settings, sender, journal, emit, summary, stop, run_id, field_types, tz,
                    esb_gate=gate, budget=knack, intake=intake)

    def waiting() -> int | None:
        return knack.ready_count(metadata.scene, app.view, app.fields["emi_id"], app.fields["esb_status"])[0]

    try:
        loop.run(listing, readers.planned, waiting=waiting)
    finally:
        if gate is not None:
            summary.esb_in_flight = gate.used()

    if journal is not None and listing.complete and not stop.stopped:
        # only a complete listing tells which records are no longer ready
        ready_ids = listing.seen - loop.skipped_ids
        _close_settled(journal, knack, settings, ready_ids, emit, stop)
        journal.clear_failures_except(ready_ids)


def _esb_gate(settings: Settings, stop: Stop, emit) -> ESBGate:
    """The ESB POSTs' slots: adaptive (limiter.py) up to ESB_MAX_IN_FLIGHT, or fixed by --workers."""
    def changed(old: int, new: int, why: str) -> None:
        emit("esb_in_flight", f"ESB POSTs in flight at most: {old} -> {new} ({why})", level=DEBUG,
             esb_in_flight=new)

    limit = ConcurrencyLimit(settings.esb_in_flight, adaptive=settings.adaptive,
                             rate_ceiling=settings.knack_max_rps, timeout=settings.esb_timeout, on_change=changed)
    return ESBGate(limit, stop)


def _close_settled(journal: Journal, knack: KnackClient, settings: Settings, ready_ids: set[str], emit,
                   stop: Stop, wall_clock: Callable[[], float] = time.time) -> None:
    """Close the journal entries (`sending`, `delivered`, `parked`) whose record Knack has settled: a status other
    than READY_TO_SEND (SENT, DO_NOT_SEND, blank, anything else) or deleted. Nothing more is sent or set for them.

    Not being listed is not proof: a staff edit between two page reads shifts the pages, and a record that is
    still READY_TO_SEND can be missing from one listing. Closing its `delivered` entry would make the next run
    post it again; so each is confirmed with one read of the record. Knack's API filters records by field keys
    only (its docs name no filter on the record id), so the reads cannot be batched: instead an entry whose record
    still shows READY_TO_SEND without being listed (a blank EMI id keeps it out of the view) is asked about again
    only after RECHECK_AFTER, so old entries do not add Knack calls to every idle run.
    """
    app = settings.app
    may_call = getattr(knack, "may_start_record", None)
    now = wall_clock()
    for entry in journal.unfinished_except(ready_ids, checked_before=now - RECHECK_AFTER):
        if not stop.work_time_left() or (may_call is not None and not may_call()):
            break  # the time or the app's daily Knack budget is spent: the next run asks about the rest
        try:
            status = knack.record_status(app.obj, entry.record_id, app.fields["esb_status"])
        except RecordGone:
            reason = "the record no longer exists in Knack"
        except OutageError as exc:
            emit("unconfirmed", f"could not ask Knack whether this record is still {READY_TO_SEND} ({exc}); its "
                 f"journal entry stays {entry.state}", level=WARNING, record_id=entry.record_id)
            break  # Knack is in trouble: do not spend the run's budget on confirmations
        else:
            if status == READY_TO_SEND:
                journal.mark_checked(entry.record_id, now)
                continue
            shown = status if status in (SENT, DO_NOT_SEND) else repr(status[:40]) if status else "no status"
            reason = f"Knack shows {shown}"
        journal.close_settled(entry.record_id, reason, now)
        emit("journal_closed", f"journal entry ({entry.state}) closed: {reason}; nothing more is sent or set for "
             f"it unless staff set it {READY_TO_SEND}", record_id=entry.record_id)

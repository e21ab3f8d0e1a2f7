"""Which records may start now: 311's order kept per service request, different service requests in parallel.

311 must receive the activities of one service request (SR) in ascending atd_activity_id order, and an
activity that failed must not be overtaken by a later one of its SR (311 would apply them out of order). So the
activities of one SR go strictly one after another; a failure holds the rest of its SR for a later run, except a
record whose message the ESB already accepted in an earlier run: only its Knack status update is missing, and
that does not change what 311 sees. Records without an SR number have no order to keep. A record that cannot go
at all (unreadable, a required value blank, a message that does not render) is added as `failed`: it never
starts, but when its turn comes it holds the later activities of its SR just as a failed delivery does.

Records arrive page by page while others are being marked (Knack applies the view's filter afresh on every
request, so marking shifts the later pages). An activity of an SR must not start while an earlier activity of the
same SR may still be unread, so a record with an SR starts only once the caller has said that every ready record
up to its key has been added (`listed_through`, `listed_all`). With the view sorted by atd_activity_id, a read of
page 1 vouches for every key up to its last record (all of them when it is the only page); a later page only
when the pages before it cannot have shifted.

Pure and single-threaded: no I/O, no clock, no lock. One thread (the run's main thread) owns a Scheduler; the
workers report their outcomes to that thread, which calls `done`.
"""

from __future__ import annotations

import enum
import heapq
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ScheduledRecord:
    record_id: str
    sr_number: str     # "" when the record has none or it could not be read
    order_key: Any     # atd_activity_id as a sortable key; keys of all records must compare with each other
    payload: Any = field(default=None, compare=False, repr=False)  # what the caller needs to deliver it
    already_delivered: bool = False  # the ESB accepted its message in an earlier run: only the status update is left
    failed: bool = False  # known not to go before it starts (its data): never handed out, holds the rest of its SR


class HeldReason(enum.Enum):
    AFTER_FAILURE = "an earlier activity of this service request failed"
    LATE = "a later activity of this service request already started in this run"


@dataclass(frozen=True)
class Held:
    record: ScheduledRecord
    reason: HeldReason


class _State(enum.Enum):
    WAITING = "waiting"
    STARTED = "started"
    FINISHED = "finished"
    HELD = "held"


@dataclass
class _Line:
    """The activities of one service request known to this run."""

    pending: list[tuple[Any, int, ScheduledRecord]] = field(default_factory=list)  # heap by (key, arrival)
    in_flight: str | None = None
    failed: bool = False
    last_started: Any = None
    started_any: bool = False


class Scheduler:
    def __init__(self) -> None:
        self._states: dict[str, _State] = {}
        self._sr_of: dict[str, str] = {}          # record id -> SR, for records started and not finished
        self._lines: dict[str, _Line] = {}
        self._free: list[ScheduledRecord] = []    # records without an SR, not started yet
        self._gated: list[tuple[Any, int, str]] = []  # (key, arrival, SR) of records beyond the listed keys
        self._dirty: set[str] = set()             # SRs whose next activity may have become startable
        self._held: list[Held] = []
        self._arrivals = 0
        self._listed_all = False
        self._listed_through: Any = None
        self._has_listed = False
        self._waiting = 0
        self._in_flight = 0

    # ----- what the caller reads -----

    def seen(self, record_id: str) -> bool:
        """This run already knows the record (waiting, started, finished or held): pass it over."""
        return record_id in self._states

    @property
    def waiting(self) -> int:
        """Records added and neither started nor held nor failed (left for the next run if the run stops now)."""
        return self._waiting

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def behind(self, record: ScheduledRecord) -> int:
        """How many activities of the record's service request wait behind it (known to this run so far)."""
        line = self._lines.get(record.sr_number)
        return len(line.pending) if line is not None else 0

    # ----- what the caller tells -----

    def add(self, record_id: str, sr_number: str, order_key: Any, payload: Any = None, *,
            already_delivered: bool = False, failed: bool = False) -> bool:
        """A record read from Knack; False if this run has seen it already (nothing changes then).

        failed=True: the caller found that this record cannot go (and reported it); it is never handed out, and
        the activities of its SR after it are held once its turn comes (unless already delivered).
        """
        if record_id in self._states:
            return False
        record = ScheduledRecord(record_id, sr_number, order_key, payload, already_delivered, failed)
        self._arrivals += 1
        self._states[record_id] = _State.WAITING
        if failed and not sr_number:
            self._states[record_id] = _State.FINISHED  # no order to keep: nothing to hold
            return True
        if not failed:
            self._waiting += 1
        if not sr_number:
            self._free.append(record)
            return True
        line = self._lines.setdefault(sr_number, _Line())
        if failed and line.started_any and order_key < line.last_started:
            # its turn has passed (a later activity already started): what has not started yet waits behind it
            self._states[record_id] = _State.FINISHED
            line.failed = True
            return True
        if line.started_any and order_key < line.last_started:
            # A later activity of this SR already went to the ESB: starting this one now would be out of order
            # for 311 too, so it is not started; the caller must say so loudly.
            self._hold(record, HeldReason.LATE)
            return True
        heapq.heappush(line.pending, (order_key, self._arrivals, record))
        if self._is_listed(order_key):
            self._dirty.add(sr_number)
        else:
            heapq.heappush(self._gated, (order_key, self._arrivals, sr_number))
        return True

    def listed_through(self, order_key: Any) -> None:
        """Every ready record with a key up to `order_key` has been added (keys never go back)."""
        if self._listed_all or (self._has_listed and order_key <= self._listed_through):
            return
        self._listed_through, self._has_listed = order_key, True
        while self._gated and self._gated[0][0] <= order_key:
            self._dirty.add(heapq.heappop(self._gated)[2])

    def listed_all(self) -> None:
        """Every ready record has been added (the last page was read): nothing is gated any more."""
        self._listed_all = True
        self._dirty.update(sr for _, _, sr in self._gated)
        self._gated.clear()

    def ready(self) -> list[ScheduledRecord]:
        """The records that may start now, in ascending key order; each is handed out once (now started).

        Call `take_held` after it: a failure's consequences are decided here.
        """
        started = list(self._free)
        self._free.clear()
        for sr in self._dirty:
            line = self._lines[sr]
            while line.in_flight is None and line.pending and self._is_listed(line.pending[0][0]):
                _, _, record = heapq.heappop(line.pending)
                if record.failed:
                    # its turn, taken as a start that failed: an earlier activity turning up later is held LATE
                    self._states[record.record_id] = _State.FINISHED
                    line.failed = True
                    line.last_started, line.started_any = record.order_key, True
                    continue
                if line.failed and not record.already_delivered:
                    self._hold(record, HeldReason.AFTER_FAILURE)
                    continue
                line.in_flight = record.record_id
                line.last_started, line.started_any = record.order_key, True
                self._sr_of[record.record_id] = sr
                started.append(record)
        self._dirty.clear()
        for record in started:
            self._states[record.record_id] = _State.STARTED
        self._waiting -= len(started)
        self._in_flight += len(started)
        started.sort(key=lambda record: record.order_key)
        return started

    def done(self, record_id: str, *, failed: bool) -> None:
        """A started record finished. failed=True holds the later activities of its SR (unless delivered).

        A record the ESB has (even if its Knack status update failed) is not a failure for 311's order.
        """
        if self._states.get(record_id) is not _State.STARTED:
            raise ValueError(f"record {record_id} is not in flight")
        self._states[record_id] = _State.FINISHED
        self._in_flight -= 1
        sr = self._sr_of.pop(record_id, "")
        if sr:
            line = self._lines[sr]
            line.in_flight = None
            line.failed = line.failed or failed
            self._dirty.add(sr)

    def take_held(self) -> list[Held]:
        """The records held since the last call (each reported once)."""
        held, self._held = self._held, []
        return held

    # ----- inside -----

    def _is_listed(self, order_key: Any) -> bool:
        return self._listed_all or (self._has_listed and order_key <= self._listed_through)

    def _hold(self, record: ScheduledRecord, reason: HeldReason) -> None:
        self._states[record.record_id] = _State.HELD
        self._waiting -= 1
        self._held.append(Held(record, reason))


"""A discrete-event model of a run's delivery, for the concurrency limit's tests: a fake clock, no threads.

Workers take records; each record's POST waits for a slot of the limit, goes to a model ESB (a fixed latency,
or `capacity` messages served at once for `latency` each and the rest waiting in a FIFO queue, as
simulators/esb.py's capacity mode), then its Knack status update waits for the pacer (evenly spaced starts at
`rate` a second: the real pacer also lets a quiet second's worth start at once, so it is never slower) and takes
`knack_latency`. A POST whose answer would come after `timeout` ends as a timeout (the ESB still works on it).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from knack311.limiter import ConcurrencyLimit, Outcome, Ticket


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Measured:
    finished_at: float = 0.0
    done: int = 0
    queue_waits: list[float] = field(default_factory=list)
    peak_in_flight: int = 0
    limits: list[tuple[float, int]] = field(default_factory=list)  # (time, limit) at every change
    timeouts: int = 0
    in_flight_at_timeouts: list[int] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.done / self.finished_at if self.finished_at else 0.0

    def wait_p90(self) -> float:
        waits = sorted(self.queue_waits)
        return waits[max(0, math.ceil(0.9 * len(waits)) - 1)] if waits else 0.0

    def limit_at(self, when: float) -> int:
        value = self.limits[0][1]
        for at, limit in self.limits:
            if at > when:
                break
            value = limit
        return value


class Model:
    def __init__(self, limit: ConcurrencyLimit, clock: FakeClock, *, latency: float | Callable[[float], float],
                 capacity: int | None = None, workers: int = 32, rate: float = 9.5, knack_latency: float = 0.2,
                 timeout: float = 30.0):
        self.limit, self.clock = limit, clock
        self.latency = latency if callable(latency) else (lambda _now, fixed=latency: fixed)
        self.capacity, self.workers, self.rate = capacity, workers, rate
        self.knack_latency, self.timeout = knack_latency, timeout
        self.measured = Measured(limits=[(0.0, limit.limit)])
        self._events: list = []
        self._order = itertools.count()
        self._busy_workers = 0
        self._servers_free_at: list[float] = [0.0] * (capacity or 0)
        self._next_pacer_slot = 0.0
        self._esb_in_flight = 0
        self.posted_at: list[float] = []  # beside measured.queue_waits

    def _at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._order), action))

    def run(self, records: int, *, until: float = 3600.0) -> Measured:
        self._left = records
        self._start_what_may()
        while self._events:
            when, _, action = heapq.heappop(self._events)
            if when > until:
                break
            self.clock.now = when
            action()
            self._start_what_may()
            if self.measured.limits[-1][1] != self.limit.limit:
                self.measured.limits.append((when, self.limit.limit))
        return self.measured

    def _start_what_may(self) -> None:
        while self._left and self._busy_workers < self.workers and self.limit.may_start():
            self._left -= 1
            self._busy_workers += 1
            self._post(self.limit.start())

    def _post(self, ticket: Ticket) -> None:
        now = self.clock.now
        self._esb_in_flight += 1
        self.measured.peak_in_flight = max(self.measured.peak_in_flight, self._esb_in_flight)
        service = self.latency(now)
        self.posted_at.append(now)
        if self.capacity:
            server = min(range(self.capacity), key=lambda i: self._servers_free_at[i])
            begins = max(now, self._servers_free_at[server])
            self._servers_free_at[server] = begins + service
            self.measured.queue_waits.append(begins - now)
            answered = begins + service
        else:
            self.measured.queue_waits.append(0.0)
            answered = now + service
        if answered - now >= self.timeout:
            self._at(now + self.timeout, lambda: self._answer(ticket, now, Outcome.TIMEOUT))
        else:
            self._at(answered, lambda: self._answer(ticket, now, Outcome.ANSWERED))

    def _answer(self, ticket: Ticket, posted: float, outcome: Outcome) -> None:
        now = self.clock.now
        self._esb_in_flight -= 1
        if outcome is Outcome.TIMEOUT:
            self.measured.timeouts += 1
            self.measured.in_flight_at_timeouts.append(self._esb_in_flight + 1)
        self.limit.finish(ticket, now - posted, outcome)
        if outcome is not Outcome.ANSWERED:
            self._busy_workers -= 1  # the record fails; the worker is free
            return
        slot = max(now, self._next_pacer_slot)
        self._next_pacer_slot = slot + 1.0 / self.rate
        self._at(slot + self.knack_latency, self._marked)

    def _marked(self) -> None:
        self._busy_workers -= 1
        self.measured.done += 1
        self.measured.finished_at = self.clock.now

"""How many ESB POSTs may be in flight at once: an adaptive limit (no I/O, an injected clock) and the gate the
delivery workers share.

The city's ESB may answer in 200 ms or in several seconds, and some of its back ends work on a few messages at
a time and queue the rest. A fixed number of POSTs in flight is either too few for a slow ESB (Knack's 10/s goes
unused) or a queue at a busy one (load for no gain). So the limit follows the answers, the way TCP Vegas and
Netflix's concurrency-limits (Vegas, Gradient2, AIMD) do:

- it starts at 20 (the initial limit of Netflix's limiters; TCP's first window is 10 segments), never more than
  Knack's pacer lets start in two seconds (20 at 9.5 a second): an ESB answering in 1.5 s needs about 16 POSTs
  in flight to keep Knack's second busy, and each round trip spent below that costs the run seconds of it;
- while answers come back without queueing, the limit is what holds the POSTs back (throughput can still rise)
  and a round trip brings answers for at least half the limit, it grows fourfold per round trip (slow start: an
  ESB answering in 3 s needs 30 POSTs in flight to use Knack's pace); an ESB that answers fewer per round trip
  cannot be working on all of them at once, so it does not grow then, and the slot of such an answer is not
  filled again (the limit drops by one) until the answers show it is;
- after the first sign of a queue it grows by a fifth of a POST per round trip, so that a probe beyond what the
  ESB can take is brief and rare, and half as often after each probe that finds the queue where the last one did;
- queueing shows as latency above the lowest seen lately: by Little's law, `in flight x (1 - min / latency)`
  of the POSTs were waiting, and the limit drops by that many (one decision per round trip, judged on a POST
  that started under the present limit);
- a 5xx, a dropped connection or an ESB that cannot be reached cut it by a quarter;
- a timeout, or an answer that came only after ESB_TIMEOUT (a re-post's longer wait), drops it to 1 until an
  answer comes back within ESB_TIMEOUT: while the ESB answers after the run gives up, every POST in flight is a
  message in doubt. So only a run that follows a healthy one starts at 20: one that finds messages in doubt
  re-posts them first, and if their answers come late, new records go one at a time;
- Knack's pacer is the ceiling: a record costs one Knack status update, so beyond `rate x latency` POSTs in
  flight (Little's law again; plus a little headroom for jitter) more parallel POSTs only wait in the pacer;
- never above ESB_MAX_IN_FLIGHT.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .stopping import POLL, Stop

INITIAL_LIMIT = 20
INITIAL_SECONDS = 2  # ... and at most what Knack's pacer lets start in this many seconds (KNACK_MAX_RPS=2: 4)
# Queueing at the ESB, in POSTs waiting (Little's law on one answer): at or above QUEUE_HIGH the limit drops by
# the queue; below QUEUE_LOW it may grow. Between the two it holds: timing noise of a few percent at a dozen
# POSTs in flight is below one waiting message, so it moves nothing.
QUEUE_HIGH = 0.75
QUEUE_LOW = 0.5
# ... or, with many POSTs in flight, latency 10% (5%) above the minimum: jitter, not a queue, below that.
QUEUE_HIGH_SHARE = 0.10
QUEUE_LOW_SHARE = 0.05
# Slow start: each answer without queueing adds this many POSTs, so the limit grows (1 + step)-fold per round trip.
SLOW_START_STEP = 3.0
# ... but only while a round trip (the lowest latency) brings at least this share of the limit in answers: an ESB
# that answers fewer cannot be working on all of them at once, and the rest wait in its queue (their answers,
# later, would say so; growing meanwhile would only make the queue longer)
SLOW_START_DELIVERED = 0.5
# Growth per round trip once slow start is over: a fifth of a POST, so that against an ESB that is at its
# capacity one round in five or so probes one message beyond it (and that message waits in its queue).
GROWTH = 0.2
# ... halved by each probe that finds the queue again at the same size (an ESB at its capacity is probed ever more
# rarely: every 5, 10, 20, then 40 round trips), and back to GROWTH once a larger limit went without a queue
GROWTH_MIN = GROWTH / 8
BACKOFF = 0.75        # after a 5xx, a dropped connection or an unreachable ESB
# How long the lowest latency counts as "the ESB without a queue": long enough to span many round trips, short
# enough that an ESB that became slower for good is learnt as such within a run, not taken for a queue forever.
MIN_LATENCY_WINDOW = 30.0
LATENCY_SMOOTHING = 0.2  # weight of a new answer in the recent latency (the Knack ceiling's Little's law)
RATE_HEADROOM = 1.1      # POSTs in flight beyond `rate x latency`: for jitter, so that Knack is never starved


class Outcome(enum.Enum):
    """How one POST ended, as far as the limit cares."""

    ANSWERED = "answered"        # the ESB answered in time (accepted, or rejected the message)
    TIMEOUT = "timeout"          # no answer within ESB_TIMEOUT
    SERVER_ERROR = "5xx"         # 5xx, or retries of 503 were needed: the ESB or a gateway is overloaded
    DROPPED = "dropped"          # the connection broke after the request was written
    UNREACHABLE = "unreachable"  # the request never reached the ESB
    STOPPED = "stopped"          # cut short by the run's stop: says nothing about the ESB


@dataclass(frozen=True)
class Ticket:
    """One POST, from `start` to `finish`."""

    in_flight: int   # POSTs in flight with this one
    round: int       # the limit's decisions so far: an answer judges the limit it started under


Change = Callable[[int, int, str], None]  # old limit, new limit, why


class ConcurrencyLimit:
    """The number of ESB POSTs that may be in flight. Not thread-safe: `ESBGate` serialises the calls.

    adaptive=False keeps the limit at `maximum` (--workers N: a fixed setting, as asked).
    """

    def __init__(self, maximum: int, *, adaptive: bool = True, initial: int = INITIAL_LIMIT,
                 rate_ceiling: float | None = None, timeout: float | None = None,
                 clock: Callable[[], float] = time.monotonic, on_change: Change | None = None):
        """rate_ceiling: the Knack pacer's records/second (None: no ceiling); timeout: ESB_TIMEOUT, the latency
        below which an answer ends the 'one at a time' after a timeout (None: any answer does)."""
        if maximum < 1:
            raise ValueError("maximum must be at least 1")
        self.maximum = maximum
        self.adaptive = adaptive
        self._rate = rate_ceiling
        self._timeout = timeout
        self._clock = clock
        self._on_change = on_change
        if rate_ceiling is not None:
            initial = min(initial, INITIAL_SECONDS * max(1, math.ceil(rate_ceiling - 1e-9)))
        self._limit = float(min(initial, maximum) if adaptive else maximum)
        self._slow_start_until = float(maximum)
        self._timed_out = False
        self._saturated = False        # the limit held a POST back since the last decision
        self._growth = GROWTH          # per round trip, after slow start
        self._queued_at = math.inf     # the limit under which the ESB last queued
        self._decisions = 0
        self._lows: deque[tuple[float, float]] = deque()  # (when, latency), latencies ascending: a window minimum
        self._recent: float | None = None
        self._answers: deque[float] = deque()  # when recent answers in time came
        self._round: list[tuple[int, float]] = []  # (in flight, latency) of each answer of the present round
        self._in_flight = 0
        self.low = self.high = self.limit

    @property
    def limit(self) -> int:
        return max(1, int(self._limit))

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def min_latency(self) -> float | None:
        return self._lows[0][1] if self._lows else None

    def may_start(self) -> bool:
        return self._in_flight < self.limit

    def start(self) -> Ticket:
        """A POST begins (the caller checked may_start)."""
        self._in_flight += 1
        if self._in_flight >= self.limit:
            self._saturated = True
        return Ticket(self._in_flight, self._decisions)

    def finish(self, ticket: Ticket, latency: float, outcome: Outcome) -> None:
        """A POST ended after `latency` seconds, with `outcome`."""
        self._in_flight -= 1
        if outcome is Outcome.STOPPED:
            return
        # an answer after ESB_TIMEOUT (a re-post's longer wait, a trickle) says what a timeout says
        late = outcome is Outcome.ANSWERED and self._timeout is not None and latency >= self._timeout
        if not self.adaptive:
            # a fixed number (--workers N) too goes one at a time after a timeout, until an answer comes in time:
            # a slow ESB must not be handed more messages to leave in doubt
            if (outcome is Outcome.TIMEOUT or late) and self._limit > 1:
                self._decide(1.0, "timeout" if not late else "answer after ESB_TIMEOUT")
            elif outcome is Outcome.ANSWERED and not late and self._limit < self.maximum:
                self._decide(float(self.maximum), "answer in time after a timeout")
            return
        now = self._clock()
        fresh = ticket.round == self._decisions  # it started under the present limit: its answer judges it
        if outcome is Outcome.TIMEOUT or (late and not self._timed_out):
            if not self._timed_out:
                self._slow_start_until = max(2.0, self._limit / 2)
                self._timed_out = True
            self._decide(1.0, "timeout" if not late else "answer after ESB_TIMEOUT")
        elif outcome is not Outcome.ANSWERED:
            if fresh:
                self._slow_start_until = max(1.0, self._limit * BACKOFF)
                self._decide(self._slow_start_until, outcome.value)
        elif not late:
            self._answered(ticket, latency, now, fresh)
        # (a late answer while already one at a time changes nothing)

    def _answered(self, ticket: Ticket, latency: float, now: float, fresh: bool) -> None:
        """An answer within ESB_TIMEOUT."""
        self._observe(latency, now)
        if self._timed_out:
            self._timed_out = False  # the ESB answers in time again: grow from 1 (slow start)
            self._decide(1.0, "answer in time after a timeout")
            return
        if self._limit < self._slow_start_until:
            self._slow_start(ticket, latency)
        elif fresh:
            self._judge_round(ticket, latency)

    def _slow_start(self, ticket: Ticket, latency: float) -> None:
        """Every answer without queueing adds SLOW_START_STEP POSTs (the limit grows by that factor plus one
        per round trip); the first that queued ends slow start."""
        waiting = ticket.in_flight * self._waited(latency)
        if waiting >= max(QUEUE_HIGH, QUEUE_HIGH_SHARE * ticket.in_flight):
            self._slow_start_until = 0.0
            # the ESB began to queue with this POST: back to what it took without a queue, and to no more than
            # it answered in the last round trip (POSTs that started together queue in any order)
            self._decide(min(self._limit - 1, ticket.in_flight - 1, len(self._answers)),
                         f"queueing at the ESB ({latency:.2f}s against {self._lows[0][1]:.2f}s)")
        elif self._saturated and len(self._answers) >= SLOW_START_DELIVERED * self.limit:
            self._decide(min(self._limit + SLOW_START_STEP, self._slow_start_until),
                         "answers without queueing")
        elif self._saturated:
            # too few answers yet for the limit: this one's slot stays empty until a round trip shows the ESB
            # working on enough at once (if it is not, the rest of the round waits in its queue, and a POST sent
            # now would wait behind them)
            self._decide(self._limit - 1, "too few answers per round trip yet")

    def _judge_round(self, ticket: Ticket, latency: float) -> None:
        # A round: as many answers as the limit allows POSTs, each started under the present limit. One answer
        # alone may be a POST that found a free worker at the ESB while the next ones queued behind it.
        self._round.append((ticket.in_flight, latency))
        if len(self._round) < self.limit:
            return
        # Little's law over the round: of `in_flight` POSTs, the share of their time spent beyond the ESB's
        # unloaded latency was spent waiting.
        in_flight = sum(n for n, _ in self._round) / len(self._round)
        latency = sum(t for _, t in self._round) / len(self._round)
        queued = in_flight * self._waited(latency)
        if queued >= max(QUEUE_HIGH, QUEUE_HIGH_SHARE * in_flight):
            self._slow_start_until = 0.0  # the ESB's capacity is near: grow slowly from now on
            if self.limit >= self._queued_at:  # the queue again where it was last found: probe less often
                self._growth = max(GROWTH_MIN, self._growth / 2)
            self._queued_at = self.limit
            self._decide(min(self._limit - 1, in_flight - queued),
                         f"queueing at the ESB (about {queued:.1f} of {in_flight:.1f} POSTs waited)")
        elif queued < max(QUEUE_LOW, QUEUE_LOW_SHARE * in_flight) and self._saturated:
            if self.limit > self._queued_at:  # beyond where the queue was: the ESB can take more now
                self._growth, self._queued_at = GROWTH, math.inf
            self._decide(self._limit + self._growth, "answers without queueing")
        else:
            self._decide(self._limit, "")

    def _waited(self, latency: float) -> float:
        """The share of `latency` spent waiting rather than being served (Little's law with the minimum latency as
        the time served)."""
        return 1.0 - self._lows[0][1] / latency if latency > 0 else 0.0

    def _observe(self, latency: float, now: float) -> None:
        lows = self._lows
        while lows and lows[-1][1] >= latency:
            lows.pop()
        lows.append((now, latency))
        while lows[0][0] < now - MIN_LATENCY_WINDOW:
            lows.popleft()
        answers = self._answers
        answers.append(now)
        while answers[0] < now - lows[0][1]:
            answers.popleft()
        self._recent = latency if self._recent is None else \
            self._recent + LATENCY_SMOOTHING * (latency - self._recent)

    def ceiling(self) -> int:
        """The most the limit may be now: ESB_MAX_IN_FLIGHT, and what Knack's pacer can use."""
        if self._rate is None or self._recent is None:
            return self.maximum
        return min(self.maximum, math.ceil(self._rate * self._recent * RATE_HEADROOM) + 1)

    def _decide(self, limit: float, why: str) -> None:
        self._decisions += 1
        self._round.clear()
        self._saturated = self._in_flight >= self.limit
        before = self.limit
        self._limit = max(1.0, min(limit, float(self.ceiling())))
        after = self.limit
        if after != before:
            self.low, self.high = min(self.low, after), max(self.high, after)
            if self._on_change is not None:
                self._on_change(before, after, why or "Knack's pace")


class ESBGate:
    """The POSTs' slots, shared by the delivery workers: `take` waits while the limit is reached, `give_back`
    reports how the POST went. Thread-safe.

    A worker waiting for a slot gives up once the run starts no new record (a stop signal, the time budget, or
    `close()` on an outage): a POST that has not begun must not begin then.
    """

    def __init__(self, limit: ConcurrencyLimit, stop: Stop):
        self.limit = limit
        self._stop = stop
        self._closed = False
        self._changed = threading.Condition()

    def take(self) -> Ticket | None:
        """Wait for a slot; None (and no slot) when the run stopped starting records meanwhile."""
        with self._changed:
            while not self._closed and self._stop.work_time_left():
                if self.limit.may_start():
                    return self.limit.start()
                self._changed.wait(POLL)
            return None

    def give_back(self, ticket: Ticket, latency: float, outcome: Outcome) -> None:
        with self._changed:
            self.limit.finish(ticket, latency, outcome)
            self._changed.notify_all()

    def close(self) -> None:
        """No new POST from now on (the run is stopping)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def used(self) -> tuple[int, int]:
        """The lowest and highest limit of the run so far."""
        with self._changed:
            return self.limit.low, self.limit.high

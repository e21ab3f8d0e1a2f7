"""One pacer for every Knack request of a run: Knack's per-second limit and the app's daily plan budget.

Knack ("API limits") allows an app 10 requests a second, counted for everything that uses the app's API key,
answers 429 beyond, and ignores the app for the rest of that second. Every plan also has a daily budget (Starter
1,000 calls, Pro 5,000, Corporate 10,000, Plus 25,000), shared by the app's other users too. Every answer carries
both states: X-RateLimit-Limit/Remaining/Reset (this second) and X-PlanLimit-Limit/Remaining/Reset (today).

The pacer
- starts at most KNACK_MAX_RPS requests a second (DEFAULT_MAX_RPS below), counted the way Knack counts them:
  per second, not per tenth of one. At a rate r it lets ceil(r) requests start in any ceil(r)/r seconds (at 9.5:
  10 in any 1.053 s), so after a quiet spell (the run waiting for ESB answers) a second's worth starts at once
  instead of a tenth of a second apart: Knack's second is used, not lost, and no second ever holds more. While
  other clients use the app's second, it spaces its requests 1/r apart instead;
- learns from X-RateLimit-* how much of the second other clients of the app use, and slows down to leave it;
- after a 429 starts nothing until the reset (Knack ignores the rest of that second anyway);
- keeps the daily budget: `may_start_record` says no once a record would leave fewer calls than the reserve
  (KNACK_PLAN_RESERVE, by default 10% of X-PlanLimit-Limit) for the app's other users.
Its waits end early on the run's stop signal and never run past the run's deadline. Thread-safe: one Pacer is
shared by every thread that talks to Knack.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

KNACK_RATE_LIMIT = 10       # requests per second per app, on every plan
# 9.5 a second: a record costs one Knack call (its status update), so the rate is the bridge's throughput, and
# 9.5 keeps it within 5% of Knack's ceiling. It is still under it with room for timing noise: at most 10 starts
# in any 1.053 s put at most 10 requests into any one-second window as long as the network shifts an arrival by
# less than 50 ms; the X-RateLimit headers and the 429 handling cover the rest. (The old default, 8, gave up 20%.)
DEFAULT_MAX_RPS = 9.5
HEADROOM = DEFAULT_MAX_RPS / KNACK_RATE_LIMIT  # the share of the free per-second budget the bridge takes
MIN_RPS = 1.0               # even when others seem to use the whole second (Knack's 429s then slow us further);
                            # never above the operator's KNACK_MAX_RPS, which may be lower (0.1 and up)
RATE_WINDOW = 1.0           # seconds: Knack counts requests per second
OTHERS_MEMORY = 2.0         # seconds an observation of other clients' use keeps slowing us down
RESET_WAIT_MAX = 2.0        # a per-second window resets within a second; a later X-RateLimit-Reset is a clock skew
DEFAULT_RESERVE_SHARE = 0.10


class Interrupted(Exception):
    """before_request did not let the request start."""


class StopRequested(Interrupted):
    """The run's stop signal came while waiting for a slot."""


class DeadlineReached(Interrupted):
    """The next slot is after the run's deadline: the request is not started, and nothing waited for it."""


class DailyBudgetSpent(Interrupted):
    """Knack's daily plan budget is used up (X-PlanLimit-Remaining 0) until it resets."""


class StopLike(Protocol):
    def wait(self, seconds: float) -> bool: ...  # True when the run is stopped (threading.Event.wait fits)


@dataclass(frozen=True)
class Ticket:
    """One request, from before_request to after_answer."""

    seq: int
    started: float  # the pacer's monotonic clock


@dataclass(frozen=True)
class PlanBudget:
    """The daily plan budget as the pacer knows it (all None until an answer carried the headers)."""

    limit: int | None
    remaining: int | None    # Knack's last figure less the calls this run started since
    reserve: int | None      # calls left for the app's other users
    resets_at: float | None  # epoch seconds

    def describe(self) -> str:
        if self.remaining is None:
            return "daily Knack calls left: unknown"
        text = f"daily Knack calls left: {self.remaining}"
        if self.limit is not None:
            text += f" of {self.limit}"
        if self.reserve is not None:
            text += f" (reserve for other users {self.reserve})"
        if self.resets_at is not None:
            reset = dt.datetime.fromtimestamp(self.resets_at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            text += f", resets at {reset}"
        return text


class _NoStop:
    def wait(self, seconds: float) -> bool:
        time.sleep(seconds)
        return False


class Pacer:
    def __init__(self, max_rps: float = DEFAULT_MAX_RPS, *, stop: StopLike | None = None,
                 plan_reserve: int | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        """stop: anything with wait(seconds) -> bool (True = stopped), such as threading.Event or the run's Stop;
        if it also has remaining() -> float (seconds to the run's deadline), no wait runs past that deadline.
        plan_reserve: daily calls to leave for the app's other users (None: 10% of X-PlanLimit-Limit)."""
        if max_rps <= 0:
            raise ValueError("max_rps must be positive")
        if plan_reserve is not None and plan_reserve < 0:
            raise ValueError("plan_reserve must not be negative")
        self.max_rps = max_rps
        self._stop = stop if stop is not None else _NoStop()
        self._remaining_time: Callable[[], float] | None = getattr(stop, "remaining", None)
        self._plan_reserve = plan_reserve
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        # the slots handed out lately, ascending: a slot is at least a window after the one `burst` places back
        self._slots: deque[float] = deque(maxlen=max(1, math.ceil(max_rps)))
        self._gate_until = -math.inf          # no start before this (after a 429)
        self._seq = 0
        self._in_flight = 0
        self._starts: deque[float] = deque()  # start times of recent requests, for the others' share
        self._others: deque[tuple[float, int]] = deque()  # (when seen, requests of other clients in the window)
        self._last_others = 0
        self._rate_limit: int | None = None
        self._plan_limit: int | None = None
        self._plan_remaining: int | None = None
        self._plan_resets_at: float | None = None
        self._plan_seq = -1
        self.requests = 0   # requests let through
        self.throttled = 0  # answers of 429

    # ----- the Knack client's hooks -----

    def before_request(self) -> Ticket:
        """Wait for this request's slot. Raises StopRequested, DeadlineReached or DailyBudgetSpent instead of
        letting it start; every Ticket returned must be given back to after_answer.

        The stop signal only cuts a wait short: a request whose slot is free starts even after it (the record
        in hand still gets its status update; what to start next is the caller's decision). Past the deadline
        nothing starts, and a wait that would end after it is not begun."""
        while True:
            with self._lock:
                self._refuse_if_plan_spent()
                now = self._clock()
                start = max(now, self._gate_until, self._window_opens(self._rate(now)))
                delay = start - now
                if self._remaining_time is not None and delay > self._remaining_time():
                    raise DeadlineReached(f"the next Knack request slot is {delay:.1f}s away, after the deadline")
                self._slots.append(start)
                gate = self._gate_until
                if delay <= 0:
                    return self._start(now)
            if self._stop.wait(delay):
                raise StopRequested("stopped while waiting for a Knack request slot")
            with self._lock:
                now = self._clock()
                if self._gate_until <= gate or self._gate_until <= now:  # no 429 closed the second meanwhile
                    self._refuse_if_plan_spent()
                    return self._start(now)

    def after_answer(self, status: int | None, headers: Mapping[str, str] | None,
                     ticket: Ticket | None = None) -> None:
        """Knack's answer to the request of `ticket` (status None and no headers when no answer came)."""
        values = {str(k).lower(): v for k, v in (headers or {}).items()}
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            now, wall = self._clock(), self._wall()
            rate_limit = _int(values.get("x-ratelimit-limit"))
            rate_remaining = _int(values.get("x-ratelimit-remaining"))
            if rate_limit is not None and rate_limit > 0:
                self._rate_limit = rate_limit
                if rate_remaining is not None and ticket is not None:
                    self._observe_others(now, rate_limit - rate_remaining, ticket)
            self._take_plan(values, ticket, wall)
            if status == 429:
                self.throttled += 1
                if not self._plan_spent():
                    # Knack ignores the rest of this second: start nothing until it resets
                    reset = _epoch(values.get("x-ratelimit-reset"), wall)
                    delay = reset - wall if reset is not None else None
                    if delay is None or not 0 < delay <= RESET_WAIT_MAX:
                        delay = RATE_WINDOW
                    self._gate_until = max(self._gate_until, now + delay)

    # ----- the daily budget -----

    def may_start_record(self, calls_needed: int = 1, *, in_flight: int = 0) -> bool:
        """Whether a new record may start: its calls, and `in_flight` records' (started, not finished, counted
        as still needing theirs), must leave at least the reserve of today's calls for the app's other users.
        True while the budget is unknown (no answer yet, or the budget reset since the last one)."""
        budget = self.plan()
        if budget.remaining is None or budget.reserve is None:
            return True
        return budget.remaining - (in_flight + 1) * calls_needed >= budget.reserve

    def plan(self) -> PlanBudget:
        with self._lock:
            self._forget_plan_after_reset(self._wall())
            return PlanBudget(self._plan_limit, self._plan_remaining, self._reserve(), self._plan_resets_at)

    @property
    def current_rps(self) -> float:
        """The rate the next requests get (lower while other clients use part of Knack's second)."""
        with self._lock:
            return self._rate(self._clock())

    # ----- inside (under the lock) -----

    def _start(self, now: float) -> Ticket:
        self._seq += 1
        self._in_flight += 1
        self.requests += 1
        if self._plan_remaining is not None:
            self._plan_remaining -= 1
        self._starts.append(now)
        while self._starts and self._starts[0] < now - RATE_WINDOW - OTHERS_MEMORY:
            self._starts.popleft()
        return Ticket(self._seq, now)

    def _window_opens(self, rate: float) -> float:
        """The earliest slot the rate allows: `burst` = ceil(rate) starts in any burst/rate seconds (never before
        a slot already handed out, so the slots stay in order). While other clients use the app's second, one at
        a time, 1/rate apart: a burst would take the second's room from their requests, which Knack then refuses,
        and would hide from Knack's count what they use."""
        slots = self._slots
        burst = 1 if self._others else max(1, math.ceil(rate - 1e-9))
        if len(slots) < burst:
            return slots[-1] if slots else -math.inf
        return max(slots[-1], slots[-burst] + burst / rate)

    def _rate(self, now: float) -> float:
        while self._others and self._others[0][0] < now - OTHERS_MEMORY:
            self._others.popleft()
        others = max((count for _, count in self._others), default=0)
        if self._rate_limit is None:
            return self.max_rps
        # the floor keeps a trickle going while others seem to use the whole second; it never lifts the rate above
        # what the operator allowed
        return max(min(MIN_RPS, self.max_rps), min(self.max_rps, (self._rate_limit - others) * HEADROOM))

    def _observe_others(self, now: float, used: int, ticket: Ticket) -> None:
        # Knack's count for the second before this request arrived, less this run's own requests in that second,
        # is what other clients of the app used. A timing wobble can shift one of our own requests out of the
        # second and show one "other" request that is not there: an observation counts only when the previous
        # answer saw at least as many.
        ours = sum(1 for started in self._starts if ticket.started - RATE_WINDOW < started <= ticket.started)
        seen = max(0, used - ours)
        steady, self._last_others = min(seen, self._last_others), seen
        if steady:
            self._others.append((now, steady))

    def _take_plan(self, values: dict[str, str], ticket: Ticket | None, wall: float) -> None:
        limit = _int(values.get("x-planlimit-limit"))
        remaining = _int(values.get("x-planlimit-remaining"))
        resets_at = _epoch(values.get("x-planlimit-reset"), wall)
        if limit is not None:
            self._plan_limit = limit
        if resets_at is not None:
            self._plan_resets_at = resets_at
        if remaining is None:
            return
        if ticket is None:
            # which of our requests Knack had counted is unknown: assume none of those still in flight
            self._plan_remaining = remaining - self._in_flight
        elif ticket.seq > self._plan_seq:
            # Knack counted this request and the ones started before it, not the ones started after it
            self._plan_seq = ticket.seq
            self._plan_remaining = remaining - (self._seq - ticket.seq)
        self._plan_remaining = max(0, self._plan_remaining) if self._plan_remaining is not None else None

    def _forget_plan_after_reset(self, wall: float) -> None:
        if self._plan_resets_at is not None and wall >= self._plan_resets_at:
            self._plan_remaining = None  # a new day's budget: known again from the next answer
            self._plan_resets_at = None

    def _plan_spent(self) -> bool:
        self._forget_plan_after_reset(self._wall())
        return self._plan_remaining is not None and self._plan_remaining <= 0

    def _refuse_if_plan_spent(self) -> None:
        if self._plan_spent():
            budget = PlanBudget(self._plan_limit, 0, self._reserve(), self._plan_resets_at)
            raise DailyBudgetSpent(f"Knack's daily API budget is used up ({budget.describe()})")

    def _reserve(self) -> int | None:
        if self._plan_reserve is not None:
            return self._plan_reserve
        if self._plan_limit is None:
            return None
        return math.ceil(self._plan_limit * DEFAULT_RESERVE_SHARE)


def _int(value: object) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _epoch(value: object, wall: float) -> float | None:
    """A reset header as epoch seconds.

    Knack documents X-RateLimit-Reset as epoch seconds (its example: 1534205053). X-PlanLimit-Reset is said to be
    epoch seconds too, but the example in Knack's own "API limits" page (10738500) is no recent epoch second, and
    answers seen from real apps (57413141 at 08:03 UTC) read as milliseconds until the daily reset at 00:00 UTC.
    So: epoch milliseconds above 1e11, epoch seconds above 1e9, milliseconds from now below that.
    """
    try:
        number = float(str(value).strip())
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or number < 0:
        return None
    if number >= 1e11:
        return number / 1000.0
    if number >= 1e9:
        return number
    return wall + number / 1000.0

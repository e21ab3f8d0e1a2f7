"""The ESB concurrency limit with a fake clock: the pure decisions one answer at a time, and a discrete-event model
of a run (tests/esb_model.py: workers, the ESB, Knack's pacer; no threads) for what the decisions add up to.
The gate's threads are checked at the end with real threads but no timing assertion."""

from __future__ import annotations

import math
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knack311.limiter import INITIAL_LIMIT, ConcurrencyLimit, ESBGate, Outcome
from tests.esb_model import FakeClock, Model

MAX_IN_FLIGHT = 32  # ESB_MAX_IN_FLIGHT's default
KNACK_RATE = 9.5    # KNACK_MAX_RPS's default: records/s


def adaptive(clock: FakeClock, **kwargs) -> ConcurrencyLimit:
    kwargs.setdefault("rate_ceiling", KNACK_RATE)
    kwargs.setdefault("timeout", 30.0)
    return ConcurrencyLimit(kwargs.pop("maximum", MAX_IN_FLIGHT), clock=clock, **kwargs)


def answer(limit: ConcurrencyLimit, clock: FakeClock, latency: float, outcome: Outcome = Outcome.ANSWERED):
    """One POST from start to end, `latency` later on the fake clock."""
    ticket = limit.start()
    clock.now += latency
    limit.finish(ticket, latency, outcome)


def round_trip(limit: ConcurrencyLimit, clock: FakeClock, latency: float) -> None:
    """As many POSTs as the limit allows, all answered `latency` later."""
    tickets = [limit.start() for _ in range(limit.limit)]
    clock.now += latency
    for ticket in tickets:
        limit.finish(ticket, latency, Outcome.ANSWERED)


# --- one answer at a time ------------------------------------------------------------------------------------------

def test_starts_at_two_seconds_of_knacks_pace_and_a_fixed_limit_moves_only_for_late_answers():
    clock = FakeClock()
    assert adaptive(clock).limit == 2 * math.ceil(KNACK_RATE) == 20  # what the pacer lets start in two seconds
    assert adaptive(clock, rate_ceiling=None).limit == INITIAL_LIMIT == 20
    assert adaptive(clock, rate_ceiling=2.0).limit == 4  # KNACK_MAX_RPS=2: more could only wait in the pacer
    assert adaptive(clock, rate_ceiling=0.3).limit == 2
    assert adaptive(clock, maximum=8).limit == 8
    fixed = ConcurrencyLimit(8, adaptive=False, clock=clock, timeout=5.0)
    for outcome in Outcome:
        if outcome is not Outcome.TIMEOUT:
            answer(fixed, clock, 4.0, outcome)  # slow answers in time and errors leave a fixed number alone
    assert (fixed.limit, fixed.low, fixed.high) == (8, 8, 8)
    answer(fixed, clock, 5.0, Outcome.TIMEOUT)  # ... but after a timeout it goes one at a time
    assert fixed.limit == 1
    answer(fixed, clock, 1.0, Outcome.ANSWERED)  # until an answer comes in time
    assert (fixed.limit, fixed.low, fixed.high) == (8, 1, 8)
    answer(fixed, clock, 12.0, Outcome.ANSWERED)  # an answer after ESB_TIMEOUT (a re-post's wait) is like one
    assert fixed.limit == 1


def test_the_gate_holds_posts_at_the_limit():
    clock = FakeClock()
    limit = adaptive(clock)
    tickets = [limit.start() for _ in range(limit.limit)]
    assert not limit.may_start() and limit.in_flight == 20
    limit.finish(tickets[0], 0.0, Outcome.STOPPED)  # a POST cut short by the stop tells nothing about the ESB
    assert limit.may_start() and limit.limit == 20


def test_a_timeout_drops_to_one_until_an_answer_comes_in_time():
    clock = FakeClock()
    changes: list[tuple[int, int, str]] = []
    limit = adaptive(clock, timeout=5.0, initial=2, on_change=lambda old, new, why: changes.append((old, new, why)))
    answer(limit, clock, 0.5)
    assert limit.limit == 2  # one POST at a time does not use the limit: no reason to raise it
    for _ in range(3):  # the limit is used and the answers are fast: it grows
        round_trip(limit, clock, 0.5)
    grown = limit.limit
    assert grown > 4
    tickets = [limit.start() for _ in range(grown)]
    clock.now += 5.0
    limit.finish(tickets[0], 5.0, Outcome.TIMEOUT)
    assert limit.limit == 1 and changes[-1] == (grown, 1, "timeout")
    for ticket in tickets[1:]:  # the others answer late, or time out too: still one at a time
        limit.finish(ticket, 6.0, Outcome.ANSWERED if ticket.in_flight % 2 else Outcome.TIMEOUT)
    assert limit.limit == 1
    answer(limit, clock, 6.0)  # an answer after ESB_TIMEOUT is no sign of health
    assert limit.limit == 1
    answer(limit, clock, 0.5)  # in time: it may grow again
    for _ in range(3):
        round_trip(limit, clock, 0.5)
    assert 1 < limit.limit <= grown
    assert (limit.low, limit.high) == (1, max(grown, limit.high))


def test_an_answer_after_esb_timeout_drops_to_one_like_a_timeout():
    clock = FakeClock()
    changes: list[tuple[int, int, str]] = []
    limit = adaptive(clock, timeout=5.0, on_change=lambda old, new, why: changes.append((old, new, why)))
    answer(limit, clock, 7.0)  # a re-post, waiting 3 x ESB_TIMEOUT, was answered after 7 s
    assert limit.limit == 1 and changes == [(20, 1, "answer after ESB_TIMEOUT")]
    answer(limit, clock, 7.5)
    assert limit.limit == 1
    answer(limit, clock, 0.5)  # in time again: it grows from one
    for _ in range(3):
        round_trip(limit, clock, 0.5)
    assert limit.limit > 4


@pytest.mark.parametrize("outcome", [Outcome.SERVER_ERROR, Outcome.DROPPED, Outcome.UNREACHABLE])
def test_a_5xx_or_a_dropped_connection_cuts_the_limit_once_per_round(outcome):
    clock = FakeClock()
    limit = adaptive(clock)
    for _ in range(3):
        round_trip(limit, clock, 0.5)
    before = limit.limit
    tickets = [limit.start() for _ in range(before)]
    for ticket in tickets:  # a burst of errors from POSTs that started under the same limit: one cut, not many
        limit.finish(ticket, 0.3, outcome)
    assert limit.limit == int(before * 0.75)


def test_latency_above_the_minimum_shrinks_the_limit():
    clock = FakeClock()
    limit = adaptive(clock, rate_ceiling=None)
    for _ in range(3):
        round_trip(limit, clock, 1.0)
    before = limit.limit
    assert before >= 8
    for _ in range(3):  # the same in flight now take twice as long: half of them waited
        round_trip(limit, clock, 2.0)
    assert limit.limit <= before // 2 + 1


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=MAX_IN_FLIGHT),
       st.lists(st.tuples(st.sampled_from(list(Outcome)), st.floats(min_value=0.0, max_value=60.0),
                          st.integers(min_value=0, max_value=40)), max_size=200))
def test_never_above_esb_max_in_flight_nor_below_one(maximum, steps):
    clock = FakeClock()
    limit = ConcurrencyLimit(maximum, rate_ceiling=None, timeout=30.0, clock=clock)
    in_flight = []
    for outcome, latency, starts in steps:
        for _ in range(starts):
            if limit.may_start():
                in_flight.append(limit.start())
        assert limit.in_flight <= maximum
        if in_flight:
            clock.now += latency
            limit.finish(in_flight.pop(0), latency, outcome)
        assert 1 <= limit.limit <= maximum and 1 <= limit.low <= limit.high <= maximum


# --- a run, in the model ----------------------------------------------------------------------------------------

LATENCIES = [0.2, 1.0, 1.5, 3.0]


@pytest.mark.parametrize("latency", LATENCIES)
def test_grows_to_what_knacks_pace_needs_at_a_fixed_latency(latency):
    clock = FakeClock()
    limit = adaptive(clock)
    measured = Model(limit, clock, latency=latency).run(3000)
    needed = KNACK_RATE * latency  # Little's law: POSTs in flight for 9.5 records a second
    assert needed <= limit.limit <= min(MAX_IN_FLIGHT, needed * 1.1 + 2)
    assert measured.peak_in_flight <= limit.high <= MAX_IN_FLIGHT
    assert measured.per_second >= 0.95 * KNACK_RATE
    # fast: within 4 round trips
    assert measured.limit_at(4 * latency + 0.01) >= min(limit.limit, int(needed))


def test_at_1_5_seconds_about_15_and_well_under_32():
    clock = FakeClock()
    limit = adaptive(clock)
    Model(limit, clock, latency=1.5).run(1000)
    assert 14 <= limit.limit <= 17 and limit.high <= 20  # 20: where it started


def test_holds_near_the_capacity_of_an_esb_that_queues():
    """An ESB that works on 4 messages at once for 1 s each and queues the rest: nearly all it can take, and the
    queue stays short."""
    clock = FakeClock()
    limit = adaptive(clock)
    measured = Model(limit, clock, latency=1.0, capacity=4).run(300)
    assert measured.per_second >= 0.9 * 4 / 1.0
    assert measured.wait_p90() <= 0.3
    # the first round's 16 beyond the ESB's 4 wait up to 4 s; the slots of its first answers (too few for a round
    # trip of 20) stay empty, so no later POST waits behind that queue
    assert max(measured.queue_waits[:20]) == pytest.approx(4.0) and max(measured.queue_waits[20:]) <= 2.0
    assert limit.high <= 20 and limit.limit <= 5  # 20: where it started


@pytest.mark.parametrize("latency", LATENCIES)
def test_after_slow_start_holds_near_the_capacity_whatever_the_latency(latency):
    """The same ESB at other speeds. Slow start (four times more per round trip) overshoots once before the first
    queued answer comes back: judged after it, the queue stays short."""
    clock = FakeClock()
    limit = adaptive(clock)
    model = Model(limit, clock, latency=latency, capacity=4)
    measured = model.run(int(300 / latency))
    capacity = min(4 / latency, KNACK_RATE)  # at 0.2 s Knack's pace is the bottleneck, not the ESB
    assert measured.per_second >= 0.9 * capacity
    # four answers per round trip are too few for 20 in flight to be worked on at once: no growth beyond the start
    assert limit.high == 20
    settled = [wait for at, wait in zip(model.posted_at, measured.queue_waits, strict=True) if at > 10 * latency]
    assert sorted(settled)[int(0.9 * len(settled))] <= 0.3 * latency


def test_an_esb_at_its_capacity_is_probed_ever_more_rarely_and_more_capacity_is_found():
    clock = FakeClock()
    limit = adaptive(clock)
    model = Model(limit, clock, latency=1.0, capacity=4)
    more_at = 300.0  # then the ESB gets four more workers

    def more_workers():
        model.capacity = 8
        model._servers_free_at.extend([more_at] * 4)

    model._at(more_at, more_workers)
    measured = model.run(2000)
    before = [(at, n) for at, n in measured.limits if 5.0 < at < more_at]
    probes = [at for (_, low), (at, high) in zip(before, before[1:], strict=False) if high > low]
    # at a fifth of a POST per round trip a probe would come every 5-10 s; halved after each that found the
    # queue again, they come ever further apart
    assert 3 <= len(probes) <= 12, probes
    gaps = [b - a for a, b in zip(probes, probes[1:], strict=False)]
    assert gaps == sorted(gaps) and gaps[-1] >= 3 * gaps[0], gaps
    waited = [wait for at, wait in zip(model.posted_at, measured.queue_waits, strict=True) if 20.0 < at < more_at]
    assert sum(1 for wait in waited if wait > 0.3) <= 0.05 * len(waited)
    assert limit.limit >= 7  # the new workers were found (and used: the rest of the backlog went at about 8/s)
    assert max(n for at, n in measured.limits if at > more_at) >= 7


def test_a_fixed_eight_queues_at_that_esb():
    """What the adaptive limit is for: eight at once keep four waiting."""
    clock = FakeClock()
    measured = Model(ConcurrencyLimit(8, adaptive=False, clock=clock), clock, latency=1.0, capacity=4,
                     workers=8).run(300)
    assert measured.wait_p90() > 0.5


def test_an_esb_answering_after_the_timeout_gets_one_post_at_a_time_until_it_recovers():
    clock = FakeClock()
    limit = adaptive(clock, timeout=5.0)
    slow_until = 60.0
    measured = Model(limit, clock, latency=lambda now: 7.0 if now < slow_until else 1.0, timeout=5.0).run(300)
    first = limit.high  # the first round, started together, all time out
    assert measured.in_flight_at_timeouts[:first] == list(range(first, 0, -1))
    assert max(measured.in_flight_at_timeouts[first:]) == 1  # then one at a time
    assert measured.timeouts <= first + slow_until / 5.0
    assert limit.low == 1
    assert limit.limit >= 4  # recovered once the ESB answered in time again (and still growing)
    assert measured.done == 300 - measured.timeouts


# --- the gate, with threads ---------------------------------------------------------------------------------------

class _Stop:
    def __init__(self):
        self.working = True

    def work_time_left(self) -> bool:
        return self.working


def test_the_gate_never_lets_more_than_the_limit_through_and_gives_up_when_the_run_stops():
    stop = _Stop()
    gate = ESBGate(ConcurrencyLimit(3, adaptive=False), stop)
    inside, peak, lock = [0], [0], threading.Lock()
    proceed = threading.Event()
    results: list[bool] = []

    def worker():
        ticket = gate.take()
        results.append(ticket is not None)
        if ticket is None:
            return
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        proceed.wait(10)
        with lock:
            inside[0] -= 1
        gate.give_back(ticket, 0.1, Outcome.ANSWERED)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    while gate.limit.in_flight < 3:
        threading.Event().wait(0.01)
    stop.working = False  # the five waiting give up; the three inside finish
    proceed.set()
    for thread in threads:
        thread.join(10)
    assert peak[0] == 3
    assert sorted(results) == [False] * 5 + [True] * 3
    assert gate.limit.in_flight == 0 and gate.used() == (3, 3)

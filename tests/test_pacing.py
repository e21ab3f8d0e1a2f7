"""The Knack pacer with a fake clock: its pace per second, other clients, 429s, the daily budget, stop and deadline."""

from __future__ import annotations

import math
import random
import threading
import time

import pytest

from knack311.pacing import (
    DEFAULT_MAX_RPS,
    DailyBudgetSpent,
    DeadlineReached,
    Pacer,
    StopRequested,
)

EPOCH = 1_790_000_000.0  # wall clock at the start of each test


class FakeTime:
    """One fake clock: monotonic and wall time move together, only when someone waits."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return EPOCH + (self.now - 1000.0)


class FakeStop:
    """The run's Stop: wait() advances the fake clock; the stop fires at `stop_at` (fake monotonic time)."""

    def __init__(self, clock: FakeTime, *, deadline: float = math.inf, stop_at: float = math.inf):
        self.clock = clock
        self.deadline = deadline
        self.stop_at = stop_at
        self.waits: list[float] = []

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        if self.clock.now + seconds >= self.stop_at:
            self.clock.now = max(self.clock.now, self.stop_at)
            return True
        self.clock.now += seconds
        return False

    def remaining(self) -> float:
        return self.deadline - self.clock.now


def make(max_rps: float = DEFAULT_MAX_RPS, **kwargs) -> tuple[Pacer, FakeTime, FakeStop]:
    clock = FakeTime()
    stop = kwargs.pop("stop", None) or FakeStop(clock, **{k: kwargs.pop(k) for k in ("deadline", "stop_at")
                                                           if k in kwargs})
    stop.clock = clock
    return Pacer(max_rps, stop=stop, clock=clock.monotonic, wall_clock=clock.wall, **kwargs), clock, stop


def rate_headers(remaining: int, reset_in: float = 1.0, limit: int = 10, wall: float = EPOCH) -> dict[str, str]:
    return {"X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": str(math.ceil(wall + reset_in))}


def plan_headers(remaining: int, limit: int = 10_000, reset: str = "") -> dict[str, str]:
    return {"X-PlanLimit-Limit": str(limit), "X-PlanLimit-Remaining": str(remaining),
            "X-PlanLimit-Reset": reset or str(int(EPOCH) + 3600)}


# ----- spacing -----


def test_a_quiet_pacer_lets_a_seconds_worth_start_at_once_and_no_more():
    pacer, clock, _ = make(10.0)

    starts = []
    for _ in range(25):
        pacer.before_request()
        starts.append(round(clock.now - 1000.0, 6))

    assert starts == [0.0] * 10 + [1.0] * 10 + [2.0] * 5
    assert pacer.requests == 25


def test_at_the_default_rate_no_second_holds_more_than_knacks_ten_whatever_the_gaps():
    pacer, clock, _ = make()
    gaps = random.Random(12)
    starts = []
    for _ in range(300):
        pacer.before_request()
        starts.append(clock.now)
        if gaps.random() < 0.2:
            clock.now += gaps.choice([0.01, 0.1, 0.3, 0.7, 1.5])  # a quiet spell: waiting for ESB answers

    # Knack counts a second; an arrival up to 50 ms late must not put an eleventh request into anyone's second
    assert min(later - earlier for earlier, later in zip(starts, starts[10:], strict=False)) >= 1.05
    # and without gaps the pace is the rate: ten starts per 10/9.5 s
    pacer, clock, _ = make()
    for _ in range(100):
        pacer.before_request()
    assert clock.now - 1000.0 == pytest.approx(9 * 10 / DEFAULT_MAX_RPS)


def test_time_spent_elsewhere_counts_toward_the_spacing():
    pacer, clock, stop = make(2.0)
    pacer.before_request()
    clock.now += 5.0  # the request and its processing took long

    pacer.before_request()

    assert stop.waits == []


def test_the_default_rate_is_under_knacks_limit_and_above_the_old_default():
    assert 8 < DEFAULT_MAX_RPS < 10


# ----- other clients and 429s -----


def test_other_clients_using_the_second_slow_the_pacer_down_and_it_recovers():
    pacer, clock, _ = make()
    # Alone: Knack's count for the second is our own requests (all of them started within this second).
    for _ in range(3):
        ticket = pacer.before_request()
        pacer.after_answer(200, rate_headers(10 - pacer.requests), ticket)
    assert pacer.current_rps == pytest.approx(DEFAULT_MAX_RPS)

    # Other clients used four requests of the second, as two answers in a row show.
    for _ in range(2):
        ticket = pacer.before_request()
        pacer.after_answer(200, rate_headers(10 - pacer.requests - 4), ticket)
    slowed = pacer.current_rps
    assert slowed == pytest.approx((10 - 4) * DEFAULT_MAX_RPS / 10)

    # while others use the second, one at a time, 1/rate apart (a burst would take their room)
    starts = []
    for _ in range(4):
        pacer.before_request()
        starts.append(clock.now)
    assert [b - a for a, b in zip(starts, starts[1:], strict=False)] == pytest.approx([1 / slowed] * 3)

    clock.now += 3.0  # the others are gone: nothing new says otherwise
    assert pacer.current_rps == pytest.approx(DEFAULT_MAX_RPS)
    before = clock.now
    for _ in range(10):
        pacer.before_request()
    assert clock.now == before  # and a quiet second may be used at once again


@pytest.mark.parametrize("others", [0, 4, 10], ids=["alone", "others-use-4", "others-use-the-second"])
def test_a_max_rps_below_one_is_kept_once_knacks_headers_are_seen(others):
    """KNACK_MAX_RPS=0.3: the header-aware floor (MIN_RPS) must not raise the operator's limit to 1 a second."""
    pacer, clock, _ = make(0.3)
    starts = []
    for _ in range(4):
        ticket = pacer.before_request()
        starts.append(clock.now)
        pacer.after_answer(200, rate_headers(max(0, 10 - 1 - others)), ticket)

    assert pacer.current_rps == pytest.approx(0.3)
    assert [round(b - a, 6) for a, b in zip(starts, starts[1:], strict=False)] == [round(1 / 0.3, 6)] * 3


def test_a_single_odd_answer_does_not_slow_the_pacer_down():
    pacer, _, _ = make()
    ticket = pacer.before_request()

    pacer.after_answer(200, rate_headers(10 - 1 - 3), ticket)  # one answer shows three "others": timing noise

    assert pacer.current_rps == pytest.approx(DEFAULT_MAX_RPS)


def test_after_a_429_nothing_starts_until_the_reset():
    pacer, clock, stop = make()
    ticket = pacer.before_request()
    clock.now += 0.3  # EPOCH + 0.3: the second resets at EPOCH + 1

    pacer.after_answer(429, rate_headers(0, reset_in=1.0), ticket)
    pacer.before_request()

    assert pacer.throttled == 1
    assert clock.wall() == pytest.approx(EPOCH + 1.0)
    assert stop.waits == [pytest.approx(0.7)]


@pytest.mark.parametrize("headers", [{}, {"X-RateLimit-Reset": "garbage"}, {"X-RateLimit-Reset": str(EPOCH + 3600)},
                                     {"X-RateLimit-Reset": str(EPOCH - 5)}],
                         ids=["none", "garbage", "far-future", "past"])
def test_a_429_without_a_usable_reset_waits_one_second(headers):
    pacer, clock, _ = make()
    ticket = pacer.before_request()

    pacer.after_answer(429, headers, ticket)
    started = clock.now
    pacer.before_request()

    assert clock.now - started == pytest.approx(1.0)


def test_a_429_while_a_thread_waits_for_its_slot_pushes_that_slot_back():
    clock = FakeTime()
    pacer_box = {}

    class AnswerArrivesWhileWaiting(FakeStop):
        def wait(self, seconds):
            if not self.waits:  # another thread's request is answered 429 during this first wait
                pacer_box["pacer"].after_answer(429, rate_headers(0, reset_in=1.5), pacer_box["ticket"])
            return super().wait(seconds)

    stop = AnswerArrivesWhileWaiting(clock)
    pacer = Pacer(1.0, stop=stop, clock=clock.monotonic, wall_clock=clock.wall)
    pacer_box.update(pacer=pacer, ticket=pacer.before_request())

    pacer.before_request()

    assert clock.wall() == pytest.approx(EPOCH + 2.0)  # not at its slot (EPOCH + 1), after the reset


# ----- stop and deadline -----


def test_a_stop_during_a_wait_raises_and_starts_nothing():
    pacer, clock, _ = make(1.0, stop_at=1000.4)
    pacer.before_request()

    with pytest.raises(StopRequested):
        pacer.before_request()

    assert clock.now == pytest.approx(1000.4)  # woke at the stop, not at the slot
    assert pacer.requests == 1


def test_no_wait_runs_past_the_deadline():
    pacer, clock, stop = make(1.0, deadline=1000.5)
    pacer.before_request()

    with pytest.raises(DeadlineReached):
        pacer.before_request()  # the slot at 1001.0 is after the deadline

    assert clock.now == 1000.0 and stop.waits == []


def test_a_threading_event_is_a_stop_too():
    stop = threading.Event()
    pacer = Pacer(0.5, stop=stop)
    pacer.before_request()
    threading.Timer(0.05, stop.set).start()

    with pytest.raises(StopRequested):
        pacer.before_request()  # would otherwise wait two seconds


@pytest.mark.timing
def test_threads_share_one_pace():
    pacer = Pacer(20.0)
    starts = []
    lock = threading.Lock()

    def worker():
        for _ in range(6):
            ticket = pacer.before_request()
            with lock:
                starts.append(ticket.started)
            pacer.after_answer(200, {}, ticket)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # The pacer lets 20 start in any second and never starts a request before its slot, but a thread can wake
    # late from its wait: what holds whatever the scheduler does is that the k-th start is at least k // 20
    # seconds after the first (which never waits), so no second ever holds more than 20.
    starts.sort()
    assert len(starts) == 48
    first = starts[0]
    assert all(started - first >= k // 20 - 1e-9 for k, started in enumerate(starts))
    assert starts[-1] - first >= 2.0 - 1e-9


# ----- the daily budget -----


def test_the_plan_budget_is_read_from_every_answer():
    pacer, _, _ = make()
    assert pacer.plan().remaining is None and pacer.may_start_record()

    ticket = pacer.before_request()
    pacer.after_answer(200, plan_headers(9_888), ticket)

    budget = pacer.plan()
    assert (budget.limit, budget.remaining, budget.reserve) == (10_000, 9_888, 1_000)
    assert budget.resets_at == int(EPOCH) + 3600
    assert "9888 of 10000" in budget.describe() and "reserve for other users 1000" in budget.describe()


def test_calls_started_since_the_answered_request_count_as_spent():
    pacer, _, _ = make(1000.0)
    first = pacer.before_request()
    pacer.before_request()
    pacer.before_request()  # two more in flight, not yet counted in Knack's figure below

    pacer.after_answer(200, plan_headers(500), first)
    assert pacer.plan().remaining == 498

    pacer.before_request()
    assert pacer.plan().remaining == 497


def test_an_older_answer_arriving_late_does_not_undo_a_newer_figure():
    pacer, _, _ = make(1000.0)
    first, second = pacer.before_request(), pacer.before_request()

    pacer.after_answer(200, plan_headers(400), second)  # others spent 100 meanwhile
    pacer.after_answer(200, plan_headers(499), first)

    assert pacer.plan().remaining == 400


def test_no_record_starts_once_the_budget_would_fall_below_the_default_reserve():
    pacer, _, _ = make()
    ticket = pacer.before_request()
    pacer.after_answer(200, plan_headers(1_002, limit=10_000), ticket)

    assert pacer.may_start_record(1)                    # 1002 - 1 >= 1000
    assert pacer.may_start_record(2)                    # 1002 - 2 >= 1000
    assert not pacer.may_start_record(3)
    assert not pacer.may_start_record(1, in_flight=2)   # the two records in flight will spend theirs too


def test_a_configured_reserve_replaces_the_ten_percent():
    pacer, _, _ = make(plan_reserve=0)
    ticket = pacer.before_request()
    pacer.after_answer(200, plan_headers(1, limit=1_000), ticket)

    assert pacer.plan().reserve == 0
    assert pacer.may_start_record(1) and not pacer.may_start_record(2)


@pytest.mark.parametrize("reset, expected", [
    (str(int(EPOCH) + 7200), EPOCH + 7200),              # epoch seconds, as Knack's docs say
    ("57413141", EPOCH + 57413.141),                     # milliseconds until the reset, as real apps answer
    (str(int((EPOCH + 60) * 1000)), EPOCH + 60),          # epoch milliseconds
], ids=["epoch-seconds", "ms-until-reset", "epoch-ms"])
def test_the_plan_reset_is_understood_in_the_forms_knack_uses(reset, expected):
    pacer, _, _ = make()
    ticket = pacer.before_request()

    pacer.after_answer(200, plan_headers(10, reset=reset), ticket)

    assert pacer.plan().resets_at == pytest.approx(expected)


def test_a_spent_budget_stops_requests_until_it_resets():
    pacer, clock, _ = make()
    ticket = pacer.before_request()
    pacer.after_answer(429, {**rate_headers(9), **plan_headers(0, limit=1_000)}, ticket)

    with pytest.raises(DailyBudgetSpent) as raised:
        pacer.before_request()
    assert "daily Knack calls left: 0 of 1000" in str(raised.value)
    assert not pacer.may_start_record()

    clock.now += 3600  # the reset time passes
    assert pacer.may_start_record()  # unknown again until the next answer
    pacer.before_request()


def test_answers_without_headers_change_nothing():
    pacer, clock, _ = make()
    ticket = pacer.before_request()

    pacer.after_answer(None, None, ticket)  # no answer at all
    pacer.after_answer(200, {"X-PlanLimit-Remaining": "lots"})

    assert pacer.plan().remaining is None and pacer.current_rps == DEFAULT_MAX_RPS


@pytest.mark.timing
def test_real_clock_default_stop_sleeps():
    pacer = Pacer(5.0)
    started = time.monotonic()
    for _ in range(6):
        pacer.before_request()
    assert time.monotonic() - started >= 1.0  # five a second: the sixth waited (sleep never ends early)


# ----- with the Knack simulator (real HTTP, real clock) -----


@pytest.mark.slow
@pytest.mark.timing
def test_against_the_simulator_the_pacer_leaves_the_others_their_share_and_tracks_the_plan():
    import requests

    from config import CONFIG
    from simulators.activities import app_metadata
    from simulators.knack_api import KnackSimulator

    app_id = "6a1b2c3d4e5f60718293a4b5"
    metadata = app_metadata("data-tracker", CONFIG["data-tracker"], app_id=app_id)
    with KnackSimulator(app_id=app_id, api_key="key", metadata=metadata, rate_limit=10.0, other_clients_rps=4.0,
                        plan_limit=5_000, plan_used=1_000) as knack:
        knack.latency = 0.05
        pacer = Pacer()
        statuses = []
        lock = threading.Lock()

        def worker():
            with requests.Session() as session:
                for _ in range(5):
                    ticket = pacer.before_request()
                    answer = session.get(f"{knack.url}/applications/{app_id}", timeout=5)
                    pacer.after_answer(answer.status_code, answer.headers, ticket)
                    with lock:
                        statuses.append(answer.status_code)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert len(statuses) == 20 and statuses.count(429) == pacer.throttled <= 5
        assert pacer.current_rps < DEFAULT_MAX_RPS - 2  # it saw the others' four a second
        budget = pacer.plan()
        assert (budget.limit, budget.reserve) == (5_000, 500)
        assert abs(budget.remaining - knack.plan_remaining()) <= 2

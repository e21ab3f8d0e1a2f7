"""The ordering scheduler on its own: 311's order per service request, whatever the pages and completions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knack311.schedule import HeldReason, Scheduler


def started_ids(scheduler: Scheduler) -> list[str]:
    return [record.record_id for record in scheduler.ready()]


def test_different_service_requests_start_together_one_activity_each():
    scheduler = Scheduler()
    scheduler.add("a1", "SR-A", 1)
    scheduler.add("b1", "SR-B", 2)
    scheduler.add("a2", "SR-A", 3)
    scheduler.listed_all()

    assert started_ids(scheduler) == ["a1", "b1"]
    assert started_ids(scheduler) == []  # a2 waits for a1
    scheduler.done("a1", failed=False)
    assert started_ids(scheduler) == ["a2"]
    assert (scheduler.waiting, scheduler.in_flight) == (0, 2)


def test_activities_of_one_sr_start_in_key_order_whatever_the_arrival_order():
    scheduler = Scheduler()
    scheduler.add("third", "SR", 30)
    scheduler.add("first", "SR", 10)
    scheduler.add("second", "SR", 20)
    scheduler.listed_all()

    order = []
    while True:
        batch = started_ids(scheduler)
        if not batch:
            break
        order += batch
        scheduler.done(batch[0], failed=False)

    assert order == ["first", "second", "third"]


def test_a_failure_holds_the_later_activities_of_its_sr_only():
    scheduler = Scheduler()
    for record_id, sr, key in [("a1", "A", 1), ("b1", "B", 2), ("a2", "A", 3), ("a3", "A", 4), ("b2", "B", 5)]:
        scheduler.add(record_id, sr, key)
    scheduler.listed_all()
    assert started_ids(scheduler) == ["a1", "b1"]

    scheduler.done("a1", failed=True)
    scheduler.done("b1", failed=False)

    assert started_ids(scheduler) == ["b2"]
    held = scheduler.take_held()
    assert [(h.record.record_id, h.reason) for h in held] == [("a2", HeldReason.AFTER_FAILURE),
                                                              ("a3", HeldReason.AFTER_FAILURE)]
    assert scheduler.take_held() == []  # reported once


def test_an_already_delivered_record_still_gets_its_status_update_after_a_failure():
    scheduler = Scheduler()
    scheduler.add("a1", "A", 1)
    scheduler.add("a2", "A", 2)
    scheduler.add("a3", "A", 3, already_delivered=True)
    scheduler.add("a4", "A", 4)
    scheduler.listed_all()
    assert started_ids(scheduler) == ["a1"]

    scheduler.done("a1", failed=True)

    assert started_ids(scheduler) == ["a3"]
    assert [h.record.record_id for h in scheduler.take_held()] == ["a2"]
    scheduler.done("a3", failed=False)
    assert started_ids(scheduler) == []
    assert [h.record.record_id for h in scheduler.take_held()] == ["a4"]


def test_records_arriving_on_a_later_page_wait_for_their_srs_activity_in_flight():
    scheduler = Scheduler()
    scheduler.add("a1", "A", 1)
    scheduler.listed_through(1)
    assert started_ids(scheduler) == ["a1"]

    scheduler.add("a2", "A", 7)  # a later page, while a1 is still with the ESB
    scheduler.add("c1", "C", 8)
    scheduler.listed_all()

    assert started_ids(scheduler) == ["c1"]
    scheduler.done("a1", failed=False)
    assert started_ids(scheduler) == ["a2"]


def test_records_arriving_after_their_sr_failed_are_held():
    scheduler = Scheduler()
    scheduler.add("a1", "A", 1)
    scheduler.listed_all()
    scheduler.ready()
    scheduler.done("a1", failed=True)
    assert scheduler.ready() == []

    scheduler.add("a2", "A", 5)
    scheduler.add("a3", "A", 6, already_delivered=True)

    assert started_ids(scheduler) == ["a3"]
    assert [(h.record.record_id, h.reason) for h in scheduler.take_held()] == [("a2", HeldReason.AFTER_FAILURE)]


def test_nothing_with_an_sr_starts_beyond_the_keys_listed_so_far():
    scheduler = Scheduler()
    scheduler.add("a5", "A", 5)
    scheduler.add("b9", "B", 9)
    scheduler.add("loose", "", 12)  # no SR: no order to keep

    assert started_ids(scheduler) == ["loose"]  # nothing listed yet
    scheduler.listed_through(6)
    assert started_ids(scheduler) == ["a5"]
    scheduler.listed_through(4)  # never goes back
    scheduler.add("a3", "A", 3)  # a shifted page brought an earlier activity: it must not be overtaken
    scheduler.done("a5", failed=False)
    assert started_ids(scheduler) == []
    assert [(h.record.record_id, h.reason) for h in scheduler.take_held()] == [("a3", HeldReason.LATE)]
    scheduler.listed_through(9)
    assert started_ids(scheduler) == ["b9"]


def test_gated_records_of_an_sr_wait_behind_an_earlier_unlisted_one():
    scheduler = Scheduler()
    scheduler.add("a2", "A", 2)
    scheduler.add("a9", "A", 9)
    scheduler.listed_through(5)

    assert started_ids(scheduler) == ["a2"]
    scheduler.done("a2", failed=False)
    assert started_ids(scheduler) == []
    scheduler.listed_through(9)
    assert started_ids(scheduler) == ["a9"]


def test_seen_records_are_passed_over():
    scheduler = Scheduler()
    assert scheduler.add("r1", "A", 1)
    scheduler.listed_all()
    scheduler.ready()
    scheduler.done("r1", failed=True)

    assert scheduler.seen("r1") and not scheduler.seen("r2")
    assert not scheduler.add("r1", "A", 1)  # still READY_TO_SEND in Knack, but this run has handled it
    assert scheduler.ready() == [] and scheduler.waiting == 0


def test_records_without_sr_start_at_once_and_a_failure_holds_nothing():
    scheduler = Scheduler()
    scheduler.add("x", "", 5)
    scheduler.add("y", "", 6)

    assert started_ids(scheduler) == ["x", "y"]
    scheduler.done("x", failed=True)
    scheduler.add("z", "", 7)
    assert started_ids(scheduler) == ["z"]
    assert scheduler.take_held() == []


def test_done_of_a_record_not_in_flight_is_a_bug():
    scheduler = Scheduler()
    scheduler.add("r1", "A", 1)
    with pytest.raises(ValueError):
        scheduler.done("r1", failed=False)  # never started
    with pytest.raises(ValueError):
        scheduler.done("unknown", failed=False)


def test_a_record_that_cannot_go_holds_the_later_activities_of_its_sr_once_its_turn_comes():
    scheduler = Scheduler()
    scheduler.add("a1", "A", 1)
    scheduler.add("a2", "A", 2, failed=True)  # e.g. unreadable: the caller reported it already
    scheduler.add("a3", "A", 3)
    scheduler.add("a4", "A", 4, already_delivered=True)
    scheduler.add("b1", "B", 5)
    scheduler.listed_all()

    assert started_ids(scheduler) == ["a1", "b1"]  # a1 goes first: a failure holds only what comes after it
    assert scheduler.waiting == 2  # a3 and a4; a2 is concluded, never waiting
    scheduler.done("a1", failed=False)

    assert started_ids(scheduler) == ["a4"]
    assert [(h.record.record_id, h.reason) for h in scheduler.take_held()] == [("a3", HeldReason.AFTER_FAILURE)]
    assert scheduler.seen("a2") and scheduler.waiting == 0


def test_a_record_that_cannot_go_without_an_sr_holds_nothing():
    scheduler = Scheduler()
    scheduler.add("x", "", 1, failed=True)
    scheduler.add("y", "", 2)

    assert started_ids(scheduler) == ["y"]
    assert scheduler.seen("x") and scheduler.take_held() == [] and scheduler.waiting == 0


def test_a_record_that_cannot_go_arriving_after_its_turn_holds_what_has_not_started():
    scheduler = Scheduler()
    scheduler.add("a5", "A", 5)
    scheduler.listed_through(5)
    assert started_ids(scheduler) == ["a5"]

    scheduler.add("a3", "A", 3, failed=True)  # a shifted page brought it back after a5 started
    scheduler.add("a7", "A", 7)
    scheduler.done("a5", failed=False)
    scheduler.listed_all()

    assert started_ids(scheduler) == []
    assert [(h.record.record_id, h.reason) for h in scheduler.take_held()] == [("a7", HeldReason.AFTER_FAILURE)]


def test_payload_is_handed_back():
    scheduler = Scheduler()
    activity = object()
    scheduler.add("r1", "A", 1, activity)
    scheduler.listed_all()

    [record] = scheduler.ready()

    assert record.payload is activity and record.sr_number == "A" and record.order_key == 1


# ----- properties: whatever the pages, completion order and failures -----

SRS = ["", "A", "B", "C", "D"]


@st.composite
def backlogs(draw):
    """Records with unique keys (atd_activity_id is an auto-increment), each with an SR (or none), an "already
    delivered" flag and, now and then, a "cannot go" flag (unreadable data, found before it could start)."""
    count = draw(st.integers(min_value=0, max_value=30))
    keys = draw(st.permutations(range(count)))
    return [(f"r{key}", draw(st.sampled_from(SRS)), key, draw(st.booleans()),
             draw(st.sampled_from([False, False, False, True]))) for key in keys]


def drive(data, records, *, pages_in_key_order: bool):
    """Feed the records page by page and complete started ones in a random order with random failures.

    Returns the events: ("start", id), ("done", id, failed), ("held", id, reason), plus the listed keys
    at each start, for the invariants to check.
    """
    arrival = sorted(records, key=lambda r: r[2]) if pages_in_key_order else list(records)
    scheduler = Scheduler()
    if not pages_in_key_order:
        scheduler.listed_all()  # a caller breaking the paging contract: the LATE rule still keeps the order
    events = []
    in_flight: list[str] = []
    while arrival or in_flight:
        if arrival and (not in_flight or data.draw(st.booleans(), label="read a page")):
            size = data.draw(st.integers(min_value=1, max_value=len(arrival)), label="page size")
            page, arrival = arrival[:size], arrival[size:]
            for record_id, sr, key, delivered, broken in page:
                assert scheduler.add(record_id, sr, key, already_delivered=delivered, failed=broken)
                assert not scheduler.add(record_id, sr, key)  # a re-read page: passed over
            if pages_in_key_order:
                if arrival:
                    scheduler.listed_through(page[-1][2])
                else:
                    scheduler.listed_all()
        else:
            index = data.draw(st.integers(min_value=0, max_value=len(in_flight) - 1), label="which finishes")
            failed = data.draw(st.booleans(), label="failed")
            record_id = in_flight.pop(index)
            scheduler.done(record_id, failed=failed)
            events.append(("done", record_id, failed))
        for record in scheduler.ready():
            events.append(("start", record.record_id))
            in_flight.append(record.record_id)
        events += [("held", held.record.record_id, held.reason) for held in scheduler.take_held()]
    assert scheduler.waiting == 0 and scheduler.in_flight == 0
    return events


def check_order(records, events):
    info = {record_id: (sr, key, delivered) for record_id, sr, key, delivered, _ in records}
    broken = {record_id for record_id, *_, is_broken in records if is_broken}
    started_keys: dict[str, list[int]] = {}
    failed_srs: set[str] = set()
    running: dict[str, str] = {}
    outcome: dict[str, list[str]] = {}
    for event in events:
        record_id = event[1]
        sr, key, delivered = info[record_id]
        if event[0] == "start":
            outcome.setdefault(record_id, []).append("started")
            if sr:
                assert sr not in running, f"{record_id} started while {running.get(sr)} of {sr} is in flight"
                running[sr] = record_id
                assert not started_keys.get(sr) or started_keys[sr][-1] < key, f"{sr} out of order at {record_id}"
                started_keys.setdefault(sr, []).append(key)
                assert sr not in failed_srs or delivered, f"{record_id} started after a failure of {sr}"
        elif event[0] == "done":
            if sr:
                running.pop(sr)
                if event[2]:
                    failed_srs.add(sr)
        else:
            outcome.setdefault(record_id, []).append("held")
            assert sr, "a record without an SR has no order to keep and is never held"
            if event[2] is HeldReason.AFTER_FAILURE:
                broken_before = any(info[b][0] == sr and info[b][1] < key for b in broken)
                assert (sr in failed_srs or broken_before) and not delivered
            else:  # LATE: a later activity of its SR started, or took its turn and could not go
                assert max(started_keys.get(sr, []) + [info[b][1] for b in broken if info[b][0] == sr]) > key
    # every record is started or held exactly once, except those that cannot go: never handed out nor held
    assert {record_id: len(what) for record_id, what in outcome.items()} == dict.fromkeys(set(info) - broken, 1)
    return outcome


@settings(max_examples=300, deadline=None)
@given(records=backlogs(), data=st.data())
def test_pages_in_key_order_keep_311s_order_and_nothing_is_late(records, data):
    events = drive(data, records, pages_in_key_order=True)
    outcome = check_order(records, events)

    assert not any(event[0] == "held" and event[2] is HeldReason.LATE for event in events)
    broken = {record_id for record_id, *_, is_broken in records if is_broken}
    failed = {event[1] for event in events if event[0] == "done" and event[2]} | broken
    held = {record_id for record_id, what in outcome.items() if what == ["held"]}
    sr_of = {record_id: sr for record_id, sr, *_ in records}
    key_of = {record_id: key for record_id, _, key, *_ in records}
    # nothing is held unless its SR had a failure
    assert all(any(sr_of[f] == sr_of[h] for f in failed) for h in held)
    # a record that cannot go holds every later activity of its SR that was not delivered before
    for record_id, sr, key, delivered, _ in records:
        if sr and not delivered and record_id not in broken and any(sr_of[b] == sr and key_of[b] < key for b in broken):
            assert outcome[record_id] == ["held"], f"{record_id} started after {sr} had a record that cannot go"


@settings(max_examples=300, deadline=None)
@given(records=backlogs(), data=st.data())
def test_any_arrival_order_never_starts_an_sr_out_of_order(records, data):
    events = drive(data, records, pages_in_key_order=False)
    check_order(records, events)


def test_behind_counts_the_activities_of_its_sr_still_waiting():
    scheduler = Scheduler()
    for n, sr in enumerate(["A", "A", "A", "B"]):
        scheduler.add(f"r{n}", sr, n)
    scheduler.listed_all()
    started = {record.record_id: record for record in scheduler.ready()}
    assert set(started) == {"r0", "r3"}
    assert scheduler.behind(started["r0"]) == 2 and scheduler.behind(started["r3"]) == 0
    scheduler.done("r0", failed=False)
    [r1] = scheduler.ready()
    assert scheduler.behind(r1) == 1

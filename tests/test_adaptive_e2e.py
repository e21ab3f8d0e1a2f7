"""Adaptive concurrency towards the ESB (issue 12), end to end: the real command against the simulators.

Without --workers the POSTs in flight follow the ESB's answers (limiter.py): they start at what Knack's pace can
use in two seconds, a fast ESB gets no more than Knack's pace can use, an ESB that answers after ESB_TIMEOUT gets
one at a time; `--workers N` is a fixed number. The summary (text and JSON) gives the range of limits the run
used, and each change is a debug event.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from tests.conftest import statuses

SENT = "SENT"


def in_flight_range(stdout: str) -> tuple[int, int]:
    [summary] = [line for line in stdout.splitlines() if " summary: " in line]
    found = re.search(r" esb_in_flight=(\d+)\.\.(\d+)(?: |$)", summary)
    assert found, summary
    return int(found[1]), int(found[2])


@pytest.mark.timing
def test_the_posts_in_flight_start_at_two_seconds_of_knacks_pace_and_follow_the_esb(knack, esb, seed, run_bridge):
    records = seed(60)  # each its own service request: nothing but the limit holds them back
    esb.latency = 0.3  # Knack's 9.5 records/s need about 3 POSTs in flight

    result = run_bridge("--log-format", "json")

    assert result.returncode == 0, result.output
    assert statuses(knack) == {r["id"]: SENT for r in records}
    assert esb.copies() == Counter({r["id"]: 1 for r in records})
    events = [json.loads(line) for line in result.stdout.splitlines()]
    summary = events[-1]
    assert summary["event"] == "summary"
    low, high = summary["esb_in_flight"]
    assert high == 20 and esb.peak_in_flight <= high  # 20: what the pacer lets start in two seconds
    # then what Knack's pace can use: 9.5/s x 0.3 s x 1.1 + 1 = 5 (9 leaves room for a busy machine's latency)
    assert low <= 9
    changes = [e for e in events if e["event"] == "esb_in_flight"]
    assert changes and {e["level"] for e in changes} == {"debug"}
    assert min(e["esb_in_flight"] for e in changes) == low


def test_workers_n_is_a_fixed_number_in_flight(knack, esb, seed, run_bridge):
    records = seed(12)
    esb.latency = 0.3

    result = run_bridge("--workers", "3")

    assert result.returncode == 0, result.output
    assert esb.peak_in_flight == 3
    assert in_flight_range(result.stdout) == (3, 3)
    assert esb.copies() == Counter({r["id"]: 1 for r in records})


@pytest.mark.timing
def test_an_esb_answering_after_the_timeout_gets_one_round_then_one_at_a_time(knack, esb, seed, run_bridge):
    records = seed(24)
    esb.inject(delay=2.5, count=100)  # it takes every message and answers after ESB_TIMEOUT

    result = run_bridge(env={"ESB_TIMEOUT": "1"})

    assert result.returncode == 1, result.output
    stop_line = result.stdout.splitlines()[-1]
    assert "not answering" in stop_line
    # the first round (20, started together) all time out; after the first timeout one at a time, so the stop
    # comes with the first round's answers missing (one more may have begun as a slot came back, before the stop
    # was decided)
    assert 20 <= len(esb.received) <= 21, [r.record_id for r in esb.received]
    assert in_flight_range(result.stdout) == (1, 20)
    assert f"{len(esb.received)} message(s) left in doubt" in stop_line, stop_line
    assert all(status == "READY_TO_SEND" for status in statuses(knack).values()) and len(records) == 24


@pytest.mark.timing
def test_after_a_first_round_left_in_doubt_the_next_run_settles_it_and_starts_new_records_one_at_a_time(
        knack, esb, seed, run_bridge):
    """The start at 20 is for a run that follows a healthy one: the run after a first round left in doubt posts
    those again first, alone, and as their answers come late, starts new records one at a time."""
    seed(26)
    esb.latency = 0.7  # it takes every message and answers after ESB_TIMEOUT (scaled down: 7 s against 5 s)
    slow = {"ESB_TIMEOUT": "0.5"}

    first = run_bridge(env=slow)
    assert first.returncode == 1, first.output
    first_round = Counter(r.record_id for r in esb.received)
    assert 20 <= len(first_round) <= 21 and max(first_round.values()) == 1, first_round

    before = len(esb.received)
    second = run_bridge(env=slow)
    assert second.returncode == 1, second.output
    later = esb.received[before:]
    reposts = [r for r in later if r.record_id in first_round]
    new = [r for r in later if r.record_id not in first_round]
    # every message in doubt went again, alone (each after the last one's answer), and its late answer settled it
    assert {r.record_id for r in reposts} == set(first_round)
    assert all(b.at >= a.answered_at - 0.05 for a, b in zip(reposts, reposts[1:], strict=False))
    assert all(statuses(knack)[rid] == SENT for rid in first_round)
    # then the new ones one at a time: each starts once the one before got its answer or gave up, not with it
    assert new, second.output
    assert all(b.at - a.at >= 0.4 for a, b in zip(new, new[1:], strict=False)), [r.at for r in new]
    copies = Counter(r.record_id for r in esb.received)
    assert max(copies.values()) <= 2 and all(copies[rid] == 1 for rid in {r.record_id for r in new})


"""Adaptive concurrency towards the ESB (issue 12), end to end: the real command against the simulators.

Without --workers the POSTs in flight follow the ESB's answers (limiter.py): a slow ESB gets more at once, an ESB
that answers after ESB_TIMEOUT gets one at a time; `--workers N` is a fixed number. The summary (text and JSON)
gives the range of limits the run used, and each change is a debug event.
"""

from __future__ import annotations

import json
import re
from collections import Counter

from tests.conftest import statuses

SENT = "SENT"


def in_flight_range(stdout: str) -> tuple[int, int]:
    [summary] = [line for line in stdout.splitlines() if " summary: " in line]
    found = re.search(r" esb_in_flight=(\d+)\.\.(\d+)(?: |$)", summary)
    assert found, summary
    return int(found[1]), int(found[2])


def test_a_slow_esb_gets_more_posts_in_flight_than_the_start(knack, esb, seed, run_bridge):
    records = seed(50)  # each its own service request: nothing but the limit holds them back
    esb.latency = 1.0  # Knack's 9.5 records/s need about 10 POSTs in flight

    result = run_bridge("--log-format", "json")

    assert result.returncode == 0, result.output
    assert statuses(knack) == {r["id"]: SENT for r in records}
    assert esb.copies() == Counter({r["id"]: 1 for r in records})
    events = [json.loads(line) for line in result.stdout.splitlines()]
    summary = events[-1]
    assert summary["event"] == "summary"
    low, high = summary["esb_in_flight"]
    assert low == 2 and esb.peak_in_flight <= high <= 32
    assert esb.peak_in_flight >= 6  # it grew from 2
    changes = [e for e in events if e["event"] == "esb_in_flight"]
    assert changes and {e["level"] for e in changes} == {"debug"}
    assert max(e["esb_in_flight"] for e in changes) == high


def test_workers_n_is_a_fixed_number_in_flight(knack, esb, seed, run_bridge):
    records = seed(12)
    esb.latency = 0.3

    result = run_bridge("--workers", "3")

    assert result.returncode == 0, result.output
    assert esb.peak_in_flight == 3
    assert in_flight_range(result.stdout) == (3, 3)
    assert esb.copies() == Counter({r["id"]: 1 for r in records})


def test_an_esb_answering_after_the_timeout_gets_few_copies_in_doubt(knack, esb, seed, run_bridge):
    records = seed(24)
    esb.inject(delay=2.5, count=100)  # it takes every message and answers after ESB_TIMEOUT

    result = run_bridge(env={"ESB_TIMEOUT": "1"})

    assert result.returncode == 1, result.output
    assert "not answering" in result.stdout.splitlines()[-1]
    # two at the start; after the first timeout one at a time, so the third timeout in a row comes at the 3rd
    # POST (a 4th may have begun as the 3rd gave its slot back, before the stop was decided)
    assert 3 <= len(esb.received) <= 4, [r.record_id for r in esb.received]
    assert in_flight_range(result.stdout) == (1, 2)
    assert all(status == "READY_TO_SEND" for status in statuses(knack).values()) and len(records) == 24

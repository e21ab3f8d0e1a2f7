"""Concurrent, ordered delivery (issue 8), end to end: the real command with its default workers against the
simulators, with random answer times so that completions interleave.

What must hold whatever the workers do at once:
- per service request, the ESB gets the activities in ascending atd_activity_id order, strictly one after
  another (the next is posted only after the previous one's Knack update), and a record is set SENT in Knack
  only after the ESB answered its POST;
- a failed activity holds the later ones of its service request, while the other service requests go on;
- different service requests do overlap (the ESB simulator counts the POSTs it handles at the same moment), and
  never more than the workers (or ESB_MAX_IN_FLIGHT) at once;
- `--workers 1` posts and updates in exactly the order of the sequential program;
- on SIGTERM nothing new starts, the records in flight end `done` or `sending` (never lost), and the process is
  gone within 8 seconds.
"""

from __future__ import annotations

import random
import re
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from config import CONFIG
from knack311.settings import DEFAULT_ESB_MAX_IN_FLIGHT, MAX_WORKERS
from simulators.esb import parse_message
from tests.conftest import make_knack, statuses

APP = "data-tracker"
FIELDS = CONFIG[APP]["fields"]
JOURNAL_NAME = f"{APP}.journal.sqlite3"
SENT, READY = "SENT", "READY_TO_SEND"
SUMMARY = re.compile(r"^\S+ data-tracker summary: .*$", re.MULTILINE)


@pytest.fixture
def knack():
    # no rate limit: the program paces at KNACK_MAX_RPS (set high below); ordering, not pacing, is tested here
    with make_knack(rate_limit=None) as simulator:
        yield simulator


@pytest.fixture
def bridge_env(bridge_env):
    return {**bridge_env, "KNACK_MAX_RPS": "50"}


# ----- helpers -------------------------------------------------------------------------------------------------

def backlog(seed, rng: random.Random, srs: int, per_sr: int) -> dict[str, list[dict]]:
    """`srs` service requests of `per_sr` activities each, their ids interleaved at random across SRs (as a
    backlog after an ESB outage looks). Returns SR -> its records in ascending atd_activity_id order."""
    owners = [sr for sr in range(srs) for _ in range(per_sr)]
    rng.shuffle(owners)
    by_sr: dict[str, list[dict]] = {}
    for n, owner in enumerate(owners):
        sr = f"24-{owner:08d}"
        by_sr.setdefault(sr, []).extend(seed(atd_activity_id=5000 + n, sr_number=sr))
    return by_sr


def jitter(knack, esb, rng: random.Random, count: int, esb_most: float = 0.15, knack_most: float = 0.05) -> None:
    """Random answer times for the next `count` ESB POSTs and Knack updates, so completions interleave."""
    for _ in range(count):
        esb.inject(delay=rng.uniform(0.0, esb_most))
        knack.inject("PUT", "/records/", delay=rng.uniform(0.0, knack_most))


def esb_received(esb, record: dict) -> list:
    return [r for r in esb.received if r.record_id == record["id"]]


def status_updates(knack, record: dict) -> list:
    return [r for r in knack.request_log if r.method == "PUT" and record["id"] in r.path]


def summary(output: str) -> str:
    [line] = SUMMARY.findall(output)
    return line


def count(output: str, name: str) -> int:
    return int(re.search(rf"\b{name}=(\d+)", summary(output)).group(1))


def journal_states(state_dir: Path) -> dict[str, str]:
    db = sqlite3.connect(str(state_dir / JOURNAL_NAME))
    try:
        return dict(db.execute("SELECT record_id, state FROM deliveries").fetchall())
    finally:
        db.close()


def assert_each_sr_in_order_one_after_another(knack, esb, by_sr: dict[str, list[dict]]) -> None:
    """Per SR: posted in ascending order, each only after the previous one's Knack update was made; and every
    Knack update only after the ESB answered that record's POST."""
    for sr, records in by_sr.items():
        posted = [r for r in records if esb_received(esb, r)]
        arrivals = [esb_received(esb, r)[0].at for r in posted]
        assert arrivals == sorted(arrivals), f"{sr}: the ESB got its activities out of order"
        for earlier, later in zip(posted, posted[1:], strict=False):
            [update] = status_updates(knack, earlier)
            assert update.at < esb_received(esb, later)[0].at, (
                f"{sr}: {later['id']} was posted before the Knack update of {earlier['id']}")
        for record in posted:
            for update in status_updates(knack, record):
                assert update.at > esb_received(esb, record)[0].answered_at, (
                    f"{record['id']} was set in Knack before the ESB answered its POST")


# ----- ordering ------------------------------------------------------------------------------------------------

def test_service_requests_overlap_and_each_keeps_its_order_under_random_latency(knack, esb, seed, run_bridge):
    rng = random.Random(8311)
    by_sr = backlog(seed, rng, srs=12, per_sr=4)
    records = [r for rs in by_sr.values() for r in rs]
    jitter(knack, esb, rng, len(records))

    result = run_bridge()

    assert result.returncode == 0, result.output
    assert statuses(knack) == {r["id"]: SENT for r in records}
    assert esb.copies() == Counter({r["id"]: 1 for r in records})
    assert_each_sr_in_order_one_after_another(knack, esb, by_sr)
    # different SRs were with the ESB at the same moment, never more than the workers
    assert 1 < esb.peak_in_flight <= DEFAULT_ESB_MAX_IN_FLIGHT, esb.peak_in_flight
    # the messages themselves are the records' own, SR by SR
    for message in (parse_message(r.body) for r in esb.accepted):
        assert message["id"] in {r["id"] for r in by_sr[message["sr_number"]]}


def test_a_failed_activity_holds_the_rest_of_its_sr_while_the_others_go_on(knack, esb, seed, run_bridge,
                                                                             state_dir):
    rng = random.Random(2024)
    by_sr = backlog(seed, rng, srs=8, per_sr=3)
    records = [r for rs in by_sr.values() for r in rs]
    rejected_sr, broken_sr = sorted(by_sr)[:2]
    rejected = by_sr[rejected_sr][1]  # its SR's second activity: the first goes, the third is held
    esb.reject_records = {rejected["id"]: "SR is locked"}
    # an activity 311 has no code for fails before it is posted, and holds its SR the same way
    [broken] = seed(atd_activity_id=4999, sr_number=broken_sr, activity_name="Not A Known Activity")
    jitter(knack, esb, rng, len(records))

    result = run_bridge()

    assert result.returncode == 1, result.output
    held = [by_sr[rejected_sr][2], *by_sr[broken_sr]]  # everything after a failure, in its SR only
    expected = {r["id"]: READY if r is rejected or r in held else SENT for r in records}
    assert statuses(knack) == {**expected, broken["id"]: READY}
    assert {r.record_id for r in esb.received} == {r["id"] for r in records} - {r["id"] for r in held}
    assert (count(result.stdout, "sent"), count(result.stdout, "failed"), count(result.stdout, "held")) == (
        len(records) - 1 - len(held), 2, len(held))
    assert rejected["id"] not in journal_states(state_dir)  # rejected: the ESB does not have it
    assert_each_sr_in_order_one_after_another(knack, esb, by_sr)
    assert esb.peak_in_flight > 1


def test_one_worker_posts_and_updates_in_the_sequential_order(knack, esb, seed, run_bridge):
    rng = random.Random(1)
    by_sr = backlog(seed, rng, srs=5, per_sr=3)
    records = sorted((r for rs in by_sr.values() for r in rs), key=lambda r: r[f"{FIELDS['atd_activity_id']}_raw"])
    jitter(knack, esb, rng, len(records))

    result = run_bridge("--workers", "1")

    assert result.returncode == 0, result.output
    assert esb.peak_in_flight == 1
    # the whole backlog in ascending atd_activity_id order, each record's POST then its update, one record at a time
    steps = sorted([(r.at, "post", r.record_id) for r in esb.received]
                   + [(r.at, "update", r.path.rsplit("/", 1)[-1]) for r in knack.request_log if r.method == "PUT"])
    assert [(step, record_id) for _, step, record_id in steps] == [
        (step, r["id"]) for r in records for step in ("post", "update")]


def test_esb_max_in_flight_bounds_the_posts_but_not_the_workers(knack, esb, seed, run_bridge):
    records = seed(48)
    esb.latency = 0.05

    result = run_bridge(env={"ESB_MAX_IN_FLIGHT": "2"})

    assert result.returncode == 0, result.output
    assert esb.peak_in_flight == 2
    assert statuses(knack) == {r["id"]: SENT for r in records}
    assert esb.copies() == Counter({r["id"]: 1 for r in records})


@pytest.mark.parametrize("args, env", [
    (["--workers", "0"], {}), (["--workers", str(MAX_WORKERS + 1)], {}), (["--workers", "two"], {}),
    (["--workers", "1.5"], {}), ([], {"ESB_MAX_IN_FLIGHT": "0"}), ([], {"ESB_MAX_IN_FLIGHT": "many"}),
], ids=["zero", "too-many", "word", "fraction", "esb-zero", "esb-word"])
def test_a_worker_count_that_is_not_a_whole_number_in_range_is_a_usage_error(knack, esb, seed, run_bridge,
                                                                             args, env):
    seed(2)

    result = run_bridge(*args, env=env)

    assert result.returncode == 2, result.output
    assert "Traceback" not in result.output
    assert ("--workers" if args else "ESB_MAX_IN_FLIGHT") in result.stderr
    assert knack.request_log == [] and esb.received == []


# ----- stopping ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timing
def test_sigterm_starts_nothing_new_and_leaves_each_record_in_flight_done_or_sending(knack, esb, seed, start_bridge,
                                                                                      run_bridge, state_dir):
    workers = 8  # a fixed number (the adaptive default would start with 2 and never see the waves below)
    records = seed(6 * workers)
    # two waves are answered at once; from the third on, the ESB takes each message and never answers in time
    esb.inject(delay=0.0, count=2 * workers)
    esb.inject(delay=30.0, count=1000)
    proc = start_bridge("--workers", str(workers))
    deadline = time.monotonic() + 30
    while len(esb.received) < 3 * workers:  # every worker now waits on an answer that will not come
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)

    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    took = time.monotonic() - signalled

    assert took < 8, f"exited {took:.1f}s after SIGTERM"
    assert proc.returncode == 1, stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert "SIGTERM" in summary(stdout).split("stopped:", 1)[1]
    # nothing started after the signal: the ESB got the three waves and no more
    assert len(esb.received) == 3 * workers and not [r for r in esb.received if r.at > signalled]
    states = journal_states(state_dir)
    hanging = {r.record_id for r in esb.received[2 * workers:]}
    assert {rid: state for rid, state in states.items() if state != "done"} == dict.fromkeys(hanging, "sending")
    done = {rid for rid, state in states.items() if state == "done"}
    assert len(done) == 2 * workers
    assert {rid for rid, status in statuses(knack).items() if status == SENT} == done
    assert count(stdout, "not_attempted") == len(records) - 3 * workers

    esb.clear_faults()
    rerun = run_bridge()  # never lost: the next run sends the rest, and again the ones whose answer never came

    assert rerun.returncode == 0, rerun.output
    assert statuses(knack) == {r["id"]: SENT for r in records}
    assert esb.copies() == Counter({r["id"]: 2 if r["id"] in hanging else 1 for r in records})
    assert set(journal_states(state_dir).values()) == {"done"}


def test_the_service_request_with_the_most_activities_to_go_starts_first(knack, esb, seed, run_bridge):
    # Its activities can only go one after another: started last (its atd_activity_ids are the backlog's highest),
    # it would be the run's tail. Six single activities come first in 311's order.
    singles = seed(6)
    chain = seed(4, sr_number="20-77777777")
    esb.latency = 0.3

    result = run_bridge("--workers", "2")

    assert result.returncode == 0, result.output
    arrivals = [message.record_id for message in sorted(esb.received, key=lambda m: m.at)]
    assert arrivals.index(chain[0]["id"]) < 2, arrivals  # among the first two POSTs, though its id is the 7th
    assert [i for i in arrivals if i in {r["id"] for r in chain}] == [r["id"] for r in chain]  # 311's order kept
    assert set(arrivals) == {r["id"] for r in singles + chain} and len(arrivals) == 10

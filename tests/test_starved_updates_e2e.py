"""Pacer waits are not outages (issue 12 item 5), end to end.

Knack's second is shared by everything that uses the app's key. When the app's other clients take most of it, a
status update can wait for its pacer slot past the run's deadline and never be sent. That is no answer from Knack,
let alone a failing one: the record is left for the next run as it is (the journal says the ESB has the message,
so the next run sets SENT without resending), counted deferred, and no "Knack status updates keep failing" stop.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import make_knack, statuses

APP = "data-tracker"
SUMMARY = re.compile(rf"^\S+ {APP} summary: .*$", re.MULTILINE)


@pytest.fixture
def knack():
    # the app's other clients use 7 of Knack's 10 requests a second, all through the runs below
    with make_knack(other_clients_rps=7.0) as simulator:
        yield simulator


def journal_states(state_dir: Path) -> dict[str, str]:
    db = sqlite3.connect(str(state_dir / f"{APP}.journal.sqlite3"))
    try:
        return dict(db.execute("SELECT record_id, state FROM deliveries"))
    finally:
        db.close()


def count(stdout: str, name: str) -> int:
    [line] = SUMMARY.findall(stdout)
    return int(re.search(rf"\b{name}=(\d+)", line).group(1))


@pytest.mark.timing
def test_a_status_update_starved_of_pacer_slots_is_left_for_the_next_run_not_an_outage(knack, esb, seed, run_bridge,
                                                                                       bridge_env):
    records = seed(12)  # each its own SR: all eight workers post at once, then queue for Knack slots
    # One Knack request a second (what the others leave, and no more, so that Knack answers no 429 here): the
    # eight status updates queue for slots, and those whose slot comes after the run's time (2 s + ESB_TIMEOUT 3 s)
    # are never sent.
    starved_run = run_bridge("--max-runtime", "2", env={"ESB_TIMEOUT": "3", "KNACK_MAX_RPS": "1"})

    assert "Traceback" not in starved_run.output
    assert "keep failing" not in starved_run.stdout
    [summary] = SUMMARY.findall(starved_run.stdout)
    assert "stopped:" not in summary and count(starved_run.stdout, "failed") == 0, summary
    assert starved_run.returncode == 0, starved_run.output  # only deferred by the time budget
    not_sent = [line for line in starved_run.stdout.splitlines()
                if "the Knack status update to SENT was not sent" in line]
    assert not_sent, starved_run.stdout
    assert all("the next run sets it without resending" in line for line in not_sent)
    assert [r.status for r in knack.request_log if r.method == "PUT" and r.status != 200] == []

    states = journal_states(Path(bridge_env["STATE_DIR"]))
    delivered = {record_id for record_id, state in states.items() if state == "delivered"}
    assert len(delivered) == len(not_sent)
    assert all(statuses(knack)[record_id] == "READY_TO_SEND" for record_id in delivered)
    assert count(starved_run.stdout, "deferred") >= len(delivered)
    assert count(starved_run.stdout, "sent") + count(starved_run.stdout, "deferred") == len(records)

    # the next run, with Knack's second free again: the starved records are set SENT without a second POST
    knack.other_clients_rps = 0.0
    next_run = run_bridge()
    assert next_run.returncode == 0, next_run.output
    assert statuses(knack) == {r["id"]: "SENT" for r in records}
    assert esb.copies() == {r["id"]: 1 for r in records}

"""Issue 13 item 3, end to end: a journal entry (`sending`, `delivered`, `parked`) whose record Knack has settled
(SENT, DO_NOT_SEND, another value, deleted) is closed with the reason in its note, and old entries cost an idle run
no Knack calls: each record is asked about once, and one Knack still shows ready (but the view does not list) at
most once a day. `--report` says what the next run does with each kind of entry.

The real command against the simulators; the journal rows are set as a run killed at the right moment leaves them.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from config import CONFIG
from tests.conftest import make_knack, statuses
from tests.test_run_failures import JOURNAL_NAME, journal_rows, journal_states, lines_naming, record_reads, staff_edit

APP = "data-tracker"
OBJ = CONFIG[APP]["obj"]
FIELDS = CONFIG[APP]["fields"]
READY, SENT, DO_NOT_SEND = "READY_TO_SEND", "SENT", "DO_NOT_SEND"
DAY = 24 * 3600


@pytest.fixture
def knack():
    with make_knack(rate_limit=None) as simulator:
        yield simulator


@pytest.fixture
def bridge_env(bridge_env):
    return {**bridge_env, "KNACK_MAX_RPS": "50"}


def left_unfinished(state_dir: Path, state: str, records: list[dict], **columns) -> None:
    """The journal as a run killed after the POST (`sending`), after the ESB's answer (`delivered`) or a parking
    (`parked`) leaves each record's entry."""
    db = sqlite3.connect(str(state_dir / JOURNAL_NAME))
    with db:
        for record in records:
            values = {"state": state, "note": "", "checked": 0, **columns}
            db.execute(f"UPDATE deliveries SET {', '.join(f'{k} = ?' for k in values)} WHERE record_id = ?",
                       (*values.values(), record["id"]))
    db.close()


def delivered_once(seed, run_bridge, esb, count: int) -> list[dict]:
    records = seed(count)
    first = run_bridge()
    assert first.returncode == 0, first.output
    assert esb.copies() == {r["id"]: 1 for r in records}
    return records


def knack_requests_of(knack, run) -> list:
    before = len(knack.request_log)
    result = run()
    return result, knack.request_log[before:]


def test_twenty_entries_staff_set_do_not_send_close_in_one_run_and_the_next_idle_run_is_one_request(
        knack, esb, seed, run_bridge, state_dir):
    records = delivered_once(seed, run_bridge, esb, 20)
    left_unfinished(state_dir, "sending", records[:10], posts=1)
    left_unfinished(state_dir, "delivered", records[10:])
    for record in records:
        staff_edit(knack, record, {FIELDS["esb_status"]: DO_NOT_SEND})

    closing, requests = knack_requests_of(knack, run_bridge)

    assert closing.returncode == 0, closing.output
    assert all(len(record_reads(knack, r)) == 1 for r in records)  # each record asked about once
    assert [r.method for r in requests] == ["GET"] * 21  # the view, then the 20 records; no status update
    rows = journal_rows(state_dir)
    assert {rows[r["id"]]["state"] for r in records} == {"done"}
    assert {rows[r["id"]]["note"] for r in records} == {"Knack shows DO_NOT_SEND"}
    for record, state in [(r, "sending") for r in records[:10]] + [(r, "delivered") for r in records[10:]]:
        [line] = [line for line in lines_naming(closing.stdout, record["id"]) if "closed" in line]
        assert f"journal entry ({state}) closed: Knack shows DO_NOT_SEND" in line, line
    assert esb.copies() == {r["id"]: 1 for r in records}  # nothing posted again
    assert set(statuses(knack).values()) == {DO_NOT_SEND}  # and Knack left as staff set it

    idle, requests = knack_requests_of(knack, run_bridge)

    assert idle.returncode == 0, idle.output
    assert len(requests) == 1 and "/views/" in requests[0].path


@pytest.mark.parametrize("status, note", [(SENT, "Knack shows SENT"), ("ON_HOLD", "Knack shows 'ON_HOLD'"),
                                          ("", "Knack shows no status")], ids=["sent", "another-value", "blank"])
def test_an_entry_whose_record_knack_shows_in_any_other_state_is_closed_with_that_reason(
        knack, esb, seed, run_bridge, state_dir, status, note):
    [record] = delivered_once(seed, run_bridge, esb, 1)
    left_unfinished(state_dir, "sending", [record], posts=1, note="no answer within 5s")
    staff_edit(knack, record, {FIELDS["esb_status"]: status})

    run = run_bridge()

    assert run.returncode == 0, run.output
    assert journal_rows(state_dir)[record["id"]]["note"] == note
    assert journal_states(state_dir)[record["id"]] == "done"
    assert esb.copies() == {record["id"]: 1}


def test_a_deleted_records_entry_closes(knack, esb, seed, run_bridge, state_dir):
    records = delivered_once(seed, run_bridge, esb, 2)
    left_unfinished(state_dir, "sending", records[:1], posts=1)
    knack.remove_record(OBJ, records[0]["id"])

    run = run_bridge()

    assert run.returncode == 0, run.output
    assert journal_states(state_dir)[records[0]["id"]] == "done"
    assert journal_rows(state_dir)[records[0]["id"]]["note"] == "the record no longer exists in Knack"
    [line] = [line for line in lines_naming(run.stdout, records[0]["id"]) if "closed" in line]
    assert "journal entry (sending) closed: the record no longer exists in Knack" in line
    assert "Traceback" not in run.output and esb.copies() == {r["id"]: 1 for r in records}


def test_a_parked_entry_closes_once_staff_set_its_record_do_not_send(knack, esb, seed, run_bridge, state_dir):
    [record] = delivered_once(seed, run_bridge, esb, 1)
    left_unfinished(state_dir, "parked", [record], posts=2)
    staff_edit(knack, record, {FIELDS["esb_status"]: DO_NOT_SEND})

    run = run_bridge()

    assert run.returncode == 0, run.output
    assert (journal_states(state_dir)[record["id"]], journal_rows(state_dir)[record["id"]]["note"]) == (
        "done", "Knack shows DO_NOT_SEND")


def test_an_entry_whose_record_is_still_ready_but_not_listed_stays_and_is_asked_about_once_a_day(
        knack, esb, seed, run_bridge, state_dir):
    [record] = delivered_once(seed, run_bridge, esb, 1)
    left_unfinished(state_dir, "sending", [record], posts=1)
    # staff set it ready again but blanked its EMI id: the view (EMI id not blank) does not list it
    staff_edit(knack, record, {FIELDS["esb_status"]: READY, FIELDS["emi_id"]: ""})

    asked, requests = knack_requests_of(knack, run_bridge)

    assert asked.returncode == 0, asked.output
    assert len(requests) == 2 and len(record_reads(knack, record)) == 1
    row = journal_rows(state_dir)[record["id"]]
    assert row["state"] == "sending" and row["posts"] == 1  # left as it is
    assert time.time() - DAY < row["checked"] <= time.time()

    idle, requests = knack_requests_of(knack, run_bridge)

    assert idle.returncode == 0, idle.output
    assert len(requests) == 1 and "/views/" in requests[0].path  # not asked again within the day
    assert esb.copies() == {record["id"]: 1}

    left_unfinished(state_dir, "sending", [record], posts=1, checked=time.time() - DAY - 60)  # a day later
    staff_edit(knack, record, {FIELDS["esb_status"]: DO_NOT_SEND})
    next_day, requests = knack_requests_of(knack, run_bridge)
    assert next_day.returncode == 0, next_day.output
    assert len(record_reads(knack, record)) == 2
    assert journal_rows(state_dir)[record["id"]]["note"] == "Knack shows DO_NOT_SEND"


# ----- --report: what the next run does with each kind of entry ------------------------------------------------

def report(run_bridge) -> str:
    result = run_bridge("--report")
    assert result.returncode == 0, result.output
    return result.stdout


def test_the_report_promises_no_resend_of_entries_the_next_run_closes(knack, esb, seed, run_bridge, state_dir):
    records = delivered_once(seed, run_bridge, esb, 3)
    left_unfinished(state_dir, "sending", records[:1], posts=1, note="no answer within 5s")
    left_unfinished(state_dir, "delivered", records[1:2])
    left_unfinished(state_dir, "sending", records[2:], posts=1, checked=time.time() - 3600)

    before = report(run_bridge)

    assert "sends them again" not in before
    [delivered] = [line for line in before.splitlines() if line.startswith("delivered to the ESB")]
    assert delivered.endswith(": 1 (each: set SENT without posting it again when a run lists the record as ready; "
                              "closed once Knack shows the record in a state other than READY_TO_SEND, or deleted)")
    [doubt] = [line for line in before.splitlines() if line.startswith("delivery in doubt")]
    assert doubt.endswith(": 2 (each: posted again, alone and waiting longer, when a run lists the record as ready, "
                          "and 311 may receive it twice; closed once Knack shows the record in a state other than "
                          "READY_TO_SEND, or deleted)")
    [asked] = lines_naming(before, records[2]["id"])
    assert "Knack showed it READY_TO_SEND on" in asked and "asked again after" in asked
    assert "asked again" not in "".join(lines_naming(before, records[0]["id"]))

    for record in records[:2]:
        staff_edit(knack, record, {FIELDS["esb_status"]: DO_NOT_SEND})
    assert run_bridge().returncode == 0

    after = report(run_bridge)  # what the report said came true: the two closed, the one asked an hour ago waits
    assert "delivered to the ESB, not yet marked SENT in Knack: none" in after
    [doubt] = [line for line in after.splitlines() if line.startswith("delivery in doubt")]
    assert ": 1 (" in doubt and lines_naming(after, records[2]["id"])
    assert esb.copies() == {r["id"]: 1 for r in records}

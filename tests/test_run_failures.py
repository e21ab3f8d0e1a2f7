"""The run when records, Knack, the ESB, the journal or the operator misbehave (issues 6 and 7), end to end: the
real command against the simulators, with outcomes checked on what the ESB received, the Knack statuses, the
journal and the exit code. A few unit tests at the end drive `run()` with fake clients, for a stop signal landing
inside a network call, which the simulators cannot time exactly.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import resource
import signal
import sqlite3
import time
from io import StringIO
from pathlib import Path

import pytest
import requests

from config import CONFIG
from knack311 import run as run_module
from knack311.errors import OutageError
from knack311.esb import Delivery, ESBUncertain
from knack311.journal import SENDING, Journal
from knack311.knack import Page
from knack311.logs import printable as log_safe
from knack311.settings import DEFAULT_ESB_MAX_IN_FLIGHT, Settings, load_app
from simulators.activities import activity_record, app_metadata
from simulators.esb import parse_message
from tests.conftest import API_KEY, APP_ID, make_knack, statuses

APP = "data-tracker"
OBJ = CONFIG[APP]["obj"]
FIELDS = CONFIG[APP]["fields"]
JOURNAL_NAME = f"{APP}.journal.sqlite3"
SENT, READY, DO_NOT_SEND = "SENT", "READY_TO_SEND", "DO_NOT_SEND"
SUMMARY_LINE = re.compile(rf"^\S+ {APP} summary(?: \(dry run\))?: .*$", re.MULTILINE)


@pytest.fixture
def knack():
    # no rate limit: these tests are about failures; the program paces at KNACK_MAX_RPS (set high below)
    with make_knack(rate_limit=None) as simulator:
        yield simulator


@pytest.fixture
def bridge_env(bridge_env):
    return {**bridge_env, "KNACK_MAX_RPS": "50"}


# ----- reading outcomes -------------------------------------------------------------------------------------------

def summary(output: str) -> str:
    lines = SUMMARY_LINE.findall(output)
    assert len(lines) == 1, f"expected one summary line, got {lines!r}\n{output}"
    return lines[0]


def count(output: str, name: str) -> int:
    found = re.search(rf"\b{name}=(\d+)", summary(output))
    assert found, summary(output)
    return int(found.group(1))


def listed_ids(output: str, name: str) -> tuple[list[str], int]:
    """The ids a summary names for failed_ids/held_ids, and the "+N more" beyond them."""
    found = re.search(rf"\b{name}=(\S+)(?: \+(\d+) more)?", summary(output))
    return (found.group(1).split(","), int(found.group(2) or 0)) if found else ([], 0)


def counts_add_up(output: str) -> None:
    names = ("sent", "do_not_send", "failed", "held", "deferred", "not_attempted", "skipped")
    rendered = count(output, "rendered") if "rendered=" in summary(output) else 0
    assert count(output, "fetched") == rendered + sum(count(output, n) for n in names), summary(output)


def lines_naming(output: str, text: str) -> list[str]:
    return [line for line in output.splitlines() if text in line]


def no_traceback(result) -> None:
    assert "Traceback" not in result.output, result.output


def journal_rows(state_dir: Path, table: str = "deliveries") -> dict[str, dict]:
    db = sqlite3.connect(str(state_dir / JOURNAL_NAME))
    db.row_factory = sqlite3.Row
    try:
        return {row["record_id"]: dict(row) for row in db.execute(f"SELECT * FROM {table}")}
    finally:
        db.close()


def journal_states(state_dir: Path) -> dict[str, str]:
    return {record_id: row["state"] for record_id, row in journal_rows(state_dir).items()}


def knack_requests(knack, method: str, path_part: str = "") -> list:
    return [r for r in knack.request_log if r.method == method and path_part in r.path]


def record_reads(knack, record: dict) -> list:
    return knack_requests(knack, "GET", f"/objects/{OBJ}/records/{record['id']}")


def staff_edit(knack, record: dict, changes: dict) -> None:
    """What a person does in Knack, through the simulator's real API."""
    reply = requests.put(f"{knack.url}/objects/{OBJ}/records/{record['id']}",
                         headers={"X-Knack-Application-Id": APP_ID, "X-Knack-REST-API-Key": API_KEY,
                                  "Content-Type": "application/json"}, data=json.dumps(changes), timeout=5)
    assert reply.status_code == 200, reply.text


def status_updates_not_applied(knack, record: dict) -> None:
    """Knack answers every status update of this record with the record unchanged (the update was not applied):
    the ESB has the message, Knack does not say SENT, the journal keeps the entry `delivered`."""
    knack.inject("PUT", record["id"], status=200, body=json.dumps(knack.record(OBJ, record["id"])), count=1000)


def sent_bodies(esb, record: dict) -> list[dict]:
    return [parse_message(r.body) for r in esb.accepted if r.record_id == record["id"]]


# ===== 7§2: each record's own status and required values ==========================================================

def test_records_the_view_should_have_filtered_out_are_never_posted(knack, esb, seed, run_bridge):
    ready = seed(2)
    [already_sent] = seed(esb_status=SENT)
    [internal] = seed(esb_status=DO_NOT_SEND)
    [no_emi] = seed(emi_id="")
    [no_sr] = seed(sr_number="")
    [no_activity_id] = seed(atd_activity_id="")
    knack.ignore_filters = True  # the view answers without applying the program's filter

    result = run_bridge()

    assert result.returncode == 1, result.output
    no_traceback(result)
    assert sorted(esb.copies().items()) == sorted((r["id"], 1) for r in ready)
    assert statuses(knack) == {**{r["id"]: SENT for r in ready}, already_sent["id"]: SENT,
                               internal["id"]: DO_NOT_SEND, no_emi["id"]: READY, no_sr["id"]: READY,
                               no_activity_id["id"]: READY}
    assert knack_requests(knack, "PUT", already_sent["id"]) == []  # never overwritten, not even with the same
    assert knack_requests(knack, "PUT", internal["id"]) == []
    assert (count(result.stdout, "fetched"), count(result.stdout, "sent"), count(result.stdout, "skipped"),
            count(result.stdout, "failed")) == (7, 2, 2, 3)
    counts_add_up(result.stdout)
    for record, field in ((no_emi, "emi_id"), (no_sr, "sr_number"), (no_activity_id, "atd_activity_id")):
        [line] = [line for line in lines_naming(result.stdout, record["id"]) if "FAILED" in line]
        assert f"{field} ({FIELDS[field]})" in line and "Knack" in line, line
    assert sorted(listed_ids(result.stdout, "failed_ids")[0]) == sorted(r["id"] for r in (no_emi, no_sr,
                                                                                           no_activity_id))


# ===== 7§5: a corrected record goes out again ========================================================================

@pytest.mark.parametrize("corrected", [True, False], ids=["corrected", "unchanged"])
def test_a_record_fixed_while_its_entry_is_delivered_is_resent_only_if_its_message_changed(
        knack, esb, seed, run_bridge, state_dir, corrected):
    records = seed(2)
    status_updates_not_applied(knack, records[0])
    first = run_bridge()
    assert first.returncode == 1, first.output
    assert journal_states(state_dir)[records[0]["id"]] == "delivered"
    knack.clear_faults()
    if corrected:
        staff_edit(knack, records[0], {FIELDS["activity_details"]: "corrected: the pole, not the bulb"})

    second = run_bridge()

    assert second.returncode == 0, second.output
    assert statuses(knack) == {r["id"]: SENT for r in records}
    assert journal_states(state_dir)[records[0]["id"]] == "done"
    details = [m["activity_details"] for m in sent_bodies(esb, records[0])]
    if corrected:
        assert details == ["details 1001", "corrected: the pole, not the bulb"]
    else:
        assert details == ["details 1001"]  # the ESB has this very message: set SENT without resending
    assert esb.copies()[records[1]["id"]] == 1


# ===== 7§6: the journal fails after the ESB accepted ================================================================

@pytest.mark.parametrize("workers", [None, "1"], ids=["default-workers", "one-worker"])
def test_a_journal_that_fails_after_the_esb_accepted_still_marks_sent_and_sends_nothing_more(
        knack, esb, seed, start_bridge, run_bridge, state_dir, workers):
    records = seed(4 if workers == "1" else 3 * DEFAULT_ESB_MAX_IN_FLIGHT)
    esb.latency = 0.5  # the ESB holds its answer: the window in which the disk "fills up"
    proc = start_bridge(*(["--workers", workers] if workers else []))
    # one worker: wait for the second record, so that the first is done; several: the first wave is in flight
    deadline = time.monotonic() + 30
    while len(esb.received) < (2 if workers == "1" else 1):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    # No file of this process may grow any more, as on a full disk; this holds for root too, unlike permissions.
    # The next journal write, `delivered` for each message the ESB is about to accept, fails.
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1, 1))
    stdout, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 1, stdout + stderr
    assert "Traceback" not in stdout + stderr
    posted = [r for r in records if r["id"] in {m.record_id for m in esb.received}]
    assert esb.copies() == {r["id"]: 1 for r in posted}
    if workers == "1":
        assert posted == records[:2]  # nothing sent after the failure
    else:
        # nothing started after the failure: only the first wave, which was in flight when the disk filled up
        assert 1 <= len(posted) <= DEFAULT_ESB_MAX_IN_FLIGHT
    # the ESB has them, so Knack says SENT; the others were left alone
    assert statuses(knack) == {r["id"]: SENT if r in posted else READY for r in records}
    in_flight = posted[1:] if workers == "1" else posted
    for record in in_flight:
        [accepted] = [line for line in lines_naming(stdout, record["id"]) if "accepted" in line]
        assert "journal" in accepted, accepted
        assert journal_states(state_dir)[record["id"]] == "sending"  # its `delivered` never got written
    assert (count(stdout, "fetched"), count(stdout, "sent")) == (len(records), len(posted))
    # a worker of the first wave that had not written `sending` yet fails on the journal: it posted nothing
    failed = count(stdout, "failed")
    assert failed == 0 if workers == "1" else failed <= DEFAULT_ESB_MAX_IN_FLIGHT - len(posted)
    assert count(stdout, "not_attempted") == len(records) - len(posted) - failed
    counts_add_up(stdout)
    assert "journal" in summary(stdout).split("stopped:", 1)[1]

    healthy = run_bridge()

    assert healthy.returncode == 0, healthy.output
    assert esb.copies() == {r["id"]: 1 for r in records}  # Knack said SENT, so the message did not go twice
    assert statuses(knack) == {r["id"]: SENT for r in records}
    assert set(journal_states(state_dir).values()) == {"done"}  # confirmed SENT with Knack, then closed


# ===== 7§7: a delivered entry is closed only when Knack confirms SENT =================================================

def test_a_delivered_record_missing_from_one_listing_but_still_ready_keeps_its_entry(knack, esb, seed, run_bridge,
                                                                                     state_dir):
    records = seed(3)
    status_updates_not_applied(knack, records[0])
    assert run_bridge().returncode == 1
    knack.clear_faults()
    # the next listing misses it although it is READY_TO_SEND (a staff edit between two page reads shifts pages)
    knack.inject("GET", "/views/", status=200, body=json.dumps({"total_pages": 1, "current_page": 1,
                                                                "total_records": 0, "records": []}))
    second = run_bridge()
    assert second.returncode == 0, second.output
    assert len(record_reads(knack, records[0])) == 1  # one read of the record to confirm
    assert journal_states(state_dir)[records[0]["id"]] == "delivered"  # Knack said READY_TO_SEND: kept

    third = run_bridge()

    assert third.returncode == 0, third.output
    assert esb.copies()[records[0]["id"]] == 1  # set SENT without posting it again
    assert statuses(knack) == {r["id"]: SENT for r in records}
    assert journal_states(state_dir)[records[0]["id"]] == "done"


def test_a_delivered_entry_whose_record_knack_says_sent_is_closed_and_a_staff_resend_goes(knack, esb, seed,
                                                                                          run_bridge, state_dir):
    records = seed(2)
    assert run_bridge().returncode == 0
    # what a run killed after Knack's SENT answer and before writing `done` leaves behind
    db = sqlite3.connect(str(state_dir / JOURNAL_NAME))
    with db:
        db.execute("UPDATE deliveries SET state = 'delivered' WHERE record_id = ?", (records[0]["id"],))
    db.close()

    second = run_bridge()
    assert second.returncode == 0, second.output
    assert len(record_reads(knack, records[0])) == 1 and record_reads(knack, records[1]) == []
    assert journal_states(state_dir)[records[0]["id"]] == "done"

    staff_edit(knack, records[0], {FIELDS["esb_status"]: READY})
    third = run_bridge()
    assert third.returncode == 0, third.output
    assert esb.copies()[records[0]["id"]] == 2  # staff asked for a resend: it went
    assert not [line for line in lines_naming(third.stdout, records[0]["id"]) if "twice" in line]


# ===== 7§12: the journal's table layout ============================================================================

def make_journal(path: Path, *statements: str, version: int = 0) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    db = sqlite3.connect(str(path))
    with db:
        for statement in statements:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {version}")
    db.close()


SHIPPED_DELIVERIES = """CREATE TABLE deliveries (record_id TEXT PRIMARY KEY, state TEXT NOT NULL,
    emi TEXT NOT NULL, message_hash TEXT NOT NULL, updated REAL NOT NULL)"""


@pytest.mark.parametrize("layout", ["extra-column", "missing-column"])
def test_a_journal_of_another_layout_stops_the_run_before_anything_is_read_or_sent(knack, esb, seed, run_bridge,
                                                                                    state_dir, layout):
    records = seed(2)
    table = (SHIPPED_DELIVERIES.replace("updated REAL NOT NULL", "updated REAL NOT NULL, attempts INTEGER")
             if layout == "extra-column" else SHIPPED_DELIVERIES.replace("emi TEXT NOT NULL, ", ""))
    make_journal(state_dir / JOURNAL_NAME, table)

    result = run_bridge()

    assert result.returncode == 2, result.output
    no_traceback(result)
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert str(state_dir / JOURNAL_NAME) in line, line
    assert knack.request_log == [] and esb.received == []
    assert all(statuses(knack)[r["id"]] == READY for r in records)


def test_a_journal_of_the_shipped_layout_is_upgraded_and_its_deliveries_honoured(knack, esb, seed, run_bridge,
                                                                                  state_dir):
    records = seed(2)
    make_journal(state_dir / JOURNAL_NAME, SHIPPED_DELIVERIES,
                 f"INSERT INTO deliveries VALUES ('{records[0]['id']}', 'delivered', 'EMI-1001', "
                 f"'a-hash-of-the-old-formula', {time.time() - 60})")

    result = run_bridge()

    assert result.returncode == 0, result.output
    assert esb.copies() == {records[1]["id"]: 1}  # the ESB had records[0] already: only marked SENT
    assert statuses(knack) == {r["id"]: SENT for r in records}
    db = sqlite3.connect(str(state_dir / JOURNAL_NAME))
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    finally:
        db.close()
    assert set(journal_states(state_dir).values()) == {"done"}


# ===== 6§5: failure lines that say what happened and what to do ====================================================

def test_an_unknown_activity_says_what_to_add_and_since_when_it_fails(knack, esb, seed, run_bridge, state_dir):
    [unknown] = seed(activity_name="Paint The Pole Pink")
    others = seed(2)

    first = run_bridge()
    second = run_bridge()

    for result in (first, second):
        assert result.returncode == 1, result.output
    assert esb.copies() == {r["id"]: 1 for r in others}
    [line] = [line for line in lines_naming(first.stdout, unknown["id"]) if "FAILED" in line]
    assert "activity_codes" in line and "config.py" in line and "'Paint The Pole Pink'" in line, line
    assert "since" not in line
    [again] = [line for line in lines_naming(second.stdout, unknown["id"]) if "FAILED" in line]
    assert re.search(r"failing since \d{4}-\d\d-\d\dT[\d:]+Z, in 2 runs", again), again
    failure = journal_rows(state_dir, "failures")[unknown["id"]]
    assert failure["runs"] == 2 and "Paint The Pole Pink" in failure["last_reason"]

    # staff give the record a 311 code of its own: it goes, and its failure history is cleared
    staff_edit(knack, unknown, {FIELDS["csr_activity_code"]: "PAINTPOL"})
    third = run_bridge()
    assert third.returncode == 0, third.output
    assert esb.copies()[unknown["id"]] == 1 and statuses(knack)[unknown["id"]] == SENT
    assert journal_rows(state_dir, "failures") == {}


def test_an_esb_rejection_line_carries_the_esbs_reason(knack, esb, seed, run_bridge, state_dir):
    records = seed(2)
    esb.reject_records = {records[0]["id"]: "SR 20-00001001 is locked by another user"}  # whenever it arrives

    result = run_bridge()

    assert result.returncode == 1, result.output
    assert [statuses(knack)[r["id"]] for r in records] == [READY, SENT]
    assert records[0]["id"] not in journal_states(state_dir)  # rejected: the ESB does not have it
    [line] = [line for line in lines_naming(result.stdout, records[0]["id"]) if "FAILED" in line]
    assert "is locked by another user" in line, line


def test_the_summary_names_the_first_20_failed_and_the_held_records(knack, esb, seed, run_bridge):
    unknown = [seed(activity_name="Not A Known Activity")[0] for _ in range(23)]
    [blocked] = seed(activity_name="Not A Known Activity", sr_number="20-55555555")
    [later] = seed(sr_number="20-55555555")  # a later activity of the same SR: held for 311's order
    [fine] = seed()

    result = run_bridge()

    assert result.returncode == 1, result.output
    assert esb.copies() == {fine["id"]: 1}
    failed, more = listed_ids(result.stdout, "failed_ids")
    assert len(failed) == 20 and more == 4
    assert set(failed) <= {r["id"] for r in unknown + [blocked]}
    assert listed_ids(result.stdout, "held_ids") == ([later["id"]], 0)
    assert (count(result.stdout, "failed"), count(result.stdout, "held")) == (24, 1)
    counts_add_up(result.stdout)


def test_after_a_read_timeout_the_next_run_says_the_answer_never_came(knack, esb, seed, run_bridge, state_dir):
    records = seed(2)
    esb.inject(delay=3, count=1)  # takes the first message to arrive in, answers after the program gave up
    env = {"ESB_TIMEOUT": "1"}

    first = run_bridge(env=env)
    assert first.returncode == 1, first.output
    [unanswered] = [r for r in records if journal_rows(state_dir)[r["id"]]["state"] == "sending"]
    entry = journal_rows(state_dir)[unanswered["id"]]
    assert "answer" in entry["note"], entry

    second = run_bridge(env=env)

    assert second.returncode == 0, second.output
    [warning] = [line for line in lines_naming(second.stdout, unanswered["id"]) if "WARNING" in line]
    assert "never came" in warning and "twice" in warning and "died" not in warning, warning
    assert esb.copies() == {r["id"]: 2 if r is unanswered else 1 for r in records}  # the duplicate a lost answer
    assert statuses(knack) == {r["id"]: SENT for r in records}


def test_a_run_that_died_mid_post_is_still_called_that(knack, esb, seed, run_bridge, state_dir):
    [record] = seed()
    state_dir.mkdir(mode=0o700, parents=True)
    journal = Journal(state_dir / JOURNAL_NAME)
    journal.set(record["id"], SENDING, "EMI-1001", "h")  # what a run killed during the POST leaves: no note
    journal.close()

    result = run_bridge()

    assert result.returncode == 0, result.output
    [warning] = [line for line in lines_naming(result.stdout, record["id"]) if "WARNING" in line]
    assert "died while posting" in warning and "twice" in warning, warning
    assert esb.copies() == {record["id"]: 1}


def test_dry_run_counts_add_up(knack, esb, seed, run_bridge):
    seed(3)
    seed(activity_name="Other")                   # would be DO_NOT_SEND
    seed(activity_name="Not A Known Activity")   # would fail

    result = run_bridge("--dry-run")

    assert result.returncode == 1, result.output
    assert (count(result.stdout, "rendered"), count(result.stdout, "do_not_send"),
            count(result.stdout, "failed")) == (3, 1, 1)
    counts_add_up(result.stdout)
    assert esb.received == [] and knack_requests(knack, "PUT") == []


@pytest.mark.parametrize("workers", [None, "1"], ids=["default-workers", "one-worker"])
def test_an_esb_that_takes_messages_but_never_answers_is_not_called_unreachable(knack, esb, seed, run_bridge,
                                                                                 state_dir, workers):
    records = seed(6 if workers == "1" else 3 * DEFAULT_ESB_MAX_IN_FLIGHT)
    esb.inject(delay=2.5, count=100)

    result = run_bridge(*(["--workers", workers] if workers else []), env={"ESB_TIMEOUT": "1"})

    assert result.returncode == 1, result.output
    stopped = summary(result.stdout).split("stopped:", 1)[1]
    assert "not answering (" in stopped and "cannot be reached" not in stopped, stopped
    posted = {r.record_id for r in esb.received}
    # the stop line states what the journal holds in doubt, however many were in flight when the run stopped
    assert f"; {len(posted)} message(s) left in doubt" in stopped, stopped
    if workers == "1":
        assert len(esb.received) == 3
    else:
        # the first wave goes out at once; the third timeout stops the run before much more could start
        assert 3 <= len(esb.received) < len(records) and len(posted) == len(esb.received)
    assert count(result.stdout, "not_attempted") == len(records) - len(posted)
    assert {rid: journal_states(state_dir).get(rid) for rid in posted} == dict.fromkeys(posted, "sending")
    assert knack_requests(knack, "PUT") == []


def test_an_esb_that_refuses_connections_is_called_unreachable(knack, esb, seed, run_bridge, state_dir):
    seed(6)
    esb.stop()

    result = run_bridge()

    assert result.returncode == 1, result.output
    stopped = summary(result.stdout).split("stopped:", 1)[1]
    assert "cannot be reached (3 records in a row)" in stopped, stopped
    assert journal_states(state_dir) == {} and knack_requests(knack, "PUT") == []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-5", "soon"])
def test_a_max_runtime_that_is_not_a_positive_finite_number_is_a_usage_error(knack, esb, seed, run_bridge, value):
    seed(1)

    result = run_bridge(f"--max-runtime={value}")

    assert result.returncode == 2, result.output
    no_traceback(result)
    assert "--max-runtime" in result.stderr
    assert knack.request_log == [] and esb.received == []


# ===== 6§2: a stop signal mid-backlog ================================================================================

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.timing
def test_a_signal_mid_backlog_stops_within_8_seconds_naming_it(knack, esb, seed, start_bridge, state_dir, signum):
    records = seed(60)  # three times the first round of POSTs (20): some are not attempted when the signal comes
    esb.latency = 0.3
    knack.latency = 0.05
    proc = start_bridge()
    deadline = time.monotonic() + 30
    while len(esb.received) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)

    signalled = time.monotonic()
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=30)
    took = time.monotonic() - signalled

    assert took < 8, f"exited {took:.1f}s after the signal"
    assert proc.returncode == 1, stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert signal.Signals(signum).name in summary(stdout).split("stopped:", 1)[1]
    counts_add_up(stdout)
    assert count(stdout, "not_attempted") > 0
    states = journal_states(state_dir)
    in_doubt = [rid for rid, state in states.items() if state == "sending"]
    # nothing half-done; in doubt at most the records in flight at the signal (one per worker)
    assert set(states.values()) <= {"done", "sending"} and len(in_doubt) <= DEFAULT_ESB_MAX_IN_FLIGHT, states
    marked = {rid for rid, status in statuses(knack).items() if status == SENT}
    assert marked == set(esb.copies()) - set(in_doubt)
    assert set(esb.copies().values()) == {1}
    assert len(marked) < len(records)


# ===== 7§13: record text in log lines ===============================================================================

def test_control_characters_from_records_cannot_forge_or_colour_log_lines(knack, esb, seed, run_bridge):
    forged = f"2024-07-04T10:00:00Z {APP} summary: fetched=0 sent=0 failed=0"
    [evil] = seed(sr_number=f"20-1\n{forged}", activity_name="Bad\x1b[2J\x1b[31mname\x00\u202e")
    [fine] = seed()

    result = run_bridge()

    assert result.returncode == 1, result.output
    assert esb.copies() == {fine["id"]: 1}
    summary(result.stdout)  # exactly one line is a summary line
    for raw in ("\x1b", "\x00", "\u202e"):
        assert raw not in result.output
    [line] = [line for line in lines_naming(result.stdout, evil["id"]) if "FAILED" in line]
    assert "20-1\\n2024" in line and "Bad\\x1b[2J" in line and "\\x00" in line and "\\u202e" in line, line


def test_log_safe_escapes_what_could_break_a_line_and_keeps_the_rest():
    assert log_safe("20-1\r\n\tx") == "20-1\\r\\n\\tx"
    assert log_safe("a\x00b\x7fc\x9bd") == "a\\x00b\\x7fc\\x9bd"
    assert log_safe("left\u2028right\u202eevil\ufeff") == "left\\u2028right\\u202eevil\\ufeff"
    kept = "caf\u00e9 \u00f1 \u4e2d \U0001f6a6 & <tag> \"q\""
    assert log_safe(kept) == kept
    assert log_safe("lone \udc80 surrogate").encode("utf-8")


# ===== unit: a stop signal landing inside a network call =============================================================

class FakeKnack:
    """Stands in for KnackClient: serves records and takes status updates; can fail a call as if cut short."""

    def __init__(self, records: list[dict], stop_during: str = ""):
        self.records = records
        self.stop_during = stop_during
        self.stop = None
        self.updates: list[tuple[str, str]] = []

    def app_metadata(self):
        return app_metadata(APP, CONFIG[APP], timezone="Central Time (US & Canada)")

    def ready_page(self, scene, view, emi_field, status_field, page, sort_field):
        if self.stop_during == "read":
            self.stop.request("SIGTERM")
            raise OutageError("Knack view view_1653 records page 1: cut short (stop signal)")
        return Page([dict(r) for r in self.records], 1, len(self.records))

    def set_status(self, obj, record_id, status_field, status):
        self.updates.append((record_id, status))

    def record_status(self, obj, record_id, status_field):
        return SENT

    def close(self):
        pass


class FakeESB:
    """Stands in for ESBClient: accepts messages, and is cut short by a SIGTERM on the `cut`-th one."""

    def __init__(self, cut: int, *, timed_out: bool = False):
        self.cut = cut
        self.timed_out = timed_out  # the `cut`-th POST ran out of time on its own while the signal came
        self.stop = None
        self.posted: list[str] = []

    def deliver(self, body: bytes, before_try=None, *, timeout=None) -> Delivery:
        self.posted.append(parse_message(body)["id"])
        if len(self.posted) == self.cut:
            self.stop.request("SIGTERM")
            if self.timed_out:
                raise ESBUncertain("POST to the ESB cut short (no complete answer within 5s); it may have the message")
            raise ESBUncertain("POST to the ESB cut short (a stop signal came); it may have the message",
                               by_signal=True)
        return Delivery(status=200, attempts=1)

    def close(self):
        pass


def unit_records(n: int) -> list[dict]:
    return [activity_record(CONFIG[APP], record_id=f"unit{i:020d}", atd_activity_id=i, emi_id=f"EMI-{i}",
                            sr_number=f"20-{i:08d}", activity_datetime=dt.datetime(2024, 7, 4, 10, 26),
                            activity_details="x", activity_name="Dispatch Technician", issue_status="open")
            for i in range(1, n + 1)]


def run_with_fakes(monkeypatch, tmp_path, knack: FakeKnack, esb: FakeESB, workers: int = 1) -> tuple[int, str]:
    """One worker: the fake ESB's `cut` counts posts, which then follow 311's order over the whole backlog."""
    def make_knack(*args, stop=None, **kwargs):
        knack.stop = stop
        return knack

    def make_esb(*args, stop=None, **kwargs):
        esb.stop = stop
        return esb

    monkeypatch.setattr(run_module, "KnackClient", make_knack)
    monkeypatch.setattr(run_module, "ESBClient", make_esb)
    settings = Settings(app=load_app(APP, CONFIG), knack_app_id=APP_ID, knack_api_key=API_KEY,
                        knack_api_url="http://knack.invalid/v1", knack_max_rps=8.0,
                        esb_endpoint="https://esb.invalid/submitKnack", esb_cert=tmp_path / "c", esb_key=tmp_path / "k",
                        esb_verify=True, esb_timeout=5.0, state_dir=tmp_path / "state", workers=workers)
    out = StringIO()
    code = run_module.run(settings, out=out)
    return code, out.getvalue()


def test_a_post_cut_short_by_a_signal_stays_sending_and_the_summary_names_the_signal(monkeypatch, tmp_path):
    records = unit_records(4)
    knack, esb = FakeKnack(records), FakeESB(cut=2)

    code, output = run_with_fakes(monkeypatch, tmp_path, knack, esb)

    assert code == 1
    stopped = summary(output).split("stopped:", 1)[1]
    assert stopped.strip() == "received SIGTERM", stopped
    assert esb.posted == [records[0]["id"], records[1]["id"]]  # nothing new after the signal
    assert knack.updates == [(records[0]["id"], SENT)]
    states = journal_states(tmp_path / "state")
    assert states == {records[0]["id"]: "done", records[1]["id"]: "sending"}
    assert "stopped by SIGTERM" in journal_rows(tmp_path / "state")[records[1]["id"]]["note"]
    assert (count(output, "sent"), count(output, "failed"), count(output, "not_attempted")) == (1, 1, 2)
    counts_add_up(output)


def test_a_post_that_timed_out_as_the_signal_came_keeps_its_own_reason_in_the_journal(monkeypatch, tmp_path):
    records = unit_records(2)
    code, output = run_with_fakes(monkeypatch, tmp_path, FakeKnack(records), FakeESB(cut=1, timed_out=True))

    assert code == 1
    note = journal_rows(tmp_path / "state")[records[0]["id"]]["note"]
    assert "no complete answer within 5s" in note and "SIGTERM" not in note


def test_a_knack_read_cut_short_by_a_signal_is_reported_as_the_signal(monkeypatch, tmp_path):
    knack, esb = FakeKnack(unit_records(2), stop_during="read"), FakeESB(cut=0)

    code, output = run_with_fakes(monkeypatch, tmp_path, knack, esb)

    assert code == 1
    assert summary(output).split("stopped:", 1)[1].strip() == "received SIGTERM"
    assert esb.posted == [] and knack.updates == []


def test_the_run_is_kept_in_the_journal_with_its_counts(monkeypatch, tmp_path):
    records = unit_records(3)
    code, output = run_with_fakes(monkeypatch, tmp_path, FakeKnack(records), FakeESB(cut=0))

    assert code == 0, output
    db = sqlite3.connect(str(tmp_path / "state" / JOURNAL_NAME))
    try:
        rows = db.execute("SELECT fetched, sent, failed, exit_code, stop_reason, ended FROM runs").fetchall()
    finally:
        db.close()
    [(fetched, sent, failed, exit_code, stop_reason, ended)] = rows
    assert (fetched, sent, failed, exit_code, stop_reason) == (3, 3, 0, 0, "") and ended is not None

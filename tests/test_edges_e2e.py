"""The program at its edges, end to end (issue 13 items 6 and 7): a malformed HEALTHCHECK_URL, stdout closed or on
a full disk, `--check` against a journal the run refuses, and output that tells the truth (JSON dry-run messages,
a time budget spent before the first read, one count of fetched records, a progress line after a stop). The real
command against the Knack and ESB simulators; outcomes read from the ESB, Knack, the journal and the exit code.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from simulators.esb import parse_message
from tests.conftest import ENTRY, statuses
from tests.test_check_e2e import parse_table

APP = "data-tracker"
SECRET_PATH = "ping-key-5b1e9d0c"
SUMMARY = re.compile(rf"^\S+ {APP} summary(?: \(dry run\))?: .*$", re.MULTILINE)


@pytest.fixture
def bridge_env(bridge_env):
    return {**bridge_env, "KNACK_MAX_RPS": "50"}


def summary(stdout: str) -> str:
    lines = SUMMARY.findall(stdout)
    assert len(lines) == 1, f"expected one summary line, got {lines!r}\n{stdout}"
    return lines[0]


def count(stdout: str, name: str) -> int:
    found = re.search(rf"\b{name}=(\d+)", summary(stdout))
    assert found, summary(stdout)
    return int(found.group(1))


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and "Exception ignored" not in text, text


# ----- a malformed HEALTHCHECK_URL is a configuration error ------------------------------------------------------

MALFORMED_PINGS = {
    "port-abc": f"https://hc-ping.example:abc/{SECRET_PATH}",
    "port-99999": f"https://hc-ping.example:99999/{SECRET_PATH}",
    "no-host": f"https:///{SECRET_PATH}",
    "other-scheme": f"ftp://hc-ping.example/{SECRET_PATH}",
    "broken-ipv6-host": f"https://[::1/{SECRET_PATH}",
}


@pytest.mark.parametrize("url", MALFORMED_PINGS.values(), ids=MALFORMED_PINGS.keys())
def test_a_malformed_healthcheck_url_stops_a_run_before_anything_is_sent(run_bridge, knack, esb, seed, url):
    seed(2)
    result = run_bridge(env={"HEALTHCHECK_URL": url})

    assert result.returncode == 2, result.output
    no_traceback(result.output)
    [line] = result.stderr.splitlines()
    assert line.startswith("configuration error: HEALTHCHECK_URL "), line
    assert SECRET_PATH not in result.output
    assert esb.received == [] and knack.request_log == []
    assert set(statuses(knack).values()) == {"READY_TO_SEND"}


@pytest.mark.parametrize("url", MALFORMED_PINGS.values(), ids=MALFORMED_PINGS.keys())
def test_a_malformed_healthcheck_url_is_a_fail_row_of_the_check(run_bridge, knack, esb, url):
    result = run_bridge("--check", env={"HEALTHCHECK_URL": url}, timeout=60)

    assert result.returncode == 2, result.output
    no_traceback(result.output)
    table = parse_table(result.stdout)
    assert table.status("HEALTHCHECK_URL") == "FAIL"
    assert table.detail("HEALTHCHECK_URL").startswith("HEALTHCHECK_URL ")
    assert table.verdict.endswith("not ready: fix the FAIL rows")
    assert SECRET_PATH not in result.output


# ----- --check applies the run's journal rules ---------------------------------------------------------------------

JOURNAL_NAME = f"{APP}.journal.sqlite3"


def journal_of_layout(path: Path, layout: str) -> None:
    """A journal a run refuses: one written by a newer version, or one with a column this version does not know."""
    from knack311.journal import Journal

    Journal(path).close()  # this version's layout, then changed as the other program would have it
    db = sqlite3.connect(str(path))
    try:
        if layout == "newer-version":
            db.execute("PRAGMA user_version = 3")
        else:
            db.execute("ALTER TABLE deliveries ADD COLUMN attempts INTEGER")
        db.commit()
    finally:
        db.close()


@pytest.mark.parametrize("layout", ["newer-version", "unknown-column"])
def test_the_check_fails_a_journal_the_run_refuses(run_bridge, knack, esb, seed, state_dir, layout):
    seed(2)
    state_dir.mkdir(parents=True)
    journal_of_layout(state_dir / JOURNAL_NAME, layout)

    checked = run_bridge("--check", timeout=60)
    no_traceback(checked.output)
    table = parse_table(checked.stdout)
    assert table.status("journal") == "FAIL", table.rows
    assert "layout this version does not know" in table.detail("journal")
    assert checked.returncode == 2 and table.verdict.endswith("not ready: fix the FAIL rows")

    # the same rule as the run's: it refuses that journal before anything is read or sent
    knack.request_log.clear()
    refused = run_bridge()
    assert refused.returncode == 2, refused.output
    assert knack.request_log == [] and esb.received == []


def test_the_check_passes_an_older_journal_the_run_upgrades(run_bridge, knack, esb, seed, state_dir):
    state_dir.mkdir(parents=True)
    db = sqlite3.connect(str(state_dir / JOURNAL_NAME))  # the first layout that shipped (user_version 0)
    db.execute("CREATE TABLE deliveries (record_id TEXT PRIMARY KEY, state TEXT NOT NULL, emi TEXT NOT NULL, "
               "message_hash TEXT NOT NULL, updated REAL NOT NULL)")
    db.commit()
    db.close()

    table = parse_table(run_bridge("--check", timeout=60).stdout)

    assert table.status("journal") == "OK", table.rows
    assert "layout version 0 (the next run upgrades it to" in table.detail("journal")


# ----- stdout closed or on a full disk -------------------------------------------------------------------------------

def start_with_stdout(bridge_env, tmp_path, args: list[str], stdout, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ENTRY), APP, *args], env=bridge_env, cwd=tmp_path, stdout=stdout,
                            stderr=stderr, text=True)


def closed_pipe() -> int:
    """The write end of a pipe whose reader is already gone, as under `| head` once head has exited."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


@pytest.mark.parametrize("stderr_too", [False, True], ids=["stdout", "stdout-and-stderr"])
def test_a_run_logging_to_a_full_disk_delivers_everything_and_exits_with_its_own_code(knack, esb, seed, bridge_env,
                                                                                     tmp_path, stderr_too):
    records = seed(5)
    with open("/dev/full", "w") as full:  # cron's `>> log` on a full disk: every write fails with ENOSPC
        proc = start_with_stdout(bridge_env, tmp_path, [], full, full if stderr_too else subprocess.PIPE)
        _, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 0, stderr  # the run's own code, not Python's 120 for a failed final flush
    if not stderr_too:
        assert stderr == ""  # no "Exception ignored ... OSError", no traceback
    assert statuses(knack) == {r["id"]: "SENT" for r in records}
    assert esb.copies() == {r["id"]: 1 for r in records}


def test_a_run_whose_reader_went_away_goes_on_and_keeps_its_exit_code(knack, esb, seed, bridge_env, tmp_path):
    records = seed(3)
    [unknown] = seed(activity_name="Not A Known Activity")  # fails: the run's own code is 1
    write_end = closed_pipe()
    try:
        proc = start_with_stdout(bridge_env, tmp_path, [], write_end)
    finally:
        os.close(write_end)
    _, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 1 and stderr == "", stderr
    assert statuses(knack) == {**{r["id"]: "SENT" for r in records}, unknown["id"]: "READY_TO_SEND"}


def test_a_dry_run_whose_reader_went_away_stops_reading_knack_quietly(knack, esb, seed, bridge_env, tmp_path):
    seed(1100)  # two pages
    write_end = closed_pipe()
    try:
        proc = start_with_stdout(bridge_env, tmp_path, ["--dry-run"], write_end)
    finally:
        os.close(write_end)
    _, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 1, stderr  # stopped early, as the exit code table says
    assert stderr == ""  # no BrokenPipeError traceback, no "Exception ignored"
    pages = [r for r in knack.request_log if r.method == "GET" and "/records" in r.path]
    assert len(pages) == 1, "the dry run read on although nobody reads its output"
    assert esb.received == [] and set(statuses(knack).values()) == {"READY_TO_SEND"}


@pytest.mark.parametrize("mode", ["--report", "--check"])
def test_report_and_check_into_a_closed_pipe_end_quietly_with_their_own_code(knack, esb, seed, run_bridge,
                                                                             bridge_env, tmp_path, mode):
    seed(2)
    seed(activity_name="Not A Known Activity")
    run_bridge()  # the journal now has a failing record and a run for --report to print
    expected = run_bridge(mode, timeout=60).returncode

    write_end = closed_pipe()
    try:
        proc = start_with_stdout(bridge_env, tmp_path, [mode], write_end)
    finally:
        os.close(write_end)
    _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == expected, stderr
    no_traceback(stderr)
    assert "BrokenPipe" not in stderr


# ----- output that tells the truth -----------------------------------------------------------------------------------

def test_json_dry_run_messages_are_json_events_with_the_xml_in_a_field(knack, esb, seed, run_bridge):
    records = seed(3)

    result = run_bridge("--dry-run", "--log-format", "json")

    assert result.returncode == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]  # every line is JSON: no raw XML among them
    messages = [e for e in events if e["event"] == "dry_run_message"]
    assert sorted(e["record_id"] for e in messages) == sorted(r["id"] for r in records)
    for event in messages:
        assert parse_message(event["xml"].encode("ascii"))["id"] == event["record_id"]
    assert events[-1]["event"] == "summary" and events[-1]["rendered"] == 3
    assert esb.received == []


def test_a_text_dry_run_still_prints_each_message_after_its_line(knack, esb, seed, run_bridge):
    [record] = seed(1)

    result = run_bridge("--dry-run")

    assert result.returncode == 0, result.output
    lines = result.stdout.splitlines()
    [at] = [i for i, line in enumerate(lines) if "rendered (dry run, not sent)" in line]
    xml = "\n".join(lines[at + 1:-1])
    assert parse_message(xml.encode("ascii"))["id"] == record["id"]


def test_a_time_budget_spent_before_the_first_read_still_counts_what_waits(knack, esb, seed, run_bridge):
    seed(3)

    result = run_bridge("--max-runtime", "0.001")

    assert result.returncode == 0, result.output  # only deferred by the time budget
    assert (count(result.stdout, "fetched"), count(result.stdout, "deferred")) == (3, 3)
    [line] = [line for line in result.stdout.splitlines() if "used before the first read" in line]
    assert "3 record(s) waiting" in line
    assert esb.received == [] and set(statuses(knack).values()) == {"READY_TO_SEND"}


def test_the_log_and_the_summary_count_the_same_fetched_records_when_the_view_ignores_its_filter(
        knack, esb, seed, run_bridge):
    ready = seed(1)
    seed(2, esb_status="SENT")
    knack.ignore_filters = True

    result = run_bridge()

    assert result.returncode == 0, result.output
    [line] = [line for line in result.stdout.splitlines() if " fetched " in line]
    fetched_in_log = int(re.search(r" fetched (\d+) record\(s\)", line).group(1))
    assert fetched_in_log == count(result.stdout, "fetched") == 3
    assert "2 of them not READY_TO_SEND (skipped)" in line
    assert count(result.stdout, "skipped") == 2 and esb.copies() == {ready[0]["id"]: 1}

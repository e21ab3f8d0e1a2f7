"""The program at its edges, end to end (issue 13 items 6 and 7): a malformed HEALTHCHECK_URL, stdout closed or on
a full disk, `--check` against a journal the run refuses, and output that tells the truth (JSON dry-run messages,
a time budget spent before the first read, one count of fetched records, a progress line after a stop). The real
command against the Knack and ESB simulators; outcomes read from the ESB, Knack, the journal and the exit code.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import statuses
from tests.test_check_e2e import parse_table

APP = "data-tracker"
SECRET_PATH = "ping-key-5b1e9d0c"
SUMMARY = re.compile(rf"^\S+ {APP} summary(?: \(dry run\))?: .*$", re.MULTILINE)


@pytest.fixture
def bridge_env(bridge_env):
    return {**bridge_env, "KNACK_MAX_RPS": "50"}


@pytest.fixture
def state_dir(bridge_env) -> Path:
    return Path(bridge_env["STATE_DIR"])


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

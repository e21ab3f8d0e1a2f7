"""The program at its edges, end to end (issue 13 items 6 and 7): a malformed HEALTHCHECK_URL, stdout closed or on
a full disk, `--check` against a journal the run refuses, and output that tells the truth (JSON dry-run messages,
a time budget spent before the first read, one count of fetched records, a progress line after a stop). The real
command against the Knack and ESB simulators; outcomes read from the ESB, Knack, the journal and the exit code.
"""

from __future__ import annotations

import re
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

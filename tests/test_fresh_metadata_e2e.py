"""Issue 13 item 2, end to end: the metadata cache serves the idle run only. A run with records reads the metadata
afresh before its first message, so a stale or poisoned cache (a field typed otherwise, another timezone) never
reaches 311; fresh metadata that does not fit config.py is a configuration error with nothing sent.

The real command against the Knack and ESB simulators; outcomes are what the ESB received, the Knack statuses, the
requests Knack saw, the cache file and the exit code.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from config import CONFIG
from simulators.activities import app_metadata
from simulators.esb import parse_message
from tests.conftest import APP_ID, make_knack, statuses

APP = "data-tracker"
FIELDS = CONFIG[APP]["fields"]
READY, SENT = "READY_TO_SEND", "SENT"
CENTRAL = "Central Time (US & Canada)"
# the seeder's activity time, 2024-07-04 10:26 in Austin (daylight saving time)
AUSTIN_DATE = "2024-07-04T10:26:00-05:00"


@pytest.fixture
def knack():
    with make_knack(rate_limit=None) as simulator:
        yield simulator


@pytest.fixture
def bridge_env(bridge_env):
    return {**bridge_env, "KNACK_MAX_RPS": "50"}


@pytest.fixture
def cache_file(bridge_env) -> Path:
    return Path(bridge_env["STATE_DIR"]) / f"{APP}.metadata.json"


def metadata_reads(knack, since: int = 0) -> int:
    return sum(1 for r in knack.request_log[since:] if "/applications/" in r.path)


def activity_dates(esb) -> dict[str, str]:
    return {m.record_id: parse_message(m.body)["activity_date"] for m in esb.accepted}


def typed(metadata: dict, variable: str, knack_type: str) -> dict:
    """The metadata with the configured field of `variable` typed `knack_type`."""
    for obj in metadata["application"]["objects"]:
        for field in obj["fields"]:
            if field["key"] == FIELDS[variable]:
                field["type"] = knack_type
    return metadata


def poison(cache_file: Path, change) -> None:
    """Edit the cached copy in place, keeping it fresh by age, as a stale or tampered file would be."""
    saved = json.loads(cache_file.read_text())
    change(saved["metadata"])
    saved["fetched_at"] = time.time()
    cache_file.write_text(json.dumps(saved))


def warm_cache(seed, run_bridge) -> None:
    """A first run delivers one record and leaves a cached copy of the metadata."""
    seed(1)
    first = run_bridge()
    assert first.returncode == 0, first.output


def test_a_cache_typing_the_activity_datetime_as_text_never_reaches_311(run_bridge, knack, seed, esb, cache_file):
    warm_cache(seed, run_bridge)
    poison(cache_file, lambda metadata: typed(metadata, "activity_datetime", "short_text"))
    records = seed(2)
    before = len(knack.request_log)

    run = run_bridge()

    assert run.returncode == 0, run.output
    assert {activity_dates(esb)[r["id"]] for r in records} == {AUSTIN_DATE}
    assert {statuses(knack)[r["id"]] for r in records} == {SENT}
    assert metadata_reads(knack, before) == 1  # the copy that does not fit config.py is replaced at once
    types = {f["key"]: f["type"] for o in json.loads(cache_file.read_text())["metadata"]["application"]["objects"]
             for f in o["fields"]}
    assert types[FIELDS["activity_datetime"]] == "date_time"


def test_a_cache_naming_another_timezone_never_reaches_311(run_bridge, knack, seed, esb, cache_file):
    warm_cache(seed, run_bridge)
    poison(cache_file, lambda metadata: metadata["application"]["settings"].update(timezone="Tokyo"))
    records = seed(2)
    before = len(knack.request_log)

    run = run_bridge()

    assert run.returncode == 0, run.output
    assert {activity_dates(esb)[r["id"]] for r in records} == {AUSTIN_DATE}  # not +09:00
    for message in esb.accepted[-2:]:
        assert parse_message(message.body)["timestamp"].endswith(("-05:00", "-06:00"))  # Austin's offset
    # the page that held records, then the metadata afresh, before any message went (its status update follows)
    log = knack.request_log[before:]
    first_update = next(i for i, r in enumerate(log) if r.method == "PUT")
    assert ["/views/" in r.path or "/applications/" in r.path for r in log[:2]] == [True, True]
    assert "/views/" in log[0].path and "/applications/" in log[1].path and first_update > 1
    assert metadata_reads(knack, before) == 1
    assert json.loads(cache_file.read_text())["metadata"]["application"]["settings"]["timezone"] == CENTRAL


def test_an_idle_run_is_one_request_whatever_the_cached_timezone(run_bridge, knack, seed, esb, cache_file):
    warm_cache(seed, run_bridge)
    poison(cache_file, lambda metadata: metadata["application"]["settings"].update(timezone="Tokyo"))
    before = len(knack.request_log)

    idle = run_bridge()

    assert idle.returncode == 0, idle.output
    assert [r.method for r in knack.request_log[before:]] == ["GET"]
    assert "/views/" in knack.request_log[-1].path  # the view's scene came from the cache, nothing else was asked


def test_fresh_metadata_with_a_wrongly_typed_field_is_a_configuration_error_and_nothing_is_sent(
        run_bridge, knack, seed, esb, cache_file):
    warm_cache(seed, run_bridge)
    sent_before = len(esb.received)
    # the app was edited in the builder after the cache was written: the date field is now short text
    knack.set_metadata(typed(app_metadata(APP, CONFIG[APP], timezone=CENTRAL, app_id=APP_ID),
                             "activity_datetime", "short_text"))
    records = seed(3)

    run = run_bridge()

    assert run.returncode == 2, run.output
    assert "Traceback" not in run.output
    [line] = [line for line in run.stderr.splitlines() if line.strip()]
    assert f"{FIELDS['activity_datetime']} is a short_text field, expected date_time" in line
    assert "activity_datetime" in line
    assert len(esb.received) == sent_before
    assert {statuses(knack)[r["id"]] for r in records} == {READY}

    again = run_bridge()  # the copy that does not fit is not trusted: every run says so until config.py is fixed
    assert again.returncode == 2 and FIELDS["activity_datetime"] in again.stderr
    assert len(esb.received) == sent_before


def test_without_a_cache_a_wrongly_typed_field_stops_the_run_before_the_view_is_read(run_bridge, knack, seed, esb):
    knack.set_metadata(typed(app_metadata(APP, CONFIG[APP], timezone=CENTRAL, app_id=APP_ID),
                             "esb_status", "short_text"))
    seed(2)

    run = run_bridge()

    assert run.returncode == 2, run.output
    assert f"{FIELDS['esb_status']} is a short_text field, expected multiple_choice" in run.stderr
    assert [r.path for r in knack.request_log] == [f"/v1/applications/{APP_ID}"]
    assert esb.received == []

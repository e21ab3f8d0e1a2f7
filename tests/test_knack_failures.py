"""A misbehaving Knack, end to end (issues 6 §2, §3, §5 and 7 §1, §8 to §11, §14, §15): the real command against
the Knack simulator taught to hang, trickle, lie with a 200, page forever, answer too much or echo the API key.

Each test asserts outcomes: the exit code, what the ESB received and how often, the Knack statuses, the journal,
Knack's request log; every run is checked for tracebacks and for the canary API key in its output.
Bounds in time ("within 8 s of the signal", "by --max-runtime + ESB_TIMEOUT") are behaviour and asserted with
margins for a loaded machine; they are not speed measurements.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from config import CONFIG
from simulators.activities import app_metadata
from tests.conftest import API_KEY, APP_ID, Run, make_knack, statuses

APP = CONFIG["data-tracker"]
OBJ, VIEW = APP["obj"], APP["view"]
STATUS = APP["fields"]["esb_status"]
READY, SENT = "READY_TO_SEND", "SENT"
STARTUP = 3.0  # seconds a loaded machine may take to start Python and import the program
SUMMARY = re.compile(r"^.*summary: .*$", re.MULTILINE)


@pytest.fixture
def knack():
    # no rate limit: these tests are about faults; the program paces at KNACK_MAX_RPS below
    with make_knack(rate_limit=None) as simulator:
        yield simulator


@pytest.fixture
def bridge_env(bridge_env):
    return {**bridge_env, "KNACK_MAX_RPS": "50"}


def checked(result: Run) -> Run:
    assert "Traceback" not in result.output, result.output
    assert API_KEY not in result.output, "the API key reached the output"
    return result


@pytest.fixture
def bridge(run_bridge):
    def run(*args: str, env: dict | None = None, timeout: float = 60) -> Run:
        return checked(run_bridge(*args, env=env, timeout=timeout))
    return run


def finish(proc: subprocess.Popen, timeout: float = 30) -> Run:
    """Wait for a run started with start_bridge, with the same checks as `bridge`."""
    out, err = proc.communicate(timeout=timeout)
    return checked(Run(proc.returncode, out, err))


def summary(result: Run) -> str:
    lines = SUMMARY.findall(result.stdout)
    assert len(lines) == 1, result.output
    return lines[0]


def journal(bridge_env) -> dict[str, str]:
    path = Path(bridge_env["STATE_DIR"]) / "data-tracker.journal.sqlite3"
    if not path.exists():
        return {}
    db = sqlite3.connect(str(path))
    try:
        return dict(db.execute("SELECT record_id, state FROM deliveries").fetchall())
    finally:
        db.close()


def puts(knack) -> list:
    return [r for r in knack.request_log if r.method == "PUT"]


def wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended before the awaited moment:\n{out}{err}")
        time.sleep(0.02)
    pytest.fail("the awaited moment never came")


def assert_recovers(bridge, knack, esb, records: list[dict]) -> None:
    """With Knack healthy again, one run sends what is left and sets everything SENT; no message twice."""
    knack.clear_faults()
    again = bridge()
    assert again.returncode == 0, again.output
    assert statuses(knack) == {r["id"]: SENT for r in records}
    assert esb.copies() == {r["id"]: 1 for r in records}


# ----- 6 §2: a stop signal ends the run within 8 s, whatever Knack is doing ----------------------------------------

def _hang_metadata(knack, records):
    knack.inject("GET", "/applications/", hang=True)
    return lambda r: "/applications/" in r.path


def _hang_records_page(knack, records):
    knack.inject("GET", "/views/", hang=True)
    return lambda r: "/views/" in r.path


def _hang_status_update(knack, records):
    knack.inject("PUT", records[0]["id"], hang=True)
    return lambda r: r.method == "PUT"


@pytest.mark.parametrize("hang", [
    pytest.param(_hang_metadata, id="metadata"),
    pytest.param(_hang_records_page, id="records-page"),
    pytest.param(_hang_status_update, id="status-put", marks=pytest.mark.slow),  # the update gets the stop grace
])
def test_sigterm_while_a_knack_request_hangs_ends_the_run_within_8s(bridge, start_bridge, knack, esb, seed,
                                                                    bridge_env, hang):
    records = seed(2)
    first, other = records
    hung = hang(knack, records)
    proc = start_bridge(env={"ESB_TIMEOUT": "30"})  # the signal, not the request's deadline, must end it
    wait_for(lambda: any(hung(r) and r.status == 0 for r in knack.request_log), 20, proc)
    if hang is _hang_status_update:  # the other record (another SR) goes at the same time: let it finish
        wait_for(lambda: statuses(knack)[other["id"]] == SENT, 20, proc)

    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    result = finish(proc)
    assert time.monotonic() - signalled < 8

    assert result.returncode == 1, result.output
    assert "SIGTERM" in summary(result)
    assert [r for r in knack.request_log if r.at > signalled] == []  # no retry, nothing new after the signal
    if hang is _hang_status_update:
        # the ESB has the first message; the update never came back: delivered, set SENT by the next run
        assert statuses(knack) == {first["id"]: READY, other["id"]: SENT}
        assert esb.copies() == {first["id"]: 1, other["id"]: 1}
        assert journal(bridge_env) == {first["id"]: "delivered", other["id"]: "done"}
    else:  # a read cut short has no effect
        assert set(statuses(knack).values()) == {READY}
        assert esb.received == [] and puts(knack) == []
        assert journal(bridge_env) == {}
    assert_recovers(bridge, knack, esb, records)


@pytest.mark.parametrize("where", ["/views/", "PUT"], ids=["records-page", "status-put"])
def test_sigterm_during_a_retry_after_wait_ends_the_run_within_8s_and_no_retry_follows(bridge, start_bridge, knack,
                                                                                     esb, seed, bridge_env, where):
    records = seed(2)
    first, other = records
    if where == "PUT":
        knack.inject("PUT", first["id"], status=429, retry_after=20, count=10)
    else:
        knack.inject("GET", "/views/", status=429, retry_after=20, count=10)
    proc = start_bridge(env={"ESB_TIMEOUT": "30"})
    wait_for(lambda: any(r.status == 429 for r in knack.request_log), 20, proc)
    if where == "PUT":  # the other record (another SR) went at the same time; a 429 says nothing about it
        wait_for(lambda: statuses(knack)[other["id"]] == SENT, 20, proc)
    time.sleep(0.5)  # into the 20 s wait

    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    result = finish(proc)
    assert time.monotonic() - signalled < 8

    assert result.returncode == 1, result.output
    assert "SIGTERM" in summary(result)
    time.sleep(0.5)
    refused = [r for r in knack.request_log if r.status == 429]
    assert len(refused) == 1, "a retry followed the signal"
    assert [r for r in knack.request_log if r.at > signalled] == []
    if where == "PUT":
        assert statuses(knack) == {first["id"]: READY, other["id"]: SENT}
        assert esb.copies() == {first["id"]: 1, other["id"]: 1}
        assert journal(bridge_env) == {first["id"]: "delivered", other["id"]: "done"}
    else:
        assert set(statuses(knack).values()) == {READY}
        assert esb.received == [] and puts(knack) == []
    assert_recovers(bridge, knack, esb, records)


# ----- 6 §3: no request outlives its deadline, no run outlives --max-runtime + ESB_TIMEOUT -------------------------

def test_a_knack_that_never_answers_is_cut_at_esb_timeout(bridge, knack, esb, seed):
    records = seed(2)
    knack.inject("GET", "/applications/", hang=True, count=100)

    began = time.monotonic()
    result = bridge(env={"ESB_TIMEOUT": "2"})
    assert time.monotonic() - began < 2 + STARTUP

    assert result.returncode == 1, result.output
    errors = [line for line in result.stdout.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "Knack app metadata" in errors[0] and "within 2s" in errors[0], result.output
    assert len(knack.request_log) == 1  # not retried: the request's time was spent
    assert esb.received == [] and puts(knack) == []
    assert_recovers(bridge, knack, esb, records)


@pytest.mark.timing
def test_knack_timeout_cuts_a_knack_request_apart_from_esb_timeout(bridge, knack, esb, seed):
    records = seed(2)
    knack.inject("GET", "/applications/", hang=True, count=100)

    began = time.monotonic()
    result = bridge(env={"ESB_TIMEOUT": "30", "KNACK_TIMEOUT": "2"})
    # ESB_TIMEOUT would have held the hanging request for 30 s; half of that is a margin no load erases
    assert time.monotonic() - began < 15

    assert result.returncode == 1, result.output
    errors = [line for line in result.stdout.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "within 2s (KNACK_TIMEOUT)" in errors[0], result.output
    assert esb.received == [] and puts(knack) == []
    assert_recovers(bridge, knack, esb, records)


@pytest.mark.parametrize("where", ["records-page", "status-put"])
def test_a_trickling_knack_cannot_keep_the_run_past_max_runtime_plus_esb_timeout(bridge, knack, esb, seed,
                                                                                bridge_env, where):
    records = seed(4)
    if where == "records-page":
        knack.inject("GET", "/views/", trickle=0.2, count=100)
    else:
        knack.inject("PUT", "/records/", trickle=0.2, count=100)  # applied, then answered a byte at a time

    began = time.monotonic()
    result = bridge("--max-runtime", "2", env={"ESB_TIMEOUT": "3"}, timeout=60)
    assert time.monotonic() - began < 2 + 3 + STARTUP

    assert result.returncode == 1, result.output
    if where == "records-page":
        assert esb.received == [] and puts(knack) == []
        assert set(statuses(knack).values()) == {READY}
    else:
        # the updates begun were cut: the ESB has each of those messages once, the journal keeps them delivered
        # (whether Knack applied an update before its answer trickled is for the next run to find out)
        posted = esb.copies()
        assert posted and set(posted.values()) == {1}, posted
        assert journal(bridge_env) == {record_id: "delivered" for record_id in posted}
    assert_recovers(bridge, knack, esb, records)


def test_429_with_a_long_retry_after_on_every_update_keeps_to_the_budget(bridge, knack, esb, seed, bridge_env):
    records = seed(3)
    knack.inject("PUT", "/records/", status=429, retry_after=4, count=1000)

    began = time.monotonic()
    result = bridge("--max-runtime", "2", env={"ESB_TIMEOUT": "5"}, timeout=120)
    ended = time.monotonic()
    assert ended - began < 2 + 5 + STARTUP

    assert result.returncode == 1, result.output
    assert [r for r in knack.request_log if r.at > began + 2 + 5 + STARTUP] == []
    posted = esb.copies()  # the records begun before the budget ran out; the rest were deferred, not posted
    assert posted and set(posted.values()) == {1}, posted
    assert journal(bridge_env) == {record_id: "delivered" for record_id in posted}
    assert set(statuses(knack).values()) == {READY}
    assert_recovers(bridge, knack, esb, records)


# ----- 6 §5: an unreachable Knack is named, and its retries are seen as they happen ------------------------------

def test_an_unreachable_knack_is_named_with_its_address_and_cause_and_each_retry_is_logged(bridge, knack, esb, seed):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens there once the socket is closed

    result = bridge(env={"KNACK_API_URL": f"http://127.0.0.1:{port}/v1", "ESB_TIMEOUT": "3"})

    assert result.returncode == 1, result.output
    lines = result.stdout.splitlines()
    errors = [line for line in lines if "ERROR" in line]
    assert len(errors) == 1, result.output
    assert f"127.0.0.1:{port}" in errors[0] and "connection refused" in errors[0], errors[0]
    retries = [i for i, line in enumerate(lines) if re.search(r"; retry \d+ in", line) and "ERROR" not in line
               and "summary:" not in line]
    assert retries and max(retries) < lines.index(errors[0]), result.output
    assert esb.received == []


def test_a_404_on_the_metadata_points_at_knack_api_url_and_knack_app_id(bridge, knack, esb, seed):
    records = seed(1)
    result = bridge(env={"KNACK_API_URL": knack.url.replace("/v1", "/api/v2")})
    assert result.returncode == 2, result.output
    assert "KNACK_API_URL" in result.stderr and "KNACK_APP_ID" in result.stderr
    assert esb.received == [] and puts(knack) == []
    assert statuses(knack) == {records[0]["id"]: READY}


# ----- 7 §1: an update answer that does not show the new status is not a success ----------------------------------

@pytest.mark.parametrize("answer", ["{}", '{"id": "%(id)s"}', '{"record": {"%(status)s": "SENT"}}'],
                         ids=["empty", "id-only", "other-shape"])
def test_an_update_answer_that_does_not_show_sent_leaves_the_message_delivered_and_unsent_again(
        bridge, knack, esb, seed, bridge_env, answer):
    [record] = seed(1)
    # not applied, answered 200: every try of this run gets the same
    knack.inject("PUT", record["id"], status=200, count=10, body=answer % {"id": record["id"], "status": STATUS})

    first = bridge()

    assert first.returncode == 1, first.output
    assert esb.copies() == {record["id"]: 1}
    assert journal(bridge_env) == {record["id"]: "delivered"}
    assert statuses(knack) == {record["id"]: READY}
    assert record["id"] in "\n".join(line for line in first.stdout.splitlines() if "FAILED" in line)

    assert_recovers(bridge, knack, esb, [record])
    assert journal(bridge_env) == {record["id"]: "done"}


# ----- 7 §8, §9: bounded answers, paging that ends -------------------------------------------------------------

def test_a_knack_that_repeats_page_1_of_100000_pages_ends_the_paging_and_its_records_are_sent(bridge, knack, esb,
                                                                                              seed):
    records = seed(3)
    page_1 = {"total_pages": 100_000, "current_page": 1, "total_records": 100_000_000, "records": records}
    knack.inject("GET", "/views/", status=200, body=json.dumps(page_1), count=1_000_000)

    result = bridge(timeout=60)

    assert result.returncode == 0, result.output
    # page 1, again as its records are marked (nothing new: Knack still lists them), then page 2 once none is in
    # flight (the same records again): paging stops there, whatever Knack says of 100,000 pages
    pages = [r.query.get("page") for r in knack.request_log if "/views/" in r.path]
    assert pages[-1] == "2" and set(pages[:-1]) == {"1"} and len(pages) <= 2 + len(records), pages
    assert any("WARNING" in line and "page 2" in line for line in result.stdout.splitlines()), result.output
    assert statuses(knack) == {r["id"]: SENT for r in records}
    assert esb.copies() == {r["id"]: 1 for r in records}


def test_an_answer_over_50_mb_is_refused_and_nothing_is_sent(bridge, knack, esb, seed):
    records = seed(2)
    knack.inject("GET", "/views/", oversize=60 * 1024 * 1024, count=10)

    result = bridge(env={"ESB_TIMEOUT": "20"})

    assert result.returncode == 1, result.output
    assert "50 MB" in result.stdout
    assert esb.received == [] and puts(knack) == []
    assert_recovers(bridge, knack, esb, records)


# ----- 7 §11: answers that crashed the run, settings that crashed it -------------------------------------------

@pytest.mark.parametrize("where", ["/applications/", "/views/"], ids=["metadata", "records-page"])
def test_json_nested_too_deeply_is_one_clean_line_and_exit_1(bridge, knack, esb, seed, where):
    records = seed(2)
    knack.inject("GET", where, status=200, body="[" * 100_000 + "]" * 100_000, count=10)

    result = bridge()

    assert result.returncode == 1, result.output
    errors = [line for line in result.output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "nested too deeply" in errors[0], result.output
    assert esb.received == [] and puts(knack) == []
    assert_recovers(bridge, knack, esb, records)


def _metadata() -> dict:
    return app_metadata("data-tracker", APP, timezone="Central Time (US & Canada)", app_id=APP_ID)


def _scenes_text(m):
    m["application"]["scenes"] = "scene_1"
    return m


def _views_dict(m):
    for scene in m["application"]["scenes"]:
        scene["views"] = {v["key"]: v for v in scene["views"]}
    return m


def _objects_of_text(m):
    m["application"]["objects"] = [o["key"] for o in m["application"]["objects"]]
    return m


def _settings_list(m):
    m["application"]["settings"] = ["timezone"]
    return m


def _timezone_number(m):
    m["application"]["settings"]["timezone"] = -6
    return m


@pytest.mark.parametrize("change", [_scenes_text, _views_dict, _objects_of_text, _settings_list, _timezone_number],
                         ids=["scenes-text", "views-dict", "objects-of-text", "settings-list", "timezone-number"])
def test_metadata_of_the_wrong_shape_is_one_clean_line_and_exit_1(bridge, knack, esb, seed, change):
    records = seed(2)
    knack.set_metadata(change(_metadata()))

    result = bridge()

    assert result.returncode == 1, result.output
    errors = [line for line in result.output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "Knack app metadata" in errors[0], result.output
    assert esb.received == [] and puts(knack) == []
    knack.set_metadata(_metadata())
    assert_recovers(bridge, knack, esb, records)


SECRET_LOOKING = "s3cr3t-\u043a\u043b\u044e\u0447"  # non-Latin-1: an HTTP header cannot carry it


@pytest.mark.parametrize("env, named, hidden", [
    ({"KNACK_API_URL": "http://[::1"}, "KNACK_API_URL", None),
    ({"KNACK_API_URL": "http://127.0.0.1:99999/v1"}, "KNACK_API_URL", None),
    ({"KNACK_API_URL": "http://knack host/v1"}, "KNACK_API_URL", None),
    ({"KNACK_API_KEY": "abc-123\nX-Injected: yes"}, "KNACK_API_KEY", "X-Injected"),
    ({"KNACK_API_KEY": SECRET_LOOKING}, "KNACK_API_KEY", SECRET_LOOKING),
    ({"KNACK_APP_ID": "5d79512148c4af00106d1507\r\nX-Injected: yes"}, "KNACK_APP_ID", "X-Injected"),
    ({"KNACK_MAX_RPS": "51"}, "KNACK_MAX_RPS", None),
    ({"KNACK_MAX_RPS": "0.05"}, "KNACK_MAX_RPS", None),
    ({"KNACK_PLAN_RESERVE": "10%"}, "KNACK_PLAN_RESERVE", None),
], ids=["ipv6-unclosed", "port-out-of-range", "space-in-host", "key-with-newline", "key-non-latin-1",
        "app-id-with-crlf", "rps-above-50", "rps-below-0.1", "plan-reserve-percent"])
def test_knack_settings_that_cannot_work_are_exit_2_naming_the_variable_before_any_request(
        bridge, knack, esb, seed, env, named, hidden):
    records = seed(1)

    result = bridge(env=env)

    assert result.returncode == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0], result.output
    if hidden is not None:
        assert hidden not in result.output
    assert knack.request_log == [] and esb.received == []
    assert statuses(knack) == {records[0]["id"]: READY}


# ----- 7 §14: record ids are escaped in the update path -------------------------------------------------------

@pytest.mark.parametrize("hostile", ["recB?x=1", "recB#x"])
def test_a_hostile_record_id_cannot_update_another_record(bridge, knack, esb, seed, hostile):
    [victim] = seed(1, record_id="recB", esb_status="DO_NOT_SEND")
    [odd] = seed(1, record_id=hostile)

    result = bridge()

    assert result.returncode == 0, result.output
    assert statuses(knack) == {victim["id"]: "DO_NOT_SEND", odd["id"]: SENT}
    assert esb.copies() == {hostile: 1}
    assert [r.path for r in puts(knack)] == [f"/v1/objects/{OBJ}/records/{hostile}"]


# ----- 7 §15: what Knack or a proxy sends back is printed without the key or app id ----------------------------

def test_an_error_that_echoes_the_api_key_is_printed_redacted(bridge, knack, esb, seed, bridge_env):
    [record] = seed(1)
    echo = {"errors": [{"message": f"API key {API_KEY} not valid for application {APP_ID}"}]}
    knack.inject("PUT", record["id"], status=400, body=json.dumps(echo), count=10)

    result = bridge()

    assert result.returncode == 1, result.output
    assert API_KEY not in result.output and APP_ID not in result.output
    assert "[KNACK_API_KEY]" in result.stdout  # the message is kept, only the secrets are masked
    assert esb.copies() == {record["id"]: 1}
    assert journal(bridge_env) == {record["id"]: "delivered"}
    assert statuses(knack) == {record["id"]: READY}
    assert_recovers(bridge, knack, esb, [record])


def test_a_proxy_page_that_echoes_the_api_key_is_printed_redacted(bridge, knack, esb, seed):
    records = seed(1)
    page = f"<html><body>Access denied for X-Knack-REST-API-Key: {API_KEY} ({APP_ID})</body></html>"
    knack.inject("GET", "/views/", status=403, body=page, count=10)

    result = bridge()

    assert result.returncode == 2, result.output  # 403 on the records: KNACK_API_KEY / KNACK_APP_ID to check
    assert API_KEY not in result.output and APP_ID not in result.output
    assert "Access denied" in result.stderr
    assert esb.received == [] and puts(knack) == []
    assert_recovers(bridge, knack, esb, records)

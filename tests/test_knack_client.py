"""KnackClient against the Knack simulator over real HTTP: what counts as an answer, where paging ends, how a
request ends (deadline, stop signal, retries), what a failure line says and what it never says.

The end-to-end versions of these, through the real command, are in test_knack_failures.py.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time

import pytest
import requests

from config import CONFIG
from knack311.errors import ConfigError, OutageError
from knack311.knack import (
    MAX_ANSWER_BYTES,
    ROWS_PER_PAGE,
    KnackBudgetSpent,
    KnackClient,
    KnackHTTPError,
    KnackNotSent,
    Page,
    RecordGone,
    app_schema_from,
)
from knack311.stopping import Stop
from simulators.activities import app_metadata
from tests.conftest import API_KEY, APP_ID, Seeder, make_knack

APP = CONFIG["data-tracker"]
OBJ, VIEW = APP["obj"], APP["view"]
FIELDS = APP["fields"]
STATUS = FIELDS["esb_status"]
EMI = FIELDS["emi_id"]
ATD = FIELDS["atd_activity_id"]


@pytest.fixture
def knack():
    with make_knack(rate_limit=None) as simulator:
        yield simulator


@pytest.fixture
def seed(knack):
    return Seeder(knack)


class Lines(list):
    def naming(self, text: str) -> list[str]:
        return [line for line in self if text in line]


@pytest.fixture
def lines():
    return Lines()


@pytest.fixture
def client(knack, lines):
    made = []

    def make(url: str | None = None, *, timeout: float = 2.0, stop: Stop | None = None, **kwargs) -> KnackClient:
        kwargs.setdefault("max_rps", 50)
        c = KnackClient(url or knack.url, APP_ID, API_KEY, timeout=timeout, stop=stop, log=lines.append, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def ready(c: KnackClient) -> list[dict]:
    """Page 1 of the ready records, as the run reads it."""
    return c.ready_page("scene_1", VIEW, EMI, STATUS, 1, ATD).records


def requests_to(knack, method: str, part: str) -> list:
    return [r for r in knack.request_log if r.method == method and part in r.path]


def page(records: list[dict], *, total_pages: int, total_records: int, current: int = 1) -> str:
    return json.dumps({"total_pages": total_pages, "current_page": current, "total_records": total_records,
                       "records": records})


# ----- set_status: only an answer that shows the new status counts ----------------------------------------------

def test_an_answer_showing_the_new_status_is_a_success(knack, seed, client):
    [record] = seed(1)
    client().set_status(OBJ, record["id"], STATUS, "SENT")
    assert knack.record(OBJ, record["id"])[f"{STATUS}_raw"] == "SENT"


@pytest.mark.parametrize("answer", [
    "{}", "[]", '"ok"', "null",
    '{"id": "%(id)s"}',
    '{"record": {"id": "%(id)s", "%(status)s": "SENT", "%(status)s_raw": "SENT"}}',
    '{"id": "someone-else", "%(status)s": "SENT", "%(status)s_raw": "SENT"}',
    '{"id": "%(id)s", "%(status)s": "SENT", "%(status)s_raw": "READY_TO_SEND"}',
], ids=["empty-object", "list", "string", "null", "id-only", "wrapped", "other-record", "raw-disagrees"])
def test_an_answer_that_does_not_show_the_new_status_is_not_a_success(knack, seed, client, answer):
    [record] = seed(1)
    knack.inject("PUT", record["id"], status=200, body=answer % {"id": record["id"], "status": STATUS})
    with pytest.raises(OutageError) as failed:
        client().set_status(OBJ, record["id"], STATUS, "SENT")
    assert record["id"] in str(failed.value)
    assert knack.record(OBJ, record["id"])[f"{STATUS}_raw"] == "READY_TO_SEND"
    assert len(requests_to(knack, "PUT", record["id"])) == 1  # a 200 is not retried, whatever it says


def test_a_display_value_alone_is_enough(knack, seed, client):
    [record] = seed(1)
    knack.inject("PUT", record["id"], status=200, body=json.dumps({"id": record["id"], STATUS: "SENT"}))
    client().set_status(OBJ, record["id"], STATUS, "SENT")


@pytest.mark.parametrize("hostile", ["recB?x=1", "recB#x", "recB/../recB", "recB%3F", "recB x"])
def test_a_hostile_record_id_addresses_that_record_only(knack, client, hostile):
    seed = Seeder(knack)
    [victim] = seed(1, record_id="recB", esb_status="DO_NOT_SEND")
    [odd] = seed(1, record_id=hostile)
    c = client()
    c.set_status(OBJ, hostile, STATUS, "SENT")
    assert knack.record(OBJ, odd["id"])[f"{STATUS}_raw"] == "SENT"
    assert knack.record(OBJ, victim["id"])[f"{STATUS}_raw"] == "DO_NOT_SEND"
    assert c.record_status(OBJ, hostile, STATUS) == "SENT"


# ----- record_status --------------------------------------------------------------------------------------------

def test_record_status_reads_one_record(knack, seed, client):
    records = seed(2)
    c = client()
    c.set_status(OBJ, records[1]["id"], STATUS, "SENT")
    assert c.record_status(OBJ, records[0]["id"], STATUS) == "READY_TO_SEND"
    assert c.record_status(OBJ, records[1]["id"], STATUS) == "SENT"
    assert [r.path for r in knack.request_log if r.method == "GET"] == [
        f"/v1/objects/{OBJ}/records/{records[0]['id']}", f"/v1/objects/{OBJ}/records/{records[1]['id']}"]


def test_record_status_of_a_deleted_record_is_record_gone(knack, seed, client):
    with pytest.raises(RecordGone) as gone:
        client().record_status(OBJ, "5f0000000000000000000000", STATUS)
    assert gone.value.status == 404 and isinstance(gone.value, OutageError)


@pytest.mark.parametrize("fault", [{"status": 400}, {"status": 200, "body": "{}"}, {"status": 200, "body": "<html>"},
                                   {"status": 503, "count": 20}], ids=["400", "no-status", "not-json", "503s"])
def test_record_status_that_cannot_be_read_is_an_outage_not_record_gone(knack, seed, client, fault):
    [record] = seed(1)
    knack.inject("GET", record["id"], **fault)
    with pytest.raises(OutageError) as failed:
        client().record_status(OBJ, record["id"], STATUS)
    assert not isinstance(failed.value, RecordGone)


# ----- answers that cannot be used --------------------------------------------------------------------------------

def test_an_answer_over_50_mb_is_refused(knack, seed, client):
    seed(2)
    knack.inject("GET", "/views/", oversize=MAX_ANSWER_BYTES + 1_000_000)
    with pytest.raises(OutageError, match="50 MB"):
        ready(client(timeout=10))


@pytest.mark.parametrize("where", ["/applications/", "/views/"])
def test_json_nested_too_deeply_is_a_clean_outage(knack, seed, client, where):
    seed(1)
    knack.inject("GET", where, status=200, body="[" * 100_000 + "]" * 100_000)
    c = client()
    with pytest.raises(OutageError, match="nested too deeply"):
        if where == "/views/":
            ready(c)
        else:
            c.app_schema(OBJ, VIEW)


def _metadata() -> dict:
    return app_metadata("data-tracker", APP, timezone="Central Time (US & Canada)", app_id=APP_ID)


def _set(path: tuple, value):
    def change(metadata):
        target = metadata["application"]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return metadata
    return change


@pytest.mark.parametrize("change", [
    lambda m: {"application": "yes"},
    lambda m: [m],
    _set(("scenes",), "scene_1"),
    _set(("scenes",), {"key": "scene_1"}),
    _set(("scenes",), ["scene_1"]),
    _set(("scenes", 0, "views"), {"key": VIEW}),
    _set(("objects",), {OBJ: {}}),
    _set(("objects",), [OBJ]),
    _set(("settings",), ["timezone"]),
    _set(("settings",), "Central Time (US & Canada)"),
    _set(("settings", "timezone"), 6),
], ids=["application-text", "list", "scenes-text", "scenes-dict", "scenes-of-text", "views-dict", "objects-dict",
        "objects-of-text", "settings-list", "settings-text", "timezone-number"])
def test_metadata_of_the_wrong_shape_is_an_outage_not_a_crash(knack, client, change):
    knack.set_metadata(change(_metadata()))
    with pytest.raises(OutageError) as failed:
        client().app_schema(OBJ, VIEW)
    assert str(failed.value).startswith("Knack app metadata:")


def test_fields_of_the_wrong_shape_are_an_outage(knack, client):
    metadata = _metadata()
    for obj in metadata["application"]["objects"]:
        if obj["key"] == OBJ:
            obj["fields"] = [f["key"] for f in obj["fields"]]
    knack.set_metadata(metadata)
    with pytest.raises(OutageError, match="fields of"):
        client().app_schema(OBJ, VIEW)


def test_well_formed_metadata_without_the_view_is_a_config_error(knack, client):
    metadata = _metadata()
    for scene in metadata["application"]["scenes"]:
        scene["views"] = []
    knack.set_metadata(metadata)
    with pytest.raises(ConfigError, match=VIEW):
        client().app_schema(OBJ, VIEW)


def test_a_404_on_the_metadata_names_both_the_app_id_and_the_url(knack, client):
    with pytest.raises(ConfigError) as failed:
        client(knack.url.replace("/v1", "/v2")).app_schema(OBJ, VIEW)
    assert "KNACK_APP_ID" in str(failed.value) and "KNACK_API_URL" in str(failed.value)


def test_a_redirect_is_not_followed_with_the_key(knack, client):
    knack.inject("GET", "/applications/", status=302, body="")
    with pytest.raises(KnackHTTPError, match="redirect"):
        client().app_schema(OBJ, VIEW)
    assert len(knack.request_log) == 1


# ----- what a failure says, and never says ----------------------------------------------------------------------

def test_an_error_echoing_the_key_and_app_id_is_redacted(knack, seed, client, lines):
    [record] = seed(1)
    echo = json.dumps({"errors": [{"message": f"key {API_KEY} is not valid for app {APP_ID}\nX-Injected: 1"}]})
    knack.inject("PUT", record["id"], status=400, body=echo)
    knack.inject("GET", "/applications/", status=503, body=f"<html>proxy: key={API_KEY} app={APP_ID}</html>",
                 count=20)
    c = client()
    with pytest.raises(OutageError) as update:
        c.set_status(OBJ, record["id"], STATUS, "SENT")
    with pytest.raises(OutageError) as metadata:
        c.app_schema(OBJ, VIEW)
    for text in [str(update.value), str(metadata.value), *lines]:
        assert API_KEY not in text and APP_ID not in text, text
        assert "\n" not in text
    assert "[KNACK_API_KEY]" in str(update.value) and "[KNACK_APP_ID]" in str(update.value)


def test_unreachable_knack_names_the_address_and_the_cause_and_logs_each_retry(knack, client, lines):
    address = f"127.0.0.1:{knack.port}"
    knack.stop()
    with pytest.raises(OutageError) as failed:
        client(timeout=2).app_schema(OBJ, VIEW)
    assert address in str(failed.value) and "connection refused" in str(failed.value)
    retries = lines.naming("retry")
    assert len(retries) >= 1 and all(address in line and "connection refused" in line for line in retries)


def test_a_name_that_does_not_resolve_is_named(client):
    with pytest.raises(OutageError, match=r"knack\.invalid:443 could not be resolved"):
        client("https://knack.invalid/v1", timeout=1).app_schema(OBJ, VIEW)


def test_tls_to_a_server_that_does_not_speak_it_is_named(knack, client):
    with pytest.raises(OutageError, match=rf"TLS with 127\.0\.0\.1:{knack.port} failed"):
        client(knack.url.replace("http://", "https://"), timeout=1).app_schema(OBJ, VIEW)


def test_a_failing_proxy_is_named(knack, client, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(OutageError, match="proxy"):
        client(timeout=1).app_schema(OBJ, VIEW)
    assert knack.request_log == []


# ----- deadlines and the stop signal ----------------------------------------------------------------------------

def test_a_hanging_knack_is_cut_at_the_request_timeout_and_not_retried_behind_the_callers_back(knack, client):
    knack.inject("GET", "/applications/", hang=True, count=10)
    started = time.monotonic()
    with pytest.raises(OutageError, match="within 1s"):
        client(timeout=1).app_schema(OBJ, VIEW)
    assert time.monotonic() - started < 3
    time.sleep(2.5)  # the abandoned request's thread meets its read timeout: it must not try again
    assert len(knack.request_log) == 1


def test_a_trickling_answer_is_cut_at_the_request_timeout(knack, seed, client):
    seed(2)
    knack.inject("GET", "/views/", trickle=0.05)
    started = time.monotonic()
    with pytest.raises(OutageError, match="no complete answer"):
        ready(client(timeout=1))
    assert time.monotonic() - started < 3


def test_a_stop_signal_abandons_a_hanging_read_at_once(knack, client):
    knack.inject("GET", "/applications/", hang=True)
    stop = Stop()
    threading.Timer(0.3, stop.request, args=("SIGTERM",)).start()
    started = time.monotonic()
    with pytest.raises(OutageError, match="SIGTERM"):
        client(timeout=30, stop=stop).app_schema(OBJ, VIEW)
    assert time.monotonic() - started < 2


def test_no_retry_starts_after_a_stop_signal_during_a_retry_after_wait(knack, seed, client):
    [record] = seed(1)
    knack.inject("PUT", record["id"], status=429, retry_after=5, count=10)
    stop = Stop()
    threading.Timer(0.5, stop.request, args=("SIGTERM",)).start()
    with pytest.raises(OutageError, match="SIGTERM"):
        client(timeout=30, stop=stop).set_status(OBJ, record["id"], STATUS, "SENT")
    time.sleep(1)
    assert [r.status for r in requests_to(knack, "PUT", record["id"])] == [429]


def test_a_retry_after_longer_than_the_request_timeout_is_not_waited_for(knack, seed, client):
    [record] = seed(1)
    knack.inject("PUT", record["id"], status=429, retry_after=30, count=10)
    started = time.monotonic()
    with pytest.raises(OutageError, match="would pass"):
        client(timeout=5).set_status(OBJ, record["id"], STATUS, "SENT")
    assert time.monotonic() - started < 2
    assert len(requests_to(knack, "PUT", record["id"])) == 1


def test_nothing_starts_past_the_runs_deadline(knack, client):
    stop = Stop(max_runtime=0.1, request_timeout=0.1)
    time.sleep(0.3)
    with pytest.raises(OutageError, match="time"):
        client(stop=stop).app_schema(OBJ, VIEW)
    assert knack.request_log == []


def test_a_short_key_or_app_id_is_not_redacted_letter_by_letter(knack):
    """No real Knack key or id is this short; redacting one would garble every line holding those letters."""
    client = KnackClient(knack.url, "a", "b", timeout=5)
    try:
        with pytest.raises((ConfigError, OutageError)) as refused:
            client.ready_page("scene_1", "view_1653", "field_1868", "field_1860", 1, ATD)
    finally:
        client.close()
    message = str(refused.value)
    assert "[KNACK_" not in message and "records" in message and "Knack" in message, message


# ----- what the pre-flight asks -----------------------------------------------------------------------------------

def test_app_metadata_is_the_answer_as_knack_gives_it_in_one_request(knack, client):
    metadata = _metadata()
    metadata["application"]["extra"] = {"kept": True}  # unchecked: nothing is taken out or added
    knack.set_metadata(metadata)
    assert client().app_metadata() == metadata
    assert [r.path for r in knack.request_log] == [f"/v1/applications/{APP_ID}"]


def test_app_metadata_404_is_a_config_error_as_for_the_schema(knack, client):
    with pytest.raises(ConfigError, match="KNACK_APP_ID"):
        client(knack.url.replace("/v1", "/v2")).app_metadata()


def test_ready_count_reads_one_record_with_the_runs_filter_and_returns_knacks_headers(knack, seed, client):
    knack.plan_limit, knack.plan_used = 1000, 100
    seed(3)
    seed(2, esb_status="SENT")
    seed(1, emi_id="")
    c = client()

    waiting, headers = c.ready_count("scene_1", VIEW, EMI, STATUS)

    assert waiting == 3 == len(ready(c))  # the records a run would send
    assert headers["X-PlanLimit-Limit"] == "1000"
    assert headers["x-planlimit-remaining"] == "899"  # as Knack spells it or not
    first = knack.request_log[0]
    assert first.query["rows_per_page"] == "1" and first.query["page"] == "1"
    assert first.query["filters"] == knack.request_log[1].query["filters"]  # ready_page's own


def test_ready_count_refused_names_the_key_and_app_id(knack):
    wrong = KnackClient(knack.url, APP_ID, "not-the-key", timeout=2, max_rps=50)
    with pytest.raises(ConfigError, match=r"HTTP 401.*KNACK_API_KEY and KNACK_APP_ID"):
        wrong.ready_count("scene_1", VIEW, EMI, STATUS)


# ----- pacing: every attempt, retries included, takes a slot of the client's Pacer --------------------------------

def _arrivals(sim, part: str = "") -> list[float]:
    return sorted(r.at for r in sim.request_log if part in r.path)


def test_a_burst_from_several_threads_with_retries_stays_within_knacks_second(client):
    with make_knack(rate_limit=10, plan_limit=None) as sim:
        records = Seeder(sim)(40)
        for record in records[::8]:  # five requests that fail once: their retries come inside the burst
            sim.inject("GET", record["id"], status=503)
        c = client(sim.url, timeout=20, max_rps=10)
        seen: dict[str, str] = {}

        def read(batch):
            for record in batch:
                seen[record["id"]] = c.record_status(OBJ, record["id"], STATUS)

        threads = [threading.Thread(target=read, args=(records[i::4],)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert seen == {r["id"]: "READY_TO_SEND" for r in records}
        answers = [r.status for r in sim.request_log]
        assert answers.count(503) == 5 and answers.count(200) == 40
        assert answers.count(429) <= 2 and c.throttled == answers.count(429)


def test_a_retry_waits_for_its_own_pacer_slot(knack, seed, client):
    [record] = seed(1)
    knack.inject("GET", record["id"], status=503)
    c = client(timeout=5, max_rps=1)  # a slot every second; urllib3's first retry has no backoff of its own

    assert c.record_status(OBJ, record["id"], STATUS) == "READY_TO_SEND"

    first, retry = _arrivals(knack, record["id"])
    assert retry - first >= 0.95


def test_a_429_holds_the_next_attempt_until_knacks_second_resets(client):
    with make_knack(rate_limit=3, plan_limit=None) as sim:
        [record] = Seeder(sim)(1)
        for _ in range(3):  # another client of the app takes the whole second
            assert requests.get(f"{sim.url}/applications/{APP_ID}", timeout=5).status_code == 200
        c = client(sim.url, timeout=10)

        assert c.record_status(OBJ, record["id"], STATUS) == "READY_TO_SEND"

        # without the pause the retry would come at once, into the same second, and be refused again
        assert [r.status for r in sim.request_log if record["id"] in r.path] == [429, 200]
        assert c.throttled == 1


def test_a_write_after_a_stop_signal_goes_at_once_and_a_read_does_not_start(knack, seed, client):
    first, second = seed(2)
    stop = Stop()
    c = client(timeout=5, max_rps=0.25, stop=stop)  # the next slot would be 4 s away
    c.record_status(OBJ, first["id"], STATUS)
    stop.request("SIGTERM")

    started = time.monotonic()
    c.set_status(OBJ, second["id"], STATUS, "SENT")
    assert time.monotonic() - started < 1
    assert knack.record(OBJ, second["id"])[f"{STATUS}_raw"] == "SENT"

    with pytest.raises(OutageError, match="not started: SIGTERM received"):
        c.record_status(OBJ, first["id"], STATUS)
    assert len(knack.request_log) == 2


@pytest.mark.timing
def test_a_request_whose_slot_is_past_the_runs_deadline_is_not_started(knack, seed, client):
    [record] = seed(1)
    c = client(timeout=1, max_rps=0.2, stop=Stop(max_runtime=0.5, request_timeout=1))  # slots 5 s apart
    c.record_status(OBJ, record["id"], STATUS)

    started = time.monotonic()
    # never sent: KnackNotSent, which a run does not count as Knack trouble
    with pytest.raises(KnackNotSent, match=r"not started: no request slot before the run's time \(--max-runtime "
                                           r"\+ ESB_TIMEOUT\) was up"):
        c.record_status(OBJ, record["id"], STATUS)
    assert time.monotonic() - started < 2.5  # nothing waited for the slot 5 s away that it could not use
    assert len(knack.request_log) == 1


# ----- the daily budget -----------------------------------------------------------------------------------------

def test_calls_left_today_follows_x_planlimit_remaining(knack, seed, client):
    knack.plan_limit, knack.plan_used = 1000, 100
    records = seed(2)
    c = client()
    assert c.calls_left_today() is None  # nothing answered yet

    c.app_metadata()
    assert c.calls_left_today() == 899 == knack.plan_remaining()
    for record in records:
        c.record_status(OBJ, record["id"], STATUS)
    knack.plan_used += 50  # the app's other users
    c.app_metadata()

    assert c.calls_left_today() == 846 == knack.plan_remaining()
    budget = c.plan_budget()
    assert (budget.limit, budget.remaining, budget.reserve) == (1000, 846, 100)


def test_a_spent_daily_budget_is_one_request_no_retry_and_says_when_it_resets(client):
    resets_at = (int(time.time()) // 3600 + 2) * 3600
    with make_knack(rate_limit=None, plan_limit=1000, plan_used=1000, plan_reset_at=resets_at) as sim:
        [record] = Seeder(sim)(1)
        c = client(sim.url, timeout=10)

        with pytest.raises(KnackBudgetSpent) as spent:
            c.record_status(OBJ, record["id"], STATUS)
        with pytest.raises(KnackBudgetSpent) as again:  # known now: not even asked
            c.set_status(OBJ, record["id"], STATUS, "SENT")

        assert len(sim.request_log) == 1 and sim.request_log[0].status == 429
        reset = dt.datetime.fromtimestamp(resets_at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for failure in (spent.value, again.value):
            assert isinstance(failure, OutageError)
            assert "calls left: 0 of 1000" in str(failure) and f"resets at {reset}" in str(failure), str(failure)
        assert c.calls_left_today() == 0 and c.throttled == 1
        assert sim.record(OBJ, record["id"])[f"{STATUS}_raw"] == "READY_TO_SEND"


def test_no_record_may_start_once_it_would_eat_into_the_reserve(knack, seed, client):
    knack.plan_limit, knack.plan_used = 1000, 880
    default, strict = client(), client(plan_reserve=200)
    assert default.may_start_record() and strict.may_start_record()  # the budget is not known yet

    default.app_metadata()  # 119 left; the reserve is 10% of 1000
    assert default.calls_left_today() == 119
    assert default.may_start_record()
    assert default.may_start_record(in_flight=18)      # 119 - 19 leaves the 100
    assert not default.may_start_record(in_flight=19)  # 119 - 20 would not

    strict.app_metadata()  # 118 left, under its 200
    assert not strict.may_start_record()
    assert strict.plan_budget().reserve == 200


# ----- one page of the records to send, sorted ------------------------------------------------------------------

def test_ready_page_sorts_by_the_given_field_and_reports_the_pages(client):
    with make_knack(rate_limit=None, max_rows_per_page=10) as sim:
        seed = Seeder(sim)
        for n in range(125, 100, -1):  # added in the opposite order
            seed(1, atd_activity_id=n)
        seed(2, esb_status="SENT")
        c = client(sim.url)

        first = c.ready_page("scene_1", VIEW, EMI, STATUS, 1, ATD)
        last = c.ready_page("scene_1", VIEW, EMI, STATUS, 3, ATD)

        assert [r[f"{ATD}_raw"] for r in first.records] == list(range(101, 111))
        assert [r[f"{ATD}_raw"] for r in last.records] == list(range(121, 126))
        assert (first.total_pages, first.total_records) == (3, 25) == (last.total_pages, last.total_records)
        query = sim.request_log[0].query
        assert (query["sort_field"], query["sort_order"], query["page"]) == (ATD, "asc", "1")
        assert query["rows_per_page"] == str(ROWS_PER_PAGE)


def test_ready_page_keeps_every_record_object_whatever_its_id(knack, client):
    # a record with a broken id must reach the run, which counts it and fails it with a line (intake.py)
    good = {"id": "rec1", STATUS: "READY_TO_SEND"}
    knack.inject("GET", "/views/", status=200, body=json.dumps({
        "total_pages": "2", "total_records": "many", "records": [good, {"id": ""}, {"id": 7}, "rec2", None]}))
    assert client().ready_page("scene_1", VIEW, EMI, STATUS, 1, ATD) == Page(
        records=[good, {"id": ""}, {"id": 7}], total_pages=2, total_records=None)


@pytest.mark.parametrize("answer, problem", [
    ({"total_pages": 1, "records": {"id": "rec1"}}, "no records list"),
    ({"total_pages": 1}, "no records list"),
    ({"total_pages": "two", "records": []}, "total_pages is not a number"),
    ({"total_pages": True, "records": []}, "total_pages is not a number"),
], ids=["records-object", "no-records", "pages-text", "pages-bool"])
def test_a_page_without_a_records_list_or_a_page_count_is_an_outage(knack, client, answer, problem):
    knack.inject("GET", "/views/", status=200, body=json.dumps(answer))
    with pytest.raises(OutageError, match=problem) as failed:
        client().ready_page("scene_1", VIEW, EMI, STATUS, 1, ATD)
    assert not isinstance(failed.value, ConfigError)


def test_ready_page_refused_names_the_key_and_app_id(knack):
    wrong = KnackClient(knack.url, APP_ID, "not-the-key", timeout=2, max_rps=50)
    try:
        with pytest.raises(ConfigError, match=r"HTTP 401.*KNACK_API_KEY and KNACK_APP_ID"):
            wrong.ready_page("scene_1", VIEW, EMI, STATUS, 1, ATD)
    finally:
        wrong.close()


def test_app_schema_from_cached_metadata_is_what_the_client_reads(knack, client):
    c = client()
    cached = json.loads(json.dumps(c.app_metadata()))  # as a cache would hold it
    assert app_schema_from(cached, OBJ, VIEW) == c.app_schema(OBJ, VIEW)
    assert app_schema_from(cached, OBJ, VIEW).scene == "scene_1"
    with pytest.raises(ConfigError, match="view_0"):
        app_schema_from(cached, OBJ, "view_0")

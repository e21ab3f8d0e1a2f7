"""The Knack API simulator and the record builders, checked with real HTTP requests and real payloads.

The simulator stands in for Knack in the end-to-end tests, so it has to behave like Knack where the
311 bridge could go wrong: filters re-evaluated on every page, the rate limit, lost answers.
"""

from __future__ import annotations

import datetime
import json
import re
import threading
import time
from pathlib import Path

import pytest
import requests

from config import CONFIG
from simulators.activities import (
    FIELD_TYPES,
    activity_record,
    app_metadata,
    random_id,
)
from simulators.knack_api import KnackSimulator

FIXTURES = Path(__file__).parent / "fixtures" / "knack"
FIXTURE_APP_ID = "5d79512148c4af00106d1507"  # the recorded app the fixtures come from
APP_ID = "6a1b2c3d4e5f60718293a4b5"
API_KEY = "test-api-key"
AUTH = {"X-Knack-Application-Id": APP_ID, "X-Knack-REST-API-Key": API_KEY}
TIMEOUT = 5

DT = CONFIG["data-tracker"]
DT_FIELDS = DT["fields"]
SM = CONFIG["signs-markings"]
SM_FIELDS = SM["fields"]
READY_WITH_EMI = {
    "match": "and",
    "rules": [
        {"field": DT_FIELDS["emi_id"], "operator": "is not blank"},
        {"field": DT_FIELDS["esb_status"], "operator": "is", "value": "READY_TO_SEND"},
    ],
}


def load_fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def activities(count: int, *, app: str = "data-tracker", start: int = 1, **values) -> list[dict]:
    """`count` ready-to-send activity records with distinct ids, in atd_activity_id order."""
    defaults = {
        "emi_id": "EMI-{n}",
        "sr_number": "24-{n:08d}",
        "activity_datetime": datetime.datetime(2024, 7, 4, 10, 26),
        "activity_name": "Dispatch Technician",
    }
    records = []
    for n in range(start, start + count):
        merged = {**defaults, **values}
        merged = {k: v.format(n=n) if isinstance(v, str) else v for k, v in merged.items()}
        records.append(
            activity_record(CONFIG[app], record_id=random_id(f"{app}:{n}"), atd_activity_id=n, app_name=app, **merged)
        )
    return records


def view_url(sim: KnackSimulator, app: dict = DT, scene: str = "scene_1") -> str:
    return f"{sim.url}/pages/{scene}/views/{app['view']}/records"


def get_page(sim, *, filters=None, page=None, rows_per_page=None, app=DT, scene="scene_1", timeout=TIMEOUT):
    params = {}
    if filters is not None:
        params["filters"] = json.dumps(filters)
    if page is not None:
        params["page"] = page
    if rows_per_page is not None:
        params["rows_per_page"] = rows_per_page
    return requests.get(view_url(sim, app, scene), params=params, headers=AUTH, timeout=timeout)


def set_status(sim, record_id: str, status: str, *, app=DT) -> requests.Response:
    return requests.put(
        f"{sim.url}/objects/{app['obj']}/records/{record_id}",
        json={app["fields"]["esb_status"]: status},
        headers=AUTH,
        timeout=TIMEOUT,
    )


def ids(response: requests.Response) -> list[str]:
    return [record["id"] for record in response.json()["records"]]


@pytest.fixture
def make_sim():
    """Start simulators and stop them after the test; no rate limit unless asked for."""
    started = []

    def make(app_name: str = "data-tracker", *, rate_limit=None, **kwargs) -> KnackSimulator:
        metadata = kwargs.pop("metadata", None) or app_metadata(app_name, CONFIG[app_name], app_id=APP_ID)
        sim = KnackSimulator(
            app_id=kwargs.pop("app_id", APP_ID), api_key=API_KEY, metadata=metadata, rate_limit=rate_limit, **kwargs
        ).start()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()


@pytest.fixture
def sim(make_sim) -> KnackSimulator:
    return make_sim()


# ----- metadata and authentication -----


def test_metadata_is_public_and_unknown_apps_are_404(sim):
    expected = app_metadata("data-tracker", DT, app_id=APP_ID)

    answer = requests.get(f"{sim.url}/applications/{APP_ID}", timeout=TIMEOUT)
    unknown = requests.get(f"{sim.url}/applications/{'0' * 24}", timeout=TIMEOUT)

    assert answer.status_code == 200
    assert answer.json() == expected
    assert unknown.status_code == 404
    assert unknown.json()["errors"][0]["message"]


def test_set_metadata_replaces_what_is_served(sim):
    sim.set_metadata(load_fixture("app_metadata.json"))

    answer = requests.get(f"{sim.url}/applications/{APP_ID}", timeout=TIMEOUT).json()

    assert answer["application"]["name"] == "Knackpy Development | PRODUCTION"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Knack-Application-Id": APP_ID},
        {"X-Knack-Application-Id": APP_ID, "X-Knack-REST-API-Key": "wrong"},
        {"X-Knack-Application-Id": "wrong", "X-Knack-REST-API-Key": API_KEY},
    ],
    ids=["none", "no-key", "wrong-key", "wrong-app"],
)
def test_records_and_updates_need_both_auth_headers(sim, headers):
    [record] = activities(1)
    sim.add_records(DT["obj"], [record])
    put_url = f"{sim.url}/objects/{DT['obj']}/records/{record['id']}"

    read = requests.get(view_url(sim), headers=headers, timeout=TIMEOUT)
    update = requests.put(put_url, json={DT_FIELDS["esb_status"]: "SENT"}, headers=headers, timeout=TIMEOUT)

    assert (read.status_code, update.status_code) == (401, 401)
    assert read.json()["errors"][0]["message"]
    assert sim.record(DT["obj"], record["id"])[f"{DT_FIELDS['esb_status']}_raw"] == "READY_TO_SEND"
    assert sim.updates == []


def test_auth_header_names_are_case_insensitive(sim):
    headers = {"x-knack-application-id": APP_ID, "X-KNACK-REST-API-KEY": API_KEY}

    assert requests.get(view_url(sim), headers=headers, timeout=TIMEOUT).status_code == 200


def test_unknown_views_paths_and_records_are_404(sim):
    sim.add_records(DT["obj"], activities(1))

    wrong_scene = get_page(sim, scene="scene_2")  # the view exists, but in another scene
    unknown_view = requests.get(f"{sim.url}/pages/scene_1/views/view_999999/records", headers=AUTH, timeout=TIMEOUT)
    unknown_path = requests.get(f"{sim.url}/objects/{DT['obj']}/records", headers=AUTH, timeout=TIMEOUT)
    unknown_record = set_status(sim, "0" * 24, "SENT")

    assert [r.status_code for r in (wrong_scene, unknown_view, unknown_path, unknown_record)] == [404] * 4
    assert all(r.json()["errors"] for r in (wrong_scene, unknown_view, unknown_record))


def test_every_request_is_logged(sim):
    get_page(sim, filters=READY_WITH_EMI, rows_per_page=10)
    requests.get(view_url(sim), timeout=TIMEOUT)

    first, second = sim.request_log
    assert (first.method, first.path, first.status) == ("GET", f"/v1/pages/scene_1/views/{DT['view']}/records", 200)
    assert json.loads(first.query["filters"]) == READY_WITH_EMI
    assert first.query["rows_per_page"] == "10"
    assert first.headers["X-Knack-REST-API-Key"] == API_KEY
    assert second.status == 401


# ----- filters and pages -----


def test_filters_select_ready_records_with_an_emi_id(sim):
    ready = activities(3)
    sent = activities(2, start=10, esb_status="SENT")
    no_emi = activities(2, start=20, emi_id="")
    sim.add_records(DT["obj"], ready[:2] + sent + no_emi + ready[2:])

    as_object = get_page(sim, filters=READY_WITH_EMI)
    as_rule_list = get_page(sim, filters=READY_WITH_EMI["rules"])  # a bare list means "and"
    either = get_page(sim, filters={**READY_WITH_EMI, "match": "or"})

    expected = [r["id"] for r in ready]
    assert ids(as_object) == expected  # insertion order
    assert ids(as_rule_list) == expected
    assert ids(either) == [r["id"] for r in ready[:2] + sent + no_emi + ready[2:]]
    assert as_object.json()["total_records"] == 3


@pytest.mark.parametrize(
    "rule, expected_numbers",
    [
        ({"operator": "is", "value": "Adjust Timing"}, [2]),
        ({"operator": "is", "value": "adjust timing"}, []),
        ({"operator": "is not", "value": "Adjust Timing"}, [1, 3, 4]),
        ({"operator": "contains", "value": "TECH"}, [1]),
        ({"operator": "does not contain", "value": "tech"}, [2, 3, 4]),
        ({"operator": "is blank"}, [3, 4]),
        ({"operator": "is not blank"}, [1, 2]),
    ],
)
def test_filter_operators_compare_raw_values(sim, rule, expected_numbers):
    records = activities(1, activity_name="Dispatch Technician") + activities(1, start=2, activity_name="Adjust Timing")
    records += activities(2, start=3, activity_name="")
    records[2].pop(f"{DT_FIELDS['activity_name']}_raw")  # a field never set: Knack sends no raw value
    records[2][DT_FIELDS["activity_name"]] = ""
    # Some multiple-choice fields come as [None] (see the fixture README): blank too.
    records[3][f"{DT_FIELDS['activity_name']}_raw"] = [None]
    records[3][DT_FIELDS["activity_name"]] = ""
    sim.add_records(DT["obj"], records)

    answer = get_page(sim, filters=[{"field": DT_FIELDS["activity_name"], **rule}])

    assert answer.status_code == 200
    assert [r[DT_FIELDS["atd_activity_id"] + "_raw"] for r in answer.json()["records"]] == expected_numbers


def test_connection_filters_compare_identifiers(make_sim):
    sim = make_sim("signs-markings")
    records = activities(2, app="signs-markings", sr_number="24-0000000{n}")
    records += activities(1, app="signs-markings", start=3, sr_number="")
    sim.add_records(SM["obj"], records)
    sr = SM_FIELDS["sr_number"]

    by_identifier = get_page(sim, app=SM, filters=[{"field": sr, "operator": "is", "value": "24-00000002"}])
    blank = get_page(sim, app=SM, filters=[{"field": sr, "operator": "is blank"}])
    containing = get_page(sim, app=SM, filters=[{"field": sr, "operator": "contains", "value": "0001"}])

    assert ids(by_identifier) == [records[1]["id"]]
    assert ids(blank) == [records[2]["id"]]
    assert ids(containing) == [records[0]["id"]]


@pytest.mark.parametrize(
    "filters",
    [
        '[{"field": "field_1860", "operator": "is after", "value": "x"}]',
        '[{"operator": "is blank"}]',
        '{"match": "xor", "rules": []}',
        "not json",
    ],
    ids=["unknown-operator", "no-field", "unknown-match", "not-json"],
)
def test_invalid_filters_are_400(sim, filters):
    answer = requests.get(view_url(sim), params={"filters": filters}, headers=AUTH, timeout=TIMEOUT)

    assert answer.status_code == 400
    assert answer.json()["errors"][0]["message"]


def test_2050_records_come_in_pages_of_1000(sim):
    records = activities(2050)
    sim.add_records(DT["obj"], records)

    pages = [get_page(sim, filters=READY_WITH_EMI, rows_per_page=1000, page=p).json() for p in (1, 2, 3, 4)]

    assert [len(p["records"]) for p in pages] == [1000, 1000, 50, 0]
    assert {(p["total_pages"], p["total_records"]) for p in pages} == {(3, 2050)}
    assert [p["current_page"] for p in pages] == [1, 2, 3, 4]
    assert [r["id"] for p in pages for r in p["records"]] == [r["id"] for r in records]


def test_rows_per_page_defaults_to_25_and_is_capped(make_sim):
    sim = make_sim(max_rows_per_page=100)
    sim.add_records(DT["obj"], activities(250))

    default = get_page(sim).json()
    too_many = get_page(sim, rows_per_page=5000).json()

    assert (len(default["records"]), default["total_pages"]) == (25, 10)
    assert (len(too_many["records"]), too_many["total_pages"]) == (100, 3)


def test_no_matching_records_means_zero_pages(sim):
    sim.add_records(DT["obj"], activities(3, esb_status="SENT"))

    answer = get_page(sim, filters=READY_WITH_EMI).json()

    assert answer == {"total_pages": 0, "current_page": 1, "total_records": 0, "records": []}


def test_pages_shift_when_records_are_marked_sent_between_reads(sim):
    records = activities(30)
    sim.add_records(DT["obj"], records)

    first = get_page(sim, filters=READY_WITH_EMI, rows_per_page=10, page=1).json()
    for record in first["records"]:
        assert set_status(sim, record["id"], "SENT").status_code == 200
    second = get_page(sim, filters=READY_WITH_EMI, rows_per_page=10, page=2).json()

    # The filter runs again on the current state: records 11-20 are now page 1, and page 2 holds 21-30.
    assert [r["id"] for r in first["records"]] == [r["id"] for r in records[:10]]
    assert [r["id"] for r in second["records"]] == [r["id"] for r in records[20:]]
    assert (second["total_records"], second["total_pages"]) == (20, 2)


def test_views_return_only_their_columns(make_sim):
    """With the recorded app: view_6 shows neither field_37 nor field_128, view_18 shows all but field_29."""
    fixture_records = load_fixture("records_all_field_types.json")["records"]
    sim = make_sim(metadata=load_fixture("app_metadata.json"))
    sim.add_records("object_3", fixture_records)

    def read(scene, view, filters=None):
        params = {"rows_per_page": 100, **({"filters": json.dumps(filters)} if filters else {})}
        url = f"{sim.url}/pages/{scene}/views/{view}/records"
        return requests.get(url, params=params, headers=AUTH, timeout=TIMEOUT).json()

    narrow = read("scene_1", "view_6")
    wide = read("scene_6", "view_18")
    johnny = read("scene_6", "view_18", [{"field": "field_128", "operator": "is", "value": "Johnny C"}])
    no_customer = read("scene_6", "view_18", [{"field": "field_128", "operator": "is blank"}])
    jalapenos = read("scene_6", "view_18", [{"field": "field_6", "operator": "is", "value": "Jalapeños"}])

    assert narrow["total_records"] == wide["total_records"] == len(fixture_records)
    assert "field_37" not in narrow["records"][0] and "field_128_raw" not in narrow["records"][0]
    assert narrow["records"][0]["field_13_raw"] == fixture_records[0]["field_13_raw"]
    without_field_29 = [{k: v for k, v in r.items() if k not in ("field_29", "field_29_raw")} for r in fixture_records]
    assert wide["records"] == without_field_29
    assert ids_of(johnny) == [fixture_records[0]["id"]]
    assert no_customer["total_records"] == len(fixture_records) - 1
    assert jalapenos["records"][0]["field_6"] == "Jalapeños"


def ids_of(reply: dict) -> list[str]:
    return [record["id"] for record in reply["records"]]


# ----- updates -----


def test_put_updates_the_record_and_is_recorded(sim):
    records = activities(3)
    sim.add_records(DT["obj"], records)
    status = DT_FIELDS["esb_status"]

    answer = set_status(sim, records[1]["id"], "SENT")
    ready = get_page(sim, filters=READY_WITH_EMI)

    assert answer.status_code == 200
    assert answer.json() == {**records[1], status: "SENT", f"{status}_raw": "SENT"}
    assert sim.record(DT["obj"], records[1]["id"])[f"{status}_raw"] == "SENT"
    assert sim.updates == [(DT["obj"], records[1]["id"], {status: "SENT"})]
    assert ids(ready) == [records[0]["id"], records[2]["id"]]


def test_put_ignores_keys_that_are_not_fields_of_the_object(sim):
    [record] = activities(1)
    sim.add_records(DT["obj"], [record])
    url = f"{sim.url}/objects/{DT['obj']}/records/{record['id']}"

    answer = requests.put(url, json={"field_999999": "SENT"}, headers=AUTH, timeout=TIMEOUT)

    assert answer.status_code == 200
    assert sim.record(DT["obj"], record["id"]) == record


@pytest.mark.parametrize("body", [b"not json", b'["SENT"]'], ids=["not-json", "not-an-object"])
def test_put_with_a_body_that_is_not_a_json_object_is_400(sim, body):
    [record] = activities(1)
    sim.add_records(DT["obj"], [record])
    url = f"{sim.url}/objects/{DT['obj']}/records/{record['id']}"

    answer = requests.put(url, data=body, headers={**AUTH, "Content-Type": "application/json"}, timeout=TIMEOUT)

    assert answer.status_code == 400
    assert sim.updates == []
    assert sim.record(DT["obj"], record["id"]) == record


def test_a_deleted_record_is_404_and_leaves_every_list(sim):
    records = activities(2)
    sim.add_records(DT["obj"], records)
    url = f"{sim.url}/objects/{DT['obj']}/records/{records[0]['id']}"
    assert requests.get(url, headers=AUTH, timeout=TIMEOUT).status_code == 200

    sim.remove_record(DT["obj"], records[0]["id"])

    assert requests.get(url, headers=AUTH, timeout=TIMEOUT).status_code == 404
    assert requests.put(url, json={"field_1": "x"}, headers=AUTH, timeout=TIMEOUT).status_code == 404
    assert [r["id"] for r in sim.records(DT["obj"])] == [records[1]["id"]]


def test_state_accessors_return_copies(sim):
    [record] = activities(1)
    sim.add_records(DT["obj"], [record])

    sim.records(DT["obj"])[0]["id"] = "changed"
    sim.record(DT["obj"], record["id"])[DT_FIELDS["emi_id"]] = "changed"
    record["id"] = "changed too"

    assert sim.records(DT["obj"])[0][DT_FIELDS["emi_id"]] == "EMI-1"
    assert sim.records(DT["obj"])[0]["id"] != "changed too"
    with pytest.raises(ValueError):
        sim.add_records(DT["obj"], [sim.records(DT["obj"])[0]])  # ids are unique


# ----- rate limit -----


def test_a_burst_beyond_the_rate_limit_gets_429(make_sim):
    sim = make_sim(rate_limit=10.0)

    with requests.Session() as session:
        answers = [session.get(view_url(sim), headers=AUTH, timeout=TIMEOUT) for _ in range(30)]

    statuses = [a.status_code for a in answers]
    refused = [a for a in answers if a.status_code == 429]
    assert set(statuses) == {200, 429}
    assert statuses.count(200) <= 10
    assert refused[0].json() == {"errors": [{"message": "Rate limit exceeded"}]}
    assert all("Retry-After" not in a.headers for a in refused)  # real Knack sends none
    assert [entry.status for entry in sim.request_log] == statuses


def test_nine_requests_a_second_stay_under_the_limit(make_sim):
    sim = make_sim(rate_limit=10.0)
    start = time.monotonic()

    statuses = []
    with requests.Session() as session:
        for n in range(18):  # two seconds at 9 requests a second
            time.sleep(max(0.0, start + n / 9 - time.monotonic()))
            statuses.append(session.get(view_url(sim), headers=AUTH, timeout=TIMEOUT).status_code)

    assert statuses == [200] * 18


def test_refused_requests_do_not_extend_the_window(make_sim):
    sim = make_sim(rate_limit=2.0)
    with requests.Session() as session:
        admitted = [session.get(view_url(sim), headers=AUTH, timeout=TIMEOUT).status_code for _ in range(2)]
        first_admitted = sim.request_log[0].at
        refused = []
        while time.monotonic() < first_admitted + 0.9:  # keep knocking for most of the second
            refused.append(session.get(view_url(sim), headers=AUTH, timeout=TIMEOUT).status_code)
            time.sleep(0.05)
        time.sleep(max(0.0, first_admitted + 1.05 - time.monotonic()))
        after_the_second = session.get(view_url(sim), headers=AUTH, timeout=TIMEOUT).status_code

    assert admitted == [200, 200]
    assert refused and set(refused) == {429}
    assert after_the_second == 200


def test_metadata_requests_count_toward_the_rate_limit(make_sim):
    sim = make_sim(rate_limit=3.0)

    statuses = [requests.get(f"{sim.url}/applications/{APP_ID}", timeout=TIMEOUT).status_code for _ in range(4)]

    assert statuses == [200, 200, 200, 429]


def test_every_answer_carries_the_per_second_state(make_sim):
    sim = make_sim(rate_limit=10.0)

    with requests.Session() as session:
        before = time.time()
        answers = [session.get(view_url(sim), headers=AUTH, timeout=TIMEOUT) for _ in range(12)]

    limits = {a.headers["X-RateLimit-Limit"] for a in answers}
    remaining = [int(a.headers["X-RateLimit-Remaining"]) for a in answers]
    assert limits == {"10"}
    assert remaining[:10] == list(range(9, -1, -1))  # each admitted request takes one of the second
    assert [a.status_code for a in answers[10:]] == [429, 429] and remaining[10:] == [0, 0]
    resets = {int(a.headers["X-RateLimit-Reset"]) for a in answers}  # whole epoch seconds, like Knack's
    assert all(before < reset <= before + 2 for reset in resets)


def test_waiting_until_the_rate_limit_reset_is_enough(make_sim):
    sim = make_sim(rate_limit=3.0)
    with requests.Session() as session:
        answers = [session.get(view_url(sim), headers=AUTH, timeout=TIMEOUT) for _ in range(4)]
        refused = answers[-1]
        time.sleep(max(0.0, int(refused.headers["X-RateLimit-Reset"]) - time.time()))
        after_reset = session.get(view_url(sim), headers=AUTH, timeout=TIMEOUT)

    assert refused.status_code == 429
    assert after_reset.status_code == 200


def test_every_request_spends_the_daily_plan_and_a_spent_plan_is_429(make_sim):
    sim = make_sim(rate_limit=2.0, plan_limit=5, plan_used=1)

    with requests.Session() as session:
        metadata = session.get(f"{sim.url}/applications/{APP_ID}", timeout=TIMEOUT)
        reads = [session.get(view_url(sim), headers=AUTH, timeout=TIMEOUT) for _ in range(3)]  # 2 of 2 per second
        spent = session.get(view_url(sim), headers=AUTH, timeout=TIMEOUT)

    answers = [metadata, *reads, spent]
    assert [a.status_code for a in answers] == [200, 200, 429, 429, 429]
    assert [a.headers["X-PlanLimit-Remaining"] for a in answers] == ["3", "2", "1", "0", "0"]
    assert {a.headers["X-PlanLimit-Limit"] for a in answers} == {"5"}
    assert reads[2].json() == {"errors": [{"message": "Rate limit exceeded"}]}
    assert spent.json()["errors"][0]["message"] != "Rate limit exceeded"
    assert sim.plan_remaining() == 0

    sim.reset_plan()
    time.sleep(1.0)  # and a new second
    assert get_page(sim).headers["X-PlanLimit-Remaining"] == "4"


def test_the_plan_resets_at_midnight_utc_unless_told_otherwise(make_sim):
    default = make_sim()
    fixed = make_sim(plan_reset_at=1_900_000_000)
    in_ms = make_sim(plan_reset_at=time.time() + 3600, plan_reset_format="ms_until")

    midnight = (time.time() // 86_400 + 1) * 86_400
    assert int(get_page(default).headers["X-PlanLimit-Reset"]) == midnight
    assert get_page(fixed).headers["X-PlanLimit-Reset"] == "1900000000"
    assert 3_590_000 < int(get_page(in_ms).headers["X-PlanLimit-Reset"]) <= 3_600_000
    assert get_page(default).headers["X-PlanLimit-Limit"] == "25000"


def test_without_limits_no_limit_headers(make_sim):
    sim = make_sim(rate_limit=None, plan_limit=None)

    answer = get_page(sim)

    assert answer.status_code == 200
    assert not [name for name in answer.headers if name.lower().startswith(("x-ratelimit", "x-planlimit"))]


@pytest.mark.timing
def test_other_clients_use_part_of_the_second_and_of_the_plan(make_sim):
    sim = make_sim(rate_limit=10.0, other_clients_rps=6.0, plan_limit=1_000)
    with requests.Session() as session:
        session.get(view_url(sim), headers=AUTH, timeout=TIMEOUT)
        time.sleep(1.0)  # the others make their requests all along
        burst = [session.get(view_url(sim), headers=AUTH, timeout=TIMEOUT) for _ in range(10)]

    admitted = [a for a in burst if a.status_code == 200]
    assert 1 <= len(admitted) <= 5  # the others took about six of the second
    assert int(burst[0].headers["X-RateLimit-Remaining"]) <= 4
    assert sim.other_requests >= 6
    assert sim.plan_remaining() == 1_000 - 11 - sim.other_requests
    assert len(sim.request_log) == 11  # the others never show in the log


# ----- sorting -----


def test_records_sort_by_a_number_field_numerically_in_either_order(sim):
    records = [activities(1, start=n)[0] for n in (10, 2, 33, 1)]
    sim.add_records(DT["obj"], records)
    atd = DT_FIELDS["atd_activity_id"]

    def keys(**params):
        answer = requests.get(view_url(sim), params=params, headers=AUTH, timeout=TIMEOUT)
        return [r[f"{atd}_raw"] for r in answer.json()["records"]]

    assert keys() == [10, 2, 33, 1]  # no sort: the order they were added in
    assert keys(sort_field=atd) == [1, 2, 10, 33]  # asc by default
    assert keys(sort_field=atd, sort_order="asc") == [1, 2, 10, 33]
    assert keys(sort_field=atd, sort_order="desc") == [33, 10, 2, 1]


def test_text_sorts_case_insensitively_with_blanks_first_and_ties_keep_their_order(sim):
    names = ["beta", "Alpha", "", "alpha", "12"]
    records = [activities(1, start=n + 1, activity_name=name)[0] for n, name in enumerate(names)]
    sim.add_records(DT["obj"], records)
    name_field = DT_FIELDS["activity_name"]

    answer = requests.get(view_url(sim), params={"sort_field": name_field}, headers=AUTH, timeout=TIMEOUT).json()

    assert [r[f"{name_field}_raw"] for r in answer["records"]] == ["", "12", "Alpha", "alpha", "beta"]


def test_sorted_pages_read_again_from_page_one_while_marking(sim):
    """The paging the bridge relies on: sorted by atd_activity_id, marked records drop out of page 1."""
    records = activities(25)
    sim.add_records(DT["obj"], list(reversed(records)))  # added in the opposite order
    atd = DT_FIELDS["atd_activity_id"]
    params = {"filters": json.dumps(READY_WITH_EMI), "rows_per_page": 10, "sort_field": atd, "sort_order": "asc"}

    def page_one():
        return requests.get(view_url(sim), params=params, headers=AUTH, timeout=TIMEOUT).json()

    first = page_one()
    for record in first["records"][:7]:  # seven marked; three (say, failed) stay READY_TO_SEND
        set_status(sim, record["id"], "SENT")
    second = page_one()

    assert [r[f"{atd}_raw"] for r in first["records"]] == list(range(1, 11))
    assert [r[f"{atd}_raw"] for r in second["records"]] == [8, 9, 10, *range(11, 18)]
    assert (second["total_records"], second["total_pages"]) == (18, 2)


def test_ignore_sort_answers_a_shuffled_order_that_stays_the_same(sim):
    records = activities(30)
    sim.add_records(DT["obj"], records)
    sim.ignore_sort = True
    atd = DT_FIELDS["atd_activity_id"]
    params = {"filters": json.dumps(READY_WITH_EMI), "rows_per_page": 10, "sort_field": atd, "sort_order": "asc"}

    def keys(page):
        answer = requests.get(view_url(sim), params={**params, "page": page}, headers=AUTH, timeout=TIMEOUT)
        return [r[f"{atd}_raw"] for r in answer.json()["records"]]

    pages = [keys(1), keys(2), keys(3)]
    assert sorted(k for page in pages for k in page) == list(range(1, 31))  # every record once
    assert all(page != sorted(page) for page in pages)
    assert [keys(1), keys(2), keys(3)] == pages  # the same order on every request
    set_status(sim, records[0]["id"], "SENT")  # a record that leaves keeps the others in their order
    assert [k for p in (1, 2, 3) for k in keys(p)] == [k for page in pages for k in page if k != 1]


def test_a_page_action_edits_the_records_just_before_that_page_is_answered(sim):
    records = activities(20)
    sim.add_records(DT["obj"], records)
    sim.on_page(2, lambda: sim.remove_record(DT["obj"], records[0]["id"]))
    sim.on_page(2, lambda: sim.edit_record(DT["obj"], records[1]["id"], {DT_FIELDS["esb_status"]: "DO_NOT_SEND"}))

    first = get_page(sim, filters=READY_WITH_EMI, rows_per_page=10, page=1).json()
    second = get_page(sim, filters=READY_WITH_EMI, rows_per_page=10, page=2).json()
    again = get_page(sim, filters=READY_WITH_EMI, rows_per_page=10, page=2).json()

    assert ids_of(first) == [r["id"] for r in records[:10]]
    # both edits happened before page 2 was answered: records 11 and 12 slid onto page 1, unseen
    assert ids_of(second) == [r["id"] for r in records[12:]]
    assert (first["total_records"], second["total_records"]) == (20, 18)
    assert again["records"] == second["records"]  # each action ran once
    assert records[0]["id"] not in {r["id"] for r in sim.records(DT["obj"])}
    assert sim.record(DT["obj"], records[1]["id"])[f"{DT_FIELDS['esb_status']}_raw"] == "DO_NOT_SEND"


@pytest.mark.parametrize("params", [{"sort_field": "field_999999"}, {"sort_field": DT_FIELDS["atd_activity_id"],
                                                                     "sort_order": "up"}],
                         ids=["unknown-field", "unknown-order"])
def test_invalid_sorting_is_400(sim, params):
    answer = requests.get(view_url(sim), params=params, headers=AUTH, timeout=TIMEOUT)

    assert answer.status_code == 400
    assert answer.json()["errors"][0]["message"]


# ----- faults -----


def test_injected_status_with_retry_after_hits_only_matching_requests(sim):
    sim.inject("GET", "/records", status=503, retry_after=2, count=2)

    metadata = requests.get(f"{sim.url}/applications/{APP_ID}", timeout=TIMEOUT)
    failed = [get_page(sim) for _ in range(2)]
    recovered = get_page(sim)

    assert metadata.status_code == 200
    assert [r.status_code for r in failed] == [503, 503]
    assert [r.headers["Retry-After"] for r in failed] == ["2", "2"]
    assert failed[0].json()["errors"][0]["message"]
    assert recovered.status_code == 200
    assert sim.pending_faults() == 0


def test_injected_malformed_body_with_status_200(sim):
    sim.inject("*", DT["view"], status=200, body="<html>bad gateway</html>")

    answer = get_page(sim)

    assert answer.status_code == 200
    assert answer.text == "<html>bad gateway</html>"
    with pytest.raises(requests.JSONDecodeError):
        answer.json()


def test_faults_of_another_method_are_left_queued(sim):
    sim.inject("PUT", status=500)

    assert get_page(sim).status_code == 200
    assert sim.pending_faults() == 1
    sim.clear_faults()
    assert sim.pending_faults() == 0


def test_dropped_connection_raises_connection_error_and_changes_nothing(sim):
    [record] = activities(1)
    sim.add_records(DT["obj"], [record])
    sim.inject("PUT", drop=True)

    with pytest.raises(requests.ConnectionError):
        set_status(sim, record["id"], "SENT")
    retried = set_status(sim, record["id"], "SENT")

    assert [entry.status for entry in sim.request_log] == [0, 200]
    assert len(sim.updates) == 1
    assert retried.json()[DT_FIELDS["esb_status"] + "_raw"] == "SENT"


def test_delayed_answer_times_out_a_hasty_client(sim):
    sim.inject("GET", "/records", delay=0.5)

    with pytest.raises(requests.Timeout):
        get_page(sim, timeout=0.1)
    assert get_page(sim).status_code == 200


def test_delay_without_status_answers_normally(sim):
    sim.inject("GET", "/records", delay=0.2)

    started = time.monotonic()
    answer = get_page(sim)

    assert answer.status_code == 200 and answer.json()["total_pages"] == 0
    assert time.monotonic() - started >= 0.2


def test_latency_slows_every_request(sim):
    sim.latency = 0.3
    with pytest.raises(requests.Timeout):
        requests.get(f"{sim.url}/applications/{APP_ID}", timeout=0.1)

    sim.latency = 0.0
    assert requests.get(f"{sim.url}/applications/{APP_ID}", timeout=TIMEOUT).status_code == 200


@pytest.mark.parametrize("fault", [{"status": 502}, {"drop": True}], ids=["5xx", "drop"])
def test_after_apply_commits_the_update_but_loses_the_answer(sim, fault):
    [record] = activities(1)
    sim.add_records(DT["obj"], [record])
    sim.inject("PUT", after_apply=True, **fault)

    if fault.get("drop"):
        with pytest.raises(requests.ConnectionError):
            set_status(sim, record["id"], "SENT")
    else:
        assert set_status(sim, record["id"], "SENT").status_code == 502

    assert sim.record(DT["obj"], record["id"])[DT_FIELDS["esb_status"] + "_raw"] == "SENT"
    assert sim.updates == [(DT["obj"], record["id"], {DT_FIELDS["esb_status"]: "SENT"})]
    assert get_page(sim, filters=READY_WITH_EMI).json()["total_records"] == 0


def test_a_stopped_simulator_refuses_connections_until_restarted(make_sim):
    sim = make_sim()
    sim.add_records(DT["obj"], activities(2))
    with requests.Session() as session:  # a kept-alive connection must not outlive the outage
        assert session.get(view_url(sim), headers=AUTH, timeout=TIMEOUT).status_code == 200
        sim.stop()
        with pytest.raises(requests.ConnectionError):
            session.get(view_url(sim), headers=AUTH, timeout=TIMEOUT)

        sim.start()  # same port, same state: Knack is back
        assert session.get(view_url(sim), headers=AUTH, timeout=TIMEOUT).json()["total_records"] == 2


# ----- one record, escaped ids -----


def test_get_of_one_record_returns_every_field_and_404_when_gone(sim):
    records = activities(2)
    sim.add_records(DT["obj"], records)
    url = f"{sim.url}/objects/{DT['obj']}/records"

    found = requests.get(f"{url}/{records[1]['id']}", headers=AUTH, timeout=TIMEOUT)
    gone = requests.get(f"{url}/5f0000000000000000000000", headers=AUTH, timeout=TIMEOUT)
    unauthorised = requests.get(f"{url}/{records[1]['id']}", timeout=TIMEOUT)

    assert found.status_code == 200 and found.json() == records[1]
    assert gone.status_code == 404
    assert unauthorised.status_code == 401


@pytest.mark.parametrize("odd_id", ["recB?x=1", "recB/../recA", "recB#top"])
def test_an_escaped_record_id_is_routed_whole_like_knack_does(sim, odd_id):
    [plain] = activities(1)
    odd = {**activities(1, start=2)[0], "id": odd_id}
    sim.add_records(DT["obj"], [plain, odd])
    escaped = requests.utils.quote(odd_id, safe="")

    answer = requests.put(f"{sim.url}/objects/{DT['obj']}/records/{escaped}", headers=AUTH, timeout=TIMEOUT,
                          json={DT_FIELDS["esb_status"]: "SENT"})

    assert answer.status_code == 200 and answer.json()["id"] == odd_id
    assert sim.updates == [(DT["obj"], odd_id, {DT_FIELDS["esb_status"]: "SENT"})]
    assert sim.record(DT["obj"], plain["id"]) == plain


# ----- answers that never come, come a byte at a time, or never end -----


def test_a_hanging_request_gets_no_answer_and_is_not_applied(sim):
    [record] = activities(1)
    sim.add_records(DT["obj"], [record])
    sim.inject("PUT", record["id"], hang=True)

    with pytest.raises(requests.Timeout):
        set_status_hasty(sim, record["id"])

    assert [(entry.method, entry.status) for entry in sim.request_log] == [("PUT", 0)]
    assert sim.updates == []


def test_a_hanging_request_after_apply_commits_the_update(sim):
    [record] = activities(1)
    sim.add_records(DT["obj"], [record])
    sim.inject("PUT", record["id"], hang=True, after_apply=True)

    with pytest.raises(requests.Timeout):
        set_status_hasty(sim, record["id"])

    assert sim.record(DT["obj"], record["id"])[DT_FIELDS["esb_status"] + "_raw"] == "SENT"


def test_stopping_the_simulator_releases_a_hanging_request(sim):
    sim.inject("GET", "/applications/", hang=True)
    outcome = []

    def ask():
        try:
            requests.get(f"{sim.url}/applications/{APP_ID}", timeout=30)
        except requests.RequestException as exc:
            outcome.append(exc)

    asker = threading.Thread(target=ask)
    asker.start()
    while not sim.request_log:
        time.sleep(0.01)
    started = time.monotonic()
    sim.stop()
    asker.join(10)

    assert not asker.is_alive() and time.monotonic() - started < 5
    assert isinstance(outcome[0], requests.ConnectionError)


@pytest.mark.timing
def test_a_trickled_answer_never_trips_a_per_read_timeout(sim):
    sim.inject("GET", "/applications/", status=418, body='{"slow": true}', trickle=0.01)

    started = time.monotonic()
    answer = requests.get(f"{sim.url}/applications/{APP_ID}", timeout=0.5)
    took = time.monotonic() - started

    assert answer.status_code == 418 and answer.json() == {"slow": True}
    assert took >= 0.01 * len(answer.content) + 0.5  # every byte of it came late, the headers too


def test_an_oversize_answer_has_no_length_and_pads_the_json(sim):
    sim.inject("GET", "/applications/", oversize=1_000_000)

    answer = requests.get(f"{sim.url}/applications/{APP_ID}", timeout=TIMEOUT)

    assert "Content-Length" not in answer.headers
    assert len(answer.content) >= 1_000_000
    assert answer.json()["application"]["id"] == APP_ID


def test_deeply_nested_json_is_served_as_json(sim):
    sim.inject("GET", "/applications/", status=200, body="[" * 50_000 + "]" * 50_000)

    answer = requests.get(f"{sim.url}/applications/{APP_ID}", timeout=TIMEOUT)

    assert answer.headers["Content-Type"].startswith("application/json")
    assert len(answer.content) == 100_000


def set_status_hasty(sim, record_id: str) -> requests.Response:
    return requests.put(f"{sim.url}/objects/{DT['obj']}/records/{record_id}", json={DT_FIELDS["esb_status"]: "SENT"},
                        headers=AUTH, timeout=0.5)


# ----- record builders against the recorded payloads -----


@pytest.fixture(scope="module")
def fixture_record() -> dict:
    return load_fixture("records_all_field_types.json")["records"][0]


@pytest.mark.parametrize(
    "local, fixture_field",
    [
        (datetime.datetime(2018, 7, 3, 10, 26), "field_13"),
        (datetime.datetime(2019, 9, 13, 2, 43), "field_37"),
        (datetime.datetime(2019, 9, 11, 0, 0), "field_12"),  # midnight: Knack's "time" is 720
        (datetime.datetime(2012, 1, 1, 16, 14), "field_14"),
    ],
)
def test_date_time_raw_values_equal_the_recorded_ones(fixture_record, local, fixture_field):
    record = activity_record(DT, record_id="r", atd_activity_id=1, emi_id="E", sr_number="S", activity_datetime=local)

    assert record[DT_FIELDS["activity_datetime"] + "_raw"] == fixture_record[fixture_field + "_raw"]


def test_date_time_display_follows_the_recorded_format(fixture_record):
    record = activity_record(
        DT, record_id="r", atd_activity_id=1, emi_id="E", sr_number="S",
        activity_datetime=datetime.datetime(2019, 9, 13, 2, 43, 59),  # Knack keeps minutes only
    )

    assert record[DT_FIELDS["activity_datetime"]] == fixture_record["field_37"] == "09/13/2019 2:43am"


def test_local_time_is_labelled_utc_like_knack_does():
    record = activity_record(
        DT, record_id="r", atd_activity_id=1, emi_id="E", sr_number="S",
        activity_datetime=datetime.datetime(2024, 7, 4, 10, 26),
    )
    raw = record[DT_FIELDS["activity_datetime"] + "_raw"]

    # 10:26 in Austin is 15:26Z, but Knack labels the wall-clock time as UTC.
    assert raw["iso_timestamp"] == "2024-07-04T10:26:00.000Z"
    assert raw["unix_timestamp"] == 1720088760000
    assert (raw["timestamp"], raw["am_pm"], raw["time"]) == ("07/04/2024 10:26 am", "AM", 626)


@pytest.mark.parametrize("app_name", sorted(CONFIG))
def test_activity_records_have_the_recorded_shapes(fixture_record, app_name):
    app = CONFIG[app_name]
    fields = app["fields"]
    [record] = activities(1, app=app_name, activity_details="Line 1\nLine <2> & more")
    types = FIELD_TYPES[app_name]

    field_keys = [key for var, key in fields.items() if var != "id"]
    assert set(record) == {"id"} | set(field_keys) | {f"{key}_raw" for key in field_keys}

    date_raw = record[fields["activity_datetime"] + "_raw"]
    assert list(date_raw) == list(fixture_record["field_13_raw"])
    assert {k: type(v) for k, v in date_raw.items()} == {k: type(v) for k, v in fixture_record["field_13_raw"].items()}

    assert record[fields["atd_activity_id"] + "_raw"] == record[fields["atd_activity_id"]] == 1
    assert record[fields["emi_id"] + "_raw"] == record[fields["emi_id"]] == "EMI-1"
    assert record[fields["esb_status"] + "_raw"] == "READY_TO_SEND"
    assert record[fields["activity_details"] + "_raw"] == "Line 1\nLine <2> & more"
    assert record[fields["activity_details"]] == "Line 1<br />Line &lt;2&gt; &amp; more"

    recorded_span = re.compile(r'<span class="([0-9a-f]{24})">(.*)</span>')
    assert recorded_span.fullmatch(fixture_record["field_128"])  # the pattern fits the recorded value
    for variable in ("sr_number", "activity_name"):
        display, raw = record[fields[variable]], record[fields[variable] + "_raw"]
        if types[variable] == "connection":
            assert [set(item) for item in raw] == [set(item) for item in fixture_record["field_128_raw"]]
            [connected] = raw
            assert recorded_span.fullmatch(display).groups() == (connected["id"], connected["identifier"])
        else:
            assert display == raw and isinstance(raw, str)
    assert record[fields["activity_name"] + "_raw"] in (
        "Dispatch Technician",
        [{"id": random_id("connection:Dispatch Technician"), "identifier": "Dispatch Technician"}],
    )


@pytest.mark.parametrize("app_name", sorted(CONFIG))
def test_empty_values_follow_the_recorded_shapes(app_name):
    app = CONFIG[app_name]
    fields = app["fields"]
    kwargs = dict(record_id="r", atd_activity_id=7, emi_id="", sr_number="", activity_datetime=None, app_name=app_name)

    record = activity_record(app, **kwargs)
    sparse = activity_record(app, omit_empty_raw=True, **kwargs)

    assert record[fields["activity_datetime"]] == record[fields["activity_datetime"] + "_raw"] == ""
    assert record[fields["emi_id"] + "_raw"] == ""
    expected_sr = [] if FIELD_TYPES[app_name]["sr_number"] == "connection" else ""
    assert record[fields["sr_number"] + "_raw"] == expected_sr and record[fields["sr_number"]] == ""
    # Fields never set come without a raw value in real Knack; connections keep their [].
    assert fields["emi_id"] + "_raw" not in sparse and sparse[fields["emi_id"]] == ""
    assert (fields["sr_number"] + "_raw" in sparse) == (expected_sr == [])


def test_random_ids_look_like_knack_ids_and_are_deterministic():
    assert re.fullmatch(r"[0-9a-f]{24}", random_id(1))
    assert random_id(1) == random_id(1) != random_id(2)


@pytest.mark.parametrize("app_name", sorted(CONFIG))
def test_app_metadata_has_the_recorded_shape(app_name):
    recorded = load_fixture("app_metadata.json")["application"]
    app = CONFIG[app_name]
    metadata = app_metadata(app_name, app, timezone="Mountain Time (US & Canada)", scene_key="scene_42")
    application = metadata["application"]

    recorded_field_keys = {key for obj in recorded["objects"] for f in obj["fields"] for key in f} | {"default"}
    assert set(application) <= set(recorded)
    assert application["settings"]["timezone"] == "Mountain Time (US & Canada)"
    assert len(application["objects"]) >= 2 and len(application["scenes"]) >= 2
    for obj in application["objects"]:
        assert set(obj) <= set(recorded["objects"][0])
        for f in obj["fields"]:
            assert set(f) <= recorded_field_keys

    [activity_object] = [o for o in application["objects"] if o["key"] == app["obj"]]
    types = {f["key"]: f for f in activity_object["fields"]}
    expected = {key: FIELD_TYPES[app_name][var] for var, key in app["fields"].items() if var != "id"}
    assert {key: f["type"] for key, f in types.items()} == expected

    status_options = types[app["fields"]["esb_status"]]["format"]["options"]
    assert {"READY_TO_SEND", "SENT"} <= set(status_options)
    date_format = types[app["fields"]["activity_datetime"]]["format"]
    assert (date_format["date_format"], date_format["time_format"]) == ("mm/dd/yyyy", "HH:MM am")
    if FIELD_TYPES[app_name]["activity_name"] == "multiple_choice":
        assert types[app["fields"]["activity_name"]]["format"]["options"] == list(app["activity_codes"])
    else:
        target = types[app["fields"]["activity_name"]]["relationship"]["object"]
        assert target in {o["key"] for o in application["objects"]} - {app["obj"]}

    scenes_of_view = [s["key"] for s in application["scenes"] for v in s["views"] if v["key"] == app["view"]]
    assert scenes_of_view == ["scene_42"]
    [view] = [v for s in application["scenes"] for v in s["views"] if v["key"] == app["view"]]
    assert view["source"]["object"] == app["obj"]
    assert {c["field"]["key"] for c in view["columns"]} == set(expected)


@pytest.mark.parametrize("app_name", sorted(CONFIG))
def test_built_records_read_back_through_the_built_view(make_sim, app_name):
    app = CONFIG[app_name]
    sim = make_sim(app_name)
    records = activities(3, app=app_name) + activities(1, app=app_name, start=4, esb_status="SENT")
    sim.add_records(app["obj"], records)
    filters = [
        {"field": app["fields"]["emi_id"], "operator": "is not blank"},
        {"field": app["fields"]["esb_status"], "operator": "is", "value": "READY_TO_SEND"},
    ]

    answer = get_page(sim, app=app, filters=filters).json()

    assert answer["records"] == records[:3]

"""Issue 8, end to end: backlogs of several pages drained while Knack's filtered view shifts under the run, the
metadata cache that makes an idle run one Knack request, and the app's daily Knack API budget. Issue 12: 311's
order kept when Knack ignores the sort, or when a staff edit shifts page 2 just as it is read.

The Knack simulator applies the view's filter afresh on every request and sorts by the field asked for, as Knack
does; `max_rows_per_page` makes a page small, so a backlog of a few dozen records spans several pages;
`ignore_sort` and `on_page` make it misbehave.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from config import CONFIG
from simulators.activities import app_metadata
from tests.conftest import APP_ID, make_knack, statuses

APP = "data-tracker"
FIELDS = CONFIG[APP]["fields"]
READY, SENT = "READY_TO_SEND", "SENT"


@pytest.fixture
def bridge_env(bridge_env):
    return {**bridge_env, "KNACK_MAX_RPS": "50"}


def small_pages(per_page: int, **kwargs):
    return make_knack(rate_limit=None, max_rows_per_page=per_page, **kwargs)


def page_reads(knack) -> list[int]:
    return [int(r.query.get("page", "1")) for r in knack.request_log if "/views/" in r.path]


def metadata_reads(knack) -> int:
    return sum(1 for r in knack.request_log if "/applications/" in r.path)


def order_kept(esb, records) -> bool:
    """Per service request, the ESB received the activities in ascending atd_activity_id order."""
    atd_of = {r["id"]: int(r[FIELDS["atd_activity_id"]]) for r in records}
    sr_of = {r["id"]: r[FIELDS["sr_number"]] for r in records}
    arrived: dict[str, list[int]] = {}
    for message in esb.accepted:
        arrived.setdefault(sr_of[message.record_id], []).append(atd_of[message.record_id])
    return all(keys == sorted(keys) for keys in arrived.values())


def summary_counts(stdout: str) -> dict[str, str]:
    [line] = [line for line in stdout.splitlines() if " summary: " in line]
    return dict(re.findall(r"(\w+)=(\S+)", line))


# ----- several pages ---------------------------------------------------------------------------------------------

def test_a_backlog_of_several_pages_is_sent_whole_once_each_and_in_order_per_sr(run_bridge, seed, esb, tmp_path):
    with small_pages(5) as knack:
        seeder = type(seed)(knack)
        records = []
        for sr in range(8):  # 8 service requests of 3 activities each: 24 records, 5 pages of 5
            records += seeder(3, sr_number=f"20-{sr:08d}")
        run = run_bridge(env={"KNACK_API_URL": knack.url})

        assert run.returncode == 0, run.output
        assert esb.copies() == {r["id"]: 1 for r in records}
        assert statuses(knack) == {r["id"]: SENT for r in records}
        assert order_kept(esb, records)
        assert summary_counts(run.stdout)["fetched"] == "24"
        # page 1 read again as the records before it were marked (page 2 when page 1 still held only records of
        # this run in flight): nothing skipped, and not a read per record
        assert page_reads(knack).count(1) >= 5
        assert len(page_reads(knack)) < len(records)


def test_records_that_keep_failing_fill_page_1_and_the_rest_is_still_sent(run_bridge, seed, esb):
    with small_pages(4) as knack:
        seeder = type(seed)(knack)
        records = seeder(14)  # 14 service requests, one activity each
        stuck = records[:6]  # more than a page of records the ESB rejects: they stay READY_TO_SEND
        esb.reject_records = {r["id"]: "SR is locked" for r in stuck}

        run = run_bridge(env={"KNACK_API_URL": knack.url})

        assert run.returncode == 1, run.output
        assert esb.copies() == {r["id"]: 1 for r in records[6:]}
        assert statuses(knack) == {r["id"]: READY if r in stuck else SENT for r in records}
        counts = summary_counts(run.stdout)
        assert counts["failed"] == "6" and counts["sent"] == "8" and counts["fetched"] == "14"
        assert 2 in page_reads(knack)  # page 1 held only this run's failures: the run looked beyond it


def test_a_dry_run_over_several_pages_lists_every_record_once(run_bridge, seed, esb):
    with small_pages(5) as knack:
        records = type(seed)(knack)(12)
        run = run_bridge("--dry-run", env={"KNACK_API_URL": knack.url})

        assert run.returncode == 0, run.output
        assert all(run.stdout.count(r["id"]) >= 1 for r in records)
        assert page_reads(knack) == [1, 2, 3]
        assert esb.received == [] and set(statuses(knack).values()) == {READY}


# ----- Knack's paging breaking the order: a sort ignored, a page shifted by a staff edit ----------------------------

def seed_interleaved(seeder, count: int, per_sr: int) -> list[dict]:
    """`count` records, `per_sr` activities per service request, the activities of one SR far apart in the
    backlog (SR k holds the k-th, (k + count/per_sr)-th, ... records)."""
    srs = count // per_sr
    records = []
    for n in range(count):
        records += seeder(1, sr_number=f"21-{n % srs:08d}")
    return records


def first_posted_after_pages(knack, esb, pages: int) -> bool:
    """The first POST to the ESB came after `pages` view reads, i.e. once the whole listing was read."""
    reads = [r.at for r in knack.request_log if "/views/" in r.path]
    return len(reads) >= pages and min(m.at for m in esb.received) > reads[pages - 1]


def unsorted_warnings(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if "WARNING" in line and "not in ascending" in line]


@pytest.mark.slow  # 1,100 records through the real pacing: about 25 s
def test_a_knack_ignoring_the_sort_over_two_real_pages_still_sends_each_sr_in_order(run_bridge, seed, esb):
    # the case: 1,100 records over two pages of 1,000, 4 activities per SR, Knack answering in any order
    with make_knack(rate_limit=None) as knack:
        knack.ignore_sort = True
        records = seed_interleaved(type(seed)(knack), 1100, per_sr=4)

        run = run_bridge(env={"KNACK_API_URL": knack.url})

        assert run.returncode == 0, run.output[-3000:]
        assert esb.copies() == {r["id"]: 1 for r in records}
        assert statuses(knack) == {r["id"]: SENT for r in records}
        assert order_kept(esb, records)
        counts = summary_counts(run.stdout)
        assert (counts["held"], counts["failed"], counts["fetched"]) == ("0", "0", "1100")
        assert page_reads(knack) == [1, 2]  # the whole listing, once
        assert first_posted_after_pages(knack, esb, 2)
        [warning] = unsorted_warnings(run.stdout)
        assert CONFIG[APP]["view"] in warning


def test_a_knack_ignoring_the_sort_over_many_small_pages_sends_each_sr_in_order(run_bridge, seed, esb):
    with small_pages(5) as knack:
        knack.ignore_sort = True
        records = seed_interleaved(type(seed)(knack), 40, per_sr=4)  # 8 pages

        run = run_bridge(env={"KNACK_API_URL": knack.url})

        assert run.returncode == 0, run.output
        assert esb.copies() == {r["id"]: 1 for r in records}
        assert statuses(knack) == {r["id"]: SENT for r in records}
        assert order_kept(esb, records)
        assert summary_counts(run.stdout)["held"] == "0"
        assert page_reads(knack) == list(range(1, 9))
        assert first_posted_after_pages(knack, esb, 8)
        assert len(unsorted_warnings(run.stdout)) == 1


def test_a_dry_run_over_pages_in_no_order_lists_every_record_once(run_bridge, seed, esb):
    with small_pages(5) as knack:
        knack.ignore_sort = True
        records = seed_interleaved(type(seed)(knack), 12, per_sr=3)
        run = run_bridge("--dry-run", env={"KNACK_API_URL": knack.url})

        assert run.returncode == 0, run.output
        assert all(run.stdout.count(r["id"]) >= 1 for r in records)
        assert page_reads(knack) == [1, 2, 3] and len(unsorted_warnings(run.stdout)) == 1
        counts = dict(re.findall(r"(\w+)=(\S+)", run.stdout.splitlines()[-1]))  # the last line: the summary
        assert (counts["fetched"], counts["rendered"]) == ("12", "12"), counts
        assert esb.received == [] and set(statuses(knack).values()) == {READY}


def test_a_staff_edit_that_shifts_page_2_as_it_is_read_does_not_break_an_srs_order(run_bridge, seed, esb):
    # page 1 is filled with records the ESB rejects; as page 2 is read, staff take one of them out of the view,
    # so the first record of page 2 slides onto page 1 unseen, while its SR's next activity is on page 2
    with small_pages(10) as knack:
        seeder = type(seed)(knack)
        failing = seeder(10)
        earlier = seeder(1, sr_number="21-00000777")[0]  # first of page 2 until the edit
        between = seeder(3)
        later = seeder(1, sr_number="21-00000777")[0]  # the same SR's next activity, on page 2
        rest = seeder(8)
        esb.reject_records = {r["id"]: "SR is locked" for r in failing}
        status_field = FIELDS["esb_status"]
        knack.on_page(2, lambda: knack.edit_record(CONFIG[APP]["obj"], failing[0]["id"],
                                                   {status_field: "DO_NOT_SEND"}))

        run = run_bridge(env={"KNACK_API_URL": knack.url})

        assert 2 in page_reads(knack), run.output  # the edit happened
        sendable = [earlier, *between, later, *rest]
        assert esb.copies() == {r["id"]: 1 for r in sendable}, run.output
        arrived = [m.record_id for m in esb.accepted]
        assert arrived.index(earlier["id"]) < arrived.index(later["id"])
        assert {statuses(knack)[r["id"]] for r in sendable} == {SENT}
        counts = summary_counts(run.stdout)
        assert (counts["held"], counts["failed"]) == ("0", "10")
        assert run.returncode == 1  # the ten rejected records


# ----- the metadata cache: an idle run is one request ------------------------------------------------------------

def test_an_idle_run_with_a_warm_cache_makes_exactly_one_knack_request(run_bridge, knack, seed, esb):
    records = seed(2)
    first = run_bridge()
    assert first.returncode == 0, first.output
    assert statuses(knack) == {r["id"]: SENT for r in records}
    before = len(knack.request_log)

    idle = run_bridge()

    assert idle.returncode == 0, idle.output
    assert [r.path for r in knack.request_log[before:]] == [knack.request_log[-1].path]
    assert "/views/" in knack.request_log[-1].path
    assert summary_counts(idle.stdout)["fetched"] == "0"


def cache_file(bridge_env) -> Path:
    return Path(bridge_env["STATE_DIR"]) / f"{APP}.metadata.json"


def test_the_cache_is_refreshed_when_a_configured_field_is_missing_from_it(run_bridge, knack, seed, esb, bridge_env):
    seed(1)
    assert run_bridge().returncode == 0
    saved = json.loads(cache_file(bridge_env).read_text())
    for obj in saved["metadata"]["application"]["objects"]:  # as the app was before a field was added
        obj["fields"] = [f for f in obj["fields"] if f["key"] != FIELDS["activity_details"]]
    cache_file(bridge_env).write_text(json.dumps(saved))
    records = seed(1)
    before = metadata_reads(knack)

    run = run_bridge()

    assert run.returncode == 0, run.output
    assert metadata_reads(knack) == before + 1
    assert esb.copies()[records[0]["id"]] == 1
    fresh = json.loads(cache_file(bridge_env).read_text())
    keys = {f["key"] for o in fresh["metadata"]["application"]["objects"] for f in o["fields"]}
    assert FIELDS["activity_details"] in keys


def test_a_cache_older_than_a_day_is_refreshed(run_bridge, knack, seed, esb, bridge_env):
    seed(1)
    assert run_bridge().returncode == 0
    saved = json.loads(cache_file(bridge_env).read_text())
    saved["fetched_at"] = time.time() - 25 * 3600
    cache_file(bridge_env).write_text(json.dumps(saved))
    before = metadata_reads(knack)

    assert run_bridge().returncode == 0
    assert metadata_reads(knack) == before + 1


def test_a_view_moved_to_another_scene_is_found_through_fresh_metadata(run_bridge, knack, seed, esb, bridge_env):
    seed(1)
    assert run_bridge().returncode == 0  # the cache now names the view's scene
    metadata = app_metadata(APP, CONFIG[APP], timezone="Central Time (US & Canada)", app_id=APP_ID)
    scenes = metadata["application"]["scenes"]
    holder = next(s for s in scenes if any(v["key"] == CONFIG[APP]["view"] for v in s["views"]))
    holder["key"] = holder["key"] + "9"  # the builder moved the view: its scene key is new
    knack.set_metadata(metadata)
    records = seed(2)

    run = run_bridge()

    assert run.returncode == 0, run.output
    assert set(esb.copies().values()) == {1} and all(r["id"] in esb.copies() for r in records)
    assert {statuses(knack)[r["id"]] for r in records} == {SENT}
    assert holder["key"] in cache_file(bridge_env).read_text()


# ----- the daily budget ----------------------------------------------------------------------------------------------

def test_the_reserve_of_daily_calls_stops_new_records_loudly_and_loses_nothing(run_bridge, seed, esb):
    # 100 calls a day, 85 spent by the app's other users: 15 left, 10 kept for them (10% of the limit)
    with make_knack(rate_limit=None, plan_limit=100, plan_used=85) as knack:
        records = type(seed)(knack)(10)
        run = run_bridge(env={"KNACK_API_URL": knack.url})

        assert run.returncode == 1, run.output
        sent = {rid for rid, status in statuses(knack).items() if status == SENT}
        assert 1 <= len(sent) < len(records)
        assert knack.plan_used <= 100 - 10  # the reserve was left to the others
        assert esb.copies() == {rid: 1 for rid in sent}  # nothing posted without its status update
        [line] = [line for line in run.stdout.splitlines() if "daily Knack API budget" in line and "ERROR" in line]
        assert "resets at" in line and "KNACK_PLAN_RESERVE" in line
        counts = summary_counts(run.stdout)
        assert counts["not_attempted"] == str(len(records) - len(sent))
        assert "knack_calls_left_today" in counts

        knack.plan_used = 0  # the next day
        rerun = run_bridge(env={"KNACK_API_URL": knack.url})
        assert rerun.returncode == 0, rerun.output
        assert set(statuses(knack).values()) == {SENT}
        assert esb.copies() == {r["id"]: 1 for r in records}


def test_knack_plan_reserve_0_spends_the_budget_to_the_last_call(run_bridge, seed, esb):
    with make_knack(rate_limit=None, plan_limit=100, plan_used=85) as knack:
        records = type(seed)(knack)(10)
        run = run_bridge(env={"KNACK_API_URL": knack.url, "KNACK_PLAN_RESERVE": "0"})

        assert run.returncode == 0, run.output
        assert set(statuses(knack).values()) == {SENT}
        assert esb.copies() == {r["id"]: 1 for r in records}
        assert summary_counts(run.stdout)["knack_calls_left_today"] == str(100 - knack.plan_used)

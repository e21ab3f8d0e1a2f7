"""No record can stop the app (issue 13, items 1 and 8), end to end: the real command against the Knack simulator
(HTTP) and the ESB simulator (HTTPS with a client certificate).

Records Knack hands over with text no encoding can write (a lone UTF-16 surrogate, half an emoji), an
atd_activity_id that is not a finite number, an id that is not a text, or an activity text far longer than any
note staff type. Each test checks what the ESB received, the Knack statuses and the exit code; every run ends
with its summary line and no traceback, and every other record is delivered.
"""

from __future__ import annotations

import datetime as dt
import re

import pytest

from config import CONFIG
from simulators.activities import activity_record
from simulators.esb import parse_message
from tests.conftest import make_knack, statuses

APP = "data-tracker"
OBJ = CONFIG[APP]["obj"]
FIELDS = CONFIG[APP]["fields"]
READY, SENT = "READY_TO_SEND", "SENT"
HALF_AN_EMOJI = "\ud83d"  # the high half of U+1F600 and its neighbours, as JSON can carry it: "\ud83d"


@pytest.fixture
def knack(request):
    """No rate limit (the program paces at KNACK_MAX_RPS, set high below); a test may ask for small pages."""
    with make_knack(rate_limit=None, **getattr(request, "param", {})) as simulator:
        yield simulator


@pytest.fixture
def bridge_env(bridge_env):
    return {**bridge_env, "KNACK_MAX_RPS": "50"}


class Records:
    """Adds data-tracker activities to the simulator, with any raw value in any field (`raw=` overrides)."""

    def __init__(self, knack):
        self.knack = knack
        self.next = 1000

    def __call__(self, *, sr: str | None = None, raw: dict | None = None, **values) -> dict:
        self.next += 1
        n = self.next
        fields = dict(record_id=f"rec{n:021d}", atd_activity_id=n, emi_id=f"EMI-{n}",
                      sr_number=sr or f"20-{n:08d}", activity_datetime=dt.datetime(2024, 7, 4, 10, 26),
                      activity_details=f"details {n}", activity_name="Dispatch Technician", issue_status="open")
        fields.update(values)
        record = activity_record(CONFIG[APP], app_name=APP, omit_empty_raw=True, **fields)
        for variable, value in (raw or {}).items():
            if variable == "id":
                record["id"] = value
            else:
                record[FIELDS[variable]] = record[f"{FIELDS[variable]}_raw"] = value
        self.knack.add_records(OBJ, [record])
        return record


@pytest.fixture
def add(knack):
    return Records(knack)


def summary(output: str) -> str:
    lines = [line for line in output.splitlines() if " summary: " in line or " summary (dry run): " in line]
    assert len(lines) == 1, output
    return lines[0]


def count(output: str, name: str) -> int:
    return int(re.search(rf"\b{name}=(\d+)", summary(output)).group(1))


def lines_with(output: str, *texts: str) -> list[str]:
    return [line for line in output.splitlines() if all(text in line for text in texts)]


def sent_messages(esb) -> dict[str, dict]:
    """record id -> the message the ESB accepted for it (each record at most once)."""
    messages = [parse_message(r.body) for r in esb.accepted]
    by_id = {m["id"]: m for m in messages}
    assert len(by_id) == len(messages), "a record was sent twice"
    return by_id


def orderly(run) -> None:
    """The run ended as the README says: one summary line, no traceback, an exit code of the table."""
    assert "Traceback" not in run.output, run.output
    assert run.returncode in (0, 1), run.output
    summary(run.stdout)


# ----- 1. text no encoding can write -------------------------------------------------------------------------------

def test_half_an_emoji_fails_a_record_it_would_change_the_identity_of_and_is_removed_from_free_text(
        run_bridge, knack, esb, add, bridge_env):
    in_emi = add(sr="24-00000001", emi_id=f"EMI-{HALF_AN_EMOJI}7")
    after_it = add(sr="24-00000001")  # a later activity of the same service request: waits for the one that failed
    in_sr = add(sr=f"24-{HALF_AN_EMOJI}0000002", activity_name="no such activity")  # it would fail anyway
    in_details = add(activity_details=f"Replaced the lamp {HALF_AN_EMOJI}, works now")
    in_name = add(activity_name=f"Dispatch Technician{HALF_AN_EMOJI}")
    plain = [add() for _ in range(3)]

    runs = [run_bridge(), run_bridge()]  # the bad records stay READY_TO_SEND: the next run must get past them too

    for run in runs:

        orderly(run)
        assert run.returncode == 1
        now = statuses(knack)
        assert {now[r["id"]] for r in (in_details, in_name, *plain)} == {SENT}
        assert {now[r["id"]] for r in (in_emi, after_it, in_sr)} == {READY}
        received = sent_messages(esb)
        assert set(received) == {r["id"] for r in (in_details, in_name, *plain)}

    assert received[in_details["id"]]["activity_details"] == "Replaced the lamp , works now"
    assert received[in_name["id"]]["activity_type_code"] == CONFIG[APP]["activity_codes"]["Dispatch Technician"]
    for run in runs:
        (failed_emi,) = lines_with(run.stdout, in_emi["id"], "FAILED")
        assert f"emi_id ({FIELDS['emi_id']})" in failed_emi and "correct it in Knack" in failed_emi
        (failed_sr,) = lines_with(run.stdout, in_sr["id"], "FAILED")
        assert f"sr_number ({FIELDS['sr_number']})" in failed_sr
        assert lines_with(run.stdout, after_it["id"], "HELD")
        assert (count(run.stdout, "failed"), count(run.stdout, "held")) == (2, 1)
    assert len(lines_with(runs[0].stdout, in_details["id"], "WARNING")) == 1
    assert lines_with(runs[1].stdout, in_details["id"]) == []  # SENT: not read again


def test_half_an_emoji_in_free_text_is_named_in_one_warning_without_the_value(run_bridge, knack, esb, add):
    record = add(activity_details=f"secret-ish note {HALF_AN_EMOJI} end", issue_status=f"open{HALF_AN_EMOJI}")

    run = run_bridge()

    orderly(run)
    assert run.returncode == 0
    assert statuses(knack) == {record["id"]: SENT}
    message = sent_messages(esb)[record["id"]]
    assert (message["activity_details"], message["issue_status_code"]) == ("secret-ish note  end", "open")
    (warning,) = lines_with(run.stdout, record["id"], "WARNING")
    assert f"activity_details ({FIELDS['activity_details']})" in warning
    assert f"issue_status_code_snapshot ({FIELDS['issue_status_code_snapshot']})" in warning
    assert "secret-ish" not in warning


def test_an_identifying_value_with_a_character_xml_forbids_fails_and_free_text_goes_without_it(
        run_bridge, knack, esb, add):
    # the message would carry these without the character: 311 would know the activity by another value
    in_sr = add(sr="24-0000\x1f0003")
    in_id = add(raw={"id": "rec\x07000000000000000000001"})
    in_details = add(activity_details="bell\x07 and NUL\x00 gone")

    run = run_bridge()

    orderly(run)
    assert run.returncode == 1
    assert set(sent_messages(esb)) == {in_details["id"]}
    assert sent_messages(esb)[in_details["id"]]["activity_details"] == "bell and NUL gone"
    assert knack.record(OBJ, in_sr["id"])[f"{FIELDS['esb_status']}_raw"] == READY
    assert knack.record(OBJ, in_id["id"])[f"{FIELDS['esb_status']}_raw"] == READY
    (failed_sr,) = lines_with(run.stdout, in_sr["id"], "FAILED")
    assert f"sr_number ({FIELDS['sr_number']}) held characters a message cannot carry" in failed_sr
    (failed_id,) = lines_with(run.stdout, "rec\\x07", "FAILED")  # the log shows the control character escaped
    assert "id (id) held characters a message cannot carry" in failed_id


# ----- 2. an atd_activity_id that is not a finite number -----------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "abc"], ids=["NaN", "Infinity", "abc"])
def test_an_activity_id_that_is_not_a_number_fails_and_holds_its_service_request(run_bridge, knack, esb, add, bad):
    sr = "24-00002000"
    first, third = add(sr=sr, atd_activity_id=2001), add(sr=sr, atd_activity_id=2003)
    unplaced = add(sr=sr, raw={"atd_activity_id": bad})
    fourth = add(sr=sr, atd_activity_id=2004)
    others = [add(), add()]

    run = run_bridge()

    orderly(run)
    assert run.returncode == 1
    assert set(sent_messages(esb)) == {r["id"] for r in others}  # none of the SR in an order nobody can vouch for
    now = statuses(knack)
    assert {now[r["id"]] for r in (first, third, unplaced, fourth)} == {READY}
    assert {now[r["id"]] for r in others} == {SENT}
    (failed,) = lines_with(run.stdout, unplaced["id"], "FAILED")
    assert "not a number" in failed and FIELDS["atd_activity_id"] in failed
    assert all(lines_with(run.stdout, r["id"], "HELD") for r in (first, third, fourth))
    assert (count(run.stdout, "failed"), count(run.stdout, "held"), count(run.stdout, "sent")) == (1, 3, 2)


# ----- 3. a record whose id is not a text --------------------------------------------------------------------------

@pytest.mark.parametrize("knack", [{"max_rows_per_page": 2}], indirect=True)  # page 1 is read again and again
@pytest.mark.parametrize("bad_id", [123, None, ["rec1", "rec2"], ".."], ids=["number", "null", "list", "dot-dot"])
def test_a_record_whose_id_is_not_a_text_is_counted_once_and_fails_with_a_line(run_bridge, knack, esb, add, bad_id):
    sr = "24-00003000"
    no_id = add(sr=sr, raw={"id": bad_id}, atd_activity_id=1)  # first in Knack's order: on page 1 every time
    after_it = add(sr=sr, atd_activity_id=2)
    others = [add() for _ in range(4)]

    run = run_bridge()

    orderly(run)
    assert run.returncode == 1
    assert set(sent_messages(esb)) == {r["id"] for r in others}
    updated = sorted(r.path.rsplit("/", 1)[-1] for r in knack.request_log if r.method == "PUT")
    assert updated == sorted(r["id"] for r in others)  # no update went anywhere else
    status = f"{FIELDS['esb_status']}_raw"
    assert [knack.record(OBJ, r["id"])[status] for r in (after_it, *others)] == [READY] + [SENT] * len(others)
    (failed,) = lines_with(run.stdout, "FAILED", "its status cannot be set in Knack")
    assert "activity=1 " in failed and f"sr={sr}" in failed
    assert lines_with(run.stdout, after_it["id"], "HELD")
    assert (count(run.stdout, "fetched"), count(run.stdout, "failed"), count(run.stdout, "held")) == (6, 1, 1)
    assert no_id["id"] == bad_id  # as Knack sent it


# ----- 4. an activity text longer than a message may carry ---------------------------------------------------------

def test_an_activity_text_over_1_mb_fails_as_bad_data_and_one_below_it_is_sent_whole(run_bridge, knack, esb, add):
    # 5 million characters of 3 bytes: 15 MB of UTF-8, 40 MB as character references; lxml alone refuses a text
    # node over 10 MB, which once failed as "rendered message is not well-formed XML" on every run
    huge = add(activity_details="中" * 5_000_000)
    long = add(activity_details="é" * 450_000 + "中" * 30_000)  # 990,000 bytes of UTF-8: under the limit
    plain = add()

    run = run_bridge()

    orderly(run)
    assert run.returncode == 1
    assert statuses(knack) == {huge["id"]: READY, long["id"]: SENT, plain["id"]: SENT}
    received = sent_messages(esb)
    assert set(received) == {long["id"], plain["id"]}
    assert received[long["id"]]["activity_details"] == "é" * 450_000 + "中" * 30_000
    (failed,) = lines_with(run.stdout, huge["id"], "FAILED")
    assert "activity_details is 15.0 MB (15,000,000 bytes of UTF-8)" in failed
    assert "at most 1 MB" in failed and "well-formed" not in failed



# ----- the same records in a dry run --------------------------------------------------------------------------------

def test_a_dry_run_reads_the_broken_records_the_same_way_and_sends_nothing(run_bridge, knack, esb, add):
    broken = [add(emi_id=f"EMI-{HALF_AN_EMOJI}"), add(raw={"atd_activity_id": float("nan")}),
              add(raw={"id": None}), add(activity_details="é" * 600_000)]
    fine = add(activity_details=f"half {HALF_AN_EMOJI} emoji")

    run = run_bridge("--dry-run")

    orderly(run)
    assert run.returncode == 1
    assert esb.received == [] and [r for r in knack.request_log if r.method == "PUT"] == []
    assert (count(run.stdout, "fetched"), count(run.stdout, "rendered"), count(run.stdout, "failed")) == (5, 1, 4)
    assert "<activity_details>half  emoji</activity_details>" in run.stdout
    assert len(lines_with(run.stdout, "FAILED")) == len(broken)
    assert lines_with(run.stdout, fine["id"], "WARNING")

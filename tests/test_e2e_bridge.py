"""End-to-end tests of issue 2: the real `send_esb_message.py` against the Knack simulator (HTTP) and the ESB
simulator (HTTPS demanding a client certificate), from a foreign working directory.

Every test asserts on outcomes only: the exit code, what the ESB received and accepted (parsed with
parse_message), the Knack statuses and Knack's request log. Every run also checks that no traceback and no
secret (the API key, the client key material) reached the output.

Most tests give the Knack simulator no rate limit and let the program pace at 50 requests/s, to keep the file
fast; `test_default_pacing_stays_under_knacks_limit` runs the default pacing against the real 10/s limit.
"""

from __future__ import annotations

import datetime as dt
import re
import textwrap
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import requests
from lxml import etree

from config import CONFIG
from simulators.activities import app_metadata
from simulators.esb import ACC_NS, ESBSimulator, parse_message
from tests.conftest import API_KEY, APP_ID, PROJECT_ROOT, Seeder, make_knack, statuses

APP = CONFIG["data-tracker"]
OBJ = APP["obj"]
FIELDS = APP["fields"]
CODES = APP["activity_codes"]
CHICAGO = ZoneInfo("America/Chicago")

# The elements of a message, in document order (issue 2, "The message").
MESSAGE_ELEMENTS = [
    "Envelope", "Header", "Body", "submitKnack",
    "header", "emi", "timestamp", "source", "target", "data_type", "event",
    "data", "csr", "id", "csr_activity_id", "sr_number", "issue_status_code", "activity_type_code",
    "activity_details", "outcome_code", "activity_date",
]
# Characters XML 1.0 forbids: every C0 control but tab, newline and carriage return; U+FFFE, U+FFFF.
FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
FAST = {"KNACK_MAX_RPS": "50"}  # the most KNACK_MAX_RPS allows (issue 7 §10)


# ----- fixtures and helpers ------------------------------------------------------------------------------------


@pytest.fixture
def knack(request):
    """Overrides conftest's simulator: no rate limit unless a test asks for one (indirect parametrization
    passes make_knack() keyword arguments: rate_limit, max_rows_per_page, timezone, app)."""
    options = {"rate_limit": None, **getattr(request, "param", {})}
    with make_knack(**options) as simulator:
        yield simulator


def _secrets(pki) -> list[str]:
    """The API key and every base64 line of the private keys the program can be given."""
    secrets = [API_KEY]
    for key_file in (pki.client_key, pki.rogue_client_key):
        secrets += [line for line in Path(key_file).read_text().splitlines() if line and not line.startswith("-----")]
    return secrets


@pytest.fixture
def bridge(run_bridge, pki):
    """run_bridge with fast Knack pacing by default, and the checks every run in this file must pass:
    no traceback, no API key, no key material in stdout or stderr."""
    secrets = _secrets(pki)

    def run(*args: str, env: dict | None = None, **kwargs):
        result = run_bridge(*args, env={**FAST, **(env or {})}, **kwargs)
        assert "Traceback" not in result.output, result.output
        leaked = [s for s in secrets if s in result.output]
        assert not leaked, "a secret reached the output"
        assert "PRIVATE KEY" not in result.output
        return result

    return run


def messages(received) -> list[dict]:
    return [parse_message(r.body) for r in received]


def ids(received) -> list[str]:
    return [parse_message(r.body)["id"] for r in received]


def msg_id(record: dict) -> str:
    """The id a message carries for this record (data/csr/id is the Knack record id: README.md, the message table)."""
    return record["id"]


def activity_ids(received, knack, app: str = "data-tracker") -> list[str]:
    """The atd_activity_id of each received message's record, in arrival order (311's order is checked on these)."""
    key = f"{CONFIG[app]['fields']['atd_activity_id']}_raw"
    by_record = {r["id"]: str(r[key]) for r in knack.records(CONFIG[app]["obj"])}
    return [by_record.get(record_id, "?") for record_id in ids(received)]


def activity_ids_by_sr(received, knack, app: str = "data-tracker") -> dict[str, list[str]]:
    """SR number -> the atd_activity_id of each message of that SR, in arrival order: 311's order is per SR, and
    with several workers different SRs interleave."""
    key = f"{CONFIG[app]['fields']['atd_activity_id']}_raw"
    by_record = {r["id"]: str(r[key]) for r in knack.records(CONFIG[app]["obj"])}
    order: dict[str, list[str]] = {}
    for message in messages(received):
        order.setdefault(message["sr_number"], []).append(by_record.get(message["id"], "?"))
    return order


def request_kinds(knack) -> list[str]:
    """Knack's request log as 'metadata' / 'records' / 'put' entries, in arrival order."""
    kinds = []
    for r in knack.request_log:
        if r.method == "PUT":
            kinds.append("put")
        elif "/views/" in r.path:
            kinds.append("records")
        else:
            kinds.append("metadata")
    return kinds


def puts(knack) -> list:
    return [r for r in knack.request_log if r.method == "PUT"]


def staff_edit(knack, record_id: str, changes: dict) -> None:
    """What a staff member does in the Knack builder: change a record's fields."""
    reply = requests.put(f"{knack.url}/objects/{OBJ}/records/{record_id}", json=changes, timeout=5,
                         headers={"X-Knack-Application-Id": APP_ID, "X-Knack-REST-API-Key": API_KEY})
    reply.raise_for_status()


def lines_naming(output: str, text: str) -> list[str]:
    return [line for line in output.splitlines() if text in line]


def all_ready(knack, app: str = "data-tracker") -> bool:
    return set(statuses(knack, app).values()) == {"READY_TO_SEND"}


def assert_no_network(knack, esb) -> None:
    assert knack.request_log == [], [f"{r.method} {r.path}" for r in knack.request_log]
    assert esb.received == []
    assert esb.handshake_failures == 0


def local(y, mo, d, h, mi, tz=CHICAGO) -> dt.datetime:
    return dt.datetime(y, mo, d, h, mi, tzinfo=tz)


# ----- 1. happy path -------------------------------------------------------------------------------------------


def test_happy_path_every_record_sent_with_the_agreed_message(bridge, knack, esb, seed):
    before = dt.datetime.now(dt.UTC)
    seeded = []
    seeded += seed(sr_number="24-00010001", activity_name="Dispatch Technician", issue_status="open",
                   activity_details="Tech on the way", activity_datetime=dt.datetime(2024, 7, 4, 10, 26))
    seeded += seed(sr_number="24-00010001", activity_name="Complete Repairs", issue_status="open",
                   activity_details="Replaced the bulb", csr_activity_id="CSR-77",
                   activity_datetime=dt.datetime(2024, 7, 4, 14, 5))
    seeded += seed(sr_number="24-00010001", activity_name="Close Issue (Resolved)", issue_status="closed_resolved",
                   activity_details="Done", activity_datetime=dt.datetime(2024, 7, 5, 9, 0))
    seeded += seed(sr_number="24-00020002", activity_name="Adjust Timing", issue_status="in_progress",
                   activity_details="Longer green", activity_datetime=dt.datetime(2024, 1, 15, 16, 45))
    seeded += seed(sr_number="24-00030003", activity_name="311 Feedback", issue_status="open",
                   activity_details="", activity_datetime=dt.datetime(2024, 12, 31, 23, 59))
    expected_dates = {
        msg_id(seeded[0]): local(2024, 7, 4, 10, 26), msg_id(seeded[1]): local(2024, 7, 4, 14, 5),
        msg_id(seeded[2]): local(2024, 7, 5, 9, 0), msg_id(seeded[3]): local(2024, 1, 15, 16, 45),
        msg_id(seeded[4]): local(2024, 12, 31, 23, 59),
    }

    result = bridge()

    assert result.returncode == 0, result.output
    assert statuses(knack) == {r["id"]: "SENT" for r in seeded}
    assert sorted(ids(esb.accepted)) == sorted(msg_id(r) for r in seeded)
    assert set(esb.copies().values()) == {1}
    by_id = {m["id"]: m for m in messages(esb.accepted)}
    for record in seeded:
        message = by_id[msg_id(record)]
        raw = {var: record.get(f"{key}_raw", "") for var, key in FIELDS.items() if var != "id"}
        assert message["elements"] == MESSAGE_ELEMENTS
        assert message["emi"] == raw["emi_id"]
        assert message["sr_number"] == raw["sr_number"]
        assert message["csr_activity_id"] == raw["csr_activity_id"]
        assert message["issue_status_code"] == raw["issue_status_code_snapshot"]
        assert message["activity_type_code"] == CODES[raw["activity_name"]]
        assert message["activity_details"] == raw["activity_details"]
        assert message["outcome_code"] == "COMPLET1"
        date = dt.datetime.fromisoformat(message["activity_date"])
        expected = expected_dates[msg_id(record)]
        assert date.utcoffset() == expected.utcoffset()
        assert date.replace(tzinfo=None) == expected.replace(tzinfo=None)
        stamp = dt.datetime.fromisoformat(message["timestamp"])
        assert stamp.tzinfo is not None, message["timestamp"]
        # publication time: now, not a value taken from the record (generous bounds: no timing assertion)
        assert before - dt.timedelta(minutes=5) <= stamp <= dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    for received in esb.received:
        header = etree.fromstring(received.body).find(f".//{{{ACC_NS}}}submitKnack/header")
        assert {tag: header.findtext(tag) for tag in ("source", "target", "data_type", "event")} == {
            "source": "KNACK", "target": "CSR", "data_type": "CSR", "event": "UPDATE"}
        content_type = {k.lower(): v for k, v in received.headers.items()}["content-type"]
        assert content_type.split(";")[0].strip().lower() == "text/xml"
        assert received.client_subject == "knack-311-client"
    # a final summary line with the counts
    last = [line for line in result.stdout.splitlines() if line.strip()][-1].lower()
    for word in ("fetched", "sent", "failed"):
        assert word in last, last
    assert re.search(r"do.?not.?send", last), last
    assert re.search(rf"\b{len(seeded)}\b", last), last


def test_nothing_to_do_exits_zero(bridge, knack, esb, seed):
    seed(esb_status="SENT")
    seed(emi_id="")  # no EMI id: not for the ESB
    result = bridge()
    assert result.returncode == 0, result.output
    assert esb.received == []
    assert puts(knack) == []


# ----- 2. the rules --------------------------------------------------------------------------------------------


def test_csr_activity_code_on_the_record_wins_over_the_activity_name(bridge, knack, esb, seed):
    [with_code] = seed(activity_name="Dispatch Technician", csr_activity_code="CUSTOM01")
    [by_name] = seed(activity_name="Dispatch Technician")
    [code_no_name] = seed(activity_name="", csr_activity_code="ADJVIDDE")
    result = bridge()
    assert result.returncode == 0, result.output
    codes = {m["id"]: m["activity_type_code"] for m in messages(esb.accepted)}
    assert codes == {msg_id(with_code): "CUSTOM01", msg_id(by_name): "DISPTECH", msg_id(code_no_name): "ADJVIDDE"}
    assert set(statuses(knack).values()) == {"SENT"}


def test_activity_not_for_311_is_set_do_not_send_and_never_posted(bridge, knack, esb, seed):
    internal = seed(activity_name="Other") + seed(activity_name="Attach Image") + seed(activity_name="Send Email")
    [normal] = seed(activity_name="Identify Asset")
    result = bridge()
    assert result.returncode == 0, result.output
    assert ids(esb.received) == [msg_id(normal)]
    assert statuses(knack) == {**{r["id"]: "DO_NOT_SEND" for r in internal}, normal["id"]: "SENT"}


def test_unknown_activity_name_fails_that_record_only(bridge, knack, esb, seed):
    [unknown] = seed(sr_number="24-00000001", activity_name="Paint The Pole Pink")
    others = seed(sr_number="24-00000002", activity_name="Assign to TMC") + \
        seed(sr_number="24-00000003", activity_name="Monitor Situation on CCTV")
    result = bridge()
    assert result.returncode == 1, result.output
    assert statuses(knack) == {unknown["id"]: "READY_TO_SEND", **{r["id"]: "SENT" for r in others}}
    assert sorted(ids(esb.received)) == sorted(msg_id(r) for r in others)
    assert lines_naming(result.output, unknown["id"]), result.output
    assert {m["activity_type_code"] for m in messages(esb.accepted)} == {"RETOMOMC", "MONISSRE"}


def test_closed_duplicate_is_sent_as_closed_resolved_and_knack_keeps_its_value(bridge, knack, esb, seed):
    [duplicate] = seed(activity_name="Close Issue (Duplicate)", issue_status="closed_duplicate")
    [resolved] = seed(activity_name="Close Issue (Resolved)", issue_status="closed_resolved")
    result = bridge()
    assert result.returncode == 0, result.output
    sent = {m["id"]: m for m in messages(esb.accepted)}
    assert sent[msg_id(duplicate)]["issue_status_code"] == "closed_resolved"
    assert sent[msg_id(duplicate)]["activity_type_code"] == "CLOIS001"
    assert sent[msg_id(resolved)]["issue_status_code"] == "closed_resolved"
    status_key = FIELDS["issue_status_code_snapshot"]
    assert knack.record(OBJ, duplicate["id"])[f"{status_key}_raw"] == "closed_duplicate"
    assert all(set(changes) == {FIELDS["esb_status"]} for _, _, changes in knack.updates), knack.updates
    assert statuses(knack)[duplicate["id"]] == "SENT"


@pytest.mark.parametrize("workers", [None, "1"], ids=["default-workers", "one-worker"])
def test_records_reach_the_esb_in_ascending_activity_id_order(bridge, knack, esb, seed, workers):
    # seeded out of order, with ids whose text order differs from their number order
    for number, sr in ((1002, "24-1"), (998, "24-2"), (10000, "24-1"), (99, "24-3"), (1001, "24-2"), (5, "24-1")):
        seed(atd_activity_id=number, sr_number=sr)
    result = bridge(*(["--workers", workers] if workers else []))
    assert result.returncode == 0, result.output
    assert activity_ids_by_sr(esb.received, knack) == {"24-1": ["5", "1002", "10000"], "24-2": ["998", "1001"],
                                                       "24-3": ["99"]}
    if workers == "1":  # one record at a time: the whole backlog in ascending order, as before --workers
        assert activity_ids(esb.received, knack) == ["5", "99", "998", "1001", "1002", "10000"]


def test_a_failed_activity_holds_the_later_ones_of_its_sr_then_a_rerun_sends_them_in_order(bridge, knack, esb,
                                                                                            seed):
    a1 = seed(atd_activity_id=2001, sr_number="24-AAAA")[0]
    b1 = seed(atd_activity_id=2002, sr_number="24-BBBB")[0]
    a2 = seed(atd_activity_id=2003, sr_number="24-AAAA")[0]
    b2 = seed(atd_activity_id=2004, sr_number="24-BBBB")[0]
    a3 = seed(atd_activity_id=2005, sr_number="24-AAAA")[0]
    esb.reject_records = {a1["id"]: "SR is locked"}  # a1 (the lowest id of its SR) is rejected, whenever it arrives

    first = bridge()

    assert first.returncode == 1, first.output
    assert statuses(knack) == {a1["id"]: "READY_TO_SEND", a2["id"]: "READY_TO_SEND", a3["id"]: "READY_TO_SEND",
                               b1["id"]: "SENT", b2["id"]: "SENT"}
    # a2 and a3 were never posted; SR BBBB went on
    assert activity_ids_by_sr(esb.received, knack) == {"24-AAAA": ["2001"], "24-BBBB": ["2002", "2004"]}
    assert lines_naming(first.output, a1["id"])

    esb.reject_records = {}
    second = bridge()  # the ESB is healthy again

    assert second.returncode == 0, second.output
    assert set(statuses(knack).values()) == {"SENT"}
    assert activity_ids_by_sr(esb.received, knack) == {"24-AAAA": ["2001", "2001", "2003", "2005"],
                                                       "24-BBBB": ["2002", "2004"]}
    assert activity_ids_by_sr(esb.accepted, knack) == {"24-AAAA": ["2001", "2003", "2005"],
                                                       "24-BBBB": ["2002", "2004"]}
    assert set(esb.copies().values()) == {1}


def test_an_unknown_activity_holds_its_sr_until_staff_give_it_a_code(bridge, knack, esb, seed):
    c1 = seed(atd_activity_id=3001, sr_number="24-CCCC", activity_name="Brand New Activity")[0]
    c2 = seed(atd_activity_id=3002, sr_number="24-CCCC", activity_name="Dispatch Technician")[0]
    d1 = seed(atd_activity_id=3003, sr_number="24-DDDD", activity_name="Dispatch Technician")[0]

    first = bridge()

    assert first.returncode == 1, first.output
    assert statuses(knack) == {c1["id"]: "READY_TO_SEND", c2["id"]: "READY_TO_SEND", d1["id"]: "SENT"}
    assert activity_ids(esb.received, knack) == ["3003"]

    staff_edit(knack, c1["id"], {FIELDS["csr_activity_code"]: "COORINTE"})
    second = bridge()

    assert second.returncode == 0, second.output
    assert set(statuses(knack).values()) == {"SENT"}
    assert activity_ids(esb.received, knack) == ["3003", "3001", "3002"]
    assert parse_message(esb.received[1].body)["activity_type_code"] == "COORINTE"


# ----- 3. escaping and non-ASCII --------------------------------------------------------------------------------

AWKWARD = (
    'Fixed A & B; 5 < 6 > 4; ]]> "double" \'single\' '
    "</activity_details><sr_number>X</sr_number> "
    '<!DOCTYPE x [<!ENTITY boom "BOOM">]> &boom; &amp; &#233; '
    "caf\u00e9 \u65e5\u672c \U0001F6A6 \u2603 "
    "ctrl:\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0c\x1f\ufffe|tab\tnew\nline"
)


def test_awkward_text_arrives_escaped_ascii_and_intact(bridge, knack, esb, seed):
    [record] = seed(activity_details=AWKWARD, emi_id="EMI-&<7>", sr_number="24-\u00e9&<1")
    [plain] = seed(activity_details="plain")
    result = bridge()
    assert result.returncode == 0, result.output
    assert statuses(knack) == {record["id"]: "SENT", plain["id"]: "SENT"}
    assert len(esb.received) == 2
    for received in esb.received:
        assert received.body.isascii()
    [message] = [m for m in messages(esb.accepted) if m["id"] == msg_id(record)]
    assert message["elements"] == MESSAGE_ELEMENTS
    assert message["activity_details"] == FORBIDDEN.sub("", AWKWARD)
    assert message["emi"] == "EMI-&<7>"
    assert message["sr_number"] == "24-\u00e9&<1"
    assert message["outcome_code"] == "COMPLET1"


def test_line_breaks_in_details_arrive_as_real_newlines(bridge, knack, esb, seed):
    # paragraph text goes to 311 as plain text with real newlines, whichever line break staff's browser sent
    details = "line one\r\nline two\nline three\rend"
    [record] = seed(activity_details=details)
    result = bridge()
    assert result.returncode == 0, result.output
    assert esb.received[0].body.isascii()
    assert parse_message(esb.accepted[0].body)["activity_details"] == "line one\nline two\nline three\nend"
    assert statuses(knack) == {record["id"]: "SENT"}


# ----- 4. timezone and daylight saving -------------------------------------------------------------------------


def test_activity_dates_carry_the_central_offset_of_their_day(bridge, knack, esb, seed):
    cases = {
        "july": (dt.datetime(2024, 7, 4, 10, 26), {dt.timedelta(hours=-5)}),
        "january": (dt.datetime(2024, 1, 15, 9, 5), {dt.timedelta(hours=-6)}),
        "before spring forward": (dt.datetime(2024, 3, 10, 1, 30), {dt.timedelta(hours=-6)}),
        "after spring forward": (dt.datetime(2024, 3, 10, 3, 30), {dt.timedelta(hours=-5)}),
        # 01:30 happens twice on 2024-11-03: either reading is a true instant of that wall-clock time
        "ambiguous fall back": (dt.datetime(2024, 11, 3, 1, 30), {dt.timedelta(hours=-5), dt.timedelta(hours=-6)}),
        "after fall back": (dt.datetime(2024, 11, 3, 2, 30), {dt.timedelta(hours=-6)}),
        "midnight": (dt.datetime(2024, 8, 1, 0, 0), {dt.timedelta(hours=-5)}),
        "noon": (dt.datetime(2024, 12, 1, 12, 0), {dt.timedelta(hours=-6)}),
    }
    by_atd = {}
    for name, (wall_clock, offsets) in cases.items():
        [record] = seed(activity_datetime=wall_clock)
        by_atd[msg_id(record)] = (name, wall_clock, offsets)
    result = bridge()
    assert result.returncode == 0, result.output
    for message in messages(esb.accepted):
        name, wall_clock, offsets = by_atd[message["id"]]
        date = dt.datetime.fromisoformat(message["activity_date"])
        assert date.replace(tzinfo=None) == wall_clock, name
        assert date.utcoffset() in offsets, (name, message["activity_date"])
    assert len(esb.accepted) == len(cases)


@pytest.mark.parametrize("knack", [{"timezone": "Eastern Time (US & Canada)"}], indirect=True, ids=["eastern"])
def test_the_apps_own_timezone_decides_the_offset(bridge, knack, esb, seed):
    seed(activity_datetime=dt.datetime(2024, 7, 4, 10, 26))
    seed(activity_datetime=dt.datetime(2024, 1, 15, 10, 26))
    result = bridge()
    assert result.returncode == 0, result.output
    dates = sorted(m["activity_date"] for m in messages(esb.accepted))
    parsed = [dt.datetime.fromisoformat(d) for d in dates]
    assert [p.utcoffset() for p in parsed] == [dt.timedelta(hours=-5), dt.timedelta(hours=-4)]
    assert [p.replace(tzinfo=None) for p in parsed] == [dt.datetime(2024, 1, 15, 10, 26),
                                                         dt.datetime(2024, 7, 4, 10, 26)]


def test_an_empty_activity_date_is_sent_empty_not_none(bridge, knack, esb, seed):
    seed(activity_datetime=None, activity_details="")
    result = bridge()
    assert result.returncode == 0, result.output
    [message] = messages(esb.accepted)
    assert message["activity_date"] == ""
    assert message["activity_details"] == ""
    assert message["csr_activity_id"] == ""
    assert "None" not in esb.accepted[0].body.decode("ascii")


# ----- 5. pagination -------------------------------------------------------------------------------------------


def _documents(stdout: str) -> list[dict]:
    """The XML messages a dry run printed, parsed."""
    found = re.findall(r"<\?xml.*?</soapenv:Envelope>", stdout, flags=re.DOTALL)
    return [parse_message(doc.encode("ascii")) for doc in found]


def test_dry_run_reads_every_page_past_1000_and_changes_nothing(bridge, knack, esb, seed, bridge_env):
    seeded = seed(2100)
    result = bridge("--dry-run")
    assert result.returncode == 0, result.output[-2000:]
    documents = _documents(result.stdout)
    assert len(documents) == 2100
    assert {d["id"] for d in documents} == {msg_id(r) for r in seeded}
    assert puts(knack) == []
    assert request_kinds(knack).count("records") >= 3
    assert esb.received == []
    assert all_ready(knack)
    assert not Path(bridge_env["STATE_DIR"]).exists()


@pytest.mark.parametrize("knack", [{"max_rows_per_page": 10}], indirect=True, ids=["10-rows-per-page"])
def test_a_real_run_over_several_pages_sends_every_record_once_while_the_pages_shift(bridge, knack, esb, seed):
    # Knack refilters on every request: each record set SENT leaves the view and the later ones move up a page.
    seeded = seed(35)
    result = bridge()
    assert result.returncode == 0, result.output
    assert statuses(knack) == {r["id"]: "SENT" for r in seeded}
    copies = esb.copies()
    assert set(copies) == {msg_id(r) for r in seeded}
    assert set(copies.values()) == {1}
    pages = [r.query.get("page") for r in knack.request_log if "/views/" in r.path]
    assert pages.count("1") >= 4  # page 1 read again as the records before it were marked
    first_put = request_kinds(knack).index("put")
    assert first_put < max(i for i, kind in enumerate(request_kinds(knack)) if kind == "records")  # page by page


@pytest.mark.timing
@pytest.mark.parametrize("knack", [{"rate_limit": 10.0}], indirect=True, ids=["knack-10-per-second"])
def test_default_pacing_stays_under_knacks_limit(bridge, knack, esb, seed):
    seeded = seed(30)
    result = bridge(env={"KNACK_MAX_RPS": None})  # the program's default pacing
    assert result.returncode == 0, result.output
    assert statuses(knack) == {r["id"]: "SENT" for r in seeded}
    assert set(esb.copies().values()) == {1} and len(esb.copies()) == 30
    # Ten starts in any 1.053 s (9.5/s) keep Knack's count for any second at 10 or less while arrivals shift by under
    # 50 ms; on a loaded machine a request can reach the simulator later than that and share a second with the
    # next one. One such 429 is the machine's noise (the pacer then waits out the second); a pacer faster than
    # Knack's limit draws one in nearly every second of this 3-second run.
    assert len([r for r in knack.request_log if r.status == 429]) <= 1


# ----- 6. Knack 429 and 5xx ------------------------------------------------------------------------------------

KNACK_FAULTS = {
    "429-on-records": dict(method="GET", path_contains="/views/", status=429),
    "429-retry-after-on-records": dict(method="GET", path_contains="/views/", status=429, retry_after=1),
    "429-on-put": dict(method="PUT", path_contains="/objects/", status=429),
    "429-retry-after-on-put": dict(method="PUT", path_contains="/objects/", status=429, retry_after=1),
    "503-on-metadata": dict(method="GET", path_contains="/applications/", status=503),
    "502-html-on-records": dict(method="GET", path_contains="/views/", status=502, body="<html>Bad gateway</html>"),
    "dropped-records": dict(method="GET", path_contains="/views/", drop=True),
    "dropped-put": dict(method="PUT", path_contains="/objects/", drop=True),
    "put-applied-but-answered-500": dict(method="PUT", path_contains="/objects/", status=500, after_apply=True),
}


@pytest.mark.parametrize("fault", list(KNACK_FAULTS.values()), ids=list(KNACK_FAULTS))
def test_knack_trouble_is_retried_and_every_record_is_sent_once(bridge, knack, esb, seed, fault):
    seeded = seed(3)
    knack.inject(**fault)
    result = bridge()
    assert knack.pending_faults() == 0  # the fault did hit the program
    expected = 0 if fault.get("drop") else fault["status"]
    assert expected in [r.status for r in knack.request_log]
    assert result.returncode == 0, result.output
    assert statuses(knack) == {r["id"]: "SENT" for r in seeded}
    assert esb.copies() == {msg_id(r): 1 for r in seeded}


def test_knack_down_for_the_records_read_stops_the_run_without_sending(bridge, knack, esb, seed):
    seed(3)
    knack.inject("GET", "/views/", status=500, count=1000)
    result = bridge()
    assert result.returncode == 1, result.output
    assert esb.received == []
    assert puts(knack) == []
    assert all_ready(knack)
    assert request_kinds(knack).count("records") >= 2  # it did retry


# ----- 7. ESB errors -------------------------------------------------------------------------------------------


def test_esb_503_twice_then_ok_is_sent_on_the_third_attempt(bridge, knack, esb, seed):
    [record] = seed()
    esb.inject(status=503, count=2)
    result = bridge()
    assert result.returncode == 0, result.output
    assert [r.status for r in esb.received] == [503, 503, 200]
    assert ids(esb.received) == [msg_id(record)] * 3
    assert esb.copies() == {msg_id(record): 1}
    assert statuses(knack) == {record["id"]: "SENT"}


ESB_REJECTIONS = {
    "soap-fault-500": dict(fault="Invalid SR number", status=500),
    "soap-fault-200": dict(fault="Invalid SR number", status=200),
    "http-400": dict(status=400),
    "http-415": dict(status=415),
}


@pytest.mark.parametrize("rejection", list(ESB_REJECTIONS.values()), ids=list(ESB_REJECTIONS))
def test_an_esb_rejection_fails_that_record_without_retry(bridge, knack, esb, seed, rejection):
    seeded = seed(sr_number="24-00000001") + seed(sr_number="24-00000002") + seed(sr_number="24-00000003")
    esb.inject(**rejection)  # the first message to arrive (the workers post all three at once)
    result = bridge()
    assert result.returncode == 1, result.output
    [rejected] = [r for r in seeded if msg_id(r) not in esb.copies()]
    others = [r for r in seeded if r is not rejected]
    assert ids(esb.received).count(msg_id(rejected)) == 1
    assert statuses(knack) == {rejected["id"]: "READY_TO_SEND", **{r["id"]: "SENT" for r in others}}
    assert esb.copies() == {msg_id(r): 1 for r in others}
    assert lines_naming(result.output, rejected["id"]), result.output


@pytest.fixture
def connect_counter(tmp_path):
    """A sitecustomize for the program's interpreter that records every socket connect (an audit hook: it
    observes, it changes nothing), so a test can count attempts on a port where nothing listens."""
    hook_dir = tmp_path / "connect_hook"
    hook_dir.mkdir()
    log = tmp_path / "connects.log"
    (hook_dir / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys

        def _hook(event, args):
            if event == "socket.connect":
                try:
                    host, port = args[1][:2]
                    with open({str(log)!r}, "a") as f:
                        f.write(f"{{host}} {{port}}\\n")
                except Exception:
                    pass

        sys.addaudithook(_hook)
    """))

    def count(port: int) -> int:
        if not log.exists():
            return 0
        return sum(1 for line in log.read_text().splitlines() if line.split()[-1] == str(port))

    return {"PYTHONPATH": str(hook_dir)}, count


def test_esb_down_stops_the_run_early_and_marks_nothing(bridge, knack, esb, seed, connect_counter):
    # 80: the first round is 20 records at once (3 connects each) before the outage stop can follow
    seeded = [seed(sr_number=f"24-{n:08d}")[0] for n in range(80)]
    esb.stop()  # connection refused from now on
    port = int(esb.url.split(":")[2].split("/")[0])
    env, connects = connect_counter
    result = bridge(env=env)
    assert result.returncode == 1, result.output
    assert puts(knack) == []
    assert statuses(knack) == {r["id"]: "READY_TO_SEND" for r in seeded}
    attempts = connects(port)
    assert 0 < attempts < len(seeded), attempts  # it tried, and gave up long before trying every record


def test_esb_dropping_every_connection_stops_the_run_early(bridge, knack, esb, seed):
    seeded = [seed(sr_number=f"24-{n:08d}")[0] for n in range(50)]  # more than the first round of 20
    esb.inject(drop=True, count=1000)
    result = bridge()
    assert result.returncode == 1, result.output
    assert esb.accepted == []
    assert 0 < len(esb.received) < len(seeded)
    assert puts(knack) == []
    assert all_ready(knack)


# ----- 8. TLS --------------------------------------------------------------------------------------------------


@pytest.fixture
def rogue_esb(pki):
    """An HTTPS server our CA does not vouch for (it would accept our client certificate)."""
    with ESBSimulator(server_cert=pki.rogue_server_cert, server_key=pki.rogue_server_key,
                      client_ca_bundle=pki.client_ca_bundle) as simulator:
        yield simulator


def test_a_server_our_ca_does_not_vouch_for_gets_nothing(bridge, knack, esb, seed, rogue_esb):
    seed(3)
    result = bridge(env={"ESB_ENDPOINT": rogue_esb.url})
    assert result.returncode == 1, result.output
    assert rogue_esb.received == []
    assert puts(knack) == []
    assert all_ready(knack)


def test_a_client_certificate_the_esb_does_not_trust_is_refused(bridge, knack, esb, seed, pki):
    seed(3)
    result = bridge(env={"ESB_CERT": str(pki.rogue_client_cert), "ESB_KEY": str(pki.rogue_client_key)})
    assert result.returncode == 1, result.output
    assert esb.received == []
    assert esb.handshake_failures >= 1
    assert puts(knack) == []
    assert all_ready(knack)


def test_verification_off_on_explicit_request_delivers_with_a_warning(bridge, knack, esb, seed, rogue_esb):
    seeded = seed(2)
    result = bridge(env={"ESB_ENDPOINT": rogue_esb.url, "ESB_VERIFY_TLS": "false"})
    assert result.returncode == 0, result.output
    assert sorted(ids(rogue_esb.accepted)) == sorted(msg_id(r) for r in seeded)
    assert statuses(knack) == {r["id"]: "SENT" for r in seeded}
    assert lines_naming(result.output, "ESB_VERIFY_TLS")


# ----- 9. configuration errors ---------------------------------------------------------------------------------


def _config_cases(tmp: Path, pki) -> dict[str, tuple[str, dict, list[str]]]:
    """name -> (app, env changes, texts the error line must name)."""
    garbage = tmp / "garbage.pem"
    garbage.write_text("this is not a key\n")
    directory = tmp / "a-directory.pem"
    directory.mkdir()
    return {
        "unknown-app": ("no-such-app", {}, ["no-such-app", "data-tracker", "signs-markings"]),
        "no-KNACK_APP_ID": ("data-tracker", {"KNACK_APP_ID": None}, ["KNACK_APP_ID"]),
        "empty-KNACK_APP_ID": ("data-tracker", {"KNACK_APP_ID": ""}, ["KNACK_APP_ID"]),
        "no-KNACK_API_KEY": ("data-tracker", {"KNACK_API_KEY": None}, ["KNACK_API_KEY"]),
        "no-ESB_ENDPOINT": ("data-tracker", {"ESB_ENDPOINT": None}, ["ESB_ENDPOINT"]),
        "missing-ESB_CERT": ("data-tracker", {"ESB_CERT": str(tmp / "nowhere.cert")}, ["nowhere.cert"]),
        "garbage-ESB_KEY": ("data-tracker", {"ESB_KEY": str(garbage)}, ["ESB_KEY"]),
        "unreadable-ESB_KEY": ("data-tracker", {"ESB_KEY": str(directory)}, ["ESB_KEY"]),
        "mismatched-ESB_KEY": ("data-tracker", {"ESB_KEY": str(pki.rogue_client_key)}, ["ESB_KEY"]),
        "text-ESB_TIMEOUT": ("data-tracker", {"ESB_TIMEOUT": "thirty"}, ["ESB_TIMEOUT"]),
        "zero-ESB_TIMEOUT": ("data-tracker", {"ESB_TIMEOUT": "0"}, ["ESB_TIMEOUT"]),
        "negative-ESB_TIMEOUT": ("data-tracker", {"ESB_TIMEOUT": "-5"}, ["ESB_TIMEOUT"]),
        "nan-ESB_TIMEOUT": ("data-tracker", {"ESB_TIMEOUT": "nan"}, ["ESB_TIMEOUT"]),
    }


CONFIG_CASE_NAMES = [
    "unknown-app", "no-KNACK_APP_ID", "empty-KNACK_APP_ID", "no-KNACK_API_KEY", "no-ESB_ENDPOINT", "missing-ESB_CERT",
    "garbage-ESB_KEY", "unreadable-ESB_KEY", "mismatched-ESB_KEY", "text-ESB_TIMEOUT", "zero-ESB_TIMEOUT",
    "negative-ESB_TIMEOUT", "nan-ESB_TIMEOUT",
]


@pytest.mark.parametrize("case", CONFIG_CASE_NAMES)
def test_configuration_errors_exit_2_with_one_line_before_any_network_call(bridge, knack, esb, seed, pki,
                                                                            tmp_path, case):
    seed(2)
    app, env, named = _config_cases(tmp_path, pki)[case]
    result = bridge(app=app, env=env)
    assert result.returncode == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for text in named:
        assert text in lines[0], lines[0]
    assert result.stderr.strip() == lines[0].strip()
    assert_no_network(knack, esb)
    assert all_ready(knack)


def _metadata_without_view(metadata: dict) -> dict:
    for scene in metadata["application"]["scenes"]:
        scene["views"] = [v for v in scene["views"] if v["key"] != APP["view"]]
    return metadata


def _metadata_without_field(metadata: dict) -> dict:
    for obj in metadata["application"]["objects"]:
        if obj["key"] == OBJ:
            obj["fields"] = [f for f in obj["fields"] if f["key"] != FIELDS["activity_details"]]
    return metadata


@pytest.mark.parametrize("change", [_metadata_without_view, _metadata_without_field],
                         ids=["view-not-in-metadata", "field-not-in-object"])
def test_config_errors_found_from_the_metadata_exit_2_and_send_nothing(bridge, knack, esb, seed, change):
    seed(2)
    knack.set_metadata(change(app_metadata("data-tracker", APP, timezone="Central Time (US & Canada)",
                                           app_id=APP_ID)))
    result = bridge()
    assert result.returncode == 2, result.output
    assert esb.received == [] and esb.handshake_failures == 0
    assert puts(knack) == []
    assert all_ready(knack)


def test_a_wrong_api_key_is_a_configuration_error(bridge, knack, esb, seed):
    seed(2)
    result = bridge(env={"KNACK_API_KEY": "not-the-key"})
    assert result.returncode == 2, result.output
    assert "KNACK_API_KEY" in result.stderr
    assert "not-the-key" not in result.output
    assert esb.received == [] and puts(knack) == []
    assert all_ready(knack)


# ----- 10. dry run ---------------------------------------------------------------------------------------------


def test_dry_run_prints_every_message_and_changes_nothing(bridge, knack, esb, seed, bridge_env):
    seeded = seed(4) + seed(activity_details="caf\u00e9 & <tea>")
    [internal] = seed(activity_name="Other")
    result = bridge("--dry-run")
    assert result.returncode == 0, result.output
    documents = {d["id"]: d for d in _documents(result.stdout)}
    assert set(documents) == {msg_id(r) for r in seeded}
    for record in seeded:
        assert documents[msg_id(record)]["emi"] == record[f"{FIELDS['emi_id']}_raw"]
        assert documents[msg_id(record)]["elements"] == MESSAGE_ELEMENTS
    assert documents[msg_id(seeded[-1])]["activity_details"] == "caf\u00e9 & <tea>"
    assert puts(knack) == []
    assert esb.received == [] and esb.handshake_failures == 0
    assert statuses(knack)[internal["id"]] == "READY_TO_SEND"
    assert all_ready(knack)
    assert not Path(bridge_env["STATE_DIR"]).exists()


# ----- 11. working directory independence ----------------------------------------------------------------------


@pytest.mark.parametrize("unset, default", [(("ESB_CERT", "ESB_KEY"), "esb.cert"), (("ESB_KEY",), "esb.pem")],
                         ids=["both-unset", "key-unset"])
def test_default_certificate_paths_are_in_the_project_root_whatever_the_cwd(bridge, knack, esb, seed, unset,
                                                                            default):
    expected = PROJECT_ROOT / default
    if expected.exists():
        pytest.skip(f"{expected} exists here; the test must not touch the project root")
    seed()
    result = bridge(env={name: None for name in unset})
    assert result.returncode == 2, result.output
    assert str(expected) in result.stderr, result.stderr
    assert_no_network(knack, esb)


# ----- 13. the signs-markings app ------------------------------------------------------------------------------

SIGNS = CONFIG["signs-markings"]


@pytest.mark.parametrize("knack", [{"app": "signs-markings"}], indirect=True, ids=["signs-markings"])
def test_signs_markings_sends_connection_identifiers_and_its_own_codes(bridge, knack, esb):
    seed = Seeder(knack, "signs-markings")
    [repair] = seed(sr_number="24-00451234", activity_name="Repair/Replace", activity_details="New stop sign")
    [crew] = seed(sr_number="24-00451234", activity_name="Dispatch Technician/Crew",
                  issue_status="closed_duplicate")
    [image] = seed(sr_number="24-00459999", activity_name="Attach Image")
    [email] = seed(sr_number="24-00460000", activity_name="Send Email")

    result = bridge(app="signs-markings")

    assert result.returncode == 0, result.output
    assert statuses(knack, "signs-markings") == {repair["id"]: "SENT", crew["id"]: "SENT",
                                                 image["id"]: "DO_NOT_SEND", email["id"]: "SENT"}
    sent = {m["id"]: m for m in messages(esb.accepted)}
    assert set(sent) == {r["id"] for r in (repair, crew, email)}
    assert sent[repair["id"]]["sr_number"] == "24-00451234"
    assert sent[repair["id"]]["activity_type_code"] == "TRREPSGN"
    assert sent[repair["id"]]["activity_details"] == "New stop sign"
    assert sent[crew["id"]]["activity_type_code"] == "DISPATC2"
    assert sent[crew["id"]]["issue_status_code"] == "closed_resolved"
    assert sent[email["id"]]["activity_type_code"] == "CONTACT"
    atd = f"{SIGNS['fields']['atd_activity_id']}_raw"
    assert activity_ids_by_sr(esb.received, knack, "signs-markings")["24-00451234"] == [str(repair[atd]),
                                                                                         str(crew[atd])]
    for message in sent.values():
        assert "span" not in message["sr_number"]
        assert dt.datetime.fromisoformat(message["activity_date"]).utcoffset() == dt.timedelta(hours=-5)

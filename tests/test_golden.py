"""Golden messages: the exact bytes 311 receives for a few Knack records, kept in tests/golden/<case>.xml.

Each case is a record as the Knack API returns it (built by simulators.activities.activity_record, which
follows the recorded payloads in tests/fixtures/knack/), taken through the path the program takes:
fields.activity_from_record -> message.message_values -> message.render_message, with a fixed publication
time. A change to any message is then a diff of these files in review; a difference of one byte fails the
test, which prints a diff of the two documents.

To change the messages on purpose (a new contract from 311, a new case), regenerate the files and read the
diff against the contract (element order, namespaces, UTC offsets) before committing:

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest -p no:cacheprovider tests/test_golden.py
    git diff tests/golden/

With UPDATE_GOLDEN=1 every case writes its file and then fails, saying it wrote it, so a regeneration never
passes silently; run the test again without it to see it pass.
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from config import CONFIG
from knack311.fields import activity_from_record, resolve_timezone
from knack311.message import message_values, render_message
from simulators.activities import activity_record, app_metadata

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"

# The publication time as the run makes it (now in the app's zone, whole seconds), from a fixed UTC instant.
PUBLISHED_UTC = "2024-07-04T20:15:42Z"


@dataclass(frozen=True)
class Case:
    name: str
    record: dict  # keyword arguments of activity_record
    published_utc: str = PUBLISHED_UTC
    app: str = "data-tracker"
    why: str = ""


def record(**values) -> dict:
    base = dict(
        record_id="6686e5f1a4c3b2001e9d0a17",
        atd_activity_id=48213,
        emi_id="EMI-2024-0704-0117",
        sr_number="24-00231456",
        activity_name="Dispatch Technician",
        activity_datetime=dt.datetime(2024, 7, 4, 14, 5),
        activity_details="Technician dispatched to Lamar Blvd at W 5th St; signal in flash mode.",
        issue_status="in_progress",
    )
    base.update(values)
    return base


HOSTILE_DETAILS = (
    "Tom & Jerry's <b>bold</b> claim: a > b, \"quoted\" & 'single'\n"
    "end of CDATA ]]> here; <![CDATA[not cdata]]>\n"
    "fake close </activity_details></csr></data></acc:submitKnack><sr_number>X</sr_number>\n"
    "template {{ 7*7 }} {% if true %}yes{% endif %} {# comment #} ${7*7}\n"
    "CRLF\r\nbare CR\rtab\there\n"
    "controls: NUL[\x00] BEL[\x07] ESC[\x1b] VT[\x0b] FF[\x0c] DEL[\x7f] NEL[\x85]\n"
    "entities &amp; &lt; &#233; &unknown; <!ENTITY xxe SYSTEM 'file:///etc/passwd'>&xxe;"
)

NON_ASCII_DETAILS = (
    "Señal dañada en Congress & 6th — café, naïve, Zoë, Ångström, São Paulo\n"
    "CJK: 信号機が点滅しています / 交通信号 / 신호등\n"
    "emoji: 🚦🚧👷‍♀️ (ZWJ sequence) 👍🏽 (skin tone)\n"
    "RTL: שלום עולם / مرحبا بالعالم\n"
    "combining: e\u0301 vs \u00e9; nbsp[\u00a0] line sep[\u2028] bom[\ufeff]"
)

CASES = [
    Case("plain", record(), why="an ordinary dispatch: every element filled from its Knack field"),
    Case("hostile_text", record(
        record_id="6686e5f1a4c3b2001e9d0a18",
        atd_activity_id=48214,
        emi_id="EMI-<42>&\"x'",
        sr_number="24-00231456 {{ 7*7 }}",
        csr_activity_id="CSR\r7",  # a short text field keeps a bare CR: it goes as &#13;
        activity_details=HOSTILE_DETAILS,
    ), why="XML specials, ]]>, a fake closing tag, Jinja-looking text, CR and control characters stay text"),
    Case("non_ascii", record(
        record_id="6686e5f1a4c3b2001e9d0a19",
        atd_activity_id=48215,
        activity_name="Identify Asset",
        activity_details=NON_ASCII_DETAILS,
    ), why="accents, CJK, emoji, RTL: all sent as character references in a plain ASCII body"),
    Case("dst_fall_back_ambiguous_hour", record(
        record_id="6727e0b1c4d5e6001f2a3b01",
        atd_activity_id=50101,
        activity_datetime=dt.datetime(2024, 11, 3, 1, 30),
        activity_details="01:30 happens twice this night.",
    ), published_utc="2024-11-03T07:45:00Z",
        why="Knack's 01:30 on the fall-back night is read as the first 01:30 (CDT, -05:00); the publication "
            "time, a real instant in the second 01:xx hour, is CST (-06:00)"),
    Case("dst_spring_forward_gap", record(
        record_id="65ed1f00a1b2c3001d4e5f01",
        atd_activity_id=49001,
        activity_datetime=dt.datetime(2024, 3, 10, 2, 30),
        activity_details="02:30 does not exist this night.",
    ), published_utc="2024-03-10T08:05:00Z",
        why="a wall time in the spring-forward gap keeps the offset before the change (-06:00); the "
            "publication time just after it is CDT (-05:00)"),
    Case("before_utc_midnight", record(
        record_id="67747a7fe1d2c3001a0b0c01",
        atd_activity_id=51001,
        activity_datetime=dt.datetime(2024, 12, 31, 17, 59),
        activity_details="17:59 CST is 23:59 UTC.",
    ), published_utc="2024-12-31T23:59:59Z",
        why="local date 2024-12-31 on both sides; 311 must not see the UTC date"),
    Case("after_utc_midnight", record(
        record_id="67747a7fe1d2c3001a0b0c02",
        atd_activity_id=51002,
        activity_datetime=dt.datetime(2024, 12, 31, 18, 0),
        activity_details="18:00 CST is already 2025-01-01 in UTC.",
    ), published_utc="2025-01-01T00:00:01Z",
        why="the UTC date has turned 2025-01-01, the app's local date is still 2024-12-31"),
    Case("closed_duplicate", record(
        record_id="6686e5f1a4c3b2001e9d0a20",
        atd_activity_id=48216,
        activity_name="Close Issue (Duplicate)",
        issue_status="closed_duplicate",
        activity_details="Same as 24-00231400.",
    ), why="311 closes duplicates as resolved: closed_duplicate is sent as closed_resolved"),
    Case("paging_activity", record(
        record_id="6686e5f1a4c3b2001e9d0a21",
        atd_activity_id=48217,
        activity_name="Dispatch Technician",
        csr_activity_code="PAGETECH",
        csr_activity_id="CSRA-0009981234",
        activity_details="Paged the on-call technician.",
    ), why="the record's own csr_activity_code wins over the activity_codes lookup (DISPTECH)"),
    Case("signs_markings_connections", record(
        record_id="6686e5f1a4c3b2001e9d0a22",
        atd_activity_id=7731,
        activity_name="Repair/Replace",
        sr_number="24-00231999",
        activity_details="Stop sign replaced.",
        issue_status="closed_resolved",
    ), app="signs-markings",
        why="signs-markings: the SR number and activity name are connections; their identifiers are sent"),
]


def render_case(case: Case) -> bytes:
    config = CONFIG[case.app]
    metadata = app_metadata(case.app, config, timezone="Central Time (US & Canada)")["application"]
    # as the run reads the metadata: field key -> type for the activity object, the app's timezone
    (activity_object,) = [o for o in metadata["objects"] if o["key"] == config["obj"]]
    field_types = {f["key"]: f["type"] for f in activity_object["fields"]}
    tz = resolve_timezone(metadata["settings"]["timezone"], config.get("timezone"))

    knack_record = activity_record(config, app_name=case.app, **case.record)
    activity = activity_from_record(knack_record, config["fields"], field_types, tz)
    published = dt.datetime.fromisoformat(case.published_utc).astimezone(tz).replace(microsecond=0).isoformat()
    return render_message(message_values(activity, config["activity_codes"]), published)


def describe_difference(expected: bytes, actual: bytes) -> str:
    offset = next((i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b),
                  min(len(expected), len(actual)))
    lines = difflib.unified_diff(
        [repr(line)[2:-1] for line in expected.splitlines(keepends=True)],
        [repr(line)[2:-1] for line in actual.splitlines(keepends=True)],
        "golden", "rendered now", lineterm="",
    )
    return (f"first difference at byte {offset} (golden {len(expected)} bytes, rendered {len(actual)} bytes)\n"
            + "\n".join(lines))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_message_bytes_match_the_golden_file(case):
    path = GOLDEN_DIR / f"{case.name}.xml"
    body = render_case(case)
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(body)
        pytest.fail(f"UPDATE_GOLDEN=1: wrote {path.relative_to(GOLDEN_DIR.parent.parent)}; "
                    "review `git diff tests/golden/`, then run again without UPDATE_GOLDEN", pytrace=False)
    if not path.exists():
        pytest.fail(f"no golden file {path.name}: create it with UPDATE_GOLDEN=1 (see this module's docstring)")
    expected = path.read_bytes()
    if body != expected:
        pytest.fail(f"{case.name}: the message differs from {path.name} ({case.why})\n"
                    + describe_difference(expected, body), pytrace=False)


def test_every_golden_file_has_a_case():
    # a renamed or removed case must not leave a stale file that nobody checks
    names = {c.name for c in CASES}
    assert sorted(p.stem for p in GOLDEN_DIR.glob("*.xml") if p.stem not in names) == []

"""Any text Knack hands over is data, never a crash (issue 13, item 1): a property test of the real command.

Hypothesis puts any Python `str` (lone surrogates included, which UTF-8, SQLite and the log cannot write; control
characters; markup; NaN and dot segments) into any field of a few records, the record id included, and runs
`send_esb_message.py` against a fresh Knack simulator and the ESB simulator. Whatever the values, the run ends
with its summary line and an exit code of the README's table, with no traceback; a plain record beside them is
delivered; and no record is set SENT unless the ESB accepted its message.

Each example is one run of the real command (about half a second), so the examples are few and each carries
several records with several odd fields.
"""

from __future__ import annotations

import datetime as dt
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config import CONFIG
from simulators.activities import activity_record
from simulators.esb import parse_message
from tests.conftest import make_knack

APP = "data-tracker"
OBJ = CONFIG[APP]["obj"]
FIELDS = CONFIG[APP]["fields"]
STATUS = f"{FIELDS['esb_status']}_raw"
VARIABLES = ["id", *(variable for variable in FIELDS if variable != "id")]

# every code point: characters() leaves out the surrogates (category Cs) unless asked for them
ANY_CHARACTER = st.one_of(st.characters(), st.characters(categories=["Cs"]))
AWKWARD = st.sampled_from(["\ud83d", "\ude00", "\ud83d\ude00", "NaN", "Infinity", "-1e400", "", " ", ".", "..",
                           "\x00", "\r\n", "]]>", "&#0;", "<x/>", "READY_TO_SEND", "closed_duplicate"])
ANY_TEXT = st.one_of(st.text(ANY_CHARACTER, max_size=40), AWKWARD,
                     st.lists(st.one_of(AWKWARD, st.text(ANY_CHARACTER, max_size=5)), max_size=4).map("".join))
# one record's odd values: config.py variable (or "id") -> the text Knack hands over, raw and displayed
ODD_RECORD = st.dictionaries(st.sampled_from(VARIABLES), ANY_TEXT, min_size=1, max_size=5)


def record(n: int, odd: dict[str, str]) -> dict:
    knack_record = activity_record(
        CONFIG[APP], app_name=APP, omit_empty_raw=True, record_id=f"rec{n:021d}", atd_activity_id=n,
        emi_id=f"EMI-{n}", sr_number=f"20-{n:08d}", activity_datetime=dt.datetime(2024, 7, 4, 10, 26),
        activity_details=f"details {n}", activity_name="Dispatch Technician", issue_status="open")
    for variable, text in odd.items():
        if variable == "id":
            knack_record["id"] = text
        else:
            knack_record[FIELDS[variable]] = knack_record[f"{FIELDS[variable]}_raw"] = text
    return knack_record


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(odd_records=st.lists(ODD_RECORD, min_size=1, max_size=3,
                            unique_by=lambda odd: odd.get("id", object())))  # Knack's ids are unique
def test_any_text_in_any_field_ends_in_a_summary_and_an_exit_code_of_the_table(run_bridge, esb, odd_records):
    records = [record(2000 + i, odd) for i, odd in enumerate(odd_records)]
    plain = record(1000, {})
    earlier = len(esb.accepted)  # one ESB for every example
    with make_knack(rate_limit=None) as knack, tempfile.TemporaryDirectory() as state_dir:
        knack.add_records(OBJ, [plain, *records])
        before = {str(r["id"]): r.get(STATUS) for r in records}

        run = run_bridge(env={"KNACK_API_URL": knack.url, "STATE_DIR": state_dir, "KNACK_MAX_RPS": "50"},
                         timeout=120)

        assert "Traceback" not in run.output, run.output
        assert run.returncode in (0, 1, 2), run.output
        assert len([line for line in run.stdout.splitlines() if " summary: " in line]) == 1, run.output
        accepted = [parse_message(r.body)["id"] for r in esb.accepted[earlier:]]
        assert accepted.count(plain["id"]) == 1, run.output
        assert knack.record(OBJ, plain["id"])[STATUS] == "SENT", run.output
        for knack_record in knack.records(OBJ):
            record_id = knack_record["id"]
            if isinstance(record_id, str) and record_id in before and before[record_id] != "SENT":
                # nothing is marked SENT unless the ESB accepted this very record's message
                assert knack_record.get(STATUS) != "SENT" or record_id in accepted, run.output

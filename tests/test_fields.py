"""Field formatting on real Knack payload shapes (tests/fixtures/knack/, recorded from a real Knack app)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

import config
from knack311.errors import ConfigError, RecordError
from knack311.fields import (
    activity_from_record,
    format_value,
    is_iso_datetime_with_offset,
    knack_datetime,
    resolve_timezone,
    type_problem,
)
from knack311.message import Activity

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "knack"
CHICAGO = ZoneInfo("America/Chicago")


@pytest.fixture(scope="module")
def metadata() -> dict:
    return json.loads((FIXTURES / "app_metadata.json").read_text(encoding="utf-8"))["application"]


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return json.loads((FIXTURES / "records_all_field_types.json").read_text(encoding="utf-8"))["records"]


@pytest.fixture(scope="module")
def field_types(metadata) -> dict[str, str]:
    return {f["key"]: f["type"] for obj in metadata["objects"] for f in obj["fields"]}


@pytest.fixture(scope="module")
def record(records) -> dict:
    """The first fixture record: one filled field of every Knack type."""
    return records[0]


@pytest.fixture(scope="module")
def app_tz(metadata) -> ZoneInfo:
    return resolve_timezone(metadata["settings"]["timezone"])


def local_wall_clock(year, month, day, hour, minute) -> dict:
    """A Knack date_time raw value for a local wall-clock time (Knack labels local time as UTC)."""
    naive = dt.datetime(year, month, day, hour, minute)
    unix_ms = int((naive - dt.datetime(1970, 1, 1)).total_seconds() * 1000)
    hours12 = naive.hour % 12 or 12
    return {
        "date": naive.strftime("%m/%d/%Y"), "date_formatted": naive.strftime("%m/%d/%Y"),
        "hours": f"{hours12:02d}", "minutes": f"{minute:02d}", "am_pm": "AM" if naive.hour < 12 else "PM",
        "unix_timestamp": unix_ms, "iso_timestamp": naive.strftime("%Y-%m-%dT%H:%M:00.000Z"),
        "timestamp": naive.strftime("%m/%d/%Y %I:%M %p").lower(), "time": naive.hour * 60 + minute,
    }


# --- the fixture's own record, field by field -------------------------------------------------------------

def test_fixture_record_has_the_types_under_test(record, field_types):
    # guards the tests below against a changed fixture
    assert field_types["field_13"] == "date_time"
    assert field_types["field_128"] == "connection"
    assert field_types["field_6"] == "multiple_choice"
    assert record["field_13"] == "07/03/2018 10:26"
    assert record["field_13_raw"]["timestamp"] == "07/03/2018 10:26 am"


@pytest.mark.parametrize("key, expected", [
    ("field_11", "1"),                                   # auto_increment, an int
    ("field_125", "1"),                                  # short_text
    ("field_6", "Extra Cheese"),                         # multiple_choice, single text
    ("field_7", "hello"),                                # short_text
    ("field_10", "100"),                                 # number
    ("field_12", "2019-09-11T00:00:00-05:00"),           # date_time without time, in CDT
    ("field_13", "2018-07-03T10:26:00-05:00"),           # date_time "07/03/2018 10:26 am", in CDT
    ("field_14", "2012-01-01T16:14:00-06:00"),           # date_time without date (Knack puts 01/01/2012), CST
    ("field_15", "2019-09-11T16:14:00-05:00"),           # date range: its start
    ("field_19", "Pizza Danger the Hut"),                # name
    ("field_20", "pizzathehut@spaceballs.com"),          # email: the address, not the mailto HTML
    ("field_22", "(512) 974-3546"),                      # phone: the formatted number
    ("field_24", "https://data.austintexas.gov/Transportation-and-Mobility/Camera-Traffic-Counts-UT-CTR-TEST/sh59-i6y9"),
    ("field_25", "0"),                                   # rating 0 is a value, not empty
    ("field_9", "he two three (four)"),                  # concatenation
    ("field_29", "Yes"),                                 # boolean True
    ("field_30", "100.43"),                              # currency (raw is a string)
    ("field_37", "2019-09-13T02:43:00-05:00"),
    ("field_38", "No"),                                  # boolean False
    ("field_76", "July pizza Tuesday "),                 # format_value keeps spaces; activity_from_record strips
    ("field_128", "Johnny C"),                           # connection: the identifier, not the <span> HTML
    ("field_129", "1.33333333"),                         # equation, a float
])
def test_format_value_on_fixture_record(record, field_types, app_tz, key, expected):
    assert format_value(record[f"{key}_raw"], field_types[key], app_tz) == expected


def test_every_fixture_value_formats_to_a_string_without_none(records, field_types, app_tz):
    for rec in records:
        for key, raw in rec.items():
            if not key.endswith("_raw"):
                continue
            text = format_value(raw, field_types[key[:-4]], app_tz)
            assert isinstance(text, str)
            assert "None" not in text, (rec["id"], key, raw)


def test_fixture_date_times_all_carry_the_chicago_offset(records, field_types, app_tz):
    seen = 0
    for rec in records:
        for key, ftype in field_types.items():
            raw = rec.get(f"{key}_raw")
            if ftype != "date_time" or not raw:
                continue
            text = format_value(raw, ftype, app_tz)
            parsed = dt.datetime.fromisoformat(text)
            wall = dt.datetime.fromisoformat(raw["iso_timestamp"].replace("Z", "")).replace(microsecond=0)
            # the wall-clock time is kept; the offset is the one Chicago had on that day
            assert parsed.replace(tzinfo=None) == wall
            assert parsed.utcoffset() == wall.replace(tzinfo=CHICAGO).utcoffset()
            assert text[-6:] in ("-05:00", "-06:00")
            seen += 1
    assert seen > 20


def test_empty_connection_from_fixture(records, field_types, app_tz):
    empties = [r for r in records if r.get("field_128_raw") == []]
    assert empties, "the fixture has records without a connected customer"
    assert format_value(empties[0]["field_128_raw"], "connection", app_tz) == ""


# --- date_time and daylight saving time --------------------------------------------------------------------

@pytest.mark.parametrize("wall, expected", [
    ((2018, 7, 3, 10, 26), "2018-07-03T10:26:00-05:00"),
    ((2019, 1, 15, 9, 5), "2019-01-15T09:05:00-06:00"),
    # spring forward, 2024-03-10 02:00 CST -> 03:00 CDT
    ((2024, 3, 10, 1, 59), "2024-03-10T01:59:00-06:00"),
    ((2024, 3, 10, 3, 0), "2024-03-10T03:00:00-05:00"),
    # fall back, 2024-11-03 02:00 CDT -> 01:00 CST
    ((2024, 11, 3, 0, 59), "2024-11-03T00:59:00-05:00"),
    ((2024, 11, 3, 2, 0), "2024-11-03T02:00:00-06:00"),
    ((2024, 12, 31, 23, 59), "2024-12-31T23:59:00-06:00"),
])
def test_date_time_offsets_across_dst(wall, expected):
    raw = local_wall_clock(*wall)
    assert format_value(raw, "date_time", CHICAGO) == expected
    # the same from iso_timestamp alone (older payloads without unix_timestamp)
    assert knack_datetime({"iso_timestamp": raw["iso_timestamp"]}, CHICAGO) == expected


def test_date_time_in_another_zone():
    raw = local_wall_clock(2018, 7, 3, 10, 26)
    assert format_value(raw, "date_time", ZoneInfo("America/Los_Angeles")) == "2018-07-03T10:26:00-07:00"


@pytest.mark.parametrize("raw", ["", None, [], {}])
def test_empty_date_time_is_empty_string(raw):
    assert format_value(raw, "date_time", CHICAGO) == ""
    assert knack_datetime(raw, CHICAGO) == ""


@pytest.mark.parametrize("raw", [
    "07/03/2018 10:26 am",
    12345,
    True,
    ["2018-07-03"],
    {"date": "07/03/2018"},                               # neither timestamp
    {"iso_timestamp": "not a date"},
    {"unix_timestamp": "1530613560000"},                  # a string, and no iso_timestamp
    {"unix_timestamp": 10 ** 20},                         # out of range
])
def test_knack_datetime_rejects_non_dates(raw):
    with pytest.raises(RecordError):
        knack_datetime(raw, CHICAGO)
    with pytest.raises(RecordError):
        format_value(raw, "date_time", CHICAGO)


def test_knack_datetime_nan_timestamp_is_a_record_error():
    # Python's json (requests' .json()) accepts NaN, so a payload can carry it
    raw = json.loads('{"unix_timestamp": NaN, "iso_timestamp": "2018-07-03T10:26:00.000Z"}')
    with pytest.raises(RecordError):
        knack_datetime(raw, CHICAGO)


# --- the other types ---------------------------------------------------------------------------------------

def test_connection_joins_identifiers():
    raw = [{"id": "5ea46ad2b6ce4b0015000ae8", "identifier": "Johnny C"},
           {"id": "5ea46ad2b6ce4b0015000ae9", "identifier": "Sally L"}]
    assert format_value(raw, "connection", CHICAGO) == "Johnny C, Sally L"
    assert format_value([], "connection", CHICAGO) == ""
    assert format_value([{"id": "x", "identifier": 42}], "connection", CHICAGO) == "42"


@pytest.mark.parametrize("raw, expected", [
    ("Extra Cheese", "Extra Cheese"),
    ("Jalapeños", "Jalapeños"),
    (["Mushrooms", "Extra Cheese"], "Mushrooms, Extra Cheese"),
    (["Mushrooms", None], "Mushrooms"),
    ([None], ""),
    ([], ""),
    ("", ""),
    (None, ""),
])
def test_multiple_choice(raw, expected):
    assert format_value(raw, "multiple_choice", CHICAGO) == expected


@pytest.mark.parametrize("raw, expected", [
    ("Crew replaced the lamp<br />Signal back on", "Crew replaced the lamp\nSignal back on"),
    ("one<br>two<BR/>three<br  />four", "one\ntwo\nthree\nfour"),
    ("line one\r\nline two\r\n", "line one\nline two\n"),
    ("old mac\rline", "old mac\nline"),
    ("  kept as typed  ", "  kept as typed  "),
    ("a & b < c", "a & b < c"),                           # escaping is the message's job, not this one's
    ("", ""),
    (None, ""),
])
def test_paragraph_text(raw, expected):
    assert format_value(raw, "paragraph_text", CHICAGO) == expected


@pytest.mark.parametrize("raw, expected", [
    (1.0, "1"), (100.0, "100"), (0.0, "0"), (1.5, "1.5"), (1, "1"), (0, "0"), (-3.0, "-3"), ("100.43", "100.43"),
])
def test_numbers(raw, expected):
    assert format_value(raw, "number", CHICAGO) == expected


EMPTY_TYPES = ["short_text", "number", "multiple_choice", "connection", "date_time", "email", "phone", "name", "link",
               "currency", "boolean", "concatenation", "rich_text", "auto_increment", ""]


# [None] is Knack's multiple-choice "nothing chosen"; a date_time never carries it
@pytest.mark.parametrize("ftype, raw", [(t, raw) for t in EMPTY_TYPES for raw in ("", [], None, [None])
                                        if not (t == "date_time" and raw == [None])])
def test_empty_values_are_empty_strings(ftype, raw):
    assert format_value(raw, ftype, CHICAGO) == ""


@pytest.mark.parametrize("raw", ["", None])
def test_empty_paragraph_text(raw):
    assert format_value(raw, "paragraph_text", CHICAGO) == ""


def test_empty_list_paragraph_text_is_empty_string():
    assert format_value([], "paragraph_text", CHICAGO) == ""


# --- timezone ----------------------------------------------------------------------------------------------

def test_resolve_timezone_maps_the_fixture_app_setting(metadata):
    assert metadata["settings"]["timezone"] == "Central Time (US & Canada)"
    assert resolve_timezone(metadata["settings"]["timezone"]) == ZoneInfo("America/Chicago")


def test_resolve_timezone_accepts_an_iana_name():
    assert resolve_timezone("America/Denver") == ZoneInfo("America/Denver")


def test_resolve_timezone_override_wins():
    assert resolve_timezone("Central Time (US & Canada)", "America/New_York") == ZoneInfo("America/New_York")
    # the override is used even when Knack's name is unknown or missing
    assert resolve_timezone("Mars Standard Time", "Europe/Paris") == ZoneInfo("Europe/Paris")
    assert resolve_timezone(None, "Asia/Tokyo") == ZoneInfo("Asia/Tokyo")


@pytest.mark.parametrize("knack_name, override", [
    ("Mars Standard Time", None),
    ("", None),
    (None, None),
    ("../../etc/passwd", None),
    ("Central Time (US & Canada)", "Central Time (US & Canada)"),   # an override must be IANA
    ("Central Time (US & Canada)", "Not/AZone"),
])
def test_resolve_timezone_unknown_is_config_error(knack_name, override):
    with pytest.raises(ConfigError) as err:
        resolve_timezone(knack_name, override)
    assert "timezone" in str(err.value)


# --- activity_from_record ----------------------------------------------------------------------------------

FIELDS = config.CONFIG["data-tracker"]["fields"]

# plausible types for the data-tracker fields, as the app metadata would give them
DATA_TRACKER_TYPES = {
    FIELDS["atd_activity_id"]: "concatenation",
    FIELDS["emi_id"]: "short_text",
    FIELDS["sr_number"]: "short_text",
    FIELDS["issue_status_code_snapshot"]: "short_text",
    FIELDS["esb_status"]: "multiple_choice",
    FIELDS["activity_datetime"]: "date_time",
    FIELDS["activity_details"]: "paragraph_text",
    FIELDS["activity_name"]: "connection",
    FIELDS["csr_activity_id"]: "short_text",
    FIELDS["csr_activity_code"]: "short_text",
}


def data_tracker_record() -> dict:
    """A records-reply entry in the fixture's shape (field_N display value + field_N_raw)."""
    when = local_wall_clock(2018, 7, 3, 10, 26)
    rec = {"id": "5d7964422d7159001659b27a"}

    def put(variable, display, raw):
        rec[FIELDS[variable]] = display
        rec[f"{FIELDS[variable]}_raw"] = raw

    put("atd_activity_id", "ACT-000123", "ACT-000123")
    put("emi_id", " EMI-42 ", " EMI-42 ")
    put("sr_number", "24-00012345 ", "24-00012345 ")
    put("issue_status_code_snapshot", "closed_duplicate", "closed_duplicate")
    put("esb_status", "READY_TO_SEND", "READY_TO_SEND")
    put("activity_datetime", "07/03/2018 10:26am", when)
    put("activity_details", "Replaced lamp<br />Signal back on  ", "Replaced lamp<br />Signal back on  ")
    put("activity_name", '<span class="5ea46ad2b6ce4b0015000ae8">Dispatch Technician</span>',
        [{"id": "5ea46ad2b6ce4b0015000ae8", "identifier": "Dispatch Technician"}])
    put("csr_activity_id", "", "")
    put("csr_activity_code", "", [None])
    return rec


def test_activity_from_record_with_shipped_config():
    activity = activity_from_record(data_tracker_record(), FIELDS, DATA_TRACKER_TYPES, CHICAGO)
    assert activity == Activity(
        record_id="5d7964422d7159001659b27a",
        atd_activity_id="ACT-000123",
        emi_id="EMI-42",                                  # stray spaces dropped from codes and ids
        sr_number="24-00012345",
        issue_status_code_snapshot="closed_duplicate",   # Knack's value; the 311 rule is applied later
        activity_name="Dispatch Technician",             # the connection's identifier, not its HTML
        activity_datetime="2018-07-03T10:26:00-05:00",
        activity_details="Replaced lamp\nSignal back on  ",   # details exactly as typed
        csr_activity_id="",
        csr_activity_code="",
    )


def test_activity_from_record_reads_raw_not_display():
    rec = data_tracker_record()
    rec[FIELDS["sr_number"]] = "<b>display</b>"
    rec[f"{FIELDS['sr_number']}_raw"] = "24-99"
    assert activity_from_record(rec, FIELDS, DATA_TRACKER_TYPES, CHICAGO).sr_number == "24-99"


def test_activity_from_record_falls_back_to_display_value():
    rec = data_tracker_record()
    del rec[f"{FIELDS['csr_activity_code']}_raw"]
    rec[FIELDS["csr_activity_code"]] = "DISPTECH"
    assert activity_from_record(rec, FIELDS, DATA_TRACKER_TYPES, CHICAGO).csr_activity_code == "DISPTECH"


def test_activity_from_record_without_optional_fields_in_config():
    fields = {k: v for k, v in FIELDS.items() if not k.startswith("csr_")}
    activity = activity_from_record(data_tracker_record(), fields, DATA_TRACKER_TYPES, CHICAGO)
    assert activity.csr_activity_id == "" and activity.csr_activity_code == ""
    assert activity.sr_number == "24-00012345"


@pytest.mark.parametrize("variable", ["sr_number", "activity_details", "activity_datetime", "emi_id"])
def test_activity_from_record_missing_field_names_it(variable):
    rec = data_tracker_record()
    key = FIELDS[variable]
    del rec[key]
    del rec[f"{key}_raw"]
    with pytest.raises(RecordError) as err:
        activity_from_record(rec, FIELDS, DATA_TRACKER_TYPES, CHICAGO)
    assert key in str(err.value)


def test_activity_from_record_bad_date_names_the_field():
    rec = data_tracker_record()
    rec[f"{FIELDS['activity_datetime']}_raw"] = "yesterday"
    with pytest.raises(RecordError) as err:
        activity_from_record(rec, FIELDS, DATA_TRACKER_TYPES, CHICAGO)
    assert FIELDS["activity_datetime"] in str(err.value)


# --- activity_date: a date-time with its offset, or the record fails (issue 13) --------------------------------

def test_an_activity_datetime_typed_as_text_fails_the_record_naming_the_field_and_its_type():
    rec = data_tracker_record()
    key = FIELDS["activity_datetime"]
    # what a metadata copy typing the date as short text makes of Knack's date object (seen sent to 311 once)
    types = {**DATA_TRACKER_TYPES, key: "short_text"}
    with pytest.raises(RecordError) as err:
        activity_from_record(rec, FIELDS, types, CHICAGO)
    assert f"field {key} (activity_datetime) is a short_text field" in str(err.value)
    assert "ISO 8601" in str(err.value)


@pytest.mark.parametrize("text", ["07/03/2018 10:26am", "2018-07-03T10:26:00", "2018-07-03", "1530613560000",
                                  "2018-07-03 10:26:00-05:00", "2018-02-30T10:26:00-06:00"])
def test_an_activity_date_without_an_offset_or_not_iso_fails_the_record(text):
    rec = data_tracker_record()
    key = FIELDS["activity_datetime"]
    rec[key] = rec[f"{key}_raw"] = text
    with pytest.raises(RecordError) as err:
        activity_from_record(rec, FIELDS, {**DATA_TRACKER_TYPES, key: "short_text"}, CHICAGO)
    assert key in str(err.value) and "short_text" in str(err.value)


def test_a_blank_activity_date_still_goes_blank():
    rec = data_tracker_record()
    key = FIELDS["activity_datetime"]
    rec[key] = rec[f"{key}_raw"] = ""
    assert activity_from_record(rec, FIELDS, DATA_TRACKER_TYPES, CHICAGO).activity_datetime == ""


@pytest.mark.parametrize("text", ["2018-07-03T10:26:00-05:00", "2018-07-03T10:26:00Z", "2018-07-03T10:26-05:00",
                                  "2018-07-03T10:26:00.123+09:30"])
def test_iso_date_times_with_an_offset_are_accepted(text):
    assert is_iso_datetime_with_offset(text)


# --- the field type rule, shared by --check and the run ---------------------------------------------------------

def test_type_problem_names_the_field_its_type_and_what_fits():
    assert type_problem("activity_datetime", "field_1", "date_time") == ""
    assert type_problem("atd_activity_id", "field_2", "short_text") == ""  # tolerated (with --check's WARN)
    assert type_problem("activity_datetime", "field_1", "short_text") == (
        "field_1 is a short_text field, expected date_time (config.py fields['activity_datetime'])")
    assert "typeless" in type_problem("emi_id", "field_3", "")

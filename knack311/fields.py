"""Knack raw field values -> plain strings for the message (pure functions).

Knack hands each field twice: `field_N` (display value, often HTML) and `field_N_raw`. We read the raw value
and format it by the field's type from the app metadata, so staff text reaches 311 as typed.
"""

from __future__ import annotations

import datetime as dt
import re
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import ConfigError, RecordError
from .message import Activity

# Knack field types that work for each template variable (format_value turns them into text). `--check` and the
# run judge a configured field by this one table.
_TEXT = frozenset({"short_text", "concatenation", "number", "auto_increment"})
EXPECTED_TYPES: dict[str, frozenset[str]] = {
    "atd_activity_id": frozenset({"auto_increment", "number"}),
    "emi_id": _TEXT,
    "sr_number": _TEXT | {"connection"},  # signs-markings links the service request record
    "issue_status_code_snapshot": _TEXT | {"multiple_choice"},
    "esb_status": frozenset({"multiple_choice"}),  # the status the bridge reads and writes
    "activity_datetime": frozenset({"date_time"}),
    "activity_details": frozenset({"paragraph_text", "short_text"}),  # rich_text would send HTML markup to 311
    "activity_name": frozenset({"multiple_choice", "connection", "short_text"}),
    "csr_activity_id": _TEXT,
    "csr_activity_code": _TEXT | {"multiple_choice"},
}
# Types that work, with a caveat worth a WARN.
TOLERATED_TYPES: dict[str, tuple[frozenset[str], str]] = {
    "atd_activity_id": (frozenset({"short_text", "concatenation"}),
                        "311 gets activities in this id's numeric order; a text id that is not a number goes last"),
}


def type_problem(variable: str, key: str, knack_type: str) -> str:
    """"" when a Knack field of this type can fill the template variable; else what is wrong, naming the field."""
    expected = EXPECTED_TYPES.get(variable, frozenset())
    tolerated, _ = TOLERATED_TYPES.get(variable, (frozenset(), ""))
    if knack_type in expected | tolerated:
        return ""
    return (f"{key} is a {knack_type or 'typeless'} field, expected {' or '.join(sorted(expected))} "
            f"(config.py fields[{variable!r}])")


# Knack stores the app timezone under Rails' friendly names ("Central Time (US & Canada)"), not IANA names.
# The US zones are the ones Knack apps of a US city use; a few others are listed for completeness. An app
# whose name is missing here can set `timezone` (an IANA name) in config.py.
KNACK_TIMEZONES = {
    "Hawaii": "Pacific/Honolulu",
    "Alaska": "America/Juneau",
    "Pacific Time (US & Canada)": "America/Los_Angeles",
    "Arizona": "America/Phoenix",
    "Mountain Time (US & Canada)": "America/Denver",
    "Central Time (US & Canada)": "America/Chicago",
    "Eastern Time (US & Canada)": "America/New_York",
    "Indiana (East)": "America/Indiana/Indianapolis",
    "Atlantic Time (Canada)": "America/Halifax",
    "Newfoundland": "America/St_Johns",
    "Saskatchewan": "America/Regina",
    "Mexico City": "America/Mexico_City",
    "Puerto Rico": "America/Puerto_Rico",
    "UTC": "Etc/UTC",
    "London": "Europe/London",
    "Dublin": "Europe/Dublin",
    "Lisbon": "Europe/Lisbon",
    "Paris": "Europe/Paris",
    "Berlin": "Europe/Berlin",
    "Madrid": "Europe/Madrid",
    "Amsterdam": "Europe/Amsterdam",
    "Sydney": "Australia/Sydney",
    "Tokyo": "Asia/Tokyo",
}


def resolve_timezone(knack_name: str | None, override: str | None = None) -> ZoneInfo:
    """The app's zone: config.py's IANA override if any, else Knack's setting mapped to IANA."""
    if override:
        return _zone(override, "config.py timezone")
    if not knack_name:
        raise ConfigError("the Knack app metadata has no settings.timezone; set `timezone` (an IANA name) in config.py")
    iana = KNACK_TIMEZONES.get(knack_name, knack_name)  # some apps may already carry an IANA name
    try:
        return ZoneInfo(iana)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"unknown Knack timezone {knack_name!r}; "
            "set `timezone` (an IANA name such as 'America/Chicago') in config.py"
        ) from None


def _zone(name: str, where: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{where}: {name!r} is not an IANA timezone name such as 'America/Chicago'") from None


def knack_datetime(raw: object, tz: ZoneInfo) -> str:
    """A Knack date_time raw value -> ISO 8601 with the app's UTC offset ("" when empty).

    Knack's unix_timestamp and iso_timestamp are the LOCAL wall-clock time labelled as UTC
    ("07/03/2018 10:26 am" comes as 2018-07-03T10:26:00.000Z), so we read them as a naive local time and
    attach the app's zone, which gives the right offset on either side of a daylight saving change.
    """
    if raw in (None, "", {}, []):
        return ""
    if not isinstance(raw, dict):
        raise RecordError(f"not a Knack date/time value: {_show(raw)}")
    wall_clock = None
    stamp = raw.get("unix_timestamp")
    if isinstance(stamp, (int, float)) and not isinstance(stamp, bool):
        try:
            wall_clock = dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=stamp)
        except (OverflowError, ValueError):  # out of range, or NaN/infinity (JSON parsers accept them)
            raise RecordError(f"date/time out of range: {_show(stamp)}") from None
    elif isinstance(raw.get("iso_timestamp"), str):
        try:
            wall_clock = dt.datetime.fromisoformat(raw["iso_timestamp"].replace("Z", "+00:00")).replace(tzinfo=None)
        except ValueError:
            raise RecordError(f"not a Knack date/time value: {_show(raw['iso_timestamp'])}") from None
    if wall_clock is None:
        raise RecordError(f"not a Knack date/time value: {_show(raw)}")
    return wall_clock.replace(tzinfo=tz).isoformat()


# What 311 takes as activity_date: a date, a time and a UTC offset (knack_datetime writes exactly this).
_ISO_WITH_OFFSET = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})")


def is_iso_datetime_with_offset(text: str) -> bool:
    if not _ISO_WITH_OFFSET.fullmatch(text):
        return False
    try:
        dt.datetime.fromisoformat(text)
    except ValueError:  # the shape, but no such day or time ("2024-02-30T25:00+00:00")
        return False
    return True


_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


def paragraph_text(raw: object) -> str:
    """Paragraph text as plain text with real newlines.

    Knack may carry line breaks as <br />, and browsers submit them as CRLF (an old Mac as a lone CR); 311
    gets one kind of line break, a newline, whichever way staff typed it.
    """
    text = _BR.sub("\n", str(raw))
    return text.replace("\r\n", "\n").replace("\r", "\n")


def format_value(raw: object, field_type: str, tz: ZoneInfo) -> str:
    """Format one raw Knack value by its field type. Empty values become "", never "None"."""
    if raw is None or raw == [] or raw == {}:
        return ""
    if field_type == "date_time":
        return knack_datetime(raw, tz)
    if field_type == "connection":
        # a connection is a list of {id, identifier}; 311 wants the identifiers
        if isinstance(raw, list):
            return ", ".join(str(item.get("identifier") or "") if isinstance(item, dict) else str(item)
                             for item in raw if item not in (None, ""))
        return str(raw)
    if field_type == "paragraph_text":
        return paragraph_text(raw)
    if isinstance(raw, bool):
        return "Yes" if raw else "No"
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))
    if isinstance(raw, list):
        # multiple choice (multi-select) and similar: the texts, skipping Knack's [None] for "nothing chosen"
        return ", ".join(format_value(item, field_type, tz) for item in raw if item not in (None, ""))
    if isinstance(raw, dict):
        for key in ("identifier", "email", "url", "formatted", "full"):
            if key in raw:
                return str(raw[key])
        return " ".join(str(v) for v in raw.values() if v not in (None, ""))
    return str(raw)


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def activity_from_record(record: dict, fields: dict[str, str], field_types: dict[str, str], tz: ZoneInfo) -> Activity:
    """A Knack record (raw values) -> an Activity of formatted strings; RecordError names a missing/bad field."""
    values: dict[str, str] = {}
    for variable, key in fields.items():
        if variable == "id":
            continue
        if key not in record and f"{key}_raw" not in record:
            raise RecordError(f"record lacks field {key} ({variable})")
        raw = record.get(f"{key}_raw", record.get(key))
        try:
            text = format_value(raw, field_types.get(key, ""), tz)
        except RecordError as exc:
            raise RecordError(f"field {key} ({variable}): {exc}") from None
        # codes and ids lose stray spaces; the details go to 311 exactly as staff typed them
        values[variable] = text if variable == "activity_details" else text.strip()
    # The guard behind the check of the metadata's field types: whatever typed the field, no activity_date that is
    # not a date-time with its offset reaches 311 (a blank one goes blank, as Knack holds it).
    when = values["activity_datetime"]
    if when and not is_iso_datetime_with_offset(when):
        key = fields["activity_datetime"]
        raise RecordError(f"field {key} (activity_datetime) is a {field_types.get(key) or 'typeless'} field whose "
                          f"value {_show(when)} is not an ISO 8601 date-time with a UTC offset")
    return Activity(
        record_id=str(record.get("id", "")),
        atd_activity_id=values["atd_activity_id"],
        emi_id=values["emi_id"],
        sr_number=values["sr_number"],
        issue_status_code_snapshot=values["issue_status_code_snapshot"],
        activity_name=values["activity_name"],
        activity_datetime=values["activity_datetime"],
        activity_details=values["activity_details"],
        csr_activity_id=values.get("csr_activity_id", ""),
        csr_activity_code=values.get("csr_activity_code", ""),
    )

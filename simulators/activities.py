"""Builders for realistic Knack metadata and activity records, for tests and demos.

Everything here follows the shapes of the real Knack payloads recorded in
tests/fixtures/knack/ (app_metadata.json, records_all_field_types.json), so code that works against
these builders works against the real API. Knack's quirks are reproduced on purpose:

- every field comes twice: ``field_N`` is the display value (HTML for connections and paragraph
  line breaks), ``field_N_raw`` the raw value;
- date_time raw values label the app's LOCAL wall-clock time as UTC (``unix_timestamp`` and
  ``iso_timestamp``), so the real instant can only be recovered with the app's timezone;
- empty values are ``""`` (``[]`` for connections).
"""

from __future__ import annotations

import datetime
import hashlib
import html
import itertools
import re
from typing import Any

# Template variable -> Knack field type, per app. The two apps hold the same activity data, but in
# signs-markings the service request and the activity name are connections to other objects, so
# their raw values are lists of {id, identifier} and their display values are HTML spans.
FIELD_TYPES: dict[str, dict[str, str]] = {
    "data-tracker": {
        "atd_activity_id": "auto_increment",
        "emi_id": "short_text",
        "sr_number": "short_text",
        "issue_status_code_snapshot": "short_text",
        "esb_status": "multiple_choice",
        "activity_datetime": "date_time",
        "activity_details": "paragraph_text",
        "activity_name": "multiple_choice",
        "csr_activity_id": "short_text",
        "csr_activity_code": "short_text",
    },
}
FIELD_TYPES["signs-markings"] = {
    **FIELD_TYPES["data-tracker"],
    "sr_number": "connection",
    "activity_name": "connection",
}

# The statuses the 311 bridge reads and writes in the esb_status multiple-choice field.
ESB_STATUSES = ["READY_TO_SEND", "SENT", "DO_NOT_SEND"]

# Knack's settings carry a Windows-style timezone name plus its standard and DST offsets in seconds
# (as strings, e.g. "-21600" and "3600" for Central time in app_metadata.json).
_TIMEZONE_OFFSETS = {
    "Central Time (US & Canada)": ("-21600", "3600"),
    "Eastern Time (US & Canada)": ("-18000", "3600"),
    "Mountain Time (US & Canada)": ("-25200", "3600"),
    "Pacific Time (US & Canada)": ("-28800", "3600"),
    "Arizona": ("-25200", "0"),
    "UTC": ("0", "0"),
}

# Date/time format of the activity timestamp fields, as Knack stores it for "mm/dd/yyyy" + "HH:MM am".
_DATE_TIME_FORMAT = {
    "calendar": False,
    "date_format": "mm/dd/yyyy",
    "time_format": "HH:MM am",
    "time_type": "current",
    "default_type": "current",
    "default_date": "",
    "default_time": "",
}


def random_id(seed: Any) -> str:
    """A Knack-style record id (24 hex characters, like a MongoDB ObjectId), deterministic in `seed`."""
    return hashlib.sha1(f"knack-simulator:{seed}".encode()).hexdigest()[:24]


def _connection_id(text: str) -> str:
    # The same identifier always points at the same connected record, as in a real app.
    return random_id(f"connection:{text}")


def date_time_value(local: datetime.datetime | None) -> tuple[str, Any]:
    """(display, raw) of a Knack date_time field ("mm/dd/yyyy" + "HH:MM am") holding `local`.

    `local` is the naive wall-clock time in the app's timezone. Knack keeps minutes only, and its
    `unix_timestamp` / `iso_timestamp` are that wall-clock time pretending to be UTC: 10:26 in Austin
    comes as "...T10:26:00.000Z" although the instant is 15:26Z (field_13_raw in the fixture).
    """
    if local is None:
        return "", ""
    if local.tzinfo is not None:
        raise ValueError("activity datetimes are naive local wall-clock times (Knack stores no zone)")
    local = local.replace(second=0, microsecond=0)
    hours12 = local.hour % 12 or 12
    is_pm = local.hour >= 12
    date = local.strftime("%m/%d/%Y")
    hours, minutes = f"{hours12:02d}", f"{local.minute:02d}"
    as_if_utc = local.replace(tzinfo=datetime.UTC)
    raw = {
        "date": date,
        "date_formatted": date,
        "hours": hours,
        "minutes": minutes,
        "am_pm": "PM" if is_pm else "AM",
        "unix_timestamp": int(as_if_utc.timestamp()) * 1000,
        "iso_timestamp": as_if_utc.strftime("%Y-%m-%dT%H:%M:00.000Z"),
        "timestamp": f"{date} {hours}:{minutes} {'pm' if is_pm else 'am'}",
        # Knack's "time" is built from the 12-hour clock: midnight comes as 720, not 0 (field_12_raw
        # in the fixture), 4:14 pm as 974. Noon is 720 as well.
        "time": hours12 * 60 + local.minute + (720 if is_pm and hours12 != 12 else 0),
    }
    # Display like field_37 in the fixture: "09/13/2019 2:43am" (hour not zero-padded).
    display = f"{date} {hours12}:{minutes}{'pm' if is_pm else 'am'}"
    return display, raw


def knack_value(field_type: str, value: Any) -> tuple[Any, Any]:
    """(display, raw) of `value` stored in a Knack field of `field_type`, as the API returns them."""
    if field_type == "date_time":
        return date_time_value(value)
    if field_type == "connection":
        if value in (None, "", []):
            return "", []
        text = str(value)
        record_id = _connection_id(text)
        # Connection display values are HTML naming the connected record's id.
        return f'<span class="{record_id}">{html.escape(text, quote=False)}</span>', [
            {"id": record_id, "identifier": text}
        ]
    if value is None or value == "":
        return "", ""
    if field_type in ("auto_increment", "number"):
        return value, value
    if field_type in ("short_text", "multiple_choice"):
        return str(value), str(value)
    if field_type == "paragraph_text":
        # The raw value is the text as typed; the display value is HTML with <br /> line breaks.
        text = str(value)
        escaped = html.escape(text, quote=False)
        return re.sub(r"\r\n|\r|\n", "<br />", escaped), text
    raise ValueError(f"no builder for Knack field type {field_type!r}")


def _field_types(app_name: str, field_types: dict | None) -> dict[str, str]:
    if field_types is not None:
        return field_types
    try:
        return FIELD_TYPES[app_name]
    except KeyError:
        raise ValueError(f"unknown app {app_name!r}: pass field_types") from None


def activity_record(
    app_config: dict,
    *,
    record_id: str,
    atd_activity_id: int,
    emi_id: str,
    sr_number: str,
    esb_status: str = "READY_TO_SEND",
    activity_datetime: datetime.datetime | None,
    activity_details: str = "",
    activity_name: str = "",
    csr_activity_id: str = "",
    csr_activity_code: str = "",
    issue_status: str = "",
    field_types: dict | None = None,
    app_name: str = "data-tracker",
    omit_empty_raw: bool = False,
) -> dict:
    """One activity record as the Knack API returns it for the app described by `app_config`.

    `activity_datetime` is the naive local wall-clock time in the app's timezone.
    With omit_empty_raw, empty fields come without their "field_N_raw" key: real Knack does that
    for fields never set on a record (field_37_raw is missing from the fixture's second record);
    connections keep their empty list.
    """
    types = _field_types(app_name, field_types)
    values = {
        "atd_activity_id": atd_activity_id,
        "emi_id": emi_id,
        "sr_number": sr_number,
        "issue_status_code_snapshot": issue_status,
        "esb_status": esb_status,
        "activity_datetime": activity_datetime,
        "activity_details": activity_details,
        "activity_name": activity_name,
        "csr_activity_id": csr_activity_id,
        "csr_activity_code": csr_activity_code,
    }
    record: dict[str, Any] = {"id": record_id}
    for variable, field_key in app_config["fields"].items():
        if variable == "id":  # the Knack record id, not a field
            continue
        field_type = types[variable]
        display, raw = knack_value(field_type, values.get(variable, ""))
        record[field_key] = display
        if not (omit_empty_raw and raw == "" and field_type != "connection"):
            record[f"{field_key}_raw"] = raw
    return record


def _free_keys(prefix: str, used: set[str], start: int = 1):
    """Yield keys like "object_3" that are not in `used` (so generated keys never collide)."""
    for number in itertools.count(start):
        key = f"{prefix}_{number}"
        if key not in used:
            used.add(key)
            yield key


def _field(object_key: str, key: str, name: str, field_type: str, **extra) -> dict:
    field = {
        "type": field_type,
        "required": False,
        "unique": False,
        "user": False,
        "conditional": False,
        "rules": None,
        "validation": None,
        "key": key,
        "object_key": object_key,
        "name": name,
        "_id": random_id(f"field:{object_key}:{key}"),
    }
    if field_type in ("short_text", "paragraph_text"):
        field["default"] = ""
    field.update(extra)
    return field


def _object(key: str, name: str, singular: str, fields: list[dict], *, inbound=(), outbound=()) -> dict:
    return {
        "inflections": {"plural": name, "singular": singular},
        "connections": {"inbound": list(inbound), "outbound": list(outbound)},
        "sort": {"field": fields[0]["key"], "order": "asc"},
        "user": False,
        "status": "current",
        "tasks": [],
        "type": "StandardObject",
        "key": key,
        "name": name,
        "conns": [],
        "_id": random_id(f"object:{key}"),
        "identifier": fields[0]["key"],
        "fields": fields,
    }


def _table_view(key: str, name: str, object_key: str, fields: list[dict]) -> dict:
    return {
        "key": key,
        "type": "table",
        "name": name,
        "title": name,
        "_id": random_id(f"view:{key}"),
        "source": {
            "object": object_key,
            "criteria": {"match": "any", "rules": [], "groups": []},
            "sort": [{"field": fields[0]["key"], "order": "asc"}],
            "limit": "",
        },
        "rows_per_page": 25,
        # View-based API requests return only the fields shown as columns.
        "columns": [
            {"field": {"key": f["key"]}, "header": f["name"], "type": "field", "object": {"key": object_key}}
            for f in fields
        ],
        "links": [],
        "inputs": [],
    }


def _scene(key: str, name: str, slug: str, views: list[dict]) -> dict:
    return {
        "key": key,
        "slug": slug,
        "name": name,
        "parent": None,
        "authenticated": False,
        "groups": [],
        "_id": random_id(f"scene:{key}"),
        "views": views,
    }


def app_metadata(
    app_name: str,
    app_config: dict,
    *,
    timezone: str = "Central Time (US & Canada)",
    scene_key: str = "scene_1",
    field_types: dict | None = None,
    app_id: str = "5d79512148c4af00106d1507",
) -> dict:
    """The reply of GET /v1/applications/{app_id} for an app holding the activities of `app_config`.

    Besides the activity object and the scene of its view, the app holds connected objects (for
    connection fields), an unrelated object and an unrelated scene listed first, so that finding
    the scene of a view or the type of a field takes a real lookup.
    """
    types = _field_types(app_name, field_types)
    activity_object = app_config["obj"]
    activity_view = app_config["view"]
    field_keys = {var: key for var, key in app_config["fields"].items() if var != "id"}

    object_keys = _free_keys("object", {activity_object})
    used_field_keys = set(field_keys.values())
    other_field_keys = _free_keys("field", used_field_keys)
    view_keys = _free_keys("view", {activity_view})
    scene_keys = _free_keys("scene", {scene_key})

    objects: list[dict] = []
    activity_fields: list[dict] = []
    outbound: list[dict] = []
    for variable, key in field_keys.items():
        field_type = types[variable]
        name = variable.upper()
        extra: dict[str, Any] = {}
        if field_type == "multiple_choice":
            options = ESB_STATUSES if variable == "esb_status" else list(app_config.get("activity_codes", {}))
            extra["format"] = {
                "options": options,
                "type": "single",
                "sorting": "alphabetical",
                "blank": "Select...",
                "default": "kn-blank",
            }
        elif field_type == "date_time":
            extra["format"] = dict(_DATE_TIME_FORMAT)
        elif field_type == "connection":
            # The connected object (service requests, activity types) with its identifier field.
            target = next(object_keys)
            target_name = f"{variable}s"
            identifier = _field(target, next(other_field_keys), name, "short_text")
            link = {"has": "one", "belongs_to": "many"}
            objects.append(
                _object(
                    target,
                    target_name,
                    variable,
                    [identifier],
                    inbound=[{"object": activity_object, "key": key, "name": name, **link}],
                )
            )
            outbound.append({"object": target, "key": key, "name": name, **link})
            extra["relationship"] = {"belongs_to": "many", "has": "one", "object": target}
            extra["rules"], extra["validation"] = [], []
        activity_fields.append(_field(activity_object, key, name, field_type, **extra))
    objects.insert(0, _object(activity_object, "activities", "activity", activity_fields, outbound=outbound))

    unrelated_object = next(object_keys)
    unrelated_fields = [
        _field(unrelated_object, next(other_field_keys), "LOCATION_NAME", "short_text"),
        _field(unrelated_object, next(other_field_keys), "SIGNAL_ID", "number"),
    ]
    objects.append(_object(unrelated_object, "locations", "location", unrelated_fields))

    # Another table view of the activity object in the unrelated scene: a view key, not an object
    # key, is what identifies the scene to read from.
    unrelated_scene = _scene(
        next(scene_keys),
        "Locations",
        "locations",
        [
            _table_view(next(view_keys), "Locations", unrelated_object, unrelated_fields),
            _table_view(next(view_keys), "All activities", activity_object, activity_fields[:3]),
        ],
    )
    activity_scene = _scene(
        scene_key,
        "311 activities",
        "311-activities",
        [_table_view(activity_view, "Activities to send to 311", activity_object, activity_fields)],
    )

    settings: dict[str, Any] = {"timezone": timezone}
    if timezone in _TIMEZONE_OFFSETS:
        settings["timezone_offset"], settings["timezone_dst"] = _TIMEZONE_OFFSETS[timezone]

    slug = re.sub(r"[^a-z0-9]+", "-", app_name.lower()).strip("-")
    return {
        "application": {
            "name": app_name,
            "description": f"Simulated Knack app {app_name} (activities for 311)",
            "home_scene": {"key": unrelated_scene["key"], "slug": unrelated_scene["slug"]},
            "id": app_id,
            "slug": slug,
            "objects": objects,
            "scenes": [unrelated_scene, activity_scene],
            "status": "live",
            "settings": settings,
        }
    }

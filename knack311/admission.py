"""Whether a record's values let it go to 311: the required values, the values 311 knows the activity by, and its
place in 311's order (pure: no I/O).

A record that fails here never starts, but it still holds the later activities of its service request
(schedule.py), so that 311 never sees them out of order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from .message import Activity, loses_characters_in_xml

REQUIRED_VALUES = ("atd_activity_id", "emi_id", "sr_number")  # 311 cannot place a message without them
# The values by which 311 (or 311's order) knows the activity. One that would reach 311 without some of its
# characters (intake removed those no encoding can write, the message drops those XML forbids) would name another
# activity: the record is not sent. Free text (activity_details) and codes go without them, with a warning.
IDENTIFYING = ("id", *REQUIRED_VALUES, "csr_activity_id")


def order_key(record: dict, atd_field: str) -> tuple:
    """atd_activity_id as a sort key. A value that is not a finite number (blank, "abc", NaN, Infinity) has no
    place in 311's order: it sorts before every number, so that the record, which fails, holds every other
    activity of its service request rather than letting them go in an order nobody can vouch for."""
    raw = record.get(f"{atd_field}_raw", record.get(atd_field))
    text = str(raw).strip() if raw not in (None, "") else ""
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    return (0, number, "") if math.isfinite(number) else (-1, 0.0, text)


def value_problem(activity: Activity, fields: Mapping[str, str], cleaned: tuple[str, ...], key: tuple) -> str:
    """Why the record's values cannot go ("" when they can). `cleaned`: the variables intake cleaned; `key`: the
    record's order_key."""
    blank = [f"{name} ({fields[name]})" for name in REQUIRED_VALUES if not getattr(activity, name)]
    if blank:
        return f"required value blank: {', '.join(blank)}: fill it in in Knack; the next run sends the record"
    damaged = [f"{name} ({fields[name]})" for name in IDENTIFYING if name in fields and (
        name in cleaned or loses_characters_in_xml(getattr(activity, "record_id" if name == "id" else name)))]
    if damaged:
        return (f"{', '.join(damaged)} held characters a message cannot carry (half an emoji, a control "
                "character): without them 311 would get another value; correct it in Knack")
    if key[0] != 0:
        return (f"atd_activity_id ({fields['atd_activity_id']}) is not a number ({activity.atd_activity_id[:40]!r}): "
                "its place in the service request's order is unknown, so the request's other activities wait; "
                "correct it in Knack")
    return ""

"""The records of a page as Knack hands them -> records the rest of the run can read without a crash.

This is the one place a record is looked at before anything else sees it (the listing, the journal, the log,
the message). Two things in Knack's JSON are not data the rest of the run can hold:

- Text no encoding can write. JSON may carry a lone UTF-16 surrogate (`"\\ud83d"`, half an emoji, left by a
  paste or a cut in the middle of a character), and Python's json hands it over as a `str` that UTF-8, SQLite
  and the log all refuse. Surrogates are the only code points a Python `str` holds that UTF-8 cannot encode.
  They are removed here from every field the run reads, as the XML path removes the characters XML forbids, and
  the record carries a note saying which fields lost some.
- An id that cannot address the record in Knack: not a text (a number, null, a list), empty, or text that
  needed cleaning. Such a record is passed on under a stand-in id that no Knack record has, so that it is
  counted and fails with a line instead of vanishing; its status can never be set in Knack.

What the notes mean for a record (fail it, or send it with a warning) is dispatch's decision.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

# Lone UTF-16 surrogates: the code points a str can hold and no UTF encoding can write.
UNENCODABLE = re.compile("[\ud800-\udfff]")
STAND_IN_PREFIX = "unusable-id-"


@dataclass(frozen=True)
class Note:
    """What intake found in one record."""

    unusable_id: str = ""          # why the record's own id cannot address it in Knack ("" when it can)
    cleaned: tuple[str, ...] = ()  # config.py variables (keys of `fields`) whose text lost unencodable characters


CLEAN = Note()


def has_unencodable(value: object) -> bool:
    if isinstance(value, str):
        return UNENCODABLE.search(value) is not None
    if isinstance(value, list):
        return any(has_unencodable(item) for item in value)
    if isinstance(value, dict):
        return any(has_unencodable(key) or has_unencodable(item) for key, item in value.items())
    return False


def without_unencodable(value: object) -> object:
    """`value` with every unencodable character removed from its texts, however deep (lists, dicts)."""
    if isinstance(value, str):
        return UNENCODABLE.sub("", value)
    if isinstance(value, list):
        return [without_unencodable(item) for item in value]
    if isinstance(value, dict):
        return {without_unencodable(key): without_unencodable(item) for key, item in value.items()}
    return value


def id_problem(record_id: object) -> str:
    """Why a record id from Knack cannot address the record ("" when it can)."""
    if isinstance(record_id, str):
        if not record_id.strip():
            return "Knack sent the record with an empty id"
        if has_unencodable(record_id):
            return "Knack sent the record with an id holding characters no encoding can write"
        if record_id in (".", ".."):  # a URL path drops such a segment: the update would miss the record
            return f"Knack sent the record with the id {record_id!r}, which no URL can address"
        return ""
    kind = {type(None): "null", bool: "true/false", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(record_id), type(record_id).__name__)
    shown = json.dumps(record_id, ensure_ascii=True, default=repr)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return f"Knack sent the record with an id that is {kind} ({shown}), not a text"


def stand_in_id(record: dict) -> str:
    """An id for a record whose own id is unusable: the same for the same record on every read (page 1 is read
    again and again), different for different records, and never a Knack id (those are 24 hex digits)."""
    content = json.dumps(record, sort_keys=True, ensure_ascii=True, default=repr)
    return STAND_IN_PREFIX + hashlib.sha256(content.encode("ascii")).hexdigest()[:12]


class Intake:
    """Cleans each record of a page and keeps a note of what it found, for the rest of the run to ask."""

    def __init__(self, fields: Mapping[str, str]):
        self._variables = {key: variable for variable, key in fields.items() if variable != "id"}
        self._notes: dict[str, Note] = {}

    def admit(self, records: list[dict]) -> list[dict]:
        """The records of one page, cleaned, each with a usable id or a stand-in (the order is kept)."""
        return [self._admit(record) for record in records]

    def note(self, record_id: str) -> Note:
        return self._notes.get(record_id, CLEAN)

    def _admit(self, record: dict) -> dict:
        problem = id_problem(record.get("id"))
        cleaned: list[str] = []
        admitted = dict(record)
        for key, variable in self._variables.items():
            for name in (key, f"{key}_raw"):
                if name in record and has_unencodable(record[name]):
                    admitted[name] = without_unencodable(record[name])
                    if variable not in cleaned:
                        cleaned.append(variable)
        if problem:
            admitted["id"] = stand_in_id(record)
        if problem or cleaned:
            self._notes[admitted["id"]] = Note(problem, tuple(cleaned))
        return admitted

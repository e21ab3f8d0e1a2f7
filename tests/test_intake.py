"""intake.py (records as Knack hands them -> records the run can read) and the order key of what it passes on."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config import CONFIG
from knack311.admission import order_key
from knack311.intake import CLEAN, STAND_IN_PREFIX, Intake, Note, id_problem, stand_in_id, without_unencodable

FIELDS = CONFIG["data-tracker"]["fields"]
ATD, EMI, DETAILS = FIELDS["atd_activity_id"], FIELDS["emi_id"], FIELDS["activity_details"]
ANY_CHARACTER = st.one_of(st.characters(), st.characters(categories=["Cs"]))


def knack_record(record_id: object = "rec1", **values) -> dict:
    record = {"id": record_id, ATD: 7, f"{ATD}_raw": 7, EMI: "EMI-7", f"{EMI}_raw": "EMI-7"}
    record.update(values)
    return record


@settings(max_examples=200, deadline=None, database=None)
@given(st.recursive(st.text(ANY_CHARACTER) | st.integers() | st.none(),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(ANY_CHARACTER), inner,
                                                                                 max_size=3)))
def test_any_value_comes_out_as_something_utf8_and_json_can_write(value):
    cleaned = without_unencodable(value)
    json.dumps(cleaned, ensure_ascii=False).encode("utf-8")  # would raise on a surrogate left anywhere


def test_a_clean_record_passes_unchanged_and_leaves_no_note():
    intake = Intake(FIELDS)
    record = knack_record(**{DETAILS: "café 🚦", f"{DETAILS}_raw": "café 🚦"})
    assert intake.admit([record]) == [record]
    assert intake.note("rec1") is CLEAN


def test_unencodable_text_is_removed_from_the_fields_the_run_reads_and_noted_by_variable():
    intake = Intake(FIELDS)
    record = knack_record(**{EMI: "EMI-\ud83d7", f"{EMI}_raw": "EMI-\ud83d7",
                             f"{DETAILS}_raw": ["a\udc00", {"b": "\ud83d"}], "field_9999": "unread \ud83d"})

    [admitted] = intake.admit([record])

    assert (admitted[EMI], admitted[f"{EMI}_raw"], admitted[f"{DETAILS}_raw"]) == ("EMI-7", "EMI-7", ["a", {"b": ""}])
    assert admitted["field_9999"] == record["field_9999"]  # not a configured field: nothing reads it
    assert intake.note("rec1") == Note(cleaned=("emi_id", "activity_details"))
    assert record[EMI] == "EMI-\ud83d7"  # the page as Knack sent it is left alone


@pytest.mark.parametrize("record_id, problem", [
    (123, "an id that is a number (123), not a text"),
    (None, "an id that is null (null), not a text"),
    (["rec1", "rec2"], 'an id that is a list (["rec1", "rec2"]), not a text'),
    ("", "an empty id"),
    ("  ", "an empty id"),
    ("rec\ud83d", "characters no encoding can write"),
    ("..", "which no URL can address"),
], ids=["number", "null", "list", "empty", "blank", "surrogate", "dot-dot"])
def test_an_unusable_id_gets_a_stand_in_and_a_note_saying_why(record_id, problem):
    intake = Intake(FIELDS)

    [admitted] = intake.admit([knack_record(record_id)])

    assert admitted["id"].startswith(STAND_IN_PREFIX)
    assert problem in intake.note(admitted["id"]).unusable_id
    assert id_problem(admitted["id"]) == ""  # the stand-in itself is a usable text for the listing and the log


def test_a_stand_in_is_the_same_on_every_read_and_differs_between_records():
    first, second = knack_record(None), knack_record(None, **{f"{ATD}_raw": 8})
    assert stand_in_id(first) == stand_in_id(json.loads(json.dumps(first)))  # page 1 read again
    assert stand_in_id(first) != stand_in_id(second)


@pytest.mark.parametrize("raw", [float("nan"), float("inf"), float("-inf"), "NaN", "Infinity", "abc", "", None,
                                 True, "1e400"])
def test_an_activity_id_that_is_not_a_finite_number_sorts_before_every_number(raw):
    unplaced = order_key({f"{ATD}_raw": raw}, ATD)
    placed = [order_key({f"{ATD}_raw": value}, ATD) for value in (-5, 0, 2001, "2003", 1e300)]
    assert unplaced[0] == -1 and all(unplaced < key for key in placed)
    assert sorted(placed) == placed and {key[0] for key in placed} == {0}
    # keys of unplaced records compare with each other too (the scheduler's heaps need a total order)
    sorted([unplaced, order_key({f"{ATD}_raw": "zzz"}, ATD), *placed])

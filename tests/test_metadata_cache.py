"""The app metadata cache in STATE_DIR: fresh for a day, refetched when the configuration is not in it, never an
error when the file is bad."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from config import CONFIG
from knack311.metadata_cache import MAX_AGE, MetadataCache, load_or_fetch, missing_from, unfit_types
from simulators.activities import app_metadata

APP = CONFIG["data-tracker"]
APP_ID = "6a1b2c3d4e5f60718293a4b5"
FIELDS = [key for variable, key in APP["fields"].items() if variable != "id"]
FIXTURE = Path(__file__).parent / "fixtures" / "knack" / "app_metadata.json"


class Clock:
    def __init__(self, now: float = 1_790_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def cache(tmp_path, clock):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    return MetadataCache(state, "data-tracker", APP_ID, clock=clock)


def metadata() -> dict:
    return app_metadata("data-tracker", APP, app_id=APP_ID)


def fits(data: dict) -> bool:
    return not missing_from(data, view=APP["view"], obj=APP["obj"], fields=FIELDS)


def test_a_stored_copy_is_loaded_while_younger_than_a_day(cache, clock):
    assert cache.load() is None
    assert cache.store(metadata())

    clock.now += MAX_AGE - 1
    assert cache.load() == metadata()
    clock.now += 1
    assert cache.load() is None  # a day old: refetch
    assert cache.load(max_age=2 * MAX_AGE) == metadata()


def test_the_file_is_owner_only_and_named_for_the_app(cache):
    cache.store(metadata())

    assert cache.path.name == "data-tracker.metadata.json"
    assert stat.S_IMODE(cache.path.stat().st_mode) == 0o600
    assert [p.name for p in cache.path.parent.iterdir()] == [cache.path.name]  # no temporary file left


def test_a_store_replaces_the_file_whole(cache, clock):
    cache.store({"application": {"name": "old"}})
    inode = cache.path.stat().st_ino
    clock.now += 10

    cache.store(metadata())

    assert cache.path.stat().st_ino != inode  # a new file renamed over the old one, never rewritten in place
    assert cache.load() == metadata()


@pytest.mark.parametrize("content", [
    b"", b"{not json", b"\xff\xfe garbage", b"[]", b'{"format": 1}', b'"just a string"',
    b'{"format": 1, "app_id": "6a1b2c3d4e5f60718293a4b5", "fetched_at": "yesterday", "metadata": {}}',
    b'{"format": 1, "app_id": "6a1b2c3d4e5f60718293a4b5", "fetched_at": 1790000000, "metadata": []}',
    b'{"format": 99, "app_id": "6a1b2c3d4e5f60718293a4b5", "fetched_at": 1790000000, "metadata": {}}',
], ids=["empty", "truncated", "not-utf8", "list", "no-fields", "string", "bad-time", "bad-metadata", "new-format"])
def test_a_corrupt_file_is_ignored_and_replaced_by_a_fetch(cache, content):
    cache.path.write_bytes(content)
    fetched = []

    data, from_cache = load_or_fetch(cache, lambda: fetched.append(1) or metadata(), fits)

    assert (data, from_cache, fetched) == (metadata(), False, [1])
    assert cache.load() == metadata()


def test_a_directory_in_the_files_place_is_no_error(cache):
    cache.path.mkdir()

    data, from_cache = load_or_fetch(cache, metadata, fits)

    assert (data, from_cache) == (metadata(), False)
    assert not cache.store(metadata())


def test_a_copy_for_another_app_id_or_from_the_future_is_not_used(cache, tmp_path, clock):
    cache.store(metadata())
    other_app = MetadataCache(cache.path.parent, "data-tracker", "0" * 24, clock=clock)
    assert other_app.load() is None  # KNACK_APP_ID changed: another app's views and fields

    clock.now -= 60  # the clock went back after the copy was written
    assert cache.load() is None


def test_a_warm_cache_saves_the_fetch(cache):
    cache.store(metadata())

    data, from_cache = load_or_fetch(cache, lambda: pytest.fail("fetched although the cache is fresh"), fits)

    assert (data, from_cache) == (metadata(), True)


def test_a_configured_field_missing_from_the_cached_copy_fetches_at_once(cache, clock):
    old = metadata()
    [activity_object] = [o for o in old["application"]["objects"] if o["key"] == APP["obj"]]
    activity_object["fields"] = [f for f in activity_object["fields"] if f["key"] != APP["fields"]["esb_status"]]
    cache.store(old)
    clock.now += 60  # fresh by age

    data, from_cache = load_or_fetch(cache, metadata, fits)

    assert (data, from_cache) == (metadata(), False)
    assert cache.load() == metadata()  # the new copy replaced the old one


def test_a_fetch_that_still_does_not_fit_is_returned_for_the_caller_to_report(cache):
    edited = metadata()
    edited["application"]["scenes"] = []

    data, from_cache = load_or_fetch(cache, lambda: edited, fits)

    assert (data, from_cache) == (edited, False)
    assert missing_from(data, view=APP["view"], obj=APP["obj"], fields=FIELDS) == [APP["view"]]


def test_missing_from_names_what_is_not_in_the_metadata():
    data = metadata()
    assert missing_from(data, view=APP["view"], obj=APP["obj"], fields=FIELDS) == []
    assert missing_from(data, view="view_0", obj=APP["obj"], fields=["field_0", *FIELDS]) == ["view_0", "field_0"]
    assert missing_from(data, view=APP["view"], obj="object_0", fields=FIELDS) == ["object_0"]
    assert missing_from({"nonsense": 1}, view="v", obj="o", fields=[]) == ["application"]


def test_the_recorded_real_metadata_round_trips(cache):
    real = json.loads(FIXTURE.read_text(encoding="utf-8"))

    assert cache.store(real)
    assert cache.load() == real
    assert missing_from(real, view="view_6", obj="object_3", fields=["field_13", "field_128"]) == []


def test_an_unwritable_state_dir_is_no_error(cache):
    os.chmod(cache.path.parent, 0o500)
    try:
        if os.access(cache.path.parent, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        assert not cache.store(metadata())
        assert cache.load() is None
    finally:
        os.chmod(cache.path.parent, 0o700)


def typed(field_types: dict[str, str]) -> dict:
    """The metadata with some configured fields (template variable -> Knack type) typed otherwise."""
    data = metadata()
    [activity_object] = [o for o in data["application"]["objects"] if o["key"] == APP["obj"]]
    for field in activity_object["fields"]:
        for variable, knack_type in field_types.items():
            if field["key"] == APP["fields"][variable]:
                field["type"] = knack_type
    return data


def test_unfit_types_names_each_configured_field_of_a_type_that_cannot_fill_its_element():
    assert unfit_types(metadata(), obj=APP["obj"], fields=APP["fields"]) == []
    poisoned = typed({"activity_datetime": "short_text", "esb_status": "rich_text"})
    assert sorted(unfit_types(poisoned, obj=APP["obj"], fields=APP["fields"])) == sorted([
        f"{APP['fields']['esb_status']} is a rich_text field, expected multiple_choice "
        "(config.py fields['esb_status'])",
        f"{APP['fields']['activity_datetime']} is a short_text field, expected date_time "
        "(config.py fields['activity_datetime'])",
    ])
    assert unfit_types({"nonsense": 1}, obj=APP["obj"], fields=APP["fields"]) == []  # missing_from's to report


def test_a_cached_copy_with_a_wrongly_typed_field_is_refetched_at_once(cache, clock):
    cache.store(typed({"activity_datetime": "short_text"}))
    clock.now += 60  # fresh by age

    def fits_with_types(data: dict) -> bool:
        return fits(data) and not unfit_types(data, obj=APP["obj"], fields=APP["fields"])

    data, from_cache = load_or_fetch(cache, metadata, fits_with_types)

    assert (data, from_cache) == (metadata(), False)
    assert cache.load() == metadata()

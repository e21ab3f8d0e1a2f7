"""The delivery journal and the run lock, on real files in a temporary directory."""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from knack311.errors import ConfigError
from knack311.journal import DELIVERED, DONE, SENDING, Journal, RunLock, prepare_state_dir

DAY = 24 * 3600


@pytest.fixture
def journal_path(tmp_path) -> Path:
    return tmp_path / "data-tracker.sqlite"


@pytest.fixture
def journal(journal_path):
    j = Journal(journal_path)
    yield j
    j.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def set_updated(path: Path, record_id: str, updated: float) -> None:
    db = sqlite3.connect(str(path))
    with db:
        db.execute("UPDATE deliveries SET updated = ? WHERE record_id = ?", (updated, record_id))
    db.close()


# --- states --------------------------------------------------------------------------------------------------

def test_unknown_record_is_none(journal):
    assert journal.get("nope") is None


def test_sending_delivered_done(journal):
    before = time.time()
    journal.set("rec1", SENDING, emi="EMI-42", message_hash="abc123")
    entry = journal.get("rec1")
    assert (entry.record_id, entry.state, entry.emi, entry.message_hash) == ("rec1", "sending", "EMI-42", "abc123")
    assert entry.updated >= before - 1

    journal.set("rec1", DELIVERED)
    entry = journal.get("rec1")
    # a state change without emi/hash keeps the ones recorded at sending time
    assert (entry.state, entry.emi, entry.message_hash) == ("delivered", "EMI-42", "abc123")

    journal.set("rec1", DONE)
    assert journal.get("rec1").state == "done"
    assert journal.counts() == {"done": 1}


def test_a_new_message_hash_replaces_the_old(journal):
    journal.set("rec1", SENDING, emi="EMI-42", message_hash="old")
    journal.set("rec1", SENDING, emi="EMI-43", message_hash="new")
    entry = journal.get("rec1")
    assert (entry.emi, entry.message_hash) == ("EMI-43", "new")


def test_entries_survive_reopening(journal_path):
    j = Journal(journal_path)
    j.set("rec1", DELIVERED, emi="EMI-1", message_hash="h1")
    j.set("rec2", SENDING, emi="EMI-2", message_hash="h2")
    j.close()
    j = Journal(journal_path)
    try:
        assert j.get("rec1").state == "delivered"
        assert j.get("rec2").message_hash == "h2"
        assert j.counts() == {"delivered": 1, "sending": 1}
    finally:
        j.close()


def test_set_is_visible_to_another_connection_at_once(journal, journal_path):
    # each set is committed when it returns: another process would see it
    journal.set("rec1", DELIVERED, emi="EMI-1", message_hash="h1")
    db = sqlite3.connect(str(journal_path))
    try:
        assert db.execute("SELECT state FROM deliveries WHERE record_id = 'rec1'").fetchone() == ("delivered",)
    finally:
        db.close()


@pytest.mark.parametrize("state, kept", [(SENDING, False), (DELIVERED, True), (DONE, True)])
def test_forget_only_removes_sending(journal, state, kept):
    journal.set("rec1", state, emi="EMI-1", message_hash="h")
    journal.forget("rec1")
    entry = journal.get("rec1")
    assert (entry is not None) == kept
    if kept:
        assert entry.state == state


def test_forget_leaves_other_records(journal):
    journal.set("rec1", SENDING, emi="E1", message_hash="h1")
    journal.set("rec2", SENDING, emi="E2", message_hash="h2")
    journal.forget("rec1")
    assert journal.get("rec1") is None
    assert journal.get("rec2").state == "sending"


# --- pruning -----------------------------------------------------------------------------------------------

def test_old_done_entries_are_pruned_on_open(journal_path):
    j = Journal(journal_path)
    for rid, state in [("old_done", DONE), ("recent_done", DONE), ("old_sending", SENDING),
                       ("old_delivered", DELIVERED)]:
        j.set(rid, state, emi=rid, message_hash="h")
    j.close()
    now = time.time()
    set_updated(journal_path, "old_done", now - 31 * DAY)
    set_updated(journal_path, "recent_done", now - 29 * DAY)
    set_updated(journal_path, "old_sending", now - 400 * DAY)     # unknown outcome: never forgotten by age
    set_updated(journal_path, "old_delivered", now - 400 * DAY)   # Knack not yet updated: never forgotten by age

    j = Journal(journal_path)
    try:
        assert j.get("old_done") is None
        assert j.get("recent_done").state == "done"
        assert j.get("old_sending").state == "sending"
        assert j.get("old_delivered").state == "delivered"
    finally:
        j.close()


# --- the file ----------------------------------------------------------------------------------------------

def test_journal_file_is_owner_only(journal, journal_path):
    journal.set("rec1", SENDING, emi="E", message_hash="h")
    assert mode(journal_path) == 0o600
    for suffix in ("-wal", "-shm"):
        side = Path(f"{journal_path}{suffix}")
        if side.exists():
            assert mode(side) == 0o600, suffix


def test_existing_world_readable_journal_is_made_owner_only(journal_path):
    journal_path.touch()
    journal_path.chmod(0o644)
    j = Journal(journal_path)
    try:
        assert mode(journal_path) == 0o600
    finally:
        j.close()


def test_wal_mode(journal, journal_path):
    # WAL is a property of the database file: a connection of our own sees it
    db = sqlite3.connect(str(journal_path))
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    finally:
        db.close()


def test_journal_path_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError) as err:
        Journal(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_journal_path_under_a_regular_file(tmp_path):
    # tests run as root, so permissions would not stop a write: a parent that is a file does
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    path = blocker / "data-tracker.sqlite"
    with pytest.raises(ConfigError) as err:
        Journal(path)
    assert str(path) in str(err.value)


def test_journal_in_a_missing_directory(tmp_path):
    with pytest.raises(ConfigError):
        Journal(tmp_path / "missing" / "data-tracker.sqlite")


def test_journal_on_a_non_database_file(journal_path):
    journal_path.write_bytes(b"this is not an SQLite database, just some text " * 100)
    with pytest.raises(ConfigError):
        Journal(journal_path)


# --- run lock ----------------------------------------------------------------------------------------------

def test_run_lock_is_exclusive(tmp_path):
    path = tmp_path / "data-tracker.lock"
    first, second = RunLock(path), RunLock(path)
    try:
        assert first.acquire() is True
        # flock belongs to the open file description, so a second open in this process is refused
        assert second.acquire() is False
        first.release()
        assert second.acquire() is True
        assert first.acquire() is False
    finally:
        first.release()
        second.release()


def test_run_lock_file_is_owner_only_and_names_the_process(tmp_path):
    path = tmp_path / "data-tracker.lock"
    path.write_text("stale 12345678\n")
    path.chmod(0o644)
    lock = RunLock(path)
    try:
        assert lock.acquire() is True
        assert mode(path) == 0o600
        assert path.read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()


def test_release_without_acquire_is_harmless(tmp_path):
    lock = RunLock(tmp_path / "x.lock")
    lock.release()
    assert lock.acquire() is True
    lock.release()
    lock.release()


def test_run_lock_in_an_impossible_place(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(ConfigError) as err:
        RunLock(blocker / "app.lock").acquire()
    assert "app.lock" in str(err.value)


# --- state dir ---------------------------------------------------------------------------------------------

def test_prepare_state_dir_creates_it(tmp_path):
    state = tmp_path / "a" / "b" / "state"
    prepare_state_dir(state)
    assert state.is_dir()
    assert mode(state) & 0o077 == 0   # owner-only
    prepare_state_dir(state)          # and again: already there is fine
    assert state.is_dir()


def test_prepare_state_dir_on_a_file(tmp_path):
    blocker = tmp_path / "state"
    blocker.write_text("x")
    with pytest.raises(ConfigError) as err:
        prepare_state_dir(blocker)
    assert str(blocker) in str(err.value)


def test_prepare_state_dir_under_a_file(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(ConfigError):
        prepare_state_dir(blocker / "state")


def test_delivered_entries_of_records_no_longer_ready_are_closed(journal):
    journal.set("still-ready", DELIVERED, "EMI-1", "h1")
    journal.set("now-sent", DELIVERED, "EMI-2", "h2")
    journal.set("in-flight", SENDING, "EMI-3", "h3")
    journal.set("finished", DONE, "EMI-4", "h4")

    assert journal.close_delivered_except({"still-ready", "in-flight"}) == 1

    assert journal.get("now-sent").state == DONE          # Knack already says SENT: a resend will be honoured
    assert journal.get("still-ready").state == DELIVERED  # its status update is still to do
    assert journal.get("in-flight").state == SENDING      # outcome unknown: left alone
    assert journal.get("finished").state == DONE
    assert journal.get("now-sent").emi == "EMI-2"


def test_a_journal_that_stops_accepting_writes_is_an_outage_not_a_crash(journal_path):
    from knack311.errors import OutageError

    journal = Journal(journal_path)
    journal._db.close()  # stands for the disk or file going away mid-run
    with pytest.raises(OutageError, match="cannot be written"):
        journal.set("rec-1", SENDING, "EMI-1", "h")
    with pytest.raises(OutageError):
        journal.get("rec-1")

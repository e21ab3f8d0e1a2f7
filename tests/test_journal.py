"""The delivery journal and the run lock, on real files in a temporary directory."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest

from knack311.errors import ConfigError
from knack311.journal import (
    DELIVERED,
    DONE,
    KEEP_RUNS,
    LAYOUT,
    LAYOUT_VERSION,
    SENDING,
    Entry,
    Journal,
    RunLock,
    message_hash,
    prepare_state_dir,
    read_report,
)

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


# --- shared by the delivery workers ------------------------------------------------------------------------------

def test_workers_share_one_journal_and_every_state_lands(journal, journal_path):
    """What the run's delivery workers do at once: each record through sending -> delivered -> done, reading its
    entry back between steps, while the main thread records and clears failures and reads the history."""
    records_per_worker, workers = 40, 8
    errors: list[BaseException] = []
    start = threading.Barrier(workers + 1)

    def worker(n: int) -> None:
        try:
            start.wait()
            for i in range(records_per_worker):
                record_id = f"w{n}-r{i}"
                journal.set(record_id, SENDING, f"EMI-{n}-{i}", f"hash-{n}-{i}")
                assert journal.get(record_id).state == SENDING
                journal.set(record_id, DELIVERED)
                journal.set(record_id, DONE)
                assert journal.get(record_id) == Entry(record_id, DONE, f"EMI-{n}-{i}", f"hash-{n}-{i}",
                                                       journal.get(record_id).updated)
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    run_id = journal.start_run()
    start.wait()
    for i in range(records_per_worker):
        failure = journal.record_failure(f"bad{i}", "SR", "unreadable", run_id)
        assert failure.record_id == f"bad{i}" and failure.runs == 1
        if i % 2:
            journal.clear_failure(f"bad{i}")
        journal.counts()
    for thread in threads:
        thread.join(30)

    assert errors == []
    assert journal.failure == ""
    assert journal.counts() == {DONE: workers * records_per_worker}
    assert {f.record_id for f in journal.failures()} == {f"bad{i}" for i in range(0, records_per_worker, 2)}
    journal.close()
    db = sqlite3.connect(str(journal_path))  # committed: another connection sees every state
    try:
        assert db.execute("SELECT COUNT(*) FROM deliveries WHERE state = 'done'").fetchone() == (
            workers * records_per_worker,)
    finally:
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


def test_unfinished_entries_of_records_no_longer_ready_are_listed_for_confirmation(journal):
    journal.set("still-ready", DELIVERED, "EMI-1", "h1")
    journal.set("not-listed", DELIVERED, "EMI-2", "h2")
    journal.set("in-doubt", SENDING, "EMI-3", "h3")
    journal.set("in-flight", SENDING, "EMI-5", "h5")
    journal.set("finished", DONE, "EMI-4", "h4")

    stale = journal.unfinished_except({"still-ready", "in-flight"})

    # only listed, never closed here: the run confirms each with Knack first
    assert [(e.record_id, e.state) for e in stale] == [("not-listed", DELIVERED), ("in-doubt", SENDING)]
    assert journal.get("not-listed").state == DELIVERED
    assert journal.get("finished").state == DONE


def test_a_journal_that_stops_accepting_writes_is_an_outage_not_a_crash(journal_path):
    from knack311.errors import OutageError

    journal = Journal(journal_path)
    journal._db.close()  # stands for the disk or file going away mid-run
    with pytest.raises(OutageError, match="cannot be written"):
        journal.set("rec-1", SENDING, "EMI-1", "h")
    with pytest.raises(OutageError):
        journal.get("rec-1")


# --- the note of a `sending` entry ----------------------------------------------------------------------------

def test_a_note_says_why_an_entry_is_in_doubt_and_a_state_change_clears_it(journal):
    journal.set("rec1", SENDING, emi="EMI-1", message_hash="h1")
    journal.set("rec1", SENDING, note="no answer from the ESB (timed out)")
    entry = journal.get("rec1")
    assert (entry.state, entry.message_hash, entry.note) == (SENDING, "h1", "no answer from the ESB (timed out)")
    journal.set("rec1", DELIVERED)
    assert journal.get("rec1").note == ""


# --- the table layout: versioned, the shipped one upgraded, any other refused ----------------------------------

V0_DELIVERIES = """CREATE TABLE deliveries (
    record_id TEXT PRIMARY KEY, state TEXT NOT NULL, emi TEXT NOT NULL,
    message_hash TEXT NOT NULL, updated REAL NOT NULL)"""


def make_db(path: Path, *statements: str, version: int = 0) -> None:
    db = sqlite3.connect(str(path))
    with db:
        for statement in statements:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {version}")
    db.close()


def layout(path: Path) -> tuple[int, dict[str, list[str]]]:
    db = sqlite3.connect(str(path))
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = [n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return version, {t: [row[1] for row in db.execute(f"PRAGMA table_info({t})")] for t in tables}
    finally:
        db.close()


def test_a_new_journal_gets_the_current_layout(journal, journal_path):
    version, tables = layout(journal_path)
    assert version == LAYOUT_VERSION == 2
    assert tables == {name: list(columns) for name, columns in LAYOUT.items()}


def test_the_shipped_layout_is_upgraded_in_place_keeping_every_entry(journal_path):
    make_db(journal_path, V0_DELIVERIES,
            "INSERT INTO deliveries VALUES ('rec1', 'delivered', 'EMI-1', 'old-formula-hash', 1700000000.0)",
            "INSERT INTO deliveries VALUES ('rec2', 'sending', 'EMI-2', 'old-formula-hash-2', 1700000001.0)",
            "INSERT INTO deliveries VALUES ('rec3', 'done', 'EMI-3', 'h3', 1e12)")

    j = Journal(journal_path)
    try:
        assert j.get("rec1") == Entry("rec1", DELIVERED, "EMI-1", "", 1700000000.0, "")
        assert j.get("rec2").state == SENDING and j.get("rec2").note == "" and j.get("rec2").posts == 1
        assert j.get("rec3").state == DONE
        j.record_failure("rec4", "20-1", "why", run_id=j.start_run())  # the new tables work
    finally:
        j.close()
    version, tables = layout(journal_path)
    assert version == 2
    assert tables == {name: list(columns) for name, columns in LAYOUT.items()}
    Journal(journal_path).close()  # and opens again as the current layout


def test_layout_1_is_upgraded_in_place_an_entry_in_doubt_counting_one_post(journal_path):
    j = Journal(journal_path)
    j.set("rec1", DELIVERED, "EMI-1", "h1")
    j.set("rec2", SENDING, "EMI-2", "h2", note="timed out")
    j.record_failure("rec3", "20-1", "why", run_id=j.start_run())
    j.close()
    db = sqlite3.connect(str(journal_path))  # back to layout 1: as the previous version left it
    with db:
        db.execute("ALTER TABLE deliveries DROP COLUMN checked")
        db.execute("ALTER TABLE deliveries DROP COLUMN posts")
        db.execute("PRAGMA user_version = 1")
    db.close()

    j = Journal(journal_path)
    try:
        assert (j.get("rec1").state, j.get("rec1").posts, j.get("rec1").checked) == (DELIVERED, 0, 0.0)
        assert (j.get("rec2").state, j.get("rec2").note, j.get("rec2").posts) == (SENDING, "timed out", 1)
        assert [f.record_id for f in j.failures()] == ["rec3"]
    finally:
        j.close()
    assert layout(journal_path) == (2, {name: list(columns) for name, columns in LAYOUT.items()})


@pytest.mark.parametrize("statements, version, named", [
    ([V0_DELIVERIES.replace("updated REAL NOT NULL", "updated REAL NOT NULL, attempts INTEGER")], 0,
     "extra column attempts"),
    ([V0_DELIVERIES.replace(", emi TEXT NOT NULL", "")], 0, "missing column emi"),
    (["CREATE TABLE outbox (id TEXT)"], 0, "unknown table outbox"),
    ([V0_DELIVERIES], 1, "no table failures"),
    ([V0_DELIVERIES], 7, "layout version 7"),
], ids=["v0-extra-column", "v0-missing-column", "v0-unknown-table", "v1-missing-tables", "newer-version"])
def test_another_layout_is_refused_at_open_and_left_untouched(journal_path, statements, version, named):
    make_db(journal_path, *statements, version=version)
    before = layout(journal_path)

    with pytest.raises(ConfigError) as err:
        Journal(journal_path)

    assert str(journal_path) in str(err.value)
    assert named in str(err.value)
    assert layout(journal_path) == before


def test_a_current_layout_with_an_extra_column_is_refused(journal_path):
    Journal(journal_path).close()
    db = sqlite3.connect(str(journal_path))
    db.execute("ALTER TABLE failures ADD COLUMN owner TEXT")
    db.close()
    with pytest.raises(ConfigError, match="extra column owner"):
        Journal(journal_path)


# --- failures: since when, in how many runs -------------------------------------------------------------------

def test_a_failure_counts_each_run_once_and_keeps_its_first_time(journal):
    first_run = journal.start_run()
    one = journal.record_failure("rec1", "20-1", "activity 'X' has no 311 code", first_run)
    again_same_run = journal.record_failure("rec1", "20-1", "still no code", first_run)
    assert (one.runs, again_same_run.runs) == (1, 1)

    second = journal.record_failure("rec1", "20-1", "ESB rejected it", journal.start_run())
    assert second.runs == 2
    assert second.first_failed == one.first_failed
    assert second.last_reason == "ESB rejected it"
    assert [f.record_id for f in journal.failures()] == ["rec1"]

    journal.clear_failure("rec1")
    assert journal.failures() == []


def test_failures_of_records_no_longer_ready_are_forgotten(journal):
    run_id = journal.start_run()
    for record_id in ("still-failing", "fixed-by-staff"):
        journal.record_failure(record_id, "", "why", run_id)
    journal.clear_failures_except({"still-failing", "other"})
    assert [f.record_id for f in journal.failures()] == ["still-failing"]


# --- runs ------------------------------------------------------------------------------------------------------

def test_runs_are_kept_with_their_counts_and_only_the_last_100(journal_path):
    j = Journal(journal_path)
    try:
        ids = [j.start_run() for _ in range(KEEP_RUNS + 5)]
        j.finish_run(ids[-1], {"fetched": 3, "sent": 2, "failed": 1}, 1, "received SIGTERM")
    finally:
        j.close()
    found = read_report(journal_path, last_runs=1000)
    assert len(found.runs) == KEEP_RUNS
    newest = found.runs[0]
    assert newest.run_id == ids[-1]
    assert newest.counts["fetched"] == 3 and newest.counts["sent"] == 2 and newest.counts["failed"] == 1
    assert (newest.exit_code, newest.stop_reason) == (1, "received SIGTERM")
    assert found.runs[1].ended is None  # a run that never finished (killed) shows as such


def test_runs_older_than_30_days_are_dropped(journal_path):
    j = Journal(journal_path)
    old = j.start_run()
    j.close()
    db = sqlite3.connect(str(journal_path))
    with db:
        db.execute("UPDATE runs SET started = ? WHERE run_id = ?", (time.time() - 31 * DAY, old))
    db.close()
    j = Journal(journal_path)
    try:
        new = j.start_run()
    finally:
        j.close()
    assert [r.run_id for r in read_report(journal_path).runs] == [new]


# --- reading for --report --------------------------------------------------------------------------------------

def test_read_report_without_a_journal_is_none(tmp_path):
    assert read_report(tmp_path / "none.sqlite3") is None
    assert not (tmp_path / "none.sqlite3").exists()


def test_read_report_changes_nothing_and_sorts_the_entries(journal_path):
    j = Journal(journal_path)
    j.set("d1", DELIVERED, "E1", "h")
    j.set("s1", SENDING, "E2", "h", note="no answer from the ESB")
    j.set("x1", DONE, "E3", "h")
    j.close()
    before = journal_path.read_bytes()

    found = read_report(journal_path)

    assert [e.record_id for e in found.delivered] == ["d1"]
    assert [(e.record_id, e.note) for e in found.sending] == [("s1", "no answer from the ESB")]
    assert journal_path.read_bytes() == before


def test_read_report_of_the_shipped_layout_and_of_an_unknown_one(journal_path):
    make_db(journal_path, V0_DELIVERIES,
            "INSERT INTO deliveries VALUES ('rec1', 'delivered', 'EMI-1', 'h', 1700000000.0)")
    found = read_report(journal_path)
    assert found.layout_version == 0 and [e.record_id for e in found.delivered] == ["rec1"]
    assert layout(journal_path)[0] == 0  # reading does not upgrade

    make_db(journal_path, "ALTER TABLE deliveries ADD COLUMN extra TEXT", version=0)
    with pytest.raises(ConfigError, match="extra column extra"):
        read_report(journal_path)


# --- what makes two messages the same --------------------------------------------------------------------------

def _message(details: str, stamp: str) -> bytes:
    # written out rather than rendered, so the test does not depend on the template's variable names
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"
    xmlns:acc="http://www.austintexas.gov/AcceptKnack/"><soapenv:Header/><soapenv:Body><acc:submitKnack>
  <header><emi>EMI-1</emi><timestamp>{stamp}</timestamp><source>KNACK</source></header>
  <data><csr><id>rec1</id><sr_number>20-1</sr_number><activity_details>{details}</activity_details></csr></data>
</acc:submitKnack></soapenv:Body></soapenv:Envelope>""".encode()


def test_message_hash_ignores_the_timestamp_but_not_the_values():
    a = message_hash(_message("bulb out", "2024-07-04T10:00:00-05:00"))
    assert a == message_hash(_message("bulb out", "2025-01-01T00:00:00-06:00"))
    assert a != message_hash(_message("bulb out, pole leaning", "2024-07-04T10:00:00-05:00"))
    assert a != message_hash(_message("bulb out ", "2024-07-04T10:00:00-05:00"))  # as typed, spaces count

"""The delivery journal (SQLite): what the ESB has, so that nothing is lost and nothing is sent twice.

A record's delivery goes `sending` (committed before the POST) -> `delivered` (the ESB accepted it) -> `done`
(Knack says SENT). After a crash the state says what the next run must do: `sending` -> the outcome is unknown,
send again with a "duplicate possible" warning; `delivered` -> only the Knack update is missing, set SENT
without resending (unless the record changed since: then the corrected message goes).

Besides the deliveries, the journal keeps what an operator needs to know later (`--report`): the records that
keep failing (since when, in how many runs, why) and the last runs (start, end, counts, exit code).

The run's delivery workers share one Journal: one connection, and a lock around every statement (and around the
statements that belong together), so each state change is committed before its worker's next network step.

The table layout is versioned with SQLite's `PRAGMA user_version`. A journal of the layout that first shipped
(version 0: `deliveries` without `note`) is upgraded in place; any other layout is refused when the journal is
opened, before Knack or the ESB is contacted, because reading it wrongly could resend or drop messages.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from lxml import etree

from .errors import ConfigError, OutageError

SENDING, DELIVERED, DONE = "sending", "delivered", "done"
# a message posted twice without an answer: never posted again until a person releases it (--resend)
PARKED = "parked"
KEEP_DONE_SECONDS = 30 * 24 * 3600   # done entries, old failures and old runs are kept this long
KEEP_RUNS = 100                      # ... and at most this many runs

LAYOUT_VERSION = 2
# table -> its columns, in order: what this version reads and writes
LAYOUT = {
    "deliveries": ("record_id", "state", "emi", "message_hash", "updated", "note", "posts", "checked"),
    "failures": ("record_id", "sr_number", "first_failed", "last_failed", "runs", "last_run", "last_reason"),
    "runs": ("run_id", "started", "ended", "fetched", "sent", "do_not_send", "failed", "held", "deferred",
             "not_attempted", "skipped", "exit_code", "stop_reason"),
}
# the layout that shipped first (user_version 0), upgraded in place
SHIPPED_LAYOUT = {"deliveries": ("record_id", "state", "emi", "message_hash", "updated")}
# layout 1: as LAYOUT without deliveries.posts and deliveries.checked, upgraded in place
LAYOUT_1 = {**LAYOUT, "deliveries": LAYOUT["deliveries"][:6]}
RUN_COUNTS = LAYOUT["runs"][3:11]

_CREATE = {
    "deliveries": """CREATE TABLE deliveries (
        record_id TEXT PRIMARY KEY, state TEXT NOT NULL, emi TEXT NOT NULL,
        message_hash TEXT NOT NULL, updated REAL NOT NULL, note TEXT NOT NULL DEFAULT '',
        posts INTEGER NOT NULL DEFAULT 0, checked REAL NOT NULL DEFAULT 0)""",
    "failures": """CREATE TABLE failures (
        record_id TEXT PRIMARY KEY, sr_number TEXT NOT NULL, first_failed REAL NOT NULL, last_failed REAL NOT NULL,
        runs INTEGER NOT NULL, last_run INTEGER NOT NULL, last_reason TEXT NOT NULL)""",
    "runs": """CREATE TABLE runs (
        run_id INTEGER PRIMARY KEY, started REAL NOT NULL, ended REAL,
        fetched INTEGER, sent INTEGER, do_not_send INTEGER, failed INTEGER, held INTEGER, deferred INTEGER,
        not_attempted INTEGER, skipped INTEGER, exit_code INTEGER, stop_reason TEXT)""",
}


@dataclass(frozen=True)
class Entry:
    record_id: str
    state: str
    emi: str
    message_hash: str  # "" when unknown (an entry from the first layout): taken as "the same message"
    updated: float
    note: str = ""     # why a `sending` entry is in doubt ("" = the run died while posting)
    posts: int = 0     # POSTs of this message that got no answer (sending) or the count that parked it
    checked: float = 0.0  # when a run last asked Knack for this record's status (0: never)


@dataclass(frozen=True)
class Failure:
    record_id: str
    sr_number: str
    first_failed: float
    last_failed: float
    runs: int
    last_reason: str


@dataclass(frozen=True)
class RunRow:
    run_id: int
    started: float
    ended: float | None      # None: the run never finished (killed) or is still going
    counts: dict[str, int]
    exit_code: int | None
    stop_reason: str


class JournalError(OutageError):
    """The journal stopped accepting writes mid-run (disk full, file removed): nothing more may be sent."""


def message_hash(body: bytes) -> str:
    """What makes two messages the same for the journal: the text of every value element, not the timestamp.

    The publication timestamp changes on every render, so it is left out; everything else 311 reads is in.
    Hashing the parsed values rather than the bytes or the template variables keeps the hash stable across a
    change of template layout or variable names, which must not turn every `delivered` entry into a resend.
    """
    root = etree.fromstring(body, etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False))
    values = [(etree.QName(element).localname, element.text or "")
              for element in root.iter(etree.Element)
              if len(element) == 0 and etree.QName(element).localname != "timestamp"]
    return hashlib.sha256(json.dumps(values, ensure_ascii=False).encode()).hexdigest()


class Journal:
    def __init__(self, path: Path):
        self.path = path
        self.failure = ""  # the first write failure of this run, once there was one
        self._db: sqlite3.Connection | None = None
        self._lock = threading.RLock()
        try:
            _owner_only_file(path)
            # used from the delivery workers' threads, one statement at a time under self._lock
            self._db = sqlite3.connect(str(path), isolation_level=None, timeout=10, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a commit survives a machine restart
            self._db.execute("BEGIN IMMEDIATE")  # the layout check and the upgrade see a journal no one else changes
            try:
                _check_or_upgrade(self._db, path)
                # prove it is writable now, before anything is sent
                old = time.time() - KEEP_DONE_SECONDS
                self._db.execute("DELETE FROM deliveries WHERE state = ? AND updated < ?", (DONE, old))
                self._db.execute("DELETE FROM failures WHERE last_failed < ?", (old,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            for suffix in ("-wal", "-shm"):
                side = Path(f"{path}{suffix}")
                if side.exists():
                    os.chmod(side, 0o600)
        except (sqlite3.Error, OSError) as exc:
            self.close()
            raise ConfigError(f"delivery journal {path} cannot be opened or written ({exc}); check STATE_DIR") from None
        except ConfigError:
            self.close()
            raise

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                try:
                    self._db.close()
                except sqlite3.Error:
                    pass  # a journal that failed mid-run may fail its last checkpoint too; the WAL keeps the commits
                self._db = None

    def _execute(self, sql: str, parameters=()) -> sqlite3.Cursor:
        """One statement (committed when it returns); the caller holds self._lock while it reads the cursor."""
        with self._lock:
            try:
                return self._db.execute(sql, parameters)
            except sqlite3.Error as exc:
                raise self._failed(exc) from None

    def _rows(self, sql: str, parameters=()) -> list[tuple]:
        with self._lock:
            cursor = self._execute(sql, parameters)
            try:
                return cursor.fetchall()
            except sqlite3.Error as exc:
                raise self._failed(exc) from None

    def _failed(self, exc: sqlite3.Error) -> JournalError:
        message = f"delivery journal {self.path} cannot be written ({exc}); stopping before anything else is sent"
        self.failure = self.failure or message
        return JournalError(message)

    # -- deliveries ------------------------------------------------------------------------------------------
    def get(self, record_id: str) -> Entry | None:
        rows = self._rows("SELECT record_id, state, emi, message_hash, updated, note, posts, checked FROM deliveries "
                          "WHERE record_id = ?", (record_id,))
        return Entry(*rows[0]) if rows else None

    def set(self, record_id: str, state: str, emi: str = "", message_hash: str = "", note: str = "") -> None:
        """Record a state change, committed (and synced) when this returns. A state change clears the note."""
        self._execute(
            """INSERT INTO deliveries (record_id, state, emi, message_hash, updated, note) VALUES (?, ?, ?, ?, ?, ?)
               ON CONFLICT(record_id) DO UPDATE SET state = excluded.state,
                 emi = CASE WHEN excluded.emi = '' THEN emi ELSE excluded.emi END,
                 message_hash = CASE WHEN excluded.message_hash = '' THEN message_hash ELSE excluded.message_hash END,
                 updated = excluded.updated, note = excluded.note""",
            (record_id, state, emi, message_hash, time.time(), note))

    def forget(self, record_id: str) -> None:
        """Drop a 'sending' entry whose POST certainly never reached the ESB (the connection was refused)."""
        self._execute("DELETE FROM deliveries WHERE record_id = ? AND state = ?", (record_id, SENDING))

    def unfinished_except(self, ready_ids: set[str]) -> list[Entry]:
        """`delivered` and `sending` entries whose record Knack no longer lists as ready to send, oldest first.

        Knack may have SENT for them (the answer to our update was lost, or the run died before writing `done`),
        but a record can also drop out of one listing without being SENT (a staff edit shifting the pages, a
        view answering without its filter): the caller confirms each with Knack before closing it.
        """
        rows = self._rows("SELECT record_id, state, emi, message_hash, updated, note, posts, checked FROM deliveries "
                          "WHERE state IN (?, ?) ORDER BY updated", (DELIVERED, SENDING))
        return [Entry(*row) for row in rows if row[0] not in ready_ids]

    def counts(self) -> dict[str, int]:
        return dict(self._rows("SELECT state, COUNT(*) FROM deliveries GROUP BY state"))

    # -- failures --------------------------------------------------------------------------------------------
    def record_failure(self, record_id: str, sr_number: str, reason: str, run_id: int) -> Failure:
        """Note that the record failed in this run (counted once per run); returns its history."""
        now = time.time()
        with self._lock:  # the history read back is this write's
            return self._record_failure(record_id, sr_number, reason, run_id, now)

    def _record_failure(self, record_id: str, sr_number: str, reason: str, run_id: int, now: float) -> Failure:
        self._execute(
            """INSERT INTO failures (record_id, sr_number, first_failed, last_failed, runs, last_run, last_reason)
               VALUES (?, ?, ?, ?, 1, ?, ?)
               ON CONFLICT(record_id) DO UPDATE SET sr_number = excluded.sr_number,
                 last_failed = excluded.last_failed, last_reason = excluded.last_reason,
                 runs = runs + (CASE WHEN last_run = excluded.last_run THEN 0 ELSE 1 END),
                 last_run = excluded.last_run""",
            (record_id, sr_number, now, now, run_id, reason))
        [row] = self._rows("SELECT record_id, sr_number, first_failed, last_failed, runs, last_reason "
                           "FROM failures WHERE record_id = ?", (record_id,))
        return Failure(*row)

    def clear_failure(self, record_id: str) -> None:
        self._execute("DELETE FROM failures WHERE record_id = ?", (record_id,))

    def clear_failures_except(self, ready_ids: set[str]) -> None:
        """Forget the failures of records no longer ready to send: someone dealt with them in Knack."""
        rows = self._rows("SELECT record_id FROM failures")
        for (record_id,) in rows:
            if record_id not in ready_ids:
                self.clear_failure(record_id)

    def failures(self) -> list[Failure]:
        return [Failure(*row) for row in self._rows(
            "SELECT record_id, sr_number, first_failed, last_failed, runs, last_reason FROM failures "
            "ORDER BY first_failed")]

    # -- runs ------------------------------------------------------------------------------------------------
    def start_run(self) -> int:
        """A row for this run, written at its start: a run that is killed leaves a row without an end."""
        with self._lock:  # lastrowid is this insert's
            run_id = int(self._execute("INSERT INTO runs (started) VALUES (?)", (time.time(),)).lastrowid)
        self._execute("DELETE FROM runs WHERE run_id <= ? OR started < ?",
                      (run_id - KEEP_RUNS, time.time() - KEEP_DONE_SECONDS))
        return run_id

    def finish_run(self, run_id: int, counts: dict[str, int], exit_code: int, stop_reason: str) -> None:
        values = [int(counts.get(name, 0)) for name in RUN_COUNTS]
        self._execute(f"UPDATE runs SET ended = ?, {', '.join(f'{n} = ?' for n in RUN_COUNTS)}, exit_code = ?, "
                      "stop_reason = ? WHERE run_id = ?", (time.time(), *values, exit_code, stop_reason, run_id))


def _tables(db: sqlite3.Connection) -> dict[str, tuple[str, ...]]:
    names = [name for (name,) in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    return {name: tuple(row[1] for row in db.execute(f"PRAGMA table_info({_quoted(name)})")) for name in names}


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _layout_problem(found: dict[str, tuple[str, ...]], wanted: dict[str, tuple[str, ...]]) -> str:
    problems = []
    for table in sorted(set(found) | set(wanted)):
        if table not in wanted:
            problems.append(f"unknown table {table}")
        elif table not in found:
            problems.append(f"no table {table}")
        elif found[table] != wanted[table]:
            missing = [c for c in wanted[table] if c not in found[table]]
            extra = [c for c in found[table] if c not in wanted[table]]
            detail = ", ".join([f"missing column {c}" for c in missing] + [f"extra column {c}" for c in extra])
            problems.append(f"table {table}: {detail or 'columns in another order'}")
    return "; ".join(problems)


def _unknown_layout(path: Path, detail: str) -> ConfigError:
    return ConfigError(f"delivery journal {path} has a table layout this version does not know ({detail}); "
                       "nothing was read or sent. Run the version that wrote it, or move the file away (a new "
                       "journal forgets unfinished deliveries)")


def _check_or_upgrade(db: sqlite3.Connection, path: Path) -> None:
    """Create a new journal's tables, upgrade the first layout in place, refuse any other (inside a transaction)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    found = _tables(db)
    if version == LAYOUT_VERSION:
        problem = _layout_problem(found, LAYOUT)
        if problem:
            raise _unknown_layout(path, problem)
        return
    if version == 1:
        problem = _layout_problem(found, LAYOUT_1)
        if problem:
            raise _unknown_layout(path, problem)
        _add_delivery_counters(db)
        db.execute(f"PRAGMA user_version = {LAYOUT_VERSION}")
        return
    if version != 0:
        raise _unknown_layout(path, f"layout version {version}; this version writes {LAYOUT_VERSION}")
    if found and found != SHIPPED_LAYOUT:
        raise _unknown_layout(path, _layout_problem(found, SHIPPED_LAYOUT))
    if found:
        db.execute("ALTER TABLE deliveries ADD COLUMN note TEXT NOT NULL DEFAULT ''")
        _add_delivery_counters(db)
        # The first layout hashed the template variables, whose names are changing: an old hash cannot be
        # compared with a new one. "" means "unknown: take it for the same message", which keeps today's
        # behaviour (set SENT without resending) instead of resending every delivered message after the upgrade.
        db.execute("UPDATE deliveries SET message_hash = ''")
    for table, create in _CREATE.items():
        if table not in found:
            db.execute(create)
    db.execute(f"PRAGMA user_version = {LAYOUT_VERSION}")


def _add_delivery_counters(db: sqlite3.Connection) -> None:
    # An entry in doubt from an older layout counts as posted once: one more unanswered POST parks it.
    db.execute("ALTER TABLE deliveries ADD COLUMN posts INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE deliveries ADD COLUMN checked REAL NOT NULL DEFAULT 0")
    db.execute("UPDATE deliveries SET posts = 1 WHERE state = ?", (SENDING,))


@dataclass(frozen=True)
class JournalReport:
    """What `--report` shows, read without changing anything."""

    layout_version: int
    delivered: list[Entry]   # the ESB has the message, Knack does not say SENT yet
    sending: list[Entry]     # the delivery is in doubt
    failures: list[Failure]
    runs: list[RunRow]       # newest first


def read_report(path: Path, last_runs: int = 10) -> JournalReport | None:
    """The journal's content, opened read-only (None when there is no journal). ConfigError on an unknown layout."""
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as exc:
        raise ConfigError(f"delivery journal {path} cannot be read ({exc})") from None
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        found = _tables(db)
        # what an older layout lacks is read as the upgrade will fill it in (the next run upgrades it)
        if version == 0 and found in ({}, SHIPPED_LAYOUT):
            extra = f"'', CASE WHEN state = '{SENDING}' THEN 1 ELSE 0 END, 0"  # no notes, failures or runs yet
        elif version == 1 and not _layout_problem(found, LAYOUT_1):
            extra = f"note, CASE WHEN state = '{SENDING}' THEN 1 ELSE 0 END, 0"
        elif version == LAYOUT_VERSION and not _layout_problem(found, LAYOUT):
            extra = "note, posts, checked"
        else:
            detail = _layout_problem(found, LAYOUT) or f"layout version {version}"
            raise _unknown_layout(path, detail)
        if not found:
            return JournalReport(version, [], [], [], [])
        entries = [Entry(*row) for row in db.execute(
            f"SELECT record_id, state, emi, message_hash, updated, {extra} FROM deliveries WHERE state IN (?, ?) "
            "ORDER BY updated", (DELIVERED, SENDING))]
        failures: list[Failure] = []
        runs: list[RunRow] = []
        if version >= 1:
            failures = [Failure(*row) for row in db.execute(
                "SELECT record_id, sr_number, first_failed, last_failed, runs, last_reason FROM failures "
                "ORDER BY first_failed")]
            for row in db.execute(f"SELECT run_id, started, ended, {', '.join(RUN_COUNTS)}, exit_code, stop_reason "
                                  "FROM runs ORDER BY run_id DESC LIMIT ?", (last_runs,)):
                counts = dict(zip(RUN_COUNTS, row[3:3 + len(RUN_COUNTS)], strict=True))
                runs.append(RunRow(row[0], row[1], row[2], counts, row[-2], row[-1] or ""))
        return JournalReport(version, [e for e in entries if e.state == DELIVERED],
                             [e for e in entries if e.state == SENDING], failures, runs)
    except sqlite3.Error as exc:
        raise ConfigError(f"delivery journal {path} cannot be read ({exc})") from None
    finally:
        db.close()


class RunLock:
    """One run per app at a time: an exclusive flock on STATE_DIR/<app>.lock, held for the whole run."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.fchmod(fd, 0o600)
        except OSError as exc:
            raise ConfigError(f"run lock {self.path} cannot be created ({exc.strerror}); check STATE_DIR") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def journal_path(state_dir: Path, app_name: str) -> Path:
    return state_dir / f"{app_name}.journal.sqlite3"


def prepare_state_dir(state_dir: Path) -> None:
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"STATE_DIR {state_dir} cannot be created ({exc.strerror})") from None
    if not state_dir.is_dir() or not os.access(state_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"STATE_DIR {state_dir} is not a writable directory")


def _owner_only_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)

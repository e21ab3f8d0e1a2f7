"""The delivery journal: what this app sent to the ESB, so no message is lost and none is sent twice.

A record moves sending -> delivered -> done:
  sending    written before the POST: if the run dies now, the outcome is unknown
  delivered  the ESB accepted the message; the Knack status update is still to do
  done       Knack says SENT
Each change is committed (SQLite, WAL) before the next network step, so a run killed at any point leaves
an exact account for the next run. One journal and one run lock per app, in STATE_DIR, owner-only.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, OutageError

SENDING, DELIVERED, DONE = "sending", "delivered", "done"
KEEP_DONE_SECONDS = 30 * 24 * 3600


@dataclass(frozen=True)
class Entry:
    record_id: str
    state: str
    emi: str
    message_hash: str
    updated: float


class JournalError(OutageError):
    """The journal stopped accepting writes mid-run (disk full, file removed): nothing more may be sent."""


class Journal:
    def __init__(self, path: Path):
        self.path = path
        try:
            _owner_only_file(path)
            self._db = sqlite3.connect(str(path), isolation_level=None, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a commit survives a machine restart
            self._db.execute("""CREATE TABLE IF NOT EXISTS deliveries (
                record_id TEXT PRIMARY KEY, state TEXT NOT NULL, emi TEXT NOT NULL,
                message_hash TEXT NOT NULL, updated REAL NOT NULL)""")
            # prove it is writable now, before anything is sent
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM deliveries WHERE state = ? AND updated < ?",
                             (DONE, time.time() - KEEP_DONE_SECONDS))
            self._db.execute("COMMIT")
            for suffix in ("-wal", "-shm"):
                side = Path(f"{path}{suffix}")
                if side.exists():
                    os.chmod(side, 0o600)
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(f"delivery journal {path} cannot be opened or written ({exc}); check STATE_DIR") from None

    def close(self) -> None:
        self._db.close()

    def _execute(self, sql: str, parameters=()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, parameters)
        except sqlite3.Error as exc:
            raise JournalError(f"delivery journal {self.path} cannot be written ({exc}); stopping before "
                               "anything else is sent") from None

    def get(self, record_id: str) -> Entry | None:
        row = self._execute("SELECT record_id, state, emi, message_hash, updated FROM deliveries WHERE record_id = ?",
                            (record_id,)).fetchone()
        return Entry(*row) if row else None

    def set(self, record_id: str, state: str, emi: str = "", message_hash: str = "") -> None:
        """Record a state change, committed (and synced) when this returns."""
        self._execute(
            """INSERT INTO deliveries (record_id, state, emi, message_hash, updated) VALUES (?, ?, ?, ?, ?)
               ON CONFLICT(record_id) DO UPDATE SET state = excluded.state,
                 emi = CASE WHEN excluded.emi = '' THEN emi ELSE excluded.emi END,
                 message_hash = CASE WHEN excluded.message_hash = '' THEN message_hash ELSE excluded.message_hash END,
                 updated = excluded.updated""",
            (record_id, state, emi, message_hash, time.time()))

    def forget(self, record_id: str) -> None:
        """Drop a 'sending' entry whose POST certainly never reached the ESB (the connection was refused)."""
        self._execute("DELETE FROM deliveries WHERE record_id = ? AND state = ?", (record_id, SENDING))

    def close_delivered_except(self, ready_ids: set[str]) -> int:
        """Close 'delivered' entries whose record Knack no longer lists as ready to send.

        Such a record was set SENT although the answer never reached us (lost reply, or the run died between
        Knack's answer and the journal write). Closing the entry keeps a later resend by staff from being
        mistaken for an unfinished status update.
        """
        rows = self._execute("SELECT record_id FROM deliveries WHERE state = ?", (DELIVERED,)).fetchall()
        stale = [record_id for (record_id,) in rows if record_id not in ready_ids]
        for record_id in stale:
            self._execute("UPDATE deliveries SET state = ?, updated = ? WHERE record_id = ?",
                          (DONE, time.time(), record_id))
        return len(stale)

    def counts(self) -> dict[str, int]:
        return dict(self._execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall())


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

"""--resend RECORD_ID: a person's say that a parked message may be posted once more.

A message posted twice without an answer is parked (in_doubt.py): the ESB may well have it, and only the ESB
team can tell whether 311 does. If 311 has it, the record is set SENT in Knack and nothing is resent; if not,
--resend releases it: the journal counts it as posted once, so the next run posts it once more (with the
duplicate warning) and parks it again should that POST get no answer either.

Needs only the app name and STATE_DIR, like --report. It changes the journal, so it takes the run lock: a run
in progress holds its journal entries in hand.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

from .delivery import when
from .in_doubt import must_park, posts_so_far
from .journal import DELIVERED, DONE, PARKED, SENDING, Journal, RunLock, journal_path
from .logs import printable
from .outcomes import EXIT_CONFIG, EXIT_LOCKED, EXIT_OK


def record_ids(values: list[str]) -> list[str]:
    """--resend values (repeatable, each maybe comma-separated) as record ids, in order, each once."""
    ids: list[str] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if part and part not in ids:
                ids.append(part)
    return ids


def resend(app_name: str, state_dir: Path, ids: list[str], out: TextIO = sys.stdout,
           err: TextIO = sys.stderr) -> int:
    """Release the parked records `ids`; exit 2 and change nothing when any of them cannot be released."""

    def say(text: str, stream: TextIO = out) -> None:
        print(printable(text), file=stream, flush=True)

    path = journal_path(state_dir, app_name)
    if not ids:
        say("--resend: no record id given", err)
        return EXIT_CONFIG
    if not path.exists():
        say(f"--resend: no delivery journal at {path}, so no parked record to release (check STATE_DIR)", err)
        return EXIT_CONFIG
    lock = RunLock(state_dir / f"{app_name}.lock")
    if not lock.acquire():
        say(f"another run for {app_name} is active (lock {lock.path}); nothing was changed: --resend again once "
            "it has ended", err)
        return EXIT_LOCKED
    try:
        journal = Journal(path)  # ConfigError (exit 2) on a journal it cannot use
        try:
            entries = {record_id: journal.get(record_id) for record_id in ids}
            problems = [problem for record_id, entry in entries.items() if (problem := _why_not(record_id, entry))]
            if problems:
                for problem in problems:
                    say(f"--resend: {problem}", err)
                say("--resend: nothing was changed", err)
                return EXIT_CONFIG
            for record_id, entry in entries.items():
                assert entry is not None
                if entry.state == SENDING and not must_park(entry.posts):
                    say(f"record={record_id} (EMI message {entry.emi or '-'}): not parked, already in doubt (posted "
                        f"{posts_so_far(entry.posts)} time without an answer): the next run posts it again; "
                        "nothing to change")
                    continue
                note = (f"parked after {posts_so_far(entry.posts)} POSTs without an answer ({entry.note or '-'}); "
                        f"released by --resend {when(time.time())}")
                journal.release(record_id, note)
                say(f"record={record_id} (EMI message {entry.emi or '-'}): released: the next run posts it once more "
                    "(311 may receive it twice); if that POST gets no answer either, it is parked again")
        finally:
            journal.close()
    finally:
        lock.release()
    return EXIT_OK


def _why_not(record_id: str, entry) -> str:
    """Why `record_id` cannot be released ("" when it can)."""
    if entry is None:
        return (f"record {record_id} is not in the delivery journal: no message of it is parked or in doubt "
                "(the record id is Knack's, as the log's record= shows it)")
    if entry.state in (PARKED, SENDING):
        return ""
    if entry.state in (DELIVERED, DONE):
        return (f"record {record_id}: the ESB accepted its message ({entry.state} {when(entry.updated)}), it is not "
                "parked; to send it again, set its ESB status to READY_TO_SEND in Knack")
    return f"record {record_id}: its journal entry is {entry.state!r}, not parked"

"""--report: what the journal knows about an app's deliveries, without touching Knack or the ESB.

Needs only the app name and STATE_DIR, so an operator can run it while Knack, the ESB or the certificates are
the trouble. Records are named as the log names them (`record=ID sr=SR`), so a line of the report can be
searched for in the log; the EMI message id comes after, as what 311 knows the message by.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from .delivery import when
from .in_doubt import posts_so_far
from .journal import PARKED, RECHECK_AFTER, SENDING, Entry, journal_path, read_report
from .knack import READY_TO_SEND, SENT
from .logs import printable
from .outcomes import COUNT_NAMES, EXIT_OK


def record_label(record_id: str, sr_number: str | None, activity: str = "") -> str:
    """`record=ID activity=ATD sr=SR` as the log names a record (logs.TextFormatter), so that `grep record=ID`
    finds its log lines; `activity=` only where the journal knows it (entries from before it kept it do not)."""
    if activity:
        return f"record={record_id} activity={activity} sr={sr_number or '-'}"
    return f"record={record_id} sr={sr_number or '-'}"


def report(app_name: str, state_dir: Path, out: TextIO = sys.stdout, last_runs: int = 10) -> int:
    path = journal_path(state_dir, app_name)
    found = read_report(path, last_runs=last_runs)  # ConfigError (exit 2) on a layout it does not know

    def say(text: str) -> None:
        print(printable(text), file=out, flush=True)

    if found is None:
        say(f"no delivery journal at {path}: no run of {app_name} has written one there (check STATE_DIR)")
        return EXIT_OK
    say(f"delivery journal {path}")
    if found.layout_version == 0:
        say("  (the layout of an earlier version: the next run upgrades it; it keeps no failures or runs yet)")

    # An entry written before the journal kept the SR may still have it in its failure (a status update that did
    # not take).
    sr_of = {failure.record_id: failure.sr_number for failure in found.failures}

    def label(entry: Entry) -> str:
        return record_label(entry.record_id, entry.sr_number or sr_of.get(entry.record_id), entry.activity)

    settled = f"closed once Knack shows the record in a state other than {READY_TO_SEND}, or deleted"
    say(f"delivered to the ESB, not yet marked {SENT} in Knack: {len(found.delivered) or 'none'}"
        + (f" (each: set {SENT} without posting it again when a run lists the record as ready; {settled})"
           if found.delivered else ""))
    for entry in found.delivered:
        say(f"  {label(entry)} accepted {when(entry.updated)}"
            f" (EMI message {entry.emi or '-'}){_asked(entry)}")
    say(f"delivery in doubt ({SENDING}): {len(found.sending) or 'none'}"
        + (" (each: posted again, alone and waiting longer, when a run lists the record as ready, and 311 may "
           f"receive it twice; {settled})" if found.sending else ""))
    for entry in found.sending:
        why = entry.note or "a run died while posting it"
        say(f"  {label(entry)} posts={posts_so_far(entry.posts)} since "
            f"{when(entry.updated)}: {why} (EMI message {entry.emi or '-'}){_asked(entry)}")
    say(f"{PARKED} (posted twice without an answer; no run posts them again): {len(found.parked) or 'none'}"
        + (" (ask the ESB team whether 311 has each: if it has, set the record SENT in Knack; if not, "
           f"--resend RECORD_ID; {settled})" if found.parked else ""))
    for entry in found.parked:
        say(f"  {label(entry)} posts={posts_so_far(entry.posts)} parked "
            f"{when(entry.updated)}: {entry.note or 'a run died while posting it'} (EMI message {entry.emi or '-'})"
            f"{_asked(entry)}")
    say(f"records that keep failing: {len(found.failures) or 'none'}")
    for failure in found.failures:
        say(f"  {record_label(failure.record_id, failure.sr_number, failure.activity)} failing since "
            f"{when(failure.first_failed)}"
            f", in {failure.runs} run{'s' if failure.runs != 1 else ''}; last {when(failure.last_failed)}: "
            f"{failure.last_reason}")
    say(f"last runs, newest first: {len(found.runs) or 'none'}")
    for row in found.runs:
        if row.ended is None:
            say(f"  {when(row.started)} did not finish (killed, or still running)")
            continue
        counts = " ".join(f"{name}={row.counts.get(name) or 0}" for name in COUNT_NAMES)
        tail = f" stopped: {row.stop_reason}" if row.stop_reason else ""
        say(f"  {when(row.started)} to {when(row.ended)} exit={row.exit_code} {counts}{tail}")
    return EXIT_OK


def _asked(entry: Entry) -> str:
    """When a run last found the record still ready in Knack though the view did not list it (a blank EMI id keeps
    a record out of the view), and when Knack is asked again."""
    if not entry.checked:
        return ""
    return (f"; Knack showed it {READY_TO_SEND} on {when(entry.checked)} without the view listing it (is its EMI id "
            f"blank?); asked again after {when(entry.checked + RECHECK_AFTER)}")

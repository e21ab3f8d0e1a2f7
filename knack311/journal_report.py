"""--report: what the journal knows about an app's deliveries, without touching Knack or the ESB.

Needs only the app name and STATE_DIR, so an operator can run it while Knack, the ESB or the certificates are
the trouble.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from .delivery import when
from .in_doubt import posts_so_far
from .journal import PARKED, SENDING, journal_path, read_report
from .knack import SENT
from .logs import printable
from .outcomes import COUNT_NAMES, EXIT_OK


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

    say(f"delivered to the ESB, not yet marked {SENT} in Knack: {len(found.delivered) or 'none'}"
        + (" (the next run sets them SENT without resending)" if found.delivered else ""))
    for entry in found.delivered:
        say(f"  record={entry.record_id} emi={entry.emi or '-'} accepted {when(entry.updated)}")
    say(f"delivery in doubt ({SENDING}): {len(found.sending) or 'none'}"
        + (" (the next run posts each again, alone and waiting longer; 311 may receive them twice)"
           if found.sending else ""))
    for entry in found.sending:
        why = entry.note or "a run died while posting it"
        say(f"  record={entry.record_id} posts={posts_so_far(entry.posts)} since {when(entry.updated)}: {why} "
            f"(EMI message {entry.emi or '-'})")
    say(f"{PARKED} (posted twice without an answer; no run posts them again): {len(found.parked) or 'none'}"
        + (" (ask the ESB team whether 311 has each: if it has, set the record SENT in Knack; if not, "
           "--resend RECORD_ID)" if found.parked else ""))
    for entry in found.parked:
        say(f"  record={entry.record_id} posts={posts_so_far(entry.posts)} parked {when(entry.updated)}: "
            f"{entry.note or 'a run died while posting it'} (EMI message {entry.emi or '-'})")
    say(f"records that keep failing: {len(found.failures) or 'none'}")
    for failure in found.failures:
        say(f"  record={failure.record_id} sr={failure.sr_number or '-'} failing since {when(failure.first_failed)}"
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

"""Messages in doubt: posted, and no answer came. Pure rules, no I/O.

An ESB that is slow but working takes a message in and answers after ESB_TIMEOUT: the run gives up waiting, the
message is in doubt (journal `sending`) and the next run posts it again. Posted again with the same short wait,
at several at once, every run, such an ESB would get copy after copy of the same messages and settle none. So:

- a message in doubt is posted again alone, before anything new, and waits REPOST_WAIT times ESB_TIMEOUT for its
  answer (within the run's time), which a slow but working ESB gives: the record is settled;
- no message is posted more than MAX_POSTS times without a person's say: one whose second POST got no answer
  either is parked, and a person asks the ESB team whether 311 has it (then sets it SENT in Knack) or releases
  it with --resend;
- answers that come after ESB_TIMEOUT are reported once per run, with a higher ESB_TIMEOUT to set.
"""

from __future__ import annotations

import math

MAX_POSTS = 2        # POSTs of one message without an answer before a person must decide
REPOST_WAIT = 3      # a message in doubt waits this many ESB_TIMEOUTs for its answer when posted again
MIN_REPOST_WAIT = 2  # ... and is not posted again with less than this many left in the run
TIMEOUT_HEADROOM = 1.5  # the suggested ESB_TIMEOUT: the slowest answer seen, with this much to spare


def posts_so_far(posts: int) -> int:
    """POSTs of a message in doubt: an entry written before POSTs were counted was posted at least once."""
    return max(posts, 1)


def must_park(posts: int) -> bool:
    """Posted so often without an answer that only a person may have it posted again."""
    return posts_so_far(posts) >= MAX_POSTS


def repost_wait(esb_timeout: float, time_left: float) -> float:
    """How long a message in doubt, posted again now, waits for its answer: REPOST_WAIT x ESB_TIMEOUT, never past
    the run's time."""
    return min(REPOST_WAIT * esb_timeout, time_left)


def repost_fits(esb_timeout: float, time_left: float) -> bool:
    """Whether the run has time left for a re-post to wait clearly longer than a first POST does; if not, the
    message waits for the next run (posted again with too short a wait, it could be parked for nothing)."""
    return repost_wait(esb_timeout, time_left) >= MIN_REPOST_WAIT * esb_timeout


def parked_reason(record_id: str, emi: str, posts: int, last: str) -> str:
    """The FAILED line of a parked record: what happened and what to check with the ESB team."""
    return (f"parked after {posts_so_far(posts)} POSTs without an answer ({last or 'a run died while posting it'}): "
            f"not posted again until a person decides. Ask the ESB team whether 311 has message {emi or '-'} "
            f"(Knack record {record_id}): if it has, set this record SENT in Knack; if not, run with --resend "
            f"{record_id}")


def not_answering(cause: str, in_doubt: int | None = None) -> str:
    """The stop line of a run that met an ESB not answering; `in_doubt` is what the journal holds in doubt once
    the run's POSTs are over (None while they are not)."""
    if in_doubt is None:
        return f"the ESB is not answering ({cause})"
    return (f"the ESB is not answering ({cause}; {in_doubt} message(s) left in doubt, posted again one at a time "
            "by the next run before anything new)")


class Doubt:
    """One run's rules for messages in doubt: each is posted again alone and before anything new; answers that
    came after ESB_TIMEOUT get one WARNING; a stop for an ESB not answering states what is left in doubt."""

    def __init__(self, esb_timeout: float):
        self.esb_timeout = esb_timeout
        self.late: list[float] = []  # seconds of the answers that came after ESB_TIMEOUT
        self.silence = ""            # why the run stopped for an ESB not answering ("": it did not)
        self.out_of_time = False     # a message in doubt could not get its longer wait within the run

    def may_start(self, next_in_doubt: bool, in_flight: int, in_doubt_in_flight: bool, time_left: float) -> bool:
        """Whether the next record may start now. A message in doubt waits for the records in flight and goes
        alone: an ESB slow enough to leave it in doubt would leave first POSTs sent beside it in doubt too."""
        if in_doubt_in_flight:
            return False
        if not next_in_doubt:
            return True
        if in_flight:
            return False
        if not repost_fits(self.esb_timeout, time_left):
            self.out_of_time = True  # it, and everything after it, waits for the next run
            return False
        return True

    def answered(self, seconds: float | None) -> None:
        if seconds is not None and seconds > self.esb_timeout:
            self.late.append(seconds)

    def not_answering(self, *, parked: bool, in_a_row: int) -> str:
        """The stop line (without the count) once a message posted again got no answer, or several in a row."""
        self.silence = ("a message posted again got no answer and is parked" if parked
                        else f"{in_a_row} records in a row got no answer")
        return not_answering(self.silence)

    def stop_line(self, stop_reason: str, in_doubt: int) -> str:
        """The run's stop line with the journal's count of messages in doubt, if the ESB's silence stopped it."""
        if self.silence and stop_reason == not_answering(self.silence):
            return not_answering(self.silence, in_doubt)
        return stop_reason

    def warning(self) -> str | None:
        """The one WARNING of a run whose answers came after ESB_TIMEOUT, with a higher ESB_TIMEOUT to set."""
        if not self.late:
            return None
        slowest, fastest = max(self.late), min(self.late)
        took = f"{slowest:.1f}s" if len(self.late) == 1 else f"{fastest:.1f} to {slowest:.1f}s"
        suggested = math.ceil(slowest * TIMEOUT_HEADROOM)
        return (f"the ESB answered {len(self.late)} message(s) only after ESB_TIMEOUT ({self.esb_timeout:g}s): "
                f"in {took}. A first POST gives up at ESB_TIMEOUT, so such messages are left in doubt and posted "
                f"again by the next run: set ESB_TIMEOUT to {suggested} or more")

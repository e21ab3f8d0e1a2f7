"""Messages in doubt, the pure parts: the re-post rules (in_doubt.py), the journal's POST count, parking and
release, and the ESB slots that drop to one after a POST without an answer. The whole runs against the simulators
in test_in_doubt_e2e.py."""

from __future__ import annotations

import threading
import time

import pytest

from knack311.in_doubt import Doubt, must_park, not_answering, parked_reason, repost_fits, repost_wait
from knack311.journal import DELIVERED, DONE, PARKED, SENDING, Journal, read_report
from knack311.limiter import ConcurrencyLimit, ESBGate
from knack311.limiter import Outcome as LimitOutcome
from knack311.stopping import Stop

# ----- the rules ------------------------------------------------------------------------------------------------


def test_a_message_is_posted_at_most_twice_without_a_persons_say():
    assert not must_park(0)  # an entry from before POSTs were counted: posted once
    assert not must_park(1)
    assert must_park(2) and must_park(3)


@pytest.mark.parametrize("time_left, wait, fits", [
    (1000.0, 15.0, True),   # 3 x ESB_TIMEOUT
    (12.0, 12.0, True),     # never past the run's time
    (10.0, 10.0, True),     # still twice a first POST's wait
    (9.9, 9.9, False),      # not clearly longer than a first POST: the next run posts it
    (0.0, 0.0, False),
])
def test_a_repost_waits_three_timeouts_within_the_runs_time(time_left, wait, fits):
    assert repost_wait(5.0, time_left) == wait
    assert repost_fits(5.0, time_left) is fits


def test_a_message_in_doubt_goes_alone_and_before_anything_new():
    doubt = Doubt(esb_timeout=5.0)
    assert doubt.may_start(next_in_doubt=False, in_flight=3, in_doubt_in_flight=False, time_left=100)
    # a re-post waits for the records in flight, then goes alone; nothing starts beside it
    assert not doubt.may_start(next_in_doubt=True, in_flight=1, in_doubt_in_flight=False, time_left=100)
    assert doubt.may_start(next_in_doubt=True, in_flight=0, in_doubt_in_flight=False, time_left=100)
    assert not doubt.may_start(next_in_doubt=False, in_flight=1, in_doubt_in_flight=True, time_left=100)
    assert not doubt.may_start(next_in_doubt=True, in_flight=1, in_doubt_in_flight=True, time_left=100)
    assert not doubt.out_of_time


def test_a_repost_without_time_for_its_longer_wait_leaves_the_rest_to_the_next_run():
    doubt = Doubt(esb_timeout=5.0)
    assert not doubt.may_start(next_in_doubt=True, in_flight=0, in_doubt_in_flight=False, time_left=9.0)
    assert doubt.out_of_time  # the loop stops starting records: deferred, not failed


def test_the_stop_line_counts_what_the_journal_holds_in_doubt():
    doubt = Doubt(esb_timeout=1.0)
    reason = doubt.not_answering(parked=False, in_a_row=3)
    assert reason == not_answering("3 records in a row got no answer")
    line = doubt.stop_line(reason, 8)
    assert line.startswith("the ESB is not answering (3 records in a row got no answer; 8 message(s) left in doubt")
    assert "; 1 message(s) left in doubt" in doubt.stop_line(reason, 1)
    # another stop reason (a signal, the journal) is left as it is
    assert doubt.stop_line("received SIGTERM", 8) == "received SIGTERM"
    parked = Doubt(esb_timeout=1.0)
    assert "parked; 0 message(s) left in doubt" in parked.stop_line(parked.not_answering(parked=True, in_a_row=1), 0)


def test_late_answers_give_one_warning_with_a_higher_esb_timeout():
    doubt = Doubt(esb_timeout=5.0)
    doubt.answered(None)
    doubt.answered(4.9)  # in time
    assert doubt.warning() is None
    doubt.answered(7.0)
    doubt.answered(7.4)
    warning = doubt.warning()
    assert "answered 2 message(s) only after ESB_TIMEOUT (5s): in 7.0 to 7.4s" in warning, warning
    assert warning.endswith("set ESB_TIMEOUT to 12 or more"), warning  # 7.4 x 1.5, rounded up


def test_the_parked_line_says_what_to_ask_the_esb_team_and_how_to_release():
    line = parked_reason("rec1", "EMI-7", 2, "POST to the ESB cut short (no complete answer within 15s)")
    assert line.startswith("parked after 2 POSTs without an answer (POST to the ESB cut short")
    assert "whether 311 has message EMI-7" in line and "set this record SENT in Knack" in line
    assert line.endswith("--resend rec1")


# ----- the journal ----------------------------------------------------------------------------------------------

@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "j.sqlite3")
    yield j
    j.close()


def test_each_post_is_counted_before_it_goes_and_only_while_in_doubt(journal):
    assert journal.posting("rec1", "EMI-1", "h1") == 1
    journal.set("rec1", SENDING, note="no answer")
    assert journal.posting("rec1", "EMI-1", "h1") == 2
    entry = journal.get("rec1")
    assert (entry.state, entry.posts, entry.note) == (SENDING, 2, "")  # "": a kill now means "died while posting"
    journal.set("rec1", DELIVERED)
    journal.set("rec1", DONE)
    assert journal.posting("rec1", "EMI-1", "h2") == 1  # staff asked for a resend: a new message, a new count


def test_an_entry_in_doubt_from_before_posts_were_counted_counts_one(journal):
    journal.set("rec1", SENDING, "EMI-1", "h1")  # posts 0: what a version that did not count wrote
    assert journal.posting("rec1", "EMI-1", "h1") == 2


def test_a_post_that_never_reached_the_esb_restores_the_earlier_doubt(journal):
    journal.posting("rec1", "EMI-1", "h1")
    journal.set("rec1", SENDING, note="no answer within 5s")
    before = journal.get("rec1")
    journal.posting("rec1", "EMI-1", "h1")

    journal.restore(before)

    assert journal.get("rec1") == before


def test_parked_and_released(journal, tmp_path):
    journal.posting("rec1", "EMI-1", "h1")
    journal.posting("rec1", "EMI-1", "h1")
    journal.park("rec1", "no answer within 15s")
    assert (journal.get("rec1").state, journal.get("rec1").posts) == (PARKED, 2)
    assert [e.record_id for e in journal.unfinished_except(set())] == ["rec1"]  # closed once Knack says SENT
    assert [e.record_id for e in read_report(tmp_path / "j.sqlite3").parked] == ["rec1"]

    journal.release("rec1", "released by --resend")

    entry = journal.get("rec1")
    assert (entry.state, entry.posts, entry.note) == (SENDING, 1, "released by --resend")
    assert journal.posting("rec1", "EMI-1", "h1") == 2  # one more POST, then parked again if unanswered


def test_release_leaves_a_delivered_entry_alone(journal):
    journal.set("rec1", DELIVERED, "EMI-1", "h1")
    journal.release("rec1", "x")
    assert journal.get("rec1").state == DELIVERED


# ----- the ESB slots after a POST without an answer (also with a fixed --workers N) ---------------------------

def fixed_gate(size: int = 4) -> ESBGate:
    return ESBGate(ConcurrencyLimit(size, adaptive=False, timeout=5.0), Stop())


def test_after_a_post_without_an_answer_one_post_at_a_time_until_an_answer_comes_in_time():
    gate = fixed_gate()
    first, second = gate.take(), gate.take()
    gate.give_back(first, 5.0, LimitOutcome.TIMEOUT)
    assert gate.limit.limit == 1
    gate.give_back(second, 7.0, LimitOutcome.ANSWERED)  # answered, but after ESB_TIMEOUT: still one
    assert gate.limit.limit == 1
    ticket = gate.take()
    gate.give_back(ticket, 0.1, LimitOutcome.UNREACHABLE)  # never reached the ESB: says nothing about its pace
    assert gate.limit.limit == 1
    ticket = gate.take()
    gate.give_back(ticket, 0.1, LimitOutcome.STOPPED)  # cut short by a signal: says nothing either
    assert gate.limit.limit == 1
    ticket = gate.take()
    gate.give_back(ticket, 0.2, LimitOutcome.ANSWERED)  # in time
    assert gate.limit.limit == 4
    assert gate.used() == (1, 4)


def test_a_worker_waits_for_the_one_slot_and_gives_up_when_the_run_stops():
    gate = fixed_gate()
    gate.give_back(gate.take(), 5.0, LimitOutcome.TIMEOUT)
    assert gate.take() is not None  # the one slot
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(gate.take()))
    waiter.start()
    time.sleep(0.3)
    assert got == []  # waiting: only one POST while the ESB does not answer in time
    gate.close()
    waiter.join(5)
    assert got == [None]

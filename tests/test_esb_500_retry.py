"""An ESB answer of HTTP 500 without a SOAP Fault is tried again within the run, 3 tries in all, as the original
script did ("retry on 500", in production since 2023); each try is journalled, so a run killed between two tries
leaves the record in doubt. 502 and 504 (a gateway gave up) stay unknown and are not tried again (issue 12, 3).

ESBClient against the ESB simulator first, then the real command end to end.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import pytest

from knack311.errors import RecordError
from knack311.esb import ESBClient, ESBUncertain, ESBUnreachable
from simulators.esb import fault_body
from tests.conftest import statuses
from tests.test_esb_failures import copies_received, lines_naming, no_traceback, warned_duplicate
from tests.test_esb_simulator import message

APP = "data-tracker"
READY, SENT = "READY_TO_SEND", "SENT"


def client(esb, pki, **kwargs) -> ESBClient:
    options = dict(cert=str(pki.client_cert), key=str(pki.client_key), verify=str(pki.ca_bundle), timeout=5,
                   backoff=0.05)
    options.update(kwargs)
    return ESBClient(esb.url, **options)


def journal_entries(bridge_env) -> dict[str, tuple[str, str]]:
    """record id -> (state, note) in the delivery journal."""
    path = Path(bridge_env["STATE_DIR"]) / f"{APP}.journal.sqlite3"
    if not path.exists():
        return {}
    db = sqlite3.connect(str(path))
    try:
        return {row[0]: (row[1], row[2]) for row in db.execute("SELECT record_id, state, note FROM deliveries")}
    finally:
        db.close()


# ----- the client ---------------------------------------------------------------------------------------------

def test_500_500_200_is_delivered_on_the_third_try_and_every_later_try_is_announced(esb, pki):
    esb.inject(status=500, count=2)
    announced = []

    delivery = client(esb, pki).deliver(message(), lambda *try_: announced.append(try_))

    assert delivery.attempts == 3
    assert [r.status for r in esb.received] == [500, 500, 200]
    assert [(number, tries) for number, tries, _ in announced] == [(2, 3), (3, 3)]
    assert all("HTTP 500" in previous for _, _, previous in announced)


def test_500_on_every_try_leaves_the_outcome_unknown(esb, pki):
    esb.inject(status=500, count=3)
    with pytest.raises(ESBUncertain) as unknown:
        client(esb, pki).deliver(message())
    assert "HTTP 500" in str(unknown.value) and "3 tries" in str(unknown.value)
    assert len(esb.received) == 3


@pytest.mark.parametrize("status", [502, 504, 501])
def test_a_gateway_failure_or_another_5xx_is_not_tried_again(esb, pki, status):
    esb.inject(status=status)
    announced = []
    with pytest.raises(ESBUncertain):
        client(esb, pki).deliver(message(), lambda *try_: announced.append(try_))
    assert len(esb.received) == 1
    assert announced == []


def test_a_fault_is_still_a_rejection_without_a_second_try(esb, pki):
    esb.inject(fault="Invalid SR number", status=500)
    with pytest.raises(RecordError):
        client(esb, pki).deliver(message())
    assert len(esb.received) == 1


def test_after_a_500_a_later_rejection_does_not_settle_the_doubt(esb, pki):
    # The first try may have reached 311: a Fault to the second says nothing about the first, so the record
    # stays in doubt (resent with the duplicate warning) instead of being taken as never delivered.
    esb.inject(status=500)
    esb.inject(status=200, body=fault_body("soapenv:Client", "duplicate message"), content_type="text/xml")
    with pytest.raises(ESBUncertain) as unknown:
        client(esb, pki).deliver(message())
    assert "duplicate message" in str(unknown.value) and "try 1 of 3 answered HTTP 500" in str(unknown.value)
    assert len(esb.received) == 2


def test_after_a_500_the_ends_of_503_tries_leave_the_outcome_unknown(esb, pki):
    esb.inject(status=500)
    esb.inject(status=503, count=2)
    with pytest.raises(ESBUncertain) as unknown:
        client(esb, pki).deliver(message())
    assert "HTTP 503" in str(unknown.value) and "HTTP 500" in str(unknown.value)
    assert [r.status for r in esb.received] == [500, 503, 503]


def test_503_alone_still_ends_as_not_taken(esb, pki):
    esb.inject(status=503, count=3)
    with pytest.raises(ESBUnreachable) as refused:
        client(esb, pki).deliver(message())
    assert type(refused.value) is ESBUnreachable


# ----- the real command ---------------------------------------------------------------------------------------

def test_500_500_200_ends_sent_with_three_posts_and_exit_0(run_bridge, knack, esb, seed, bridge_env):
    [record] = seed(1)
    esb.inject(status=500, count=2, record=record["id"])

    run = run_bridge()

    assert run.returncode == 0, run.output
    no_traceback(run)
    assert [r.status for r in esb.received] == [500, 500, 200]
    assert esb.copies() == {record["id"]: 1}
    assert statuses(knack) == {record["id"]: SENT}
    assert journal_entries(bridge_env) == {record["id"]: ("done", "")}


def test_500_on_every_try_leaves_the_record_in_doubt_and_the_next_run_warns(run_bridge, knack, esb, seed,
                                                                             bridge_env):
    unknown, healthy = seed(2)
    esb.inject(status=500, count=3, processed=True, record=unknown["id"])

    run = run_bridge()

    assert run.returncode == 1, run.output
    no_traceback(run)
    assert copies_received(esb, unknown) == 3
    assert statuses(knack) == {unknown["id"]: READY, healthy["id"]: SENT}
    state, note = journal_entries(bridge_env)[unknown["id"]]
    assert state == "sending" and "HTTP 500" in note and "3 tries" in note
    [failed] = [line for line in lines_naming(run.stdout, unknown["id"]) if "FAILED" in line]
    assert "HTTP 500" in failed and "3 tries" in failed

    rerun = run_bridge()
    assert rerun.returncode == 0, rerun.output
    assert warned_duplicate(rerun.stdout, unknown), rerun.stdout
    assert copies_received(esb, unknown) == 4
    assert statuses(knack) == {unknown["id"]: SENT, healthy["id"]: SENT}
    assert {state for state, _ in journal_entries(bridge_env).values()} == {"done"}


@pytest.mark.parametrize("status", [502, 504])
def test_a_gateway_failure_is_posted_once_and_left_in_doubt(run_bridge, knack, esb, seed, bridge_env, status):
    unknown, healthy = seed(2)
    esb.inject(status=status, processed=True, record=unknown["id"])

    run = run_bridge()

    assert run.returncode == 1, run.output
    assert copies_received(esb, unknown) == 1
    assert statuses(knack) == {unknown["id"]: READY, healthy["id"]: SENT}
    assert journal_entries(bridge_env)[unknown["id"]][0] == "sending"


def test_a_run_killed_between_two_tries_leaves_the_record_in_doubt_naming_the_try(start_bridge, run_bridge, knack,
                                                                                  esb, seed, bridge_env):
    [record] = seed(1)
    esb.inject(status=500, record=record["id"])
    esb.inject(hang=True, record=record["id"])  # the second try never gets its answer
    proc = start_bridge(env={"ESB_TIMEOUT": "60"})
    deadline = time.monotonic() + 30
    while len(esb.received) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(esb.received) == 2, "the program never made its second try"

    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)

    state, note = journal_entries(bridge_env)[record["id"]]
    assert state == "sending"
    assert "try 2 of 3" in note and "HTTP 500" in note
    assert statuses(knack) == {record["id"]: READY}

    rerun = run_bridge()
    assert rerun.returncode == 0, rerun.output
    assert warned_duplicate(rerun.stdout, record), rerun.stdout
    assert any("try 2 of 3" in line for line in lines_naming(rerun.stdout, record["id"])), rerun.stdout
    assert statuses(knack) == {record["id"]: SENT}

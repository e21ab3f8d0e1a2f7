"""A 2xx SOAP answer whose submitKnackResponse/status says anything but success is a rejection, like a SOAP
Fault (issue 13, 5): the record fails, stays READY_TO_SEND, the journal forgets it and the other records go on.
A SOAP answer without a status element stays an acceptance.

What counts as success: SUCCESS, SUCCESSFUL or OK, case-insensitive, surrounding spaces ignored
(esb_answers.SUCCESS_STATUSES, README "What the ESB's answers mean").
"""

from __future__ import annotations

import re

import pytest

from knack311.esb_answers import EXCERPT_CHARS, Body, Verdict, judge, read_body
from simulators.esb import ACC_NS, SOAP_NS, status_body
from tests.conftest import statuses
from tests.test_esb_failures import copies_received, journal, lines_naming, no_traceback

READY, SENT = "READY_TO_SEND", "SENT"


def answer(inner: str, *, soap_ns: str = SOAP_NS) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><s:Envelope xmlns:s="{soap_ns}"><s:Body>{inner}</s:Body>'
            "</s:Envelope>").encode()


def response(status: str, extra: str = "") -> bytes:
    return answer(f'<acc:submitKnackResponse xmlns:acc="{ACC_NS}"><status>{status}</status>{extra}'
                  "</acc:submitKnackResponse>")


# ----- the rule -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("status", ["SUCCESS", "success", " Ok ", "OK", "Successful", "\n  SUCCESS\n"])
def test_a_success_status_is_an_acceptance(status):
    assert judge(200, "OK", response(status))[0] is Verdict.ACCEPTED


@pytest.mark.parametrize("status", ["FAILURE", "ERROR", "failed", "REJECTED", "", "PENDING", "SUCCESS_PARTIAL",
                                    "NOT OK"])
def test_any_other_status_is_a_rejection(status):
    verdict, line = judge(200, "OK", response(status))
    assert verdict is Verdict.REJECTED
    assert f"status {status.strip()!r}" in line


def test_no_status_element_stays_an_acceptance():
    assert judge(200, "OK", answer(f'<acc:submitKnackResponse xmlns:acc="{ACC_NS}"/>'))[0] is Verdict.ACCEPTED
    assert judge(200, "OK", answer(f'<acc:submitKnackResponse xmlns:acc="{ACC_NS}"><message>queued</message>'
                                   "</acc:submitKnackResponse>"))[0] is Verdict.ACCEPTED
    assert judge(200, "OK", answer("<other><status>FAILURE</status></other>"))[0] is Verdict.ACCEPTED


@pytest.mark.parametrize("inner", [
    '<r:submitKnackResponse xmlns:r="urn:any"><r:status>FAILURE</r:status></r:submitKnackResponse>',
    "<submitKnackResponse><status>FAILURE</status></submitKnackResponse>",
    f'<acc:submitKnackResponse xmlns:acc="{ACC_NS}"><acc:status>FAILURE</acc:status></acc:submitKnackResponse>',
], ids=["foreign-namespace", "no-namespace", "qualified-status"])
def test_the_status_is_found_in_any_namespace(inner):
    assert read_body(answer(inner))[0] is Body.REFUSED
    assert read_body(answer(inner, soap_ns="http://www.w3.org/2003/05/soap-envelope"))[0] is Body.REFUSED


def test_one_status_that_is_not_a_success_is_enough():
    assert judge(200, "OK", response("SUCCESS", "<status>ERROR</status>"))[0] is Verdict.REJECTED


@pytest.mark.parametrize("status", [202, 204, 299])
def test_any_2xx_status_refusal_is_a_rejection(status):
    assert judge(status, "Accepted", status_body("FAILURE"))[0] is Verdict.REJECTED


def test_a_fault_still_wins_and_a_500_with_a_failure_status_is_a_500():
    # the rule is about 2xx answers: a 500 without a Fault is tried again, whatever its body says
    assert judge(500, "Internal Server Error", status_body("FAILURE"))[0] is Verdict.SERVICE_ERROR


def test_the_line_quotes_the_answers_text_on_one_bounded_line_without_markup():
    detail = "SR 20-00001001 is closed;\nno update\u202e taken " + "because " * 200
    verdict, line = judge(200, "OK", status_body("FAILURE", detail))
    assert verdict is Verdict.REJECTED
    assert line.startswith("ESB refused the message: HTTP 200 OK with submitKnackResponse status 'FAILURE'; "
                           "the answer says: FAILURE SR 20-00001001 is closed; no update\\u202e taken because")
    assert "\n" not in line and "\u202e" not in line
    assert "<" not in line  # text, never markup cut mid-tag
    assert line.endswith("...")
    assert len(line) < 200 + EXCERPT_CHARS


def test_markup_in_the_text_is_quoted_as_the_text_it_stands_for():
    _, line = judge(200, "OK", status_body("ERROR", "expected <sr_number> & <emi>"))
    assert "expected <sr_number> & <emi>" in line


def test_a_very_long_status_value_is_cut():
    _, line = judge(200, "OK", status_body("E" * 5000))
    assert len(line) < 200 + 2 * EXCERPT_CHARS


# ----- the real command ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("status", ["FAILURE", "error"])
def test_a_200_that_says_failure_fails_the_record_and_the_others_go_on(run_bridge, knack, esb, seed, bridge_env,
                                                                      status):
    refused, *others = seed(3)
    esb.inject(status=200, body=status_body(status, "SR 20-00001001 is closed"), content_type="text/xml",
               record=refused["id"])

    run = run_bridge()

    assert run.returncode == 1, run.output
    no_traceback(run)
    assert copies_received(esb, refused) == 1  # a verdict: not tried again
    assert statuses(knack) == {refused["id"]: READY, **{r["id"]: SENT for r in others}}
    assert esb.copies() == {r["id"]: 1 for r in others}
    assert journal(bridge_env) == {r["id"]: "done" for r in others}  # the refused one is forgotten
    [failed] = [line for line in lines_naming(run.stdout, refused["id"]) if "FAILED" in line]
    assert f"status {status!r}" in failed and "SR 20-00001001 is closed" in failed
    assert re.search(r"summary: .*failed=1", run.stdout), run.stdout

    rerun = run_bridge()  # the ESB accepts it now: sent without a duplicate warning, since it never had it
    assert rerun.returncode == 0, rerun.output
    assert not any("twice" in line for line in lines_naming(rerun.stdout, refused["id"])), rerun.stdout
    assert statuses(knack) == {r["id"]: SENT for r in [refused, *others]}


def test_a_200_soap_answer_without_status_is_still_delivered(run_bridge, knack, esb, seed, bridge_env):
    records = seed(2)
    esb.inject(status=200, body=status_body(None, "queued"), content_type="text/xml", processed=True, count=2)

    run = run_bridge()

    assert run.returncode == 0, run.output
    assert statuses(knack) == {r["id"]: SENT for r in records}
    assert journal(bridge_env) == {r["id"]: "done" for r in records}

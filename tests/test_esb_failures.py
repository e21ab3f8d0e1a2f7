"""The ESB misbehaving, end to end: the real command against an ESB simulator taught to stall, trickle, hang,
lie with a 200, answer through a failing gateway, refuse our certificate or never stop talking; and client keys
that must never prompt (issues 6 and 7, the ESB side).

Each test checks what the ESB received and how often, the Knack statuses, the delivery journal and the exit code.
The journal meanings: `sending` = outcome unknown (the next run resends it with a "duplicate possible" warning);
no entry = the ESB certainly does not have the message (a rejection, or it never got there).
"""

from __future__ import annotations

import collections
import os
import pty
import re
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from knack311.settings import DEFAULT_ESB_MAX_IN_FLIGHT
from simulators.certs import CLIENT_NAME
from simulators.esb import ACCESS_DENIED_PAGE, GATEWAY_JSON, SOAP_NS, ESBSimulator, fault_body
from tests.conftest import API_KEY, ENTRY, statuses

APP = "data-tracker"
READY, SENT = "READY_TO_SEND", "SENT"
SOAP12_NS = "http://www.w3.org/2003/05/soap-envelope"
KEY_PASSWORD = "correct horse battery staple"
# Run-wide faults (a refused certificate, a wrong endpoint) stop the run: the records whose POST had already
# begun end too, and no record starts after. Seeding more than the workers start at once makes that visible.
MORE_THAN_THE_WORKERS_START = 3 * DEFAULT_ESB_MAX_IN_FLIGHT


# ----- helpers ---------------------------------------------------------------------------------------------------

def journal(bridge_env) -> dict[str, str]:
    """record id -> state of the delivery journal ({} when the journal was never created)."""
    path = Path(bridge_env["STATE_DIR"]) / f"{APP}.journal.sqlite3"
    if not path.exists():
        return {}
    db = sqlite3.connect(str(path))
    try:
        return dict(db.execute("SELECT record_id, state FROM deliveries").fetchall())
    finally:
        db.close()


def copies_received(esb, record) -> int:
    return sum(1 for r in esb.received if r.record_id == record["id"])


def summary(output: str) -> str:
    lines = [line for line in output.splitlines() if " summary: " in line or " summary (" in line]
    assert len(lines) == 1, output
    return lines[0]


def lines_naming(output: str, text: str) -> list[str]:
    return [line for line in output.splitlines() if text in line]


def warned_duplicate(output: str, record) -> bool:
    return any(re.search(r"twice|duplicate", line, re.IGNORECASE) for line in lines_naming(output, record["id"]))


def no_traceback(run) -> None:
    assert "Traceback" not in run.output, run.output


def assert_resent_with_warning(run_bridge, knack, bridge_env, records, unknown) -> None:
    """The next run, against a healthy ESB, resends the unknown one with the warning; then all are SENT."""
    rerun = run_bridge()
    assert rerun.returncode == 0, rerun.output
    assert warned_duplicate(rerun.stdout, unknown), rerun.stdout
    assert statuses(knack) == {r["id"]: SENT for r in records}
    assert journal(bridge_env) == {r["id"]: "done" for r in records}


@pytest.fixture
def simulator(pki):
    """Start extra ESB simulators (a TLS version, a server certificate of another CA); stopped at the end."""
    started = []

    def start(*, rogue_server: bool = False, tls_version: str | None = None) -> ESBSimulator:
        sim = ESBSimulator(server_cert=pki.rogue_server_cert if rogue_server else pki.server_cert,
                           server_key=pki.rogue_server_key if rogue_server else pki.server_key,
                           client_ca_bundle=pki.client_ca_bundle, tls_version=tls_version).start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


# ================================================================================================================
# 1. Time: a total deadline for every POST, and SIGTERM while an answer stalls (6§2, 6§3)
# ================================================================================================================

@pytest.mark.parametrize("misbehaviour", [dict(trickle=1.0), dict(stall=True), dict(hang=True)],
                         ids=["trickle", "stall", "hang"])
def test_an_answer_that_never_completes_is_cut_at_esb_timeout_and_left_unknown(run_bridge, knack, esb, seed,
                                                                               bridge_env, misbehaviour):
    # A byte a second never trips requests' per-read timeout; only a total deadline ends this POST.
    unknown, healthy = seed(2)
    esb.inject(**misbehaviour, record=unknown["id"])
    started = time.monotonic()

    run = run_bridge(env={"ESB_TIMEOUT": "2"}, timeout=60)

    assert run.returncode == 1, run.output
    no_traceback(run)
    assert time.monotonic() - started < 30  # the 2 s deadline, not the simulator's 120 s of misbehaviour
    assert copies_received(esb, unknown) == 1  # cut, not repeated within the run
    assert statuses(knack) == {unknown["id"]: READY, healthy["id"]: SENT}
    assert journal(bridge_env) == {unknown["id"]: "sending", healthy["id"]: "done"}
    assert lines_naming(run.stdout, unknown["id"]), run.stdout

    assert_resent_with_warning(run_bridge, knack, bridge_env, [unknown, healthy], unknown)
    assert esb.copies()[unknown["id"]] == 2  # the ESB had taken the first one in: the accepted cost, warned


@pytest.mark.slow
@pytest.mark.timing
def test_sigterm_while_an_esb_answer_stalls_ends_the_run_within_8s(start_bridge, run_bridge, knack, esb, seed,
                                                                 bridge_env):
    records = seed(3, sr_number="20-00009999")  # one SR: the later two wait for the first, which stalls
    in_flight = records[0]
    esb.inject(stall=True)  # headers, then nothing: the POST waits on the body
    proc = start_bridge(env={"ESB_TIMEOUT": "60"})  # the deadline is far: only the signal can end it
    deadline = time.monotonic() + 20
    while not esb.received and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert esb.received, "the program never posted"
    time.sleep(0.3)  # the answer's headers are out; the POST is now waiting for the body

    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("still running 20 s after SIGTERM")
    took = time.monotonic() - signalled

    assert took < 8, f"exited {took:.1f}s after SIGTERM"
    assert proc.returncode == 1, out + err
    assert "Traceback" not in out + err
    assert "SIGTERM" in summary(out)
    assert len(esb.received) == 1  # no other record was posted, nothing retried after the signal
    assert statuses(knack) == {r["id"]: READY for r in records}
    assert journal(bridge_env) == {in_flight["id"]: "sending"}

    rerun = run_bridge()
    assert rerun.returncode == 0, rerun.output
    assert warned_duplicate(rerun.stdout, in_flight), rerun.stdout
    assert statuses(knack) == {r["id"]: SENT for r in records}
    assert esb.copies() == {in_flight["id"]: 2, records[1]["id"]: 1, records[2]["id"]: 1}


# ================================================================================================================
# 2. Keys that never prompt (6§4)
# ================================================================================================================

@pytest.fixture
def encrypted_key(pki, tmp_path) -> Path:
    """The client key of the test PKI, encrypted with KEY_PASSWORD (made at test time)."""
    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), password=None)
    path = tmp_path / "esb-encrypted.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(KEY_PASSWORD.encode())))
    path.chmod(0o600)
    return path


def assert_key_refused(run_output: str, returncode: int, knack, esb) -> None:
    assert returncode == 2, run_output
    assert "pass phrase" not in run_output.lower(), run_output
    assert "Traceback" not in run_output, run_output
    errors = [line for line in run_output.splitlines() if "ESB_KEY" in line]
    assert len(errors) == 1, run_output
    assert KEY_PASSWORD not in run_output
    assert knack.request_log == [] and esb.received == [] and esb.handshake_failures == 0
    assert set(statuses(knack).values()) == {READY}


@pytest.mark.parametrize("password", [None, "wrong password"], ids=["no-password", "wrong-password"])
def test_an_encrypted_key_without_its_password_is_a_configuration_error_without_a_terminal(
        run_bridge, knack, esb, seed, encrypted_key, password):
    seed(2)
    run = run_bridge(env={"ESB_KEY": str(encrypted_key), "ESB_KEY_PASSWORD": password}, timeout=30)
    assert_key_refused(run.output, run.returncode, knack, esb)


def run_on_a_terminal(args: list[str], env: dict, cwd: Path, timeout: float) -> tuple[int | None, str]:
    """Run the command with a pseudo-terminal as its controlling terminal, stdin and stdout, as an operator
    would at a shell. Returns (exit code or None if it had to be killed after `timeout`, everything it printed).
    It is sent nothing on its terminal: a prompt would wait forever."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once (nothing else is safe after fork in a threaded process)
        try:
            os.chdir(cwd)
            os.execve(sys.executable, [sys.executable, *args], env)
        finally:
            os._exit(127)
    output = b""
    code = None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child closed its end of the terminal
                    chunk = b""
                if chunk:
                    output += chunk
                    continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return code, output.decode(errors="replace")


def test_an_encrypted_key_without_its_password_never_prompts_on_a_terminal(bridge_env, knack, esb, seed,
                                                                            encrypted_key, tmp_path):
    seed(2)
    env = {k: v for k, v in {**bridge_env, "ESB_KEY": str(encrypted_key)}.items() if v is not None}
    started = time.monotonic()

    code, output = run_on_a_terminal([str(ENTRY), APP], env, tmp_path, timeout=15)

    assert code is not None, f"waited on its terminal for 15 s (a passphrase prompt?):\n{output}"
    assert time.monotonic() - started < 15
    assert_key_refused(output, code, knack, esb)


def test_an_encrypted_key_with_its_password_delivers(run_bridge, knack, esb, seed, encrypted_key, bridge_env):
    records = seed(2)
    run = run_bridge(env={"ESB_KEY": str(encrypted_key), "ESB_KEY_PASSWORD": KEY_PASSWORD})
    assert run.returncode == 0, run.output
    assert KEY_PASSWORD not in run.output
    assert esb.copies() == {r["id"]: 1 for r in records}
    assert {r.client_subject for r in esb.accepted} == {CLIENT_NAME}
    assert statuses(knack) == {r["id"]: SENT for r in records}


# ================================================================================================================
# 3. TLS failures told apart; one warning when verification is off; rejections show the answer (6§5)
# ================================================================================================================

@pytest.mark.parametrize("tls_version", ["1.2", "1.3"])
def test_a_client_certificate_the_esb_refuses_is_named_and_stops_the_run(run_bridge, knack, seed, pki, simulator,
                                                                         bridge_env, tls_version):
    # With TLS 1.3 the refusal arrives after our request was written, as an alert read in place of the answer.
    records = seed(MORE_THAN_THE_WORKERS_START)
    esb = simulator(tls_version=tls_version)
    run = run_bridge(env={"ESB_ENDPOINT": esb.url, "ESB_CERT": str(pki.rogue_client_cert),
                          "ESB_KEY": str(pki.rogue_client_key)})

    assert run.returncode == 1, run.output
    no_traceback(run)
    assert esb.received == []
    assert 1 <= esb.handshake_failures <= DEFAULT_ESB_MAX_IN_FLIGHT  # the POSTs already begun, then the run stopped
    assert statuses(knack) == {r["id"]: READY for r in records}
    assert journal(bridge_env) == {}  # the ESB's service never saw it: nothing of unknown outcome is left
    lines = lines_naming(run.stdout, "did not accept our client certificate")
    assert lines and all(str(pki.rogue_client_cert) in line for line in lines), run.stdout
    assert "could not be verified" not in run.output


@pytest.mark.parametrize("tls_version", ["1.2", "1.3"])
def test_an_esb_certificate_our_ca_does_not_vouch_for_is_named_and_stops_the_run(run_bridge, knack, seed, pki,
                                                                                 simulator, bridge_env, tls_version):
    records = seed(MORE_THAN_THE_WORKERS_START)
    impostor = simulator(rogue_server=True, tls_version=tls_version)
    run = run_bridge(env={"ESB_ENDPOINT": impostor.url})

    assert run.returncode == 1, run.output
    no_traceback(run)
    assert impostor.received == [] and 1 <= impostor.handshake_failures <= DEFAULT_ESB_MAX_IN_FLIGHT
    assert statuses(knack) == {r["id"]: READY for r in records}
    assert journal(bridge_env) == {}
    lines = lines_naming(run.stdout, "certificate could not be verified")
    assert lines and all(f"ESB_CA_BUNDLE {pki.ca_bundle}" in line for line in lines), run.stdout
    assert "did not accept our client certificate" not in run.output


def test_verification_off_warns_once_not_for_every_message(run_bridge, knack, seed, simulator):
    records = seed(3)
    impostor = simulator(rogue_server=True)
    run = run_bridge(env={"ESB_ENDPOINT": impostor.url, "ESB_VERIFY_TLS": "false"})

    assert run.returncode == 0, run.output
    assert impostor.copies() == {r["id"]: 1 for r in records}
    assert statuses(knack) == {r["id"]: SENT for r in records}
    assert "InsecureRequestWarning" not in run.output
    assert "Unverified HTTPS request" not in run.output
    assert len(lines_naming(run.output, "ESB_VERIFY_TLS")) == 1, run.output


def test_a_4xx_line_carries_the_start_of_the_answer_on_one_line(run_bridge, knack, esb, seed, bridge_env):
    rejected, healthy = seed(2)
    page = (b"<html>\n<body>\n<h1>Forbidden by policy \x1b[31mRULE-7\x1b[0m</h1>\r\nsummary: forged line\n"
            + b"x" * 2000 + b"</body></html>")
    esb.inject(status=403, body=page, content_type="text/html", record=rejected["id"])

    run = run_bridge()

    assert run.returncode == 1, run.output
    assert copies_received(esb, rejected) == 1  # a verdict: not retried
    assert statuses(knack) == {rejected["id"]: READY, healthy["id"]: SENT}
    assert rejected["id"] not in journal(bridge_env)  # rejected: the ESB does not have it
    [line] = [line for line in lines_naming(run.stdout, rejected["id"]) if "FAILED" in line]
    assert "HTTP 403" in line and "Forbidden by policy" in line and "\\x1b[31mRULE-7" in line
    assert "\x1b" not in run.output  # no raw escape reaches the log
    assert len(line) < 600  # the start of the answer, not all of it
    assert len(re.findall(r"^\S+ \S+ summary:", run.stdout, re.MULTILINE)) == 1  # the answer forged no line


def test_a_soap_fault_line_carries_the_fault_and_the_start_of_the_answer(run_bridge, knack, esb, seed, bridge_env):
    rejected, healthy = seed(2)
    esb.inject(fault="SR 20-00001001 is locked by\nanother update", record=rejected["id"])

    run = run_bridge()

    assert run.returncode == 1, run.output
    assert copies_received(esb, rejected) == 1
    assert statuses(knack) == {rejected["id"]: READY, healthy["id"]: SENT}
    assert rejected["id"] not in journal(bridge_env)
    [line] = [line for line in lines_naming(run.stdout, rejected["id"]) if "FAILED" in line]
    assert "SR 20-00001001 is locked by another update" in line
    assert "<soapenv:Envelope" in line  # the start of the answer itself


# ================================================================================================================
# 4. What counts as accepted (7§3)
# ================================================================================================================

NOT_THE_ESB = {
    "html-access-denied": (ACCESS_DENIED_PAGE, "text/html"),
    "gateway-json": (GATEWAY_JSON, "application/json"),
    "plain-text": (b"OK\n", "text/plain"),
    "xml-not-soap": (b"<?xml version='1.0'?><result>OK</result>", "text/xml"),
}


@pytest.mark.parametrize("body,content_type", list(NOT_THE_ESB.values()), ids=list(NOT_THE_ESB))
def test_a_200_that_is_not_the_esbs_soap_is_not_taken_for_acceptance(run_bridge, knack, esb, seed, bridge_env,
                                                                      body, content_type):
    unknown, healthy = seed(2)
    esb.inject(status=200, body=body, content_type=content_type, record=unknown["id"])

    run = run_bridge()

    assert run.returncode == 1, run.output
    assert copies_received(esb, unknown) == 1
    assert statuses(knack) == {unknown["id"]: READY, healthy["id"]: SENT}
    assert journal(bridge_env) == {unknown["id"]: "sending", healthy["id"]: "done"}

    assert_resent_with_warning(run_bridge, knack, bridge_env, [unknown, healthy], unknown)


FAULTS_THE_OLD_CHECK_MISSED = {
    "utf-16-with-bom": fault_body("soapenv:Client", "Invalid SR number", encoding="UTF-16"),
    "bare-fault-in-soap-body": fault_body("Client", "Invalid SR number", bare=True),
}


@pytest.mark.parametrize("body", list(FAULTS_THE_OLD_CHECK_MISSED.values()), ids=list(FAULTS_THE_OLD_CHECK_MISSED))
def test_a_fault_in_any_encoding_or_without_namespace_is_a_rejection(run_bridge, knack, esb, seed, bridge_env,
                                                                     body):
    rejected, healthy = seed(2)
    esb.inject(status=200, body=body, content_type="text/xml", record=rejected["id"])

    run = run_bridge()

    assert run.returncode == 1, run.output
    assert copies_received(esb, rejected) == 1
    assert statuses(knack) == {rejected["id"]: READY, healthy["id"]: SENT}
    assert rejected["id"] not in journal(bridge_env)
    assert any("Invalid SR number" in line for line in lines_naming(run.stdout, rejected["id"])), run.stdout


ACCEPTANCES = {
    "empty-body": b"",
    "soap-1.2-envelope": (f'<?xml version="1.0"?><e:Envelope xmlns:e="{SOAP12_NS}"><e:Body><r>OK</r></e:Body>'
                          "</e:Envelope>").encode(),
    "soap-1.1-utf-16": (f'<?xml version="1.0" encoding="UTF-16"?><e:Envelope xmlns:e="{SOAP_NS}"><e:Body/>'
                        "</e:Envelope>").encode("utf-16"),
}


@pytest.mark.parametrize("body", list(ACCEPTANCES.values()), ids=list(ACCEPTANCES))
def test_an_empty_or_soap_200_is_accepted(run_bridge, knack, esb, seed, bridge_env, body):
    records = seed(2)
    esb.inject(status=200, body=body, content_type="text/xml", processed=True)

    run = run_bridge()

    assert run.returncode == 0, run.output
    assert len(esb.received) == 2
    assert statuses(knack) == {r["id"]: SENT for r in records}
    assert journal(bridge_env) == {r["id"]: "done" for r in records}


# ================================================================================================================
# 5. An answer that may follow a forwarded message keeps the outcome unknown (7§4)
# ================================================================================================================

MAY_HAVE_BEEN_FORWARDED = {
    "504-gateway-timeout": dict(status=504, processed=True),
    "502-bad-gateway": dict(status=502, processed=True),
    "dropped-after-the-request": dict(drop=True, processed=True),
    "tls-error-after-the-request": dict(garble=True, processed=True),
}


@pytest.mark.parametrize("answer", list(MAY_HAVE_BEEN_FORWARDED.values()), ids=list(MAY_HAVE_BEEN_FORWARDED))
def test_an_answer_that_may_follow_a_forwarded_message_is_not_repeated(run_bridge, knack, esb, seed, bridge_env,
                                                                       answer):
    # The simulator takes the message in (processed) and then answers badly, as a gateway whose upstream
    # timed out after passing the message on to 311.
    unknown, healthy = seed(2)
    esb.inject(**answer, record=unknown["id"])

    run = run_bridge()

    assert run.returncode == 1, run.output
    no_traceback(run)
    assert copies_received(esb, unknown) == 1  # not repeated within the run
    assert statuses(knack) == {unknown["id"]: READY, healthy["id"]: SENT}
    assert journal(bridge_env) == {unknown["id"]: "sending", healthy["id"]: "done"}

    assert_resent_with_warning(run_bridge, knack, bridge_env, [unknown, healthy], unknown)
    assert esb.copies()[unknown["id"]] == 2  # the accepted cost of not losing it, announced by the warning


def test_503_says_not_handled_and_is_retried_within_the_run(run_bridge, knack, esb, seed, bridge_env):
    [record] = seed(1)
    esb.inject(status=503, count=2)

    run = run_bridge()

    assert run.returncode == 0, run.output
    assert [r.status for r in esb.received] == [503, 503, 200]
    assert esb.copies() == {record["id"]: 1}
    assert statuses(knack) == {record["id"]: SENT}


def test_503_beyond_the_tries_leaves_nothing_unknown(run_bridge, knack, esb, seed, bridge_env):
    refused, healthy = seed(2)
    esb.inject(status=503, count=3, record=refused["id"])

    run = run_bridge()

    assert run.returncode == 1, run.output
    assert copies_received(esb, refused) == 3
    assert statuses(knack) == {refused["id"]: READY, healthy["id"]: SENT}
    assert refused["id"] not in journal(bridge_env)  # 503 = not handled: the next run sends it without a warning

    rerun = run_bridge()
    assert rerun.returncode == 0, rerun.output
    assert not warned_duplicate(rerun.stdout, refused)
    assert esb.copies() == {refused["id"]: 1, healthy["id"]: 1}


def test_a_redirect_means_a_wrong_endpoint_and_stops_the_run(run_bridge, knack, esb, seed, bridge_env):
    records = seed(MORE_THAN_THE_WORKERS_START)
    esb.inject(status=301, count=len(records))

    run = run_bridge()

    assert run.returncode == 1, run.output
    assert 1 <= len(esb.received) <= DEFAULT_ESB_MAX_IN_FLIGHT  # the POSTs already begun; no record started after
    assert max(collections.Counter(r.record_id for r in esb.received).values()) == 1  # not followed, not retried
    assert statuses(knack) == {r["id"]: READY for r in records}
    assert journal(bridge_env) == {}
    assert lines_naming(run.stdout, "ESB_ENDPOINT"), run.stdout


# ================================================================================================================
# 6. A bounded answer: an endless 200 does not grow the process (7§8)
# ================================================================================================================

def peak_memory_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a running process, in MB; 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) / 1024 if found else 0.0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read the peak memory")
def test_an_endless_answer_is_read_to_1mb_only(start_bridge, knack, esb, seed, bridge_env):
    unknown, healthy = seed(2)
    esb.inject(endless=True, record=unknown["id"])
    bound_mb = 200.0

    proc = start_bridge(env={"ESB_TIMEOUT": "20"})
    peak = 0.0
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        peak = max(peak, peak_memory_mb(proc.pid))
        if peak > bound_mb:
            proc.kill()
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=30)

    assert peak <= bound_mb, f"the process grew to {peak:.0f} MB reading an endless answer"
    assert proc.returncode == 1, out + err
    assert copies_received(esb, unknown) == 1
    assert statuses(knack) == {unknown["id"]: READY, healthy["id"]: SENT}
    assert journal(bridge_env) == {unknown["id"]: "sending", healthy["id"]: "done"}
    assert API_KEY not in out + err

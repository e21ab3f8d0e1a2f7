"""The ESB simulator over real HTTPS with mutual TLS, using certificates made at test time."""

from __future__ import annotations

import socket
import ssl
import stat
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from lxml import etree

from simulators.certs import PKIFiles, make_pki
from simulators.esb import ACC_NS, SOAP_NS, ESBSimulator, fault_body, parse_message

TIMEOUT = 5  # seconds; every request in these tests has an explicit timeout


def message(record_id: str = "rec1", details: str = "Crew fixed the light &#233;") -> bytes:
    return (
        f'<soapenv:Envelope xmlns:soapenv="{SOAP_NS}" xmlns:acc="{ACC_NS}"><soapenv:Header/>'
        "<soapenv:Body><acc:submitKnack><header><emi>EMI-42</emi><timestamp>2024-05-01T10:00:00</timestamp>"
        "<source>KNACK</source><target>CSR</target><data_type>CSR</data_type><event>UPDATE</event></header>"
        f"<data><csr><id>{record_id}</id><csr_activity_id/><sr_number>24-00012345</sr_number>"
        "<issue_status_code>CLOSED</issue_status_code><activity_type_code>SIGNALS</activity_type_code>"
        f"<activity_details>{details}</activity_details><outcome_code>COMPLET1</outcome_code>"
        "<activity_date>2024-05-01T09:30:00</activity_date></csr></data></acc:submitKnack>"
        "</soapenv:Body></soapenv:Envelope>"
    ).encode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKIFiles:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def esb(pki):
    with ESBSimulator(
        server_cert=pki.server_cert, server_key=pki.server_key, client_ca_bundle=pki.client_ca_bundle
    ) as simulator:
        yield simulator


def post(url, pki, body=None, *, cert="ours", verify=None, timeout=TIMEOUT, content_type="text/xml"):
    certs = {
        "ours": (str(pki.client_cert), str(pki.client_key)),
        "rogue": (str(pki.rogue_client_cert), str(pki.rogue_client_key)),
        None: None,
    }
    return requests.post(
        url,
        data=message() if body is None else body,
        headers={"Content-Type": content_type},
        cert=certs[cert],
        verify=str(verify or pki.ca_bundle),
        timeout=timeout,
    )


def eventually(condition, timeout=2.0) -> bool:
    """For server-side bookkeeping that may land just after the client saw the outcome."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def fault_of(response) -> tuple[str, str]:
    root = etree.fromstring(response.content)
    fault = root.find(f"{{{SOAP_NS}}}Body/{{{SOAP_NS}}}Fault")
    assert fault is not None, response.content
    return fault.findtext("faultcode"), fault.findtext("faultstring")


# -- certificates -----------------------------------------------------------------


def test_make_pki_writes_pem_files_with_private_keys(tmp_path):
    files = make_pki(tmp_path / "new")
    for path in vars(files).values():
        assert path.read_bytes().startswith(b"-----BEGIN ")
    for key in (files.server_key, files.client_key, files.rogue_server_key, files.rogue_client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert b"PRIVATE KEY" in key.read_bytes()
    assert files.ca_bundle.read_bytes() != files.rogue_ca_bundle.read_bytes()


# -- the happy path ---------------------------------------------------------------


def test_accepts_a_message_from_a_trusted_client(esb, pki):
    response = post(esb.url, pki)

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/xml")
    root = etree.fromstring(response.content)
    status = root.find(f"{{{SOAP_NS}}}Body/{{{ACC_NS}}}submitKnackResponse/status")
    assert status is not None and status.text == "SUCCESS"

    [received] = esb.accepted
    assert received.record_id == "rec1"
    assert received.emi == "EMI-42"
    assert received.status == 200
    assert received.client_subject == "knack-311-client"
    assert received.body == message()
    assert esb.received == [received]


def test_url_is_loopback_https_on_the_configured_path(esb):
    assert esb.url.startswith("https://127.0.0.1:")
    assert esb.url.endswith("/submitKnack")


def test_parse_message_reads_every_field(esb, pki):
    post(esb.url, pki)
    values = parse_message(esb.accepted[0].body)

    assert values["id"] == "rec1"
    assert values["sr_number"] == "24-00012345"
    assert values["activity_details"] == "Crew fixed the light \u00e9"  # reference resolved to text
    assert values["csr_activity_id"] == ""
    assert values["outcome_code"] == "COMPLET1"
    assert values["elements"][:4] == ["Envelope", "Header", "Body", "submitKnack"]
    assert values["elements"][-1] == "activity_date"


def test_parse_message_gives_empty_strings_for_missing_elements():
    values = parse_message(f'<soapenv:Envelope xmlns:soapenv="{SOAP_NS}"/>'.encode())
    assert values["id"] == "" and values["emi"] == ""
    assert values["elements"] == ["Envelope"]
    with pytest.raises(ValueError):
        parse_message(b"not xml")


def test_copies_counts_accepted_duplicates(esb, pki):
    for record_id in ("a", "b", "a"):
        assert post(esb.url, pki, message(record_id)).status_code == 200
    esb.inject(status=503)
    assert post(esb.url, pki, message("c")).status_code == 503

    assert esb.copies() == {"a": 2, "b": 1}
    assert [r.record_id for r in esb.received] == ["a", "b", "a", "c"]


# -- TLS: both sides must prove who they are --------------------------------------


def test_client_without_certificate_is_refused_and_server_keeps_serving(esb, pki):
    with pytest.raises(requests.exceptions.ConnectionError):  # SSLError is a ConnectionError
        post(esb.url, pki, cert=None)

    assert esb.received == []
    assert eventually(lambda: esb.handshake_failures == 1)
    assert post(esb.url, pki).status_code == 200


def test_client_with_rogue_certificate_is_refused(esb, pki):
    with pytest.raises(requests.exceptions.ConnectionError):
        post(esb.url, pki, cert="rogue")

    assert esb.received == []
    assert post(esb.url, pki).status_code == 200


def test_client_verifying_with_another_ca_rejects_the_server(esb, pki):
    with pytest.raises(requests.exceptions.SSLError):
        post(esb.url, pki, verify=pki.rogue_ca_bundle)
    assert esb.received == []


def test_server_with_rogue_certificate_is_rejected_by_the_client(pki):
    with ESBSimulator(
        server_cert=pki.rogue_server_cert,
        server_key=pki.rogue_server_key,
        client_ca_bundle=pki.client_ca_bundle,
    ) as impostor:
        with pytest.raises(requests.exceptions.SSLError):
            post(impostor.url, pki)
        assert impostor.received == []


def test_stalled_handshake_does_not_block_other_clients(esb, pki):
    # A client that opens TCP and never speaks TLS; the handshake runs in its own thread.
    host, port = esb.url.split("/")[2].split(":")
    with socket.create_connection((host, int(port))):
        assert post(esb.url, pki, timeout=2).status_code == 200


# -- HTTP and SOAP rules ----------------------------------------------------------


def test_wrong_path_is_404(esb, pki):
    assert post(esb.url.replace("/submitKnack", "/other"), pki).status_code == 404
    assert esb.accepted == []


def test_wrong_content_type_is_415(esb, pki):
    assert post(esb.url, pki, content_type="application/json").status_code == 415
    assert esb.accepted == []


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(message(details="Caf\u00e9 owner called"), id="non-ascii"),
        pytest.param(b"<soapenv:Envelope><unclosed>", id="malformed"),
        pytest.param(
            f'<soapenv:Envelope xmlns:soapenv="{SOAP_NS}"><soapenv:Body/></soapenv:Envelope>'.encode(),
            id="no-submitKnack",
        ),
        pytest.param(b"<Envelope><Body/></Envelope>", id="not-soap"),
    ],
)
def test_bad_message_gets_client_fault_and_is_not_accepted(esb, pki, body):
    response = post(esb.url, pki, body)

    assert response.status_code == 500
    faultcode, faultstring = fault_of(response)
    assert faultcode == "soapenv:Client"
    assert faultstring
    assert esb.accepted == []
    assert [r.status for r in esb.received] == [500]


def test_character_references_are_accepted(esb, pki):
    body = message(details="Caf&#233; &#8212; &amp; more")
    assert post(esb.url, pki, body, content_type="text/xml; charset=utf-8").status_code == 200
    assert parse_message(esb.accepted[0].body)["activity_details"] == "Caf\u00e9 \u2014 & more"


# -- injected failures ------------------------------------------------------------


def test_injected_status_applies_to_the_next_count_posts(esb, pki):
    esb.inject(status=503, count=2)

    statuses = [post(esb.url, pki, message(f"r{i}")).status_code for i in range(3)]

    assert statuses == [503, 503, 200]
    assert [r.record_id for r in esb.accepted] == ["r2"]
    assert [r.status for r in esb.received] == [503, 503, 200]


def test_injected_fault_is_a_soap_server_fault(esb, pki):
    esb.inject(fault="Backend CSR system unavailable")

    response = post(esb.url, pki)

    assert response.status_code == 500
    assert fault_of(response) == ("soapenv:Server", "Backend CSR system unavailable")
    assert esb.accepted == []
    assert esb.received[0].record_id == "rec1"  # the simulator still saw what was sent


def test_injected_fault_with_status_200_is_not_accepted(esb, pki):
    esb.inject(fault="Invalid SR number", status=200)

    response = post(esb.url, pki)

    assert response.status_code == 200
    assert fault_of(response)[1] == "Invalid SR number"
    assert esb.accepted == []


def test_injected_drop_closes_without_answer(esb, pki):
    esb.inject(drop=True)

    with pytest.raises(requests.exceptions.ConnectionError):
        post(esb.url, pki)

    assert [r.status for r in esb.received] == [0]
    assert esb.accepted == []
    assert post(esb.url, pki).status_code == 200


@pytest.mark.timing
def test_injected_delay_outlasts_a_short_client_timeout(esb, pki):
    esb.inject(delay=1.0)

    with pytest.raises(requests.exceptions.Timeout):
        post(esb.url, pki, timeout=0.3)

    # The ESB took the message in; only its answer was late.
    assert [r.record_id for r in esb.accepted] == ["rec1"]


@pytest.mark.timing
def test_delay_alone_is_then_answered_normally(esb, pki):
    esb.inject(delay=0.3)
    assert post(esb.url, pki, timeout=TIMEOUT).elapsed.total_seconds() >= 0.3
    assert len(esb.accepted) == 1


@pytest.mark.timing
def test_latency_applies_to_every_answer(esb, pki):
    esb.latency = 0.2
    for _ in range(2):
        response = post(esb.url, pki)
        assert response.status_code == 200
        assert response.elapsed.total_seconds() >= 0.2


def test_clear_faults_cancels_pending_injections(esb, pki):
    esb.inject(status=503, count=5)
    esb.clear_faults()
    assert post(esb.url, pki).status_code == 200


# -- answers that misbehave (issues 6 and 7) ---------------------------------------


def raw_exchange(url, pki, *, read_for: float, tls_version=None) -> tuple[bytes, float]:
    """POST a message over a bare TLS socket and collect what comes back for `read_for` seconds (or until the
    server closes): for answers requests would refuse to show as they are."""
    host, port = url.split("/")[2].split(":")
    context = ssl.create_default_context(cafile=str(pki.ca_bundle))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    body = message()
    request = (f"POST /submitKnack HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/xml\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    received = b""
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(request)
            tls.settimeout(0.2)
            while time.monotonic() - started < read_for:
                try:
                    chunk = tls.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                received += chunk
                if len(received) > 3_000_000:
                    break
    return received, time.monotonic() - started


def test_hang_takes_the_message_in_and_never_answers(esb, pki):
    esb.inject(hang=True)
    with pytest.raises(requests.exceptions.Timeout):
        post(esb.url, pki, timeout=0.5)
    assert [r.status for r in esb.received] == [0]
    assert esb.copies() == {"rec1": 1}  # taken in: only the answer is missing
    assert post(esb.url, pki).status_code == 200  # the next POST is served


def test_stall_sends_the_headers_and_never_the_body(esb, pki):
    esb.inject(stall=True)
    answer, _ = raw_exchange(esb.url, pki, read_for=1.0)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: " in head
    assert rest == b""
    assert esb.copies() == {"rec1": 1}


def test_trickle_sends_the_answer_a_byte_at_a_time(esb, pki):
    esb.inject(trickle=0.1)
    answer, _ = raw_exchange(esb.url, pki, read_for=1.05)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert 5 <= len(rest) <= 12  # about ten bytes in a second, not the whole answer
    assert esb.copies() == {"rec1": 1}


def test_endless_never_ends(esb, pki):
    esb.inject(endless=True)
    answer, _ = raw_exchange(esb.url, pki, read_for=5)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length" not in head
    assert len(rest) > 2_000_000
    assert esb.copies() == {"rec1": 1}


def test_garble_breaks_tls_after_the_request(esb, pki):
    esb.inject(garble=True)
    with pytest.raises(requests.exceptions.SSLError):
        post(esb.url, pki)
    assert [r.record_id for r in esb.received] == ["rec1"]
    assert esb.accepted == []  # unless processed=True


def test_an_injected_body_is_answered_as_is(esb, pki):
    esb.inject(body=b"<html>Access denied</html>", content_type="text/html")
    esb.inject(status=403, body=b"no")
    first, second = post(esb.url, pki), post(esb.url, pki)
    assert (first.status_code, first.headers["Content-Type"], first.content) == (200, "text/html",
                                                                                  b"<html>Access denied</html>")
    assert (second.status_code, second.content) == (403, b"no")
    assert esb.accepted == []


def test_processed_counts_a_misanswered_message_as_taken_in(esb, pki):
    esb.inject(status=504, processed=True)
    esb.inject(status=504)
    assert post(esb.url, pki, message("a")).status_code == 504
    assert post(esb.url, pki, message("b")).status_code == 504
    assert esb.copies() == {"a": 1}


def test_only_one_misbehaviour_at_a_time(esb):
    with pytest.raises(ValueError):
        esb.inject(hang=True, stall=True)


def test_fault_body_in_utf16_and_bare():
    utf16 = fault_body("soapenv:Client", "bad", encoding="UTF-16")
    assert utf16.startswith(b"\xff\xfe") or utf16.startswith(b"\xfe\xff")
    root = etree.fromstring(utf16)
    assert root.find(f"{{{SOAP_NS}}}Body/{{{SOAP_NS}}}Fault/faultstring").text == "bad"
    bare = etree.fromstring(fault_body("Client", "bad", bare=True))
    assert bare.find(f"{{{SOAP_NS}}}Body/Fault/faultstring").text == "bad"


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_tls_version_can_be_pinned_and_a_refused_client_reads_the_alert(pki, version):
    with ESBSimulator(server_cert=pki.server_cert, server_key=pki.server_key,
                      client_ca_bundle=pki.client_ca_bundle, tls_version=version) as pinned:
        response = post(pinned.url, pki)
        assert response.status_code == 200
        # With TLS 1.3 the refusal comes after the client's request; the simulator lingers so that the alert
        # is read, not destroyed by a reset.
        for _ in range(10):
            with pytest.raises(requests.exceptions.SSLError) as refused:
                post(pinned.url, pki, cert="rogue")
            assert "ALERT_UNKNOWN_CA" in str(refused.value)
        assert eventually(lambda: pinned.handshake_failures == 10)
        other = ssl.TLSVersion.TLSv1_3 if version == "1.2" else ssl.TLSVersion.TLSv1_2
        context = ssl.create_default_context(cafile=str(pki.ca_bundle))
        context.minimum_version = context.maximum_version = other
        host, port = pinned.url.split("/")[2].split(":")
        with socket.create_connection((host, int(port)), timeout=5) as raw, pytest.raises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname=host)


# -- concurrent senders -----------------------------------------------------------

def test_concurrent_posts_are_counted_and_timed(esb, pki):
    esb.latency = 0.3
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda n: post(esb.url, pki, message(f"rec{n}")), range(3)))

    assert [r.status_code for r in replies] == [200, 200, 200]
    assert esb.peak_in_flight == 3
    assert all(r.answered_at - r.at >= 0.3 for r in esb.received)
    esb.latency = 0.0
    post(esb.url, pki)
    assert esb.peak_in_flight == 3  # a peak, not the current count


def test_a_rejected_record_gets_a_fault_whenever_it_arrives(esb, pki):
    esb.reject_records = {"rec2": "record rec2 rejected"}

    replies = {n: post(esb.url, pki, message(f"rec{n}")) for n in (1, 2, 3)}

    assert replies[2].status_code == 500 and fault_of(replies[2]) == ("soapenv:Server", "record rec2 rejected")
    assert replies[1].status_code == replies[3].status_code == 200
    assert sorted(r.record_id for r in esb.accepted) == ["rec1", "rec3"]


def test_an_injection_for_one_record_waits_for_that_record_and_comes_first(esb, pki):
    esb.inject(status=503, count=2)  # for any message
    esb.inject(status=502, record="recB")

    answers = [post(esb.url, pki, message(rid)).status_code for rid in ("recA", "recB", "recB", "recA")]

    assert answers == [503, 502, 503, 200]  # recB's own fault first, then the general ones in order
    esb.inject(status=504, record="recC")
    esb.clear_faults()
    assert post(esb.url, pki, message("recC")).status_code == 200


@pytest.mark.timing
def test_capacity_works_on_that_many_at_once_and_queues_the_rest_in_arrival_order(esb, pki):
    esb.latency, esb.capacity = 0.4, 2
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda n: post(esb.url, pki, message(f"rec{n}")), range(6)))

    assert [r.status_code for r in replies] == [200] * 6
    assert esb.peak_in_flight == 6  # all six were open at once: four of them waiting
    received = sorted(esb.received, key=lambda r: r.at)
    work = [(r.at + r.queue_wait, r.at + r.queue_wait + esb.latency) for r in received]
    for begin, _ in work:  # never more than two worked on at one moment
        assert sum(1 for b, e in work if b <= begin < e) <= 2
    assert [b for b, _ in work] == sorted(b for b, _ in work)  # first come, first served
    waits = [r.queue_wait for r in received]
    assert max(waits[:2]) < 0.2 and min(waits[4:]) >= 0.4  # 0 and 0.8 s with exact timing
    assert esb.queue_wait_p90() == pytest.approx(max(waits))


def test_without_capacity_nothing_waits(esb, pki):
    esb.latency = 0.2
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: post(esb.url, pki, message(f"rec{n}")), range(4)))
    assert esb.queue_wait_p90() == 0.0

"""ESBClient against the ESB simulator over real mutual TLS, without the rest of the program: its TLS context,
the stop signal and deadlines, and whether a failed POST may have left (the end-to-end tests of the same
behaviour through the real command are in test_esb_failures.py)."""

from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest
from cryptography.hazmat.primitives import serialization

from config import CONFIG
from knack311.errors import ConfigError
from knack311.esb import ESBClient, ESBUncertain, ESBUnreachable, _Abandoned, _WriteGate, handshake, tls_context
from knack311.settings import load_settings
from knack311.stopping import WRITE_GRACE, Stop
from simulators.certs import CLIENT_NAME
from simulators.esb import ESBSimulator
from tests.test_esb_simulator import message

PASSWORD = "s3cret passphrase"


@pytest.fixture
def esb(pki):
    with ESBSimulator(server_cert=pki.server_cert, server_key=pki.server_key,
                      client_ca_bundle=pki.client_ca_bundle) as simulator:
        yield simulator


@pytest.fixture
def encrypted_key(pki, tmp_path):
    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), password=None)
    path = tmp_path / "encrypted.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.BestAvailableEncryption(PASSWORD.encode())))
    return path


def client(url: str, pki, **kwargs) -> ESBClient:
    options = dict(cert=str(pki.client_cert), key=str(pki.client_key), verify=str(pki.ca_bundle), timeout=5)
    options.update(kwargs)
    return ESBClient(url, **options)


# ----- keys and trust -------------------------------------------------------------------------------------------

def test_an_encrypted_key_with_its_password_is_used_for_the_handshake(esb, pki, encrypted_key):
    delivery = client(esb.url, pki, key=str(encrypted_key), key_password=PASSWORD).deliver(message())
    assert delivery.status == 200
    assert [r.client_subject for r in esb.accepted] == [CLIENT_NAME]


@pytest.mark.parametrize("password,says", [("", "ESB_KEY_PASSWORD is not set"),
                                           ("wrong", "ESB_KEY_PASSWORD does not decrypt it")])
def test_an_encrypted_key_without_its_password_fails_without_asking(esb, pki, encrypted_key, password, says):
    with pytest.raises(ConfigError, match=says) as error:
        client(esb.url, pki, key=str(encrypted_key), key_password=password)
    assert "ESB_KEY" in str(error.value) and PASSWORD not in str(error.value)
    assert esb.received == [] and esb.handshake_failures == 0


def test_settings_carry_the_password_but_never_show_it(pki, encrypted_key):
    env = {"KNACK_APP_ID": "app", "KNACK_API_KEY": "key", "ESB_ENDPOINT": "https://esb.example/submit",
           "ESB_CERT": str(pki.client_cert), "ESB_KEY": str(encrypted_key), "ESB_KEY_PASSWORD": PASSWORD}
    settings = load_settings("data-tracker", env, CONFIG)
    assert settings.esb_key_password == PASSWORD
    assert PASSWORD not in repr(settings)
    with pytest.raises(ConfigError, match="ESB_KEY"):
        load_settings("data-tracker", {**env, "ESB_KEY_PASSWORD": ""}, CONFIG)


def test_the_trust_is_ours_alone(esb, pki, monkeypatch):
    # requests would let REQUESTS_CA_BUNDLE replace the trust, and add certifi's bundle to verify=True.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.ca_bundle))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(pki.ca_bundle))
    for verify in (str(pki.rogue_ca_bundle), True):
        with pytest.raises(ESBUnreachable, match="certificate could not be verified") as refused:
            client(esb.url, pki, verify=verify).deliver(message())
        assert refused.value.lasting
    assert esb.received == []


def test_verification_off_still_presents_our_certificate(pki):
    with ESBSimulator(server_cert=pki.rogue_server_cert, server_key=pki.rogue_server_key,
                      client_ca_bundle=pki.client_ca_bundle) as impostor:
        assert client(impostor.url, pki, verify=False).deliver(message()).status == 200
        assert [r.client_subject for r in impostor.accepted] == [CLIENT_NAME]


def test_the_context_refuses_a_bundle_without_certificates(pki, tmp_path):
    empty = tmp_path / "empty.pem"
    empty.write_text("no certificate here\n")
    with pytest.raises(ConfigError, match="ESB_CA_BUNDLE"):
        tls_context(str(pki.client_cert), str(pki.client_key), "", str(empty))


# ----- whether the request left ---------------------------------------------------------------------------------

def test_the_write_gate_settles_once():
    gate = _WriteGate()
    assert gate.close() is False
    with pytest.raises(_Abandoned):
        gate.open()  # abandoned as "never sent": it must stay so
    gate = _WriteGate()
    gate.open()
    assert gate.close() is True


@pytest.mark.parametrize("timeout", [1.0, pytest.param(30.0, marks=pytest.mark.slow)],
                         ids=["socket-timeout", "stop-signal"])
def test_a_handshake_that_never_completes_is_not_taken_for_a_sent_message(pki, timeout):
    # TCP accepted, TLS never spoken. Whether the socket timeout or a stop signal ends it, the request never left.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        held = []
        threading.Thread(target=lambda: held.append(listener.accept()), daemon=True).start()
        stop = Stop()
        if timeout > 10:
            threading.Timer(0.5, stop.request, args=("SIGTERM",)).start()
        started = time.monotonic()
        with pytest.raises(ESBUnreachable) as failed:
            client(f"https://127.0.0.1:{listener.getsockname()[1]}/submitKnack", pki, timeout=timeout, stop=stop,
                   attempts=1).deliver(message())
        assert type(failed.value) is ESBUnreachable, failed.value  # not ESBUncertain
        assert time.monotonic() - started < WRITE_GRACE + 2
        for conn, _ in held:
            conn.close()


def test_a_refused_connection_is_not_taken(pki):
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(ESBUnreachable, match="connection refused") as refused:
        client(f"https://127.0.0.1:{port}/submitKnack", pki, backoff=0).deliver(message())
    assert type(refused.value) is ESBUnreachable and not refused.value.lasting


# ----- time and the stop signal ---------------------------------------------------------------------------------

def test_a_hung_answer_is_cut_at_the_timeout_as_unknown(esb, pki):
    esb.inject(hang=True)
    started = time.monotonic()
    with pytest.raises(ESBUncertain) as cut:
        client(esb.url, pki, timeout=1).deliver(message())
    assert time.monotonic() - started < 3
    assert not cut.value.by_signal
    assert len(esb.received) == 1


@pytest.mark.slow
def test_a_stop_signal_gives_a_stalled_post_the_write_grace_then_cuts_it(esb, pki):
    esb.inject(stall=True)
    stop = Stop()
    threading.Timer(0.3, stop.request, args=("SIGTERM",)).start()
    started = time.monotonic()
    with pytest.raises(ESBUncertain) as cut:
        client(esb.url, pki, timeout=60, stop=stop).deliver(message())
    assert time.monotonic() - started < 0.3 + WRITE_GRACE + 1.5
    assert cut.value.by_signal


def test_no_503_retry_starts_after_the_stop_signal(esb, pki):
    esb.inject(status=503, count=3)
    stop = Stop()
    threading.Timer(0.5, stop.request, args=("SIGTERM",)).start()
    started = time.monotonic()
    with pytest.raises(ESBUnreachable) as stopped:
        client(esb.url, pki, stop=stop, backoff=10).deliver(message())  # the second retry would wait 20 s
    assert time.monotonic() - started < 3
    assert type(stopped.value) is ESBUnreachable  # 503: not handled, nothing unknown
    time.sleep(0.3)
    assert [r.status for r in esb.received] == [503, 503]


def test_no_connect_retry_starts_after_the_stop_signal(pki):
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    stop = Stop()
    threading.Timer(0.5, stop.request, args=("SIGTERM",)).start()
    started = time.monotonic()
    with pytest.raises(ESBUnreachable) as stopped:
        client(f"https://127.0.0.1:{port}/submitKnack", pki, stop=stop, backoff=10).deliver(message())
    assert time.monotonic() - started < 3  # not the 20 s backoff before the third connect
    assert type(stopped.value) is ESBUnreachable


def test_no_retry_starts_past_the_runs_deadline(esb, pki):
    esb.inject(status=503, count=3)
    stop = Stop(max_runtime=0.5, request_timeout=1)
    started = time.monotonic()
    with pytest.raises(ESBUnreachable):
        client(esb.url, pki, stop=stop, backoff=10).deliver(message())
    assert time.monotonic() - started < 2
    assert len(esb.received) == 2


# ----- the pre-flight's handshake (no request) --------------------------------------------------------------------

def shake(url: str, pki, **kwargs):
    options = dict(cert=str(pki.client_cert), key=str(pki.client_key), key_password="", verify=str(pki.ca_bundle),
                   timeout=5)
    options.update(kwargs)
    return handshake(url, **options)


class QuietTLSServer:
    """A TLS 1.3 server that takes any client, sends no session ticket, then either says nothing or hangs up
    without an alert: what the pre-flight cannot learn from tickets."""

    def __init__(self, pki, *, hang_up: bool):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.server_cert, pki.server_key)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.num_tickets = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.listener.getsockname()[1]}/submitKnack"
        self.read: list[bytes] = []
        self._held = []

        def serve() -> None:
            conn, _ = self.listener.accept()
            with context.wrap_socket(conn, server_side=True) as tls:
                if hang_up:
                    socket.socket.shutdown(tls, socket.SHUT_RDWR)  # no close_notify, no alert
                    return
                tls.settimeout(3)
                try:
                    self.read.append(tls.recv(1))
                except OSError:
                    pass

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.thread.join(5)
        self.listener.close()


def test_the_handshake_probe_takes_silence_after_tls13_as_acceptance_after_the_settle_time(pki):
    server = QuietTLSServer(pki, hang_up=False)
    try:
        started = time.monotonic()
        result = shake(server.url, pki, settle=0.3)
        assert time.monotonic() - started >= 0.3
        assert result.tls_version == "TLSv1.3" and result.server_certificate
    finally:
        server.close()
    assert not any(server.read)  # the probe wrote nothing before it closed


def test_the_handshake_probe_takes_a_hang_up_after_tls13_for_a_refused_certificate(pki):
    server = QuietTLSServer(pki, hang_up=True)
    try:
        with pytest.raises(ESBUnreachable, match=r"closed the connection right after the TLS handshake.*ESB_CERT"):
            shake(server.url, pki)
    finally:
        server.close()


def test_the_handshake_probe_is_bounded_by_the_timeout(pki):
    # TCP accepted, TLS never spoken
    with socket.create_server(("127.0.0.1", 0)) as listener:
        held = []
        threading.Thread(target=lambda: held.append(listener.accept()), daemon=True).start()
        started = time.monotonic()
        with pytest.raises(ESBUnreachable, match="ESB_ENDPOINT"):
            shake(f"https://127.0.0.1:{listener.getsockname()[1]}/submitKnack", pki, timeout=1)
        assert time.monotonic() - started < 3
        for conn, _ in held:
            conn.close()


def test_the_handshake_probe_and_a_post_name_a_refused_certificate_alike(esb, pki):
    with pytest.raises(ESBUnreachable) as probe:
        shake(esb.url, pki, cert=str(pki.rogue_client_cert), key=str(pki.rogue_client_key))
    with pytest.raises(ESBUnreachable) as post:
        client(esb.url, pki, cert=str(pki.rogue_client_cert), key=str(pki.rogue_client_key)).deliver(message())
    assert str(probe.value) == str(post.value)
    assert str(probe.value).startswith(
        f"the ESB did not accept our client certificate (ESB_CERT {pki.rogue_client_cert})")
    assert len(esb.received) == 0

"""ESB_PROXY: an explicit http:// CONNECT proxy towards the ESB (issue 14, 9). TLS, the client certificate and
the verification of the ESB's certificate stay end to end through the tunnel; the proxy's credentials are never
printed; a malformed value is a configuration error; a refusing proxy leaves the record unposted.

The proxy is simulators/proxy.py, a real CONNECT proxy on loopback that records every tunnel it was asked for.
"""

from __future__ import annotations

import socket

import pytest
import trustme

from knack311.errors import ConfigError
from knack311.esb import ESBClient, ESBUncertain, ESBUnreachable, handshake
from knack311.esb_proxy import esb_proxy_setting, proxy_address, proxy_authorization
from simulators.proxy import ConnectProxy
from tests.conftest import API_KEY, statuses
from tests.test_check_e2e import check
from tests.test_esb_failures import journal, lines_naming, no_traceback, summary
from tests.test_esb_simulator import message

READY, SENT = "READY_TO_SEND", "SENT"
PROXY_PASSWORD = "canary-proxy-password-71d2"


@pytest.fixture
def proxy():
    with ConnectProxy() as started:
        yield started


def esb_address(esb) -> str:
    return esb.url.split("//", 1)[1].split("/", 1)[0]


def with_credentials(url: str, user: str = "bridge", password: str = PROXY_PASSWORD) -> str:
    return url.replace("http://", f"http://{user}:{password}@")


# ----- the setting ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["http://proxy.city.example:3128", "http://10.1.2.3:8080/",
                                   "http://user:p%40ss@proxy.city.example:3128", "http://[::1]:3128"])
def test_an_http_proxy_with_host_and_port_is_taken(value):
    assert esb_proxy_setting(f"  {value} ") == value


def test_unset_means_no_proxy():
    assert esb_proxy_setting("") == "" and esb_proxy_setting("   ") == ""


MALFORMED = {
    "socks": "socks5://proxy.city.example:1080",
    "https-proxy": "https://proxy.city.example:3128",
    "no-port": "http://proxy.city.example",
    "port-not-a-number": "http://proxy.city.example:31x8",
    "port-out-of-range": "http://proxy.city.example:99999",
    "no-host": "http://:3128",
    "a-path": "http://proxy.city.example:3128/connect",
    "no-scheme": "proxy.city.example:3128",
    "a-space": "http://proxy city:3128",
}


@pytest.mark.parametrize("value", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_proxy_is_a_configuration_error_naming_esb_proxy(value):
    with pytest.raises(ConfigError) as refused:
        esb_proxy_setting(value)
    assert "ESB_PROXY" in str(refused.value)
    with pytest.raises(ConfigError) as refused:
        esb_proxy_setting(value.replace("://", f"://u:{PROXY_PASSWORD}@", 1) if "://" in value
                          else f"u:{PROXY_PASSWORD}@{value}")
    assert PROXY_PASSWORD not in str(refused.value) and "not shown" in str(refused.value)


def test_the_address_and_the_header_carry_the_credentials_only_where_they_belong():
    url = "http://bridge:p%40ss%3Aword@proxy.city.example:3128"
    assert proxy_address(url) == "proxy.city.example:3128"
    assert proxy_authorization(url) == {"Proxy-Authorization": "Basic YnJpZGdlOnBAc3M6d29yZA=="}  # bridge:p@ss:word
    assert proxy_authorization("http://proxy.city.example:3128") == {}


# ----- the client through a real CONNECT proxy ------------------------------------------------------------------

def client(esb, pki, proxy_url: str, **kwargs) -> ESBClient:
    return ESBClient(esb.url, cert=str(pki.client_cert), key=str(pki.client_key), verify=str(pki.ca_bundle),
                     timeout=5, proxy=proxy_url, backoff=0.01, **kwargs)


def test_a_post_goes_through_the_tunnel_with_tls_end_to_end(esb, pki, proxy):
    delivery = client(esb, pki, proxy.url).deliver(message("rec-via-proxy"))

    assert delivery.status == 200
    assert [c.target for c in proxy.connects] == [esb_address(esb)] and proxy.tunnels == 1
    assert [r.record_id for r in esb.accepted] == ["rec-via-proxy"]
    assert esb.accepted[0].client_subject  # our client certificate reached the ESB through the tunnel
    assert proxy.carried[:1] == b"\x16"  # a TLS handshake record: the proxy carried TLS, not HTTP
    assert b"submitKnack" not in proxy.carried and b"rec-via-proxy" not in proxy.carried


def test_the_tunnel_verifies_the_esbs_certificate_as_without_a_proxy(esb, pki, proxy, tmp_path):
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    with pytest.raises(ESBUnreachable) as untrusted:
        ESBClient(esb.url, cert=str(pki.client_cert), key=str(pki.client_key), verify=str(other_ca), timeout=5,
                  proxy=proxy.url).deliver(message())
    assert "ESB_CA_BUNDLE" in str(untrusted.value)
    assert esb.received == []


def test_credentials_go_to_the_proxy_in_the_connect_only(esb, pki):
    with ConnectProxy(credentials=("bridge", PROXY_PASSWORD)) as guarded:
        client(esb, pki, with_credentials(guarded.url)).deliver(message())
        assert [c.status for c in guarded.connects] == [200]
        with pytest.raises(ESBUnreachable) as refused:
            client(esb, pki, with_credentials(guarded.url, password="wrong")).deliver(message())
    assert "ESB_PROXY" in str(refused.value) and "407" in str(refused.value)
    assert "wrong" not in str(refused.value)
    assert PROXY_PASSWORD.encode() not in esb.received[0].body + repr(esb.received[0].headers).encode()


def test_a_refusing_proxy_means_the_message_never_left(esb, pki):
    with ConnectProxy(refuse=True) as refusing:
        with pytest.raises(ESBUnreachable) as refused:
            client(esb, pki, refusing.url).deliver(message())
    assert type(refused.value) is ESBUnreachable and not isinstance(refused.value, ESBUncertain)
    assert refused.value.lasting  # its rules will not change within the run
    assert "ESB_PROXY" in str(refused.value) and "403" in str(refused.value)
    assert esb.received == [] and esb.handshake_failures == 0


def test_a_proxy_that_is_not_there_is_named(esb, pki):
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with pytest.raises(ESBUnreachable) as down:
        client(esb, pki, f"http://127.0.0.1:{port}").deliver(message())
    assert type(down.value) is ESBUnreachable
    assert f"ESB_PROXY 127.0.0.1:{port}" in str(down.value) and "connection refused" in str(down.value)


def test_the_handshake_probe_goes_through_the_proxy(esb, pki, proxy):
    result = handshake(esb.url, cert=str(pki.client_cert), key=str(pki.client_key), key_password="",
                       verify=str(pki.ca_bundle), timeout=5, proxy=proxy.url)
    assert result.proxy == proxy.address and result.tls_version.startswith("TLS")
    assert [c.target for c in proxy.connects] == [esb_address(esb)]
    assert esb.received == []


def test_the_esb_session_still_ignores_https_proxy(esb, pki, proxy, monkeypatch):
    with ConnectProxy(refuse=True) as environment_proxy:
        monkeypatch.setenv("HTTPS_PROXY", environment_proxy.url)
        client(esb, pki, proxy.url).deliver(message())
        assert environment_proxy.connects == []
    assert len(proxy.connects) == 1


# ----- the real command -----------------------------------------------------------------------------------------

def test_the_run_posts_through_esb_proxy_and_marks_the_records_sent(run_bridge, knack, esb, seed, bridge_env):
    records = seed(3)
    with ConnectProxy(credentials=("bridge", PROXY_PASSWORD)) as guarded:
        run = run_bridge(env={"ESB_PROXY": with_credentials(guarded.url)})
        connects = guarded.connects

    assert run.returncode == 0, run.output
    no_traceback(run)
    assert connects and {c.target for c in connects} == {esb_address(esb)}
    assert all(c.status == 200 for c in connects)
    assert esb.copies() == {r["id"]: 1 for r in records}
    assert statuses(knack) == {r["id"]: SENT for r in records}
    assert journal(bridge_env) == {r["id"]: "done" for r in records}
    assert PROXY_PASSWORD not in run.output and API_KEY not in run.output


def test_a_refusing_proxy_leaves_the_records_unposted_and_says_esb_proxy(run_bridge, knack, esb, seed, bridge_env):
    records = seed(2)
    with ConnectProxy(refuse=True) as refusing:
        run = run_bridge(env={"ESB_PROXY": with_credentials(refusing.url)})
        asked = refusing.connects

    assert run.returncode == 1, run.output
    no_traceback(run)
    assert asked, "the program never asked the proxy"
    assert esb.received == [] and esb.handshake_failures == 0
    assert statuses(knack) == {r["id"]: READY for r in records}
    assert journal(bridge_env) == {}  # never left: the next run sends them without a duplicate warning
    failed = [line for r in records for line in lines_naming(run.stdout, r["id"]) if "FAILED" in line]
    assert failed and all("ESB_PROXY" in line and "403" in line for line in failed), run.stdout
    assert "stopped:" in summary(run.stdout)
    assert PROXY_PASSWORD not in run.output


@pytest.mark.parametrize("value", ["socks5://u:{pw}@127.0.0.1:1080", "http://u:{pw}@127.0.0.1:99999",
                                   "http://127.0.0.1"], ids=["socks-with-credentials", "bad-port", "no-port"])
def test_a_malformed_esb_proxy_stops_the_run_before_anything_is_sent(run_bridge, knack, esb, seed, value):
    records = seed(1)
    run = run_bridge(env={"ESB_PROXY": value.format(pw=PROXY_PASSWORD)})

    assert run.returncode == 2, run.output
    no_traceback(run)
    [line] = [line for line in run.stderr.splitlines() if line.strip()]
    assert "ESB_PROXY" in line
    assert PROXY_PASSWORD not in run.output
    assert knack.request_log == [] and esb.received == [] and esb.handshake_failures == 0
    assert statuses(knack) == {r["id"]: READY for r in records}


def test_check_shows_esb_proxy_and_shakes_hands_through_it(run_bridge, knack, esb, seed):
    seed(1)
    with ConnectProxy(credentials=("bridge", PROXY_PASSWORD)) as guarded:
        run, table = check(run_bridge, ESB_PROXY=with_credentials(guarded.url))
        connects = guarded.connects

    assert table.status("ESB_PROXY") == "OK"
    assert guarded.address in table.detail("ESB_PROXY") and "credentials (not shown)" in table.detail("ESB_PROXY")
    assert table.status("ESB TLS handshake") == "OK", run.stdout
    assert f"through ESB_PROXY {guarded.address}" in table.detail("ESB TLS handshake")
    assert [c.target for c in connects] == [esb_address(esb)]
    assert esb.received == []
    assert PROXY_PASSWORD not in run.output


def test_check_fails_the_handshake_row_naming_a_refusing_proxy(run_bridge, knack, esb):
    with ConnectProxy(refuse=True) as refusing:
        run, table = check(run_bridge, ESB_PROXY=refusing.url)

    assert run.returncode == 2, run.output
    assert table.status("ESB TLS handshake") == "FAIL"
    assert "ESB_PROXY" in table.detail("ESB TLS handshake") and "403" in table.detail("ESB TLS handshake")


def test_check_fails_a_malformed_esb_proxy_without_showing_its_credentials(run_bridge, knack, esb):
    run, table = check(run_bridge, ESB_PROXY=f"socks5://u:{PROXY_PASSWORD}@127.0.0.1:1080")

    assert run.returncode == 2, run.output
    assert table.status("ESB_PROXY") == "FAIL"
    assert PROXY_PASSWORD not in run.output

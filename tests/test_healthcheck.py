"""The dead man's switch pings against real loopback servers: one that answers, a dead port, one that hangs,
one that trickles its answer."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from knack311.errors import ConfigError
from knack311.healthcheck import Healthcheck, healthcheck_url, ping_url
from knack311.logs import EventLog
from knack311.outcomes import Readers, ReportError, RunReport

SECRET = "5f1f3c2e-6b8a-4c55-9d1e-0c1d2e3f4a5b"


class PingServer:
    """A healthchecks stand-in on 127.0.0.1 that records every request."""

    def __init__(self, status: int = 200):
        self.requests: list[tuple[str, str, dict, bytes]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                parts = urlsplit(self.path)
                server.requests.append((self.command, parts.path, parse_qs(parts.query), self.rfile.read(length)))
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            do_GET = do_POST = do_HEAD = _handle

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/ping/{SECRET}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class SilentServer:
    """Accepts connections and then says nothing, or trickles an answer one byte at a time."""

    def __init__(self, trickle: bool = False):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/{SECRET}"
        self.trickle = trickle
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        self.sock.settimeout(0.05)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
            except OSError:
                pass
            if self.trickle:
                for conn in self.conns:
                    try:
                        conn.send(b"H")  # "HHHH...": never a whole status line, always another byte soon
                    except OSError:
                        pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        for conn in self.conns:
            conn.close()
        self.sock.close()


def dead_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connections are refused
    return f"http://127.0.0.1:{port}/{SECRET}"


def report(exit_code=0, **kw) -> RunReport:
    return RunReport(app="data-tracker", exit_code=exit_code, fetched=3, sent=3, duration_s=1.0, **kw)


def test_start_then_exit_code_with_the_same_run_id_and_the_summary_as_body():
    with PingServer() as server:
        check = Healthcheck(server.url)
        check.started("data-tracker")
        check.finished(report(0))
        check.finished(report(1, stop_reason="the ESB cannot be reached"))
    methods, paths, queries, bodies = zip(*server.requests, strict=True)
    assert paths == (f"/ping/{SECRET}/start", f"/ping/{SECRET}/0", f"/ping/{SECRET}/1")
    assert set(methods) == {"POST"}
    assert {q["rid"][0] for q in queries} == {check.run_id}
    assert bodies[0] == b""
    assert bodies[1].decode().startswith("summary: fetched=3 sent=3")
    assert bodies[2].decode().endswith("stopped: the ESB cannot be reached")


def test_a_locked_run_only_logs_and_a_dry_run_pings_nothing():
    with PingServer() as server:
        check = Healthcheck(server.url)
        check.finished(RunReport(app="data-tracker", exit_code=75))
        check.finished(report(0, dry_run=True))
    assert [(p, b) for _, p, _, b in server.requests] == [
        (f"/ping/{SECRET}/log", b"another run for data-tracker is active; this run sent nothing")]


def test_ping_url_keeps_an_existing_query():
    assert ping_url("https://hc.example/p/key/slug/?create=1", "start", "r1") == \
        "https://hc.example/p/key/slug/start?create=1&rid=r1"
    assert ping_url("https://hc-ping.com/" + SECRET, "0", "r") == f"https://hc-ping.com/{SECRET}/0?rid=r"


def test_a_refusing_server_answers_fast_and_names_the_host_only():
    check = Healthcheck(dead_url(), timeout=2)
    began = time.monotonic()
    with pytest.raises(ReportError) as caught:
        check.started("data-tracker")
    assert time.monotonic() - began < 2.5
    message = str(caught.value)
    assert message.startswith("healthcheck ping /start to 127.0.0.1:") and "cannot connect" in message
    assert SECRET not in message and "/ping" not in message


@pytest.mark.parametrize("trickle", [False, True], ids=["hangs", "trickles"])
def test_a_hanging_server_is_given_up_within_the_timeout(trickle):
    with SilentServer(trickle=trickle) as server:
        check = Healthcheck(server.url, timeout=0.5)
        began = time.monotonic()
        with pytest.raises(ReportError, match=r"^healthcheck ping /1 to 127\.0\.0\.1:\d+ failed: no answer within "
                                              r"0\.5s$"):
            check.finished(report(1))
        assert time.monotonic() - began < 3  # 0.5 s asked for; generous margin on a loaded machine


def test_an_error_answer_is_a_failed_ping():
    with PingServer(status=404) as server, pytest.raises(ReportError, match=r"failed: HTTP 404$") as caught:
        Healthcheck(server.url).started("data-tracker")
    assert SECRET not in str(caught.value)


def test_a_ping_never_waits_past_the_time_left():
    now = [100.0]
    with SilentServer() as server:
        check = Healthcheck(server.url, timeout=5, deadline=100.4, clock=lambda: now[0])
        began = time.monotonic()
        with pytest.raises(ReportError, match=r"no answer within 0\.4s"):
            check.started("data-tracker")
        assert time.monotonic() - began < 3
        now[0] = 100.5
        with pytest.raises(ReportError, match="skipped: no time left"):
            check.finished(report(0))
        assert len(server.conns) <= 1  # the skipped ping made no connection


def test_failed_pings_are_warnings_in_the_log_and_the_outcome_stands():
    out = io.StringIO()
    readers = Readers([Healthcheck(dead_url(), timeout=1), EventLog("data-tracker", "json", out)])
    readers.started("data-tracker")
    readers.finished(report(0))
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["event"], e["level"]) for e in events] == [("report_failed", "warning"), ("report_failed", "warning"),
                                                          ("summary", "info")]
    assert events[-1]["exit_code"] == 0
    assert SECRET not in out.getvalue()


def test_healthcheck_url_setting():
    assert healthcheck_url(f" https://hc-ping.com/{SECRET} ") == f"https://hc-ping.com/{SECRET}"
    for bad in ("hc-ping.com/x", "ftp://hc-ping.com/x", "https:///x", f"https://hc-ping.com/{SECRET} x"):
        with pytest.raises(ConfigError) as caught:
            healthcheck_url(bad)
        assert SECRET not in str(caught.value)

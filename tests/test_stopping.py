"""The run's stop signal and deadlines (knack311/stopping.py) and the retries and reads that obey them
(knack311/http.py), against real sockets on loopback."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from knack311.http import AnswerTooLarge, RetryStopped, read_capped, with_stop
from knack311.stopping import WRITE_GRACE, CutShort, Stop


class Trickle(BaseHTTPRequestHandler):
    """Answers 200 with a body sent one byte every 0.2 s, forever (until the client goes)."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        try:
            while True:
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass

    def log_message(self, *args):
        pass


class Counting(BaseHTTPRequestHandler):
    """Answers every request 503 with Retry-After; counts the requests."""

    hits = 0
    retry_after = "1"
    body = b""

    def do_GET(self):
        type(self).hits += 1
        self.send_response(503)
        self.send_header("Retry-After", self.retry_after)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class Endless(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        try:
            while True:
                self.wfile.write(b"y" * 65536)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    servers = []

    def start(handler) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_trickling_answer_is_cut_at_the_call_timeout(serve):
    url = serve(Trickle)
    stop = Stop()
    started = time.monotonic()
    with pytest.raises(CutShort) as cut:
        # requests' own read timeout (5 s) is never tripped: a byte comes every 0.2 s
        stop.call(lambda: requests.get(url, timeout=5).content, timeout=1.0, what="GET trickle")
    assert 0.9 <= time.monotonic() - started < 3
    assert not cut.value.by_signal


def test_a_read_is_abandoned_at_once_on_the_stop_signal_a_write_gets_the_grace():
    stop = Stop()
    blocker = threading.Event()
    threading.Timer(0.3, stop.request, args=("SIGTERM",)).start()
    started = time.monotonic()
    with pytest.raises(CutShort) as cut:
        stop.call(blocker.wait, timeout=60, what="read")
    assert time.monotonic() - started < 1.5
    assert cut.value.by_signal

    # a write that finishes inside the grace is not cut
    assert stop.call(lambda: time.sleep(1.0) or "accepted", timeout=60, what="write", write=True) == "accepted"
    # a write that would take longer is cut when the grace is over, not before
    started = time.monotonic()
    with pytest.raises(CutShort) as cut:
        stop.call(blocker.wait, timeout=60, what="write", write=True)
    assert time.monotonic() - started < WRITE_GRACE + 0.5
    assert cut.value.by_signal
    blocker.set()


def test_no_call_runs_past_the_hard_deadline():
    stop = Stop(max_runtime=0.3, request_timeout=0.4)
    blocker = threading.Event()
    started = time.monotonic()
    with pytest.raises(CutShort):
        stop.call(blocker.wait, timeout=60, what="write", write=True)
    assert time.monotonic() - started < 1.2
    assert not stop.work_time_left()
    blocker.set()


def test_errors_and_values_come_back_to_the_caller():
    stop = Stop()
    assert stop.call(lambda: 42, timeout=1, what="x") == 42
    with pytest.raises(ZeroDivisionError):
        stop.call(lambda: 1 / 0, timeout=1, what="x")


def test_sigterm_sets_the_stop_and_names_the_signal():
    stop = Stop()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(2) is True
        assert stop.signal_name == "SIGTERM"
        assert not stop.work_time_left()
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_process_signals_reach_a_stop_attached_later_and_stay_installed(monkeypatch):
    """The entry script's handlers: a signal during the start reaches the mode's Stop when it attaches; a Stop
    that ends does not take them down; at the very end signals are ignored (never the default's exit 143)."""
    from knack311 import stopping

    signals = stopping.ProcessSignals()
    monkeypatch.setattr(stopping, "PROCESS_SIGNALS", signals)
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        signals.install()
        os.kill(os.getpid(), signal.SIGTERM)  # before any Stop exists (the imports, the settings)
        time.sleep(0.01)
        assert signals.name == "SIGTERM"

        stop = Stop(request_timeout=1)
        stop.install()
        assert stop.stopped and stop.signal_name == "SIGTERM"
        assert stop.exit_by() <= signals.at + stopping.STOP_WITHIN  # counted from the signal, not from now
        stop.restore()
        assert signal.getsignal(signal.SIGTERM) == signals._handle  # still ours after the run
        os.kill(os.getpid(), signal.SIGINT)  # handled: no KeyboardInterrupt
        time.sleep(0.01)

        later = Stop(request_timeout=1)
        later.install()
        os.kill(os.getpid(), signal.SIGINT)
        assert later.wait(2) is True and later.signal_name == "SIGTERM"  # the process's first signal counts
        later.restore()

        signals.ignore_from_now()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_wait_sleeps_unless_stopped():
    stop = Stop()
    started = time.monotonic()
    assert stop.wait(0.2) is False
    assert time.monotonic() - started >= 0.19
    threading.Timer(0.1, stop.request, args=("SIGINT",)).start()
    started = time.monotonic()
    assert stop.wait(30) is True
    assert time.monotonic() - started < 1


def session_with(retry: Retry) -> requests.Session:
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    return session


def test_no_retry_starts_after_the_stop_signal(serve):
    Counting.hits = 0
    Counting.retry_after = "30"
    url = serve(Counting)
    stop = Stop()
    retry = with_stop(Retry(total=5, status_forcelist=(503,), backoff_factor=0.1, raise_on_status=False), stop)
    threading.Timer(0.3, stop.request, args=("SIGTERM",)).start()
    started = time.monotonic()
    with pytest.raises(RetryStopped):
        session_with(retry).get(url, timeout=5)
    assert time.monotonic() - started < 2
    time.sleep(0.3)
    assert Counting.hits == 1  # the Retry-After wait was broken off, and no second request went


def test_a_retry_that_would_end_past_the_deadline_is_not_begun(serve):
    Counting.hits = 0
    Counting.retry_after = "30"
    url = serve(Counting)
    stop = Stop(max_runtime=2, request_timeout=1)
    retry = with_stop(Retry(total=5, status_forcelist=(503,), raise_on_status=False, retry_after_max=60), stop)
    started = time.monotonic()
    with pytest.raises(RetryStopped):
        session_with(retry).get(url, timeout=5)
    assert time.monotonic() - started < 1
    assert Counting.hits == 1


def test_with_stop_keeps_the_policy():
    retry = Retry(total=4, connect=2, status_forcelist=(429,), backoff_factor=0.5, retry_after_max=30)
    stoppable = with_stop(retry, Stop())
    assert (stoppable.total, stoppable.connect, stoppable.backoff_factor, stoppable.retry_after_max) == (4, 2, 0.5, 30)
    assert stoppable.new(total=3).stop is stoppable.stop  # carried through urllib3's copies
    assert with_stop(retry, None) is retry


def test_an_endless_body_is_refused_at_the_limit(serve):
    url = serve(Endless)
    reply = requests.get(url, stream=True, timeout=5)
    with pytest.raises(AnswerTooLarge):
        read_capped(reply, 1_000_000)


def test_a_declared_oversize_body_is_refused_before_reading():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def answer():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\nabc")
        time.sleep(0.5)
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    reply = requests.get(f"http://127.0.0.1:{listener.getsockname()[1]}/", stream=True, timeout=5)
    with pytest.raises(AnswerTooLarge, match="99999999"):
        read_capped(reply, 1000)
    listener.close()


def test_a_small_body_is_read_whole(serve):
    class Small(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, *args):
            pass

    reply = requests.get(serve(Small), stream=True, timeout=5)
    assert read_capped(reply, 5) == b"hello"

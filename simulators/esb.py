"""A loopback stand-in for the city's Enterprise Service Bus (ESB).

It speaks HTTPS, demands a client certificate signed by the ESB's CA, accepts SOAP 1.1
submitKnack messages and records everything it received, so tests can assert on what
the ESB actually got. Faults, error statuses, dropped connections, slow answers and
answers that never end or are not the ESB's at all can be injected to exercise the
program's retry, timeout and error handling.
"""

from __future__ import annotations

import collections
import contextlib
import math
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from lxml import etree

from simulators.serving import ServedInBackground

SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
ACC_NS = "http://www.austintexas.gov/AcceptKnack/"

# A client that connects and then stalls must not hold a server thread for long.
HANDSHAKE_TIMEOUT = 5.0
IDLE_TIMEOUT = 10.0
# The longest an answer that hangs, stalls, trickles or never ends is kept up (stop() ends it sooner).
MISBEHAVE_FOR = 120.0
ENDLESS_CHUNK = b"<filler>" + b"x" * 8183 + b"\n"  # 8 KiB of an answer that never ends

# Fields of the submitKnack message, by their path below acc:submitKnack.
_FIELDS = {
    "emi": "header/emi",
    "timestamp": "header/timestamp",
    "id": "data/csr/id",
    "csr_activity_id": "data/csr/csr_activity_id",
    "sr_number": "data/csr/sr_number",
    "issue_status_code": "data/csr/issue_status_code",
    "activity_type_code": "data/csr/activity_type_code",
    "activity_details": "data/csr/activity_details",
    "outcome_code": "data/csr/outcome_code",
    "activity_date": "data/csr/activity_date",
}


def _parser() -> etree.XMLParser:
    # Never expand entities or fetch anything: the body comes from the network.
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)


def _submit_knack(root: etree._Element) -> etree._Element | None:
    if root.tag != f"{{{SOAP_NS}}}Envelope":
        return None
    return root.find(f"{{{SOAP_NS}}}Body/{{{ACC_NS}}}submitKnack")


def parse_message(body: bytes) -> dict:
    """The values of a submitKnack message, for tests to inspect what the ESB received.

    Missing elements give "". "elements" lists the local name of every element in
    document order, so a test can check the message's shape. Raises ValueError if the
    body is not XML at all.
    """
    try:
        root = etree.fromstring(body, _parser())
    except etree.XMLSyntaxError as exc:
        raise ValueError(f"not an XML message: {exc}") from exc
    submit = _submit_knack(root)
    values = {}
    for name, path in _FIELDS.items():
        element = submit.find(path) if submit is not None else None
        values[name] = (element.text or "") if element is not None else ""
    values["elements"] = [etree.QName(e).localname for e in root.iter() if isinstance(e.tag, str)]
    return values


def _envelope(content: etree._Element, encoding: str = "UTF-8") -> bytes:
    envelope = etree.Element(f"{{{SOAP_NS}}}Envelope", nsmap={"soapenv": SOAP_NS, "acc": ACC_NS})
    etree.SubElement(envelope, f"{{{SOAP_NS}}}Body").append(content)
    return etree.tostring(envelope, xml_declaration=True, encoding=encoding)


# Answers that did not come from the ESB's service, as a proxy, a gateway or a firewall sends them.
ACCESS_DENIED_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Access denied</title></head>\n"
                      b"<body><h1>Access denied</h1><p>You are not allowed to reach this service.</p></body></html>\n")
GATEWAY_JSON = b'{"message": "upstream request queued", "requestId": "3f1c"}\n'


def fault_body(faultcode: str, faultstring: str, *, encoding: str = "UTF-8", bare: bool = False) -> bytes:
    """A SOAP 1.1 Fault; faultcode and faultstring are un-namespaced, as SOAP 1.1 requires.

    encoding: of the whole document, declared in its XML declaration (UTF-16 gets a BOM).
    bare: the Fault element itself has no namespace, as some services write it inside the SOAP Body.
    """
    fault = etree.Element("Fault" if bare else f"{{{SOAP_NS}}}Fault")
    etree.SubElement(fault, "faultcode").text = faultcode
    etree.SubElement(fault, "faultstring").text = faultstring
    return _envelope(fault, encoding)


def success_body() -> bytes:
    return status_body("SUCCESS")


def status_body(status: str | None, message: str = "") -> bytes:
    """A submitKnackResponse whose status says `status` (None: no status element), and a message element
    after it when `message` is given, as an ESB that answers 200 with its own verdict writes it."""
    response = etree.Element(f"{{{ACC_NS}}}submitKnackResponse")
    if status is not None:
        etree.SubElement(response, "status").text = status
    if message:
        etree.SubElement(response, "message").text = message
    return _envelope(response)


@dataclass
class Received:
    body: bytes
    headers: dict
    status: int  # what the simulator answered; 0 if it dropped the connection
    client_subject: str  # CN of the client certificate, "" if none
    record_id: str  # data/csr/id of the message, "" if unparseable
    emi: str  # header/emi of the message
    at: float = 0.0  # time.monotonic() when the message was taken in
    answered_at: float = 0.0  # time.monotonic() once its answer was sent (or the connection dropped)
    queue_wait: float = 0.0  # seconds it waited for one of the `capacity` workers before its `latency` began


@dataclass(frozen=True)
class _Injected:
    status: int | None
    fault: str | None
    delay: float
    drop: bool
    how: str = ""  # hang, stall, trickle, endless, garble: how the answer misbehaves
    trickle: float = 0.0
    body: bytes | None = None
    content_type: str | None = None
    processed: bool | None = None


@dataclass(frozen=True)
class _Answer:
    status: int  # 0: drop the connection
    body: bytes = b""
    content_type: str = "text/plain"

    accepted: bool = False  # only a genuine SUCCESS answer counts, never an injected one
    how: str = ""  # "": answer normally; else how it misbehaves (see ESBSimulator.inject)
    trickle: float = 0.0  # seconds between two bytes of a trickled answer


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so the program's connection pooling is exercised as against the real ESB.
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT
    server: _TLSServer

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        with self.server.simulator._counted_in_flight():
            self.server.simulator._handle(self, body)

    def do_GET(self) -> None:
        self.send_answer(_Answer(404, b"not found\n"))

    def send_answer(self, answer: _Answer) -> None:
        stopping = self.server.simulator._stopping
        if answer.status == 0:
            # Answer nothing; the server closes the socket once the handler returns.
            self.close_connection = True
            if answer.how == "hang":
                stopping.wait(MISBEHAVE_FOR)
            return
        if answer.how == "garble":
            # Bytes that are not a TLS record, straight onto the TCP socket: the client's TLS layer fails while
            # reading the answer, after its request was written.
            self.close_connection = True
            socket.socket.sendall(self.connection, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            return
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        if answer.how == "endless":
            # No Content-Length and no chunking: the body ends when the connection does, which is never.
            self.close_connection = True
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                while not stopping.is_set():
                    self.wfile.write(ENDLESS_CHUNK)
            except OSError:
                pass  # the client read enough and hung up
            return
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        if answer.how == "stall":
            self.wfile.flush()
            self.close_connection = True
            stopping.wait(MISBEHAVE_FOR)
        elif answer.how == "trickle":
            self.close_connection = True
            try:
                for i in range(len(answer.body)):
                    if stopping.wait(answer.trickle):
                        return
                    self.wfile.write(answer.body[i:i + 1])
            except OSError:
                pass
        else:
            self.wfile.write(answer.body)

    def client_subject(self) -> str:
        cert = self.connection.getpeercert() or {}
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return value
        return ""

    def log_message(self, format, *args) -> None:
        pass  # tests assert on what was received, not on an access log


class _TLSServer(ThreadingHTTPServer):
    daemon_threads = True  # a handler sleeping on an injected delay must not block stop()

    def __init__(self, address, context: ssl.SSLContext, simulator: ESBSimulator):
        self.context = context
        self.simulator = simulator
        super().__init__(address, _Handler)

    def get_request(self):
        # Wrap without handshaking: the accept loop runs in one thread, and a client that
        # stalls or fails the handshake there would block every other client.
        sock, address = self.socket.accept()
        # Without this, the answer's body waits for the client's delayed ACK (Nagle): ~40 ms on every POST,
        # which the benchmark would count as the program's time.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def finish_request(self, request, client_address) -> None:
        # Runs in the per-connection thread.
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            request.do_handshake()
        except (ssl.SSLError, OSError):
            # No client certificate, one the ESB's CA did not sign, or a client that does
            # not trust us: refuse quietly, as the real ESB does, and keep serving.
            self.simulator._count_handshake_failure()
            _linger(request)
            return
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address) -> None:
        pass  # e.g. a client that timed out and left; never print a traceback


def _linger(request: ssl.SSLSocket) -> None:
    """Close after a refused handshake the way a proper TLS server does, so the client reads the alert.

    With TLS 1.3 the client has finished its side of the handshake and written its request before the server's
    verdict on its certificate arrives. Closing at once with that request unread makes the kernel send a reset,
    which can destroy the alert in flight: the client would see a bare EOF instead of "certificate required".
    """
    try:
        socket.socket.shutdown(request, socket.SHUT_WR)
        request.settimeout(0.5)
        while socket.socket.recv(request, 65536):
            pass
    except OSError:
        pass


class ESBSimulator(ServedInBackground):
    """HTTPS ESB on loopback. Bound at construction, so `url` is known before start()."""

    def __init__(
        self,
        *,
        server_cert: Path,
        server_key: Path,
        client_ca_bundle: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "/submitKnack",
        tls_version: str | None = None,
    ):
        """tls_version: "1.2" or "1.3" to speak only that version (default: whatever the client offers)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(server_cert, server_key)
        context.load_verify_locations(client_ca_bundle)
        if tls_version is not None:
            version = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[tls_version]
            context.minimum_version = context.maximum_version = version

        self.path = path
        self.latency: float = 0.0  # seconds to wait before every answer
        # At most this many messages worked on at once (each for `latency`), the rest waiting in a FIFO queue, as
        # an ESB back end with a few workers does; None: every message at once.
        self.capacity: int | None = None
        self._workers_busy = 0
        self._queue: collections.deque[object] = collections.deque()
        self._turns = threading.Condition()
        self.handshake_failures = 0  # TLS handshakes the server refused or that broke off
        # For concurrent senders: the most POSTs handled at the same moment, and records whose messages are
        # rejected with a SOAP Fault whenever they arrive (inject() goes by arrival order, which concurrency
        # makes unpredictable).
        self.peak_in_flight = 0
        self._in_flight = 0
        self.reject_records: dict[str, str] = {}  # data/csr/id -> the faultstring to answer with
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._accepted: list[Received] = []
        self._injected: collections.deque[_Injected] = collections.deque()
        self._injected_for: dict[str, collections.deque[_Injected]] = {}  # data/csr/id -> its own faults
        self._stopping = threading.Event()  # ends answers that hang, stall, trickle or never end
        self._server = _TLSServer((host, port), context, self)
        self._thread: threading.Thread | None = None
        bound_host, bound_port = self._server.server_address[:2]
        self.url = f"https://{bound_host}:{bound_port}{path}"

    # -- what arrived ------------------------------------------------------------

    @property
    def received(self) -> list[Received]:
        """Every request that reached the HTTP layer, in order (a snapshot)."""
        with self._lock:
            return list(self._received)

    @property
    def accepted(self) -> list[Received]:
        """The requests the ESB accepted: answered 200 with a SUCCESS response, or taken in by the ESB although
        its answer then misbehaved (a delay, a hang, see inject's `processed`) (a snapshot)."""
        with self._lock:
            return list(self._accepted)

    def copies(self) -> collections.Counter:
        """record_id -> number of accepted copies; any count above 1 is a duplicate."""
        return collections.Counter(r.record_id for r in self.accepted)

    # -- misbehaving on purpose --------------------------------------------------

    def inject(
        self,
        *,
        status: int | None = None,
        fault: str | None = None,
        count: int = 1,
        delay: float = 0.0,
        drop: bool = False,
        hang: bool = False,
        stall: bool = False,
        trickle: float = 0.0,
        endless: bool = False,
        garble: bool = False,
        body: bytes | None = None,
        content_type: str | None = None,
        processed: bool | None = None,
        record: str | None = None,
    ) -> None:
        """Make the next `count` POSTs to the ESB path misbehave (queued after earlier ones).

        record: only the messages whose data/csr/id is this record id, whenever they arrive (a client
        that posts several records at once cannot make "the next POST" mean one record); these come
        before the faults for any message.

        Each reads the whole request first and records it in `received`.
        delay: wait that long first. drop: close the connection without answering.
        fault: answer a SOAP Fault (faultcode soapenv:Server) with HTTP `status`, 500 by
        default as SOAP 1.1 servers do. status alone: answer that status with a short body.
        body (and content_type): answer exactly that, with `status` (200 by default).
        With only a delay, the message is then handled normally.
        hang: never answer (until stop()). stall: send the status line and headers, never the
        body. trickle=s: send the answer one byte every s seconds. endless: a 200 whose body
        never ends. garble: answer with bytes that are not TLS, so the client's TLS fails after
        its request was written.
        processed: count the message as taken in by the ESB (in `accepted`) although the answer
        misbehaves, as a gateway's 504 can hide a message the ESB got. Default: True for hang,
        stall, trickle and endless (the ESB has it, only its answer is broken), else False.
        """
        if count < 1:
            raise ValueError("count must be at least 1")
        hows = [name for name, on in (("hang", hang), ("stall", stall), ("trickle", trickle > 0),
                                      ("endless", endless), ("garble", garble), ("drop", drop)) if on]
        if len(hows) > 1:
            raise ValueError(f"choose one of {', '.join(hows)}")
        how = hows[0] if hows and hows[0] != "drop" else ""
        if processed is None:
            processed = how in ("hang", "stall", "trickle", "endless")
        injected = _Injected(status, fault, delay, drop, how, trickle, body, content_type, processed)
        with self._lock:
            queue = self._injected if record is None else self._injected_for.setdefault(record, collections.deque())
            queue.extend([injected] * count)

    def clear_faults(self) -> None:
        with self._lock:
            self._injected.clear()
            self._injected_for.clear()

    # -- request handling (server threads) ---------------------------------------

    @contextlib.contextmanager
    def _counted_in_flight(self):
        with self._lock:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def _count_handshake_failure(self) -> None:
        with self._lock:
            self.handshake_failures += 1

    def _handle(self, handler: _Handler, body: bytes) -> None:
        if handler.path != self.path:
            handler.send_answer(_Answer(404, b"not found\n"))
            return
        try:
            values = parse_message(body)
            record_id, emi = values["id"], values["emi"]
        except ValueError:
            record_id = emi = ""
        with self._lock:
            own = self._injected_for.get(record_id)
            queue = own if own else self._injected
            injected = queue.popleft() if queue else None

        answer = self._answer(handler, body, injected)
        # Recorded before the delay: the ESB has taken the message in, only the answer is
        # slow. So a client that gives up waiting still finds its message in `accepted`,
        # just as a real timeout can leave a message delivered but unacknowledged.
        received = Received(
            body=body,
            headers=dict(handler.headers),
            status=answer.status,
            client_subject=handler.client_subject(),
            record_id=record_id,
            emi=emi,
            at=time.monotonic(),
        )
        with self._lock:
            self._received.append(received)
            if answer.accepted or (injected is not None and injected.processed):
                self._accepted.append(received)
        with self._worker(received):
            time.sleep(self.latency + (injected.delay if injected else 0.0))
        try:
            handler.send_answer(answer)
        finally:
            received.answered_at = time.monotonic()

    @contextlib.contextmanager
    def _worker(self, received: Received):
        """One of the `capacity` workers for this message, in arrival order (at once when capacity is None)."""
        capacity = self.capacity
        if capacity is None:
            yield
            return
        turn = object()
        with self._turns:
            self._queue.append(turn)
            while not (self._queue[0] is turn and self._workers_busy < capacity) and not self._stopping.is_set():
                self._turns.wait(0.05)
            self._queue.remove(turn)
            self._workers_busy += 1
            self._turns.notify_all()
        received.queue_wait = time.monotonic() - received.at
        try:
            yield
        finally:
            with self._turns:
                self._workers_busy -= 1
                self._turns.notify_all()

    def queue_wait_p90(self) -> float:
        """The 90th percentile of the messages' waits for a worker (capacity mode; 0 without a queue)."""
        waits = sorted(r.queue_wait for r in self.received)
        return waits[max(0, math.ceil(0.9 * len(waits)) - 1)] if waits else 0.0

    def _answer(self, handler: _Handler, body: bytes, injected: _Injected | None) -> _Answer:
        answer = self._genuine_answer(handler, body, injected)
        if injected is not None and injected.how:
            if injected.how == "hang":
                return _Answer(0, how="hang")
            return _Answer(answer.status, answer.body, answer.content_type, how=injected.how,
                           trickle=injected.trickle)
        return answer

    def _genuine_answer(self, handler: _Handler, body: bytes, injected: _Injected | None) -> _Answer:
        if injected is not None:
            if injected.drop:
                return _Answer(0)
            if injected.body is not None:
                return _Answer(injected.status or 200, injected.body, injected.content_type or "text/plain")
            if injected.fault is not None:
                return _Answer(
                    injected.status or 500,
                    fault_body("soapenv:Server", injected.fault),
                    "text/xml; charset=utf-8",
                )
            if injected.status is not None:
                return _Answer(injected.status, f"injected status {injected.status}\n".encode())

        if self.reject_records:
            try:
                record_id = parse_message(body)["id"]
            except ValueError:
                record_id = ""
            if record_id in self.reject_records:
                return _Answer(500, fault_body("soapenv:Server", self.reject_records[record_id]),
                               "text/xml; charset=utf-8")

        media_type = (handler.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if media_type != "text/xml":
            return _Answer(415, b"Content-Type must be text/xml\n")
        problem = self._problem(body)
        if problem:
            return _Answer(500, fault_body("soapenv:Client", problem), "text/xml; charset=utf-8")
        return _Answer(200, success_body(), "text/xml; charset=utf-8", accepted=True)

    @staticmethod
    def _problem(body: bytes) -> str | None:
        """Why the ESB would reject this message, or None if it accepts it."""
        if not body.isascii():
            # The real ESB mangles anything beyond ASCII; text must arrive as character
            # references (&#233;), so raw UTF-8 bytes are a bug in the sender.
            return "message contains non-ASCII bytes"
        try:
            root = etree.fromstring(body, _parser())
        except etree.XMLSyntaxError as exc:
            return f"message is not well-formed XML: {exc}"
        if _submit_knack(root) is None:
            return "expected soapenv:Envelope/soapenv:Body/acc:submitKnack"
        return None

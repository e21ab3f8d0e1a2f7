"""A stateful Knack REST API simulator: a real HTTP server on loopback, for tests and demos.

It serves the three endpoints the 311 bridge uses, with the behaviour of the real Knack API:

    GET /v1/applications/{app_id}                                  app metadata (no auth, like Knack)
    GET /v1/pages/{scene}/views/{view}/records?filters=&rows_per_page=&page=&sort_field=&sort_order=
                                                                   records of a view
    GET /v1/objects/{object}/records/{record_id}                   one record, every field
    PUT /v1/objects/{object}/records/{record_id}                   update fields of one record

Real-Knack behaviour reproduced on purpose, because the client must cope with it:
- view filters are evaluated afresh on every page request, so records whose status changed drop out
  and the later pages shift;
- an empty result has total_pages 0;
- view-based requests return only the fields shown as columns of the view;
- at most `rate_limit` requests per second per app, beyond which Knack answers 429 without Retry-After;
  other clients of the same app can be made to use part of that second (`other_clients_rps`);
- a daily plan budget (`plan_limit`) that every request of the app spends, beyond which Knack answers 429;
- every answer carries X-RateLimit-Limit/Remaining/Reset (this second) and X-PlanLimit-Limit/Remaining/Reset
  (today), the resets as epoch seconds;
- records of a view sorted by `sort_field` (numbers numerically) in `sort_order` asc or desc.

Switches for Knack behaving worse than that: `ignore_sort` answers every view request in a shuffled order (stable
from request to request) whatever `sort_field` asks, and `on_page()` makes a staff edit (`edit_record`,
`remove_record`) at the very moment a given page of a view is requested.

Faults (slow answers, 5xx, malformed bodies, dropped connections, updates committed but answered with
an error, answers that never come, come a byte at a time or never end) are queued with `inject()` and hit
the next matching requests.
"""

from __future__ import annotations

import collections
import collections.abc
import copy
import hashlib
import json
import math
import re
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

_OPERATORS = ("is", "is not", "is blank", "is not blank", "contains", "does not contain")
# Knack's API docs write "and"/"or"; the builder's own view criteria use "all"/"any".
_MATCH = {"and": all, "all": all, "or": any, "any": any}
_MAX_ROWS_PER_PAGE = 1000  # Knack's hard cap on rows_per_page
_DEFAULT_ROWS_PER_PAGE = 25
RATE_LIMIT_MESSAGE = "Rate limit exceeded"  # Knack's words ("API limits")
# Knack's docs show no body for a spent daily budget; this wording is assumed. A client must go by the 429 and
# X-PlanLimit-Remaining: 0, never by the message.
PLAN_LIMIT_MESSAGE = "Daily API limit exceeded"
DAY = 86_400


@dataclass
class LoggedRequest:
    method: str
    path: str  # without the query string
    query: dict[str, str]
    status: int  # the status answered, 0 if the connection was dropped
    headers: dict[str, str]
    at: float = 0.0  # time.monotonic() when the request arrived


@dataclass
class _Fault:
    method: str
    path_contains: str
    status: int | None
    body: str | bytes | None
    remaining: int
    delay: float
    drop: bool
    retry_after: float | None
    after_apply: bool
    # ways of answering badly (see inject()); they come after the request is logged
    hang: bool = False
    trickle: float | None = None
    oversize: int = 0

    def matches(self, method: str, target: str) -> bool:
        return self.method in ("*", method) and self.path_contains in target

    @property
    def replaces_answer(self) -> bool:
        return self.drop or self.status is not None


@dataclass
class _Reply:
    status: int
    body: bytes
    content_type: str = "application/json; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _PageAction:
    page: int
    action: Callable[[], None]
    remaining: int


class _BadRequest(Exception):
    pass


def _json_reply(status: int, payload: Any) -> _Reply:
    # Knack sends UTF-8 JSON with non-ASCII characters as they are ("Jalapeños"); a lone UTF-16 surrogate (half an
    # emoji) cannot be UTF-8, and JavaScript's JSON.stringify writes it as an escape, "\ud83d", as done here.
    text = json.dumps(payload, ensure_ascii=False)
    text = _LONE_SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)
    return _Reply(status, text.encode("utf-8"))


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _error(status: int, message: str) -> _Reply:
    return _json_reply(status, {"errors": [{"message": message}]})


def _is_blank(raw: Any) -> bool:
    # Knack returns empty values as "" or [] (connections), and some multiple-choice fields as [None].
    if raw is None or raw == "" or raw == [] or raw == {}:
        return True
    return isinstance(raw, list) and all(item in (None, "") for item in raw)


def _comparable_texts(raw: Any, display: Any) -> list[str]:
    """The texts a filter value is compared with: the raw value, or what identifies it."""
    if _is_blank(raw):
        return [""]
    if isinstance(raw, list):
        texts = []
        for item in raw:
            if isinstance(item, dict):  # a connection: {"id", "identifier"}
                texts += [str(item.get("identifier", "")), str(item.get("id", ""))]
            elif item is not None:
                texts.append(str(item))
        return texts
    if isinstance(raw, dict):  # dates, names, addresses: compare with what Knack displays
        return [display if isinstance(display, str) else ""]
    return [str(raw)]


def _parse_filters(text: str | None) -> tuple[Any, list[dict]]:
    """Knack's filters parameter: {"match": "and"|"or", "rules": [...]} or a bare list of rules."""
    if not text:
        return all, []
    try:
        filters = json.loads(text)
    except ValueError:
        raise _BadRequest("filters is not valid JSON") from None
    if isinstance(filters, list):
        match, rules = "and", filters
    elif isinstance(filters, dict):
        match, rules = str(filters.get("match", "and")).lower(), filters.get("rules", [])
    else:
        raise _BadRequest("filters must be an object or a list of rules")
    if match not in _MATCH:
        raise _BadRequest(f"unknown filter match {match!r}")
    if not isinstance(rules, list):
        raise _BadRequest("filter rules must be a list")
    for rule in rules:
        if not isinstance(rule, dict) or not isinstance(rule.get("field"), str):
            raise _BadRequest(f"invalid filter rule {rule!r}")
        if rule.get("operator") not in _OPERATORS:
            raise _BadRequest(f"unsupported filter operator {rule.get('operator')!r}")
    return _MATCH[match], rules


def _rule_matches(record: dict, rule: dict) -> bool:
    field_key, operator = rule["field"], rule["operator"]
    raw = record.get(f"{field_key}_raw", record.get(field_key))
    if operator == "is blank":
        return _is_blank(raw)
    if operator == "is not blank":
        return not _is_blank(raw)
    value = rule.get("value")
    wanted = "" if value is None else str(value)
    texts = _comparable_texts(raw, record.get(field_key))
    if operator == "is":
        return wanted in texts
    if operator == "is not":
        return wanted not in texts
    # Knack's "contains" is a case-insensitive text search.
    found = any(wanted.lower() in text.lower() for text in texts)
    return found if operator == "contains" else not found


def _sort_value(raw: Any, display: Any) -> tuple:
    """How Knack orders a field's values: blanks first, then numbers by value, then text (case-insensitive)."""
    if _is_blank(raw):
        return (0, 0.0, "")
    if isinstance(raw, dict):  # a date: its timestamp; other compound values: what Knack displays
        stamp = raw.get("unix_timestamp")
        if isinstance(stamp, int | float) and not isinstance(stamp, bool):
            return (1, float(stamp), "")
        raw = display if isinstance(display, str) else ""
    if isinstance(raw, list):  # connections by what they show (their identifiers)
        raw = " ".join(str(item.get("identifier", "")) if isinstance(item, dict) else str(item)
                       for item in raw if item is not None)
    if isinstance(raw, bool):
        return (2, 0.0, str(raw).lower())
    if isinstance(raw, int | float):
        return (1, float(raw), "")
    text = str(raw).strip()
    try:
        number = float(text.replace(",", ""))
    except ValueError:
        return (2, 0.0, text.lower())
    return (1, number, "") if math.isfinite(number) else (2, 0.0, text.lower())


def _positive_int(query: dict[str, str], name: str, default: int) -> int:
    text = query.get(name)
    if text in (None, ""):
        return default
    try:
        number = int(text)
    except ValueError:
        raise _BadRequest(f"{name} must be an integer") from None
    if number < 1:
        raise _BadRequest(f"{name} must be at least 1")
    return number


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive, like the real API, so a client's connection pool is exercised.
    protocol_version = "HTTP/1.1"
    server_version = "KnackSimulator/1.0"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Without this, the body written after the headers waits for the client's delayed ACK
        # (Nagle), and every answer takes ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.simulator._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.simulator._track(self.connection, add=False)

    def _serve(self) -> None:
        self.server.simulator._serve(self)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _serve

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read request_log
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    simulator: KnackSimulator

    def handle_error(self, request, client_address) -> None:
        # Clients that time out or go away mid-answer are expected in fault tests: stay quiet about
        # those, but let a bug in the simulator show its traceback.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class KnackSimulator:
    """A Knack app on loopback: metadata, view records with filters and paging, record updates."""

    def __init__(
        self,
        *,
        app_id: str,
        api_key: str,
        metadata: dict,
        rate_limit: float | None = 10.0,
        other_clients_rps: float = 0.0,
        plan_limit: int | None = 25_000,
        plan_used: int = 0,
        plan_reset_at: float | None = None,
        plan_reset_format: str = "epoch",
        max_rows_per_page: int = 1000,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.app_id = app_id
        self.api_key = api_key
        self.rate_limit = rate_limit
        # Requests a second that other clients of the app (Zapier, the app's own pages...) make, evenly spaced.
        # They take their part of Knack's second and of the daily budget, and never show in request_log.
        self.other_clients_rps = other_clients_rps
        self.other_requests = 0  # those the rate limit let through
        # The daily plan budget (Knack: Starter 1,000, Pro 5,000, Corporate 10,000, Plus 25,000); None: no
        # budget and no X-PlanLimit headers. plan_used is what the app's users spent today before the test.
        if plan_reset_format not in ("epoch", "ms_until"):
            raise ValueError("plan_reset_format is 'epoch' (epoch seconds) or 'ms_until' (milliseconds until it)")
        self.plan_limit = plan_limit
        self.plan_used = plan_used
        self.plan_reset_at = plan_reset_at  # epoch seconds; None: the next midnight UTC
        # Knack's docs say epoch seconds; answers seen from real apps read as milliseconds until the reset.
        self.plan_reset_format = plan_reset_format
        self.max_rows_per_page = max_rows_per_page
        self.host = host
        self.port = port
        self.latency = 0.0
        self.ignore_filters = False  # answer view requests as if no filter had been sent (seen from real Knack)
        self.ignore_sort = False  # answer view requests in a shuffled order, the same on every request
        self._page_actions: list[_PageAction] = []
        self.request_log: list[LoggedRequest] = []
        self.updates: list[tuple[str, str, dict]] = []
        self._lock = threading.Lock()
        self._metadata = copy.deepcopy(metadata)
        self._records: dict[str, dict[str, dict]] = {}  # object key -> record id -> record (insertion order)
        self._faults: list[_Fault] = []
        self._window: collections.deque[float] = collections.deque()  # arrival times of admitted requests
        self._next_other: float | None = None  # when the other clients make their next request
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()  # releases requests held by hang/trickle faults
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ----- lifecycle -----

    @property
    def url(self) -> str:
        """The KNACK_API_URL to give the program, e.g. http://127.0.0.1:54321/v1."""
        # Known from start() on, and kept after stop() so a test can show Knack being down.
        if self.port == 0:
            raise RuntimeError("the Knack simulator is not started")
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> KnackSimulator:
        if self._server is None:
            self._stopping.clear()
            self._server = _Server((self.host, self.port), _Handler)
            self._server.simulator = self
            self.port = self._server.server_address[1]
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                name=f"knack-simulator-{self.port}",
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        # Close kept-alive connections too, so a stopped simulator looks like a Knack outage.
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> KnackSimulator:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # ----- state -----

    def add_records(self, object_key: str, records: list[dict]) -> None:
        """Add Knack-shaped records ("id", "field_N", "field_N_raw") to an object, in order."""
        with self._lock:
            table = self._records.setdefault(object_key, {})
            for record in records:
                record_id = record["id"]
                if not isinstance(record_id, collections.abc.Hashable):  # a broken record (an id that is a list)
                    record_id = json.dumps(record_id)
                if record_id in table:
                    raise ValueError(f"record {record_id} already exists in {object_key}")
                table[record_id] = copy.deepcopy(record)

    def records(self, object_key: str) -> list[dict]:
        with self._lock:
            return copy.deepcopy(list(self._records.get(object_key, {}).values()))

    def record(self, object_key: str, record_id: str) -> dict:
        with self._lock:
            return copy.deepcopy(self._records[object_key][record_id])

    def edit_record(self, object_key: str, record_id: str, changes: dict[str, Any]) -> None:
        """Set fields of a record as staff would in the builder: nothing logged, no budget spent."""
        with self._lock:
            record = self._records[object_key][record_id]
            for key, value in changes.items():
                record[f"{key}_raw"] = value
                record[key] = "" if value is None else value

    def remove_record(self, object_key: str, record_id: str) -> None:
        """Delete a record as staff would in the builder."""
        with self._lock:
            del self._records[object_key][record_id]

    def on_page(self, page: int, action: Callable[[], None], *, count: int = 1) -> None:
        """Call `action()` when one of the next `count` requests for page `page` of a view's records arrives, before
        it is answered: a staff edit at that very moment (`edit_record`, `remove_record`)."""
        if count < 1:
            raise ValueError("count must be at least 1")
        with self._lock:
            self._page_actions.append(_PageAction(page, action, count))

    def reset_plan(self, used: int = 0) -> None:
        """A new day: the daily budget is whole again (less `used`)."""
        with self._lock:
            self.plan_used = used
            if self.plan_reset_at is not None:
                self.plan_reset_at += DAY

    def plan_remaining(self) -> int | None:
        with self._lock:
            return None if self.plan_limit is None else max(0, self.plan_limit - self.plan_used)

    def set_metadata(self, metadata: dict) -> None:
        with self._lock:
            self._metadata = copy.deepcopy(metadata)

    # ----- faults -----

    def inject(
        self,
        method: str,
        path_contains: str = "",
        *,
        status: int | None = None,
        body: str | bytes | None = None,
        count: int = 1,
        delay: float = 0.0,
        drop: bool = False,
        retry_after: float | None = None,
        after_apply: bool = False,
        hang: bool = False,
        trickle: float | None = None,
        oversize: int = 0,
    ) -> None:
        """Make the next `count` requests of `method` ("*" = any) whose path (with its query string)
        contains `path_contains` misbehave: wait `delay` seconds, then drop the connection without an
        answer, or answer `status` with `body`. With after_apply the request is first handled
        normally (a PUT commits its update), and only its answer is replaced.

        A fractional retry_after is sent as is ("0.5"); HTTP allows whole seconds only and urllib3
        rejects such a header, so use whole numbers unless that is what is being tested.

        Answers that defeat a client's per-read timeouts, as a stuck Knack or proxy does:
        - hang: accept the request and never answer (until the client goes or the simulator stops); the
          request is not applied unless after_apply;
        - trickle=s: send the answer (status line, headers, body) one byte every s seconds;
        - oversize=n: follow the answer's body with n bytes of JSON whitespace, without Content-Length,
          so the client cannot know the size before reading it.
        """
        if count < 1:
            raise ValueError("count must be at least 1")
        if drop and status is not None:
            raise ValueError("a fault either drops the connection or answers a status, not both")
        if hang and (drop or status is not None or trickle or oversize):
            raise ValueError("a hanging request gets no answer at all")
        with self._lock:
            self._faults.append(
                _Fault(method.upper(), path_contains, status, body, count, delay, drop, retry_after, after_apply,
                       hang, trickle, oversize)
            )

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def pending_faults(self) -> int:
        """How many faulty answers are still queued."""
        with self._lock:
            return sum(fault.remaining for fault in self._faults)

    def _take_fault(self, method: str, target: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, target):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    @staticmethod
    def _fault_reply(fault: _Fault) -> _Reply:
        assert fault.status is not None
        if fault.body is None and fault.status >= 400:
            reply = _error(fault.status, f"Simulated error {fault.status}")
        elif fault.body is None:
            reply = _Reply(fault.status, b"")
        else:
            body = fault.body.encode("utf-8") if isinstance(fault.body, str) else fault.body
            try:
                json.loads(body)
                content_type = "application/json; charset=utf-8"
            except RecursionError:  # JSON nested deeper than Python's parser goes: still JSON
                content_type = "application/json; charset=utf-8"
            except ValueError:
                content_type = "text/html; charset=utf-8"  # e.g. a proxy's "bad gateway" page
            reply = _Reply(fault.status, body, content_type)
        if fault.retry_after is not None:
            reply.headers["Retry-After"] = f"{fault.retry_after:g}"
        return reply

    # ----- answering badly (hang, trickle, oversize faults) -----

    def _hang(self, handler: _Handler, fault: _Fault, method: str, path: str, query: dict[str, str], body: bytes,
              arrived: float) -> None:
        """Keep the request without ever answering, until the client gives up or the simulator stops."""
        if fault.after_apply:
            self._answer(method, urlsplit(handler.path).path, query, handler.headers, body)
        with self._lock:
            self.request_log.append(LoggedRequest(method, path, query, 0, dict(handler.headers.items()), arrived))
        handler.close_connection = True
        connection = handler.connection
        while not self._stopping.wait(0.05):
            readable, _, _ = select.select([connection], [], [], 0)
            if readable:  # the client closed its end (or sent more, which it would not while waiting)
                try:
                    if not connection.recv(1, socket.MSG_PEEK):
                        return
                except OSError:
                    return

    def _answer_badly(self, handler: _Handler, reply: _Reply, fault: _Fault) -> None:
        """Write the answer a byte at a time (trickle) and/or followed by padding of unannounced size."""
        reason = handler.responses.get(reply.status, ("",))[0]
        head = [f"HTTP/1.1 {reply.status} {reason}", f"Content-Type: {reply.content_type}", "Connection: close"]
        if not fault.oversize:
            head.append(f"Content-Length: {len(reply.body)}")
        head += [f"{name}: {value}" for name, value in reply.headers.items()]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + reply.body
        handler.close_connection = True
        try:
            if fault.trickle:
                for index in range(len(data)):
                    if self._stopping.wait(fault.trickle):
                        return
                    handler.wfile.write(data[index:index + 1])
            else:
                handler.wfile.write(data)
            padding, left = b" " * 65536, fault.oversize
            while left > 0 and not self._stopping.is_set():
                handler.wfile.write(padding[:left])
                left -= len(padding)
        except OSError:  # the client gave up, as it should
            pass

    # ----- serving -----

    def _track(self, connection: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def _serve(self, handler: _Handler) -> None:
        arrived = time.monotonic()
        method = handler.command
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        split = urlsplit(handler.path)
        path = unquote(split.path)
        query = dict(parse_qsl(split.query, keep_blank_values=True))

        if self.latency:
            time.sleep(self.latency)
        fault = self._take_fault(method, handler.path)
        if fault is not None and fault.delay:
            time.sleep(fault.delay)

        if fault is not None and fault.hang:
            self._hang(handler, fault, method, path, query, body, arrived)
            return

        reply: _Reply | None
        if fault is None or not fault.replaces_answer:
            reply = self._answer(method, split.path, query, handler.headers, body)
        else:
            if fault.after_apply:
                # Knack commits the change, but the client never sees a good answer.
                self._answer(method, split.path, query, handler.headers, body)
            reply = None if fault.drop else self._fault_reply(fault)

        # Log before answering, so a test that has its answer also sees the log entry.
        with self._lock:
            self.request_log.append(
                LoggedRequest(method, path, query, reply.status if reply else 0, dict(handler.headers.items()), arrived)
            )

        if reply is None:
            handler.close_connection = True
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if fault is not None and (fault.trickle or fault.oversize):
            self._answer_badly(handler, reply, fault)
            return
        try:
            handler.send_response(reply.status)
            handler.send_header("Content-Type", reply.content_type)
            handler.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(reply.body)
        except OSError:  # the client gave up (timeout) while we were slow
            handler.close_connection = True

    def _answer(self, method: str, path: str, query: dict[str, str], headers, body: bytes) -> _Reply:
        """What the real Knack answers (no faults) to a request for `path` (as sent, still %-escaped)."""
        # Split before unescaping, like a real router: an escaped "/" or "?" in a record id stays in the id.
        parts = [unquote(part) for part in path.strip("/").split("/")]
        is_metadata = method == "GET" and len(parts) == 3 and parts[:2] == ["v1", "applications"]
        is_view_records = (
            method == "GET" and len(parts) == 6 and parts[:2] == ["v1", "pages"] and parts[3] == "views"
            and parts[5] == "records"
        )
        is_update = method == "PUT" and len(parts) == 5 and parts[:2] == ["v1", "objects"] and parts[3] == "records"
        is_record = method == "GET" and len(parts) == 5 and parts[:2] == ["v1", "objects"] and parts[3] == "records"
        if not (is_metadata or is_view_records or is_update or is_record):
            return _error(404, f"Not found: {method} {path}")

        # The metadata is public in Knack; everything else needs the app id and API key headers.
        if not is_metadata and (
            headers.get("X-Knack-Application-Id") != self.app_id or headers.get("X-Knack-REST-API-Key") != self.api_key
        ):
            return _error(401, "Invalid API key or application id")
        admitted, limit_headers = self._admit()
        if admitted is None:
            reply = _error(429, PLAN_LIMIT_MESSAGE)
        elif not admitted:
            reply = _error(429, RATE_LIMIT_MESSAGE)
        else:
            try:
                if is_metadata:
                    reply = self._metadata_reply(parts[2])
                elif is_view_records:
                    reply = self._view_records(parts[2], parts[4], query)
                elif is_record:
                    reply = self._record_reply(parts[2], parts[4])
                else:
                    reply = self._update(parts[2], parts[4], body)
            except _BadRequest as bad:
                reply = _error(400, str(bad))
        reply.headers.update(limit_headers)
        return reply

    def _admit(self) -> tuple[bool | None, dict[str, str]]:
        """Knack's limits for one request of the app: (True, headers) to serve it; (False, ...) when the second
        is used up; (None, ...) when the day's plan budget is. Every request spends the daily budget, even one
        refused for the second; the per-second window is a sliding one, and refused requests do not count."""
        with self._lock:
            now, wall = time.monotonic(), time.time()
            self._other_clients_until(now)
            admitted: bool | None = True
            if self.plan_limit is not None and self.plan_used >= self.plan_limit:
                admitted = None
            else:
                self.plan_used += 1
                if self.rate_limit is not None:
                    self._expire(now)
                    admitted = len(self._window) < self.rate_limit
                    if admitted:
                        self._window.append(now)
            return admitted, self._limit_headers(now, wall)

    def _expire(self, now: float) -> None:
        while self._window and now - self._window[0] >= 1.0:
            self._window.popleft()

    def _other_clients_until(self, now: float) -> None:
        """The requests the other clients made since the last request of ours (all earlier than it, so the
        window stays in time order)."""
        if self.other_clients_rps <= 0:
            self._next_other = None
            return
        if self._next_other is None:
            self._next_other = now
        while self._next_other <= now:
            at = self._next_other
            self._next_other += 1.0 / self.other_clients_rps
            if self.plan_limit is not None and self.plan_used >= self.plan_limit:
                continue
            self.plan_used += 1
            if self.rate_limit is not None:
                self._expire(at)
                if len(self._window) >= self.rate_limit:
                    continue
                self._window.append(at)
            self.other_requests += 1

    def _limit_headers(self, now: float, wall: float) -> dict[str, str]:
        headers = {}
        if self.rate_limit is not None:
            self._expire(now)
            # A sliding window has room again when its oldest request leaves it; Knack sends whole seconds.
            frees_at = wall + (self._window[0] + 1.0 - now) if self._window else wall
            headers.update({
                "X-RateLimit-Limit": f"{self.rate_limit:g}",
                "X-RateLimit-Remaining": str(max(0, math.floor(self.rate_limit) - len(self._window))),
                "X-RateLimit-Reset": str(math.ceil(frees_at)),
            })
        if self.plan_limit is not None:
            resets_at = self.plan_reset_at if self.plan_reset_at is not None else (wall // DAY + 1) * DAY
            reset = (str(math.ceil(resets_at)) if self.plan_reset_format == "epoch"
                     else str(max(0, round((resets_at - wall) * 1000))))
            headers.update({
                "X-PlanLimit-Limit": str(self.plan_limit),
                "X-PlanLimit-Remaining": str(max(0, self.plan_limit - self.plan_used)),
                "X-PlanLimit-Reset": reset,
            })
        return headers

    def _metadata_reply(self, app_id: str) -> _Reply:
        if app_id != self.app_id:
            return _error(404, f"Application {app_id} not found")
        with self._lock:
            return _json_reply(200, self._metadata)

    def _find_view(self, scene_key: str, view_key: str) -> dict | None:
        for scene in self._metadata.get("application", {}).get("scenes", []):
            if scene.get("key") == scene_key:
                for view in scene.get("views", []):
                    if view.get("key") == view_key:
                        return view
        return None

    def _view_records(self, scene_key: str, view_key: str, query: dict[str, str]) -> _Reply:
        match, rules = _parse_filters(query.get("filters"))
        if self.ignore_filters:
            rules = []
        rows_per_page = min(
            _positive_int(query, "rows_per_page", _DEFAULT_ROWS_PER_PAGE), _MAX_ROWS_PER_PAGE, self.max_rows_per_page
        )
        page = _positive_int(query, "page", 1)
        for action in self._take_page_actions(page):
            action()  # outside the lock: it edits the records
        sort_field = query.get("sort_field", "")
        sort_order = query.get("sort_order", "asc").lower() or "asc"
        if sort_order not in ("asc", "desc"):
            raise _BadRequest("sort_order must be asc or desc")
        with self._lock:
            view = self._find_view(scene_key, view_key)
            if view is None:
                return _error(404, f"View {view_key} not found in scene {scene_key}")
            object_key = view.get("source", {}).get("object")
            known = self._field_keys(object_key)
            if sort_field and known is not None and sort_field not in known:
                # stricter than Knack may be, so that a wrong key in a test shows at once
                raise _BadRequest(f"sort_field {sort_field!r} is not a field of {object_key}")
            # Filters run against the current state on every request: records updated since the
            # previous page no longer match, and later pages shift (the real Knack behaviour).
            matching = [
                record
                for record in self._records.get(object_key, {}).values()
                if match(_rule_matches(record, rule) for rule in rules)
            ]
            if self.ignore_sort:
                matching.sort(key=lambda r: hashlib.sha256(str(r.get("id", "")).encode()).digest())
            elif sort_field:  # a stable sort: equal values keep the order the records were added in
                matching.sort(key=lambda r: _sort_value(r.get(f"{sort_field}_raw", r.get(sort_field)),
                                                        r.get(sort_field)),
                              reverse=sort_order == "desc")
            columns = {
                column["field"]["key"]
                for column in view.get("columns", [])
                if isinstance(column.get("field"), dict) and "key" in column["field"]
            }
            start = (page - 1) * rows_per_page
            shown = [self._only_columns(record, columns) for record in matching[start : start + rows_per_page]]
            # Serialized under the lock so a concurrent update cannot tear a record.
            return _json_reply(
                200,
                {
                    "total_pages": math.ceil(len(matching) / rows_per_page),  # 0 when nothing matches
                    "current_page": page,
                    "total_records": len(matching),
                    "records": shown,
                },
            )

    def _take_page_actions(self, page: int) -> list[Callable[[], None]]:
        with self._lock:
            due = [action for action in self._page_actions if action.page == page]
            for action in due:
                action.remaining -= 1
            self._page_actions = [action for action in self._page_actions if action.remaining > 0]
            return [action.action for action in due]

    @staticmethod
    def _only_columns(record: dict, columns: set[str]) -> dict:
        # View-based requests return only the fields the view shows (all of them if it names none).
        if not columns:
            return record
        return {
            key: value
            for key, value in record.items()
            if key == "id" or key in columns or (key.endswith("_raw") and key[: -len("_raw")] in columns)
        }

    def _field_keys(self, object_key: str) -> set[str] | None:
        for obj in self._metadata.get("application", {}).get("objects", []):
            if obj.get("key") == object_key:
                return {f["key"] for f in obj.get("fields", [])}
        return None

    def _record_reply(self, object_key: str, record_id: str) -> _Reply:
        # GET /v1/objects/{object}/records/{id}: the whole record, as Knack answers an object-based read.
        with self._lock:
            record = self._records.get(object_key, {}).get(record_id)
            if record is None:
                return _error(404, f"Record {record_id} not found in {object_key}")
            return _json_reply(200, record)

    def _update(self, object_key: str, record_id: str, body: bytes) -> _Reply:
        try:
            changes = json.loads(body)
        except ValueError:
            raise _BadRequest("body is not valid JSON") from None
        if not isinstance(changes, dict):
            raise _BadRequest("body must be a JSON object of field values")
        with self._lock:
            record = self._records.get(object_key, {}).get(record_id)
            if record is None:
                return _error(404, f"Record {record_id} not found in {object_key}")
            # Knack silently ignores keys that are not fields of the object (when the metadata
            # describes the object), so a wrong field key leaves the record unchanged.
            known = self._field_keys(object_key)
            for key, value in changes.items():
                if known is not None and key not in known:
                    continue
                record[f"{key}_raw"] = value
                record[key] = "" if value is None else value
            self.updates.append((object_key, record_id, copy.deepcopy(changes)))
            return _json_reply(200, record)

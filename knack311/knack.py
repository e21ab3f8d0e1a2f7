"""The Knack REST API: app metadata, a view's records (every page), one record's status, status updates.

Knack allows an app 10 requests a second and answers 429 beyond; it also has bad moments (5xx, timeouts).
Requests are paced below the limit, and urllib3's Retry retries 429, 5xx, timeouts and dropped connections
with exponential backoff, honouring Retry-After; each retry is logged as it happens.

Every request, with its retries, runs through the run's Stop (stopping.py): it is abandoned when it has no
complete answer within ESB_TIMEOUT (requests' own timeouts bound each socket read, so an answer trickled a
byte at a time would never trip them), a read is abandoned at once on SIGTERM/SIGINT and a status update gets
the stop grace, and no retry starts after a stop signal, past the run's deadline or past the request's own
ESB_TIMEOUT. A request abandoned by the caller makes no further attempt in the background either.

What Knack (or a proxy in front of it) answers is not trusted: at most 50 MB is read, JSON that cannot be
parsed or metadata of the wrong shape is an outage (one clean line, exit 1), paging ends even when Knack's
page counts lie, and text it sends back is stripped of the API key and application id before it is printed.
"""

from __future__ import annotations

import errno
import json
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.client import RemoteDisconnected
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.exceptions import ProxyError as Urllib3ProxyError
from urllib3.exceptions import SSLError as Urllib3SSLError
from urllib3.util import parse_url
from urllib3.util.retry import Retry

from .errors import ConfigError, OutageError
from .http import AnswerTooLarge, RetryStopped, StoppableRetry, read_capped, with_stop
from .stopping import CutShort, Stop

READY_TO_SEND = "READY_TO_SEND"
SENT = "SENT"
DO_NOT_SEND = "DO_NOT_SEND"

ROWS_PER_PAGE = 1000  # Knack's maximum
MAX_ANSWER_BYTES = 50 * 1024 * 1024  # a page of 1000 records is a few MB; beyond this an answer is broken
REDACT_MIN = 8     # characters: see KnackClient._secrets
MAX_PAGES = 1000  # a million records waiting is no 311 backlog: a page count beyond this is not believed


class KnackHTTPError(OutageError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RecordGone(KnackHTTPError):
    """Knack answered 404 for one record: it no longer exists (deleted by staff)."""


class _Pacer:
    """Spaces request starts at least 1/rate seconds apart (thread-safe), to stay under Knack's limit."""

    def __init__(self, rate: float):
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take the next start slot; returns how long to wait for it."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self._interval
        return start - now


def knack_retry(attempts: int = 6, backoff: float = 0.5) -> Retry:
    return Retry(
        total=attempts - 1,
        connect=attempts - 1,
        read=attempts - 1,
        status=attempts - 1,
        other=0,
        backoff_factor=backoff,
        backoff_max=15,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=frozenset({"GET", "PUT"}),  # PUT of a status is idempotent
        respect_retry_after_header=True,
        retry_after_max=30,  # and one longer than what is left of the request's ESB_TIMEOUT is not waited for
        raise_on_status=False,
    )


# ----- one request and its retries ------------------------------------------------------------------------------

@dataclass
class _Call:
    """One Knack request as its retries see it: its own deadline, whether the caller gave up on it, what
    went wrong last. urllib3 runs the retries in the thread that makes the request (a Stop.call worker), so
    the retry policy finds the call in a thread-local."""

    what: str
    timeout: float
    clock: Callable[[], float]
    deadline: float = 0.0
    abandoned: threading.Event = field(default_factory=threading.Event)
    attempts: int = 1
    last_cause: str = ""
    gave_up: str = ""

    def __post_init__(self) -> None:
        self.deadline = self.clock() + self.timeout

    def remaining(self) -> float:
        return self.deadline - self.clock()


_current = threading.local()


class _KnackRetry(StoppableRetry):
    """The run's StoppableRetry, which also keeps within the request it serves and says each retry out loud.

    Without the request's own deadline, a call abandoned by its caller at ESB_TIMEOUT would go on retrying
    in its background thread: a status update could then land long after the run reported it failed.
    """

    log: Callable[[str], None] | None = None
    address: str = ""

    def new(self, **kw) -> _KnackRetry:
        copy = super().new(**kw)
        copy.log = self.log
        copy.address = self.address
        return copy

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        call: _Call | None = getattr(_current, "call", None)
        if call is not None:
            call.last_cause = (f"HTTP {response.status} from {self.address}" if response is not None
                               else _transport_cause(error, self.address))
            refusal = ""
            if self.stop is not None and self.stop.stopped:
                refusal = f"no retry after {self.stop.signal_name}"
            elif self.stop is not None and self.stop.remaining() <= 0:
                refusal = "no retry past the run's deadline (--max-runtime + ESB_TIMEOUT)"
            elif call.abandoned.is_set() or call.remaining() <= 0:
                refusal = f"no retry past the request's {call.timeout:g}s limit (ESB_TIMEOUT)"
            if refusal:
                call.gave_up = refusal
                raise MaxRetryError(_pool, url or "", RetryStopped(refusal))
        return super().increment(method, url, response, error, _pool, _stacktrace)

    def sleep(self, response=None) -> None:
        call: _Call | None = getattr(_current, "call", None)
        if call is None:
            return super().sleep(response)
        delay = self.get_retry_after(response) if self.respect_retry_after_header and response else None
        delay = self.get_backoff_time() if delay is None else delay
        if delay >= call.remaining():
            call.gave_up = (f"no retry: the next one, {delay:g}s from now, would pass the request's "
                            f"{call.timeout:g}s limit (ESB_TIMEOUT)")
            raise RetryStopped(call.gave_up)
        if self.log is not None:
            self.log(f"Knack {call.what}: {call.last_cause}; retry {call.attempts} in {delay:g}s")
        try:
            super().sleep(response)
        except RetryStopped:
            call.gave_up = (f"no retry after {self.stop.signal_name}" if self.stop and self.stop.stopped else
                            "no retry past the run's deadline (--max-runtime + ESB_TIMEOUT)")
            raise
        call.attempts += 1


class KnackClient:
    def __init__(self, api_url: str, app_id: str, api_key: str, *, timeout: float = 30.0,
                 max_rps: float = 8.0, retry: Retry | None = None, stop: Stop | None = None,
                 log: Callable[[str], None] | None = None):
        self._base = api_url.rstrip("/")
        self._app_id = app_id
        self._stop = stop if stop is not None else Stop(request_timeout=timeout)
        self._log_line = log
        self._total = timeout  # ESB_TIMEOUT: one request with its retries, connect to the last byte
        self._timeout = (min(10.0, timeout), timeout)
        self._pacer = _Pacer(max_rps)
        # longest first, so that a key containing the app id is not half-redacted. A value shorter than
        # REDACT_MIN is no real Knack key or id (those are 24+ characters) and redacting it would garble every
        # line that happens to contain those letters; printing it gives nothing away.
        self._secrets = sorted({(v, name) for value, name in ((api_key, "[KNACK_API_KEY]"), (app_id, "[KNACK_APP_ID]"))
                                if len(value) >= REDACT_MIN for v in (value, quote(value, safe=""))},
                               key=lambda s: -len(s[0]))
        url = parse_url(self._base)
        self._address = f"{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"
        self._session = requests.Session()
        self._session.headers.update({
            "X-Knack-Application-Id": app_id,
            "X-Knack-REST-API-Key": api_key,
            "Content-Type": "application/json",
        })
        policy = with_stop(retry or knack_retry(), self._stop)
        retries = _KnackRetry.__new__(_KnackRetry)  # the same policy and stop, plus the request's own limits
        retries.__dict__.update(policy.__dict__)
        retries.stop = self._stop
        retries.log = self._log
        retries.address = self._address
        adapter = HTTPAdapter(max_retries=retries)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def close(self) -> None:
        self._session.close()

    # ----- what is printed ------------------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        """Text for the log: one line, control characters escaped, no API key or application id (a proxy's
        or Knack's error page may echo the request's headers or path)."""
        text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(text))
        for secret, name in self._secrets:
            text = text.replace(secret, name)
        return text

    def _log(self, line: str) -> None:
        if self._log_line is not None:
            self._log_line(self._redact(line))

    def _outage(self, what: str, detail: str) -> OutageError:
        return OutageError(self._redact(f"Knack {what}: {detail}"))

    # ----- one request ----------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, what: str, *, write: bool = False, **kwargs) -> object:
        """One request (with its retries) -> the parsed JSON answer. OutageError for anything else."""
        return self._exchange(method, path, what, write=write, **kwargs)[0]

    def _exchange(self, method: str, path: str, what: str, *, write: bool = False,
                  **kwargs) -> tuple[object, Mapping[str, str]]:
        """One request (with its retries) -> the parsed JSON answer and the answer's headers."""
        stop = self._stop
        if stop.stopped and not write:
            raise self._outage(what, f"not started: {stop.signal_name} received")
        if stop.remaining() <= 0:
            raise self._outage(what, f"not started: {stop.signal_name} received" if stop.stopped else
                               "not started: the run's time (--max-runtime + ESB_TIMEOUT) is up")
        # Paced here, in the caller, where a stop signal ends the wait; a write after the signal (the update
        # of a message the ESB just accepted) goes at once, inside the stop grace.
        if stop.wait(self._pacer.reserve()) and not write:
            raise self._outage(what, f"not started: {stop.signal_name} received")

        call = _Call(what, self._total, stop.clock)
        url = f"{self._base}{path}"

        def attempt() -> tuple[int, str, str, bytes, Mapping[str, str]]:
            _current.call = call
            try:
                # No redirects: a redirect would carry the API key header to wherever it points.
                reply = self._session.request(method, url, timeout=self._timeout, stream=True,
                                              allow_redirects=False, **kwargs)
                return reply.status_code, reply.reason or "", reply.headers.get("Location", ""), \
                    read_capped(reply, MAX_ANSWER_BYTES), reply.headers
            finally:
                _current.call = None

        try:
            status, reason, location, body, headers = stop.call(attempt, timeout=self._total,
                                                                what=f"Knack {what}", write=write)
        except CutShort as exc:
            call.abandoned.set()
            if exc.by_signal:
                cause = f"cut short by {stop.signal_name}"
            elif stop.remaining() <= 0:
                cause = "cut short: the run's time (--max-runtime + ESB_TIMEOUT) is up"
            else:
                cause = f"no complete answer from {self._address} within {self._total:g}s (ESB_TIMEOUT)"
            if call.attempts > 1:
                cause += f" (after {call.attempts} attempts, the one before: {call.last_cause})"
            raise self._outage(what, cause) from None
        except RetryStopped:
            raise self._outage(what, f"{call.last_cause}; {call.gave_up or 'no retry'}{_after(call)}") from None
        except AnswerTooLarge:
            raise self._outage(what, f"answer from {self._address} is over the "
                                     f"{MAX_ANSWER_BYTES // (1024 * 1024)} MB this program reads") from None
        except requests.RequestException as exc:
            if call.gave_up:  # a retry refused by the stop, the deadline or the request's limit
                raise self._outage(what, f"{call.last_cause}; {call.gave_up}{_after(call)}") from None
            raise self._outage(what, _transport_cause(exc, self._address) + _after(call)) from None

        if 300 <= status < 400:
            raise KnackHTTPError(status, self._redact(
                f"Knack {what}: HTTP {status} redirect to {location[:100] or '?'} not followed "
                "(check KNACK_API_URL)"))
        if status >= 400:
            detail = f"HTTP {status} {_error_text(body, reason)}"
            if call.gave_up:
                detail += f"; {call.gave_up}"
            raise KnackHTTPError(status, self._redact(f"Knack {what}: {detail}{_after(call)}"))
        try:
            return json.loads(body), headers
        except RecursionError:
            raise self._outage(what, "answer is JSON nested too deeply to read") from None
        except ValueError:
            raise self._outage(what, f"answer is not JSON (HTTP {status}): {_excerpt(body)}") from None

    # ----- the API --------------------------------------------------------------------------------------------

    def app_schema(self, obj: str, view: str) -> AppSchema:
        """Fetch the app metadata once: the scene holding the view, the activity object's field types, timezone."""
        return _app_schema(self.app_metadata(), obj, view)

    def app_metadata(self) -> object:
        """The app metadata as Knack answers it (GET /applications/{app_id}), unchecked: one request."""
        try:
            return self._request("GET", f"/applications/{_segment(self._app_id)}", "app metadata")
        except KnackHTTPError as exc:
            if exc.status == 404:
                raise ConfigError(f"{exc} (check KNACK_APP_ID, and that KNACK_API_URL is Knack's API root, such "
                                  "as https://api.knack.com/v1)") from None
            if exc.status in (401, 403):
                raise ConfigError(f"{exc} (check KNACK_APP_ID)") from None
            raise

    def ready_count(self, scene: str, view: str, emi_field: str,
                    status_field: str) -> tuple[int | None, Mapping[str, str]]:
        """How many records wait to be sent (Knack's total_records for the filter ready_records uses; None when
        Knack's count is not a number), and the answer's headers (Knack's rate and daily plan limits): one
        request for a one-record page."""
        what = f"view {view} records count"
        try:
            data, headers = self._exchange("GET", f"/pages/{_segment(scene)}/views/{_segment(view)}/records", what,
                                           params={"filters": _ready_filters(emi_field, status_field),
                                                   "rows_per_page": 1, "page": 1})
        except KnackHTTPError as exc:
            if exc.status in (401, 403):
                raise ConfigError(f"{exc} (check KNACK_API_KEY and KNACK_APP_ID)") from None
            raise
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            raise self._outage(what, "reply has no records list")
        return _count(data.get("total_records")), headers

    def ready_records(self, scene: str, view: str, emi_field: str, status_field: str) -> list[dict]:
        """Every READY_TO_SEND record with an EMI id, from all pages.

        Knack applies the filter afresh on every request, so a record set to SENT drops out and shifts the
        later pages: the caller must read all pages before changing any status (this returns them all).

        Paging ends, whatever Knack's page counts say, when a page brings no record not seen before, or at
        the number of pages its record count allows. Both are logged warnings, and the records read so far
        are returned: each is a real record (the run checks each one's own status), the ones not read stay
        READY_TO_SEND for the next run, and refusing all of them would stop every run while Knack pages
        badly. Paging past the run's --max-runtime is an OutageError instead: no record could be sent after
        it anyway, and a run that only ever reads must not exit 0.
        """
        filters = _ready_filters(emi_field, status_field)
        records: dict[str, dict] = {}
        page, last_page = 1, MAX_PAGES
        while True:
            what = f"view {view} records page {page}"
            if not self._stop.work_time_left():
                if self._stop.stopped:
                    raise self._outage(what, f"not read: {self._stop.signal_name} received")
                budget = self._stop.work_deadline - self._stop.started
                raise self._outage(what, f"not read: the time budget (--max-runtime {budget:g}s) was spent "
                                         f"reading records ({len(records)} read in {page - 1} page(s))")
            try:
                data = self._request("GET", f"/pages/{_segment(scene)}/views/{_segment(view)}/records", what,
                                     params={"filters": filters, "rows_per_page": ROWS_PER_PAGE, "page": page})
            except KnackHTTPError as exc:
                if exc.status in (401, 403):
                    raise ConfigError(f"{exc} (check KNACK_API_KEY and KNACK_APP_ID)") from None
                raise
            if not isinstance(data, dict) or not isinstance(data.get("records"), list):
                raise self._outage(what, "reply has no records list")
            new = 0
            for record in data["records"]:
                if isinstance(record, dict) and isinstance(record.get("id"), str) and record["id"]:
                    if record["id"] not in records:
                        records[record["id"]] = record
                        new += 1
            total_pages = _count(data.get("total_pages"))
            if total_pages is None:
                raise self._outage(what, "total_pages is not a number")
            if page >= total_pages or not data["records"]:
                return list(records.values())
            if page == 1:
                last_page = _plausible_pages(data, len(data["records"]))
                if total_pages > last_page:
                    self._log(f"WARNING: Knack {what}: says {total_pages} pages for "
                              f"{_count(data.get('total_records'))} records; reading at most {last_page}")
            if new == 0:
                self._log(f"WARNING: Knack {what}: brought no record not seen on an earlier page (Knack says "
                          f"{total_pages} pages); paging stopped, {len(records)} record(s) read, "
                          "the others wait for the next run")
                return list(records.values())
            if page >= last_page:
                return list(records.values())
            page += 1

    def set_status(self, obj: str, record_id: str, status_field: str, status: str) -> None:
        """Set one record's ESB status (retried by the adapter; raises OutageError or KnackHTTPError).

        Knack answers an update with the updated record. Only an answer whose record shows the new status
        counts as done: `{}`, `{"id": ...}` or another shape (seen from Knack and from proxies, with the
        update not applied) says nothing about the record, and taking it for success would make every later
        run resend the message.
        """
        what = f"update of record {record_id}"
        record = self._request("PUT", f"/objects/{_segment(obj)}/records/{_segment(record_id)}", what, write=True,
                               data=json.dumps({status_field: status}))
        held = self._status_in(record, record_id, status_field, what)
        if held != status:
            raise self._outage(what, f"answered, but the record says {held[:40]!r}, not {status}")

    def record_status(self, obj: str, record_id: str, status_field: str) -> str:
        """The status (raw value) Knack holds for one record now: one GET of the record.

        Raises RecordGone (a KnackHTTPError, so an OutageError too) when Knack answers 404: the record no
        longer exists, which a caller may want to treat apart from an outage; OutageError for anything else
        that is not a record showing its status. A blank status is "".
        """
        what = f"status of record {record_id}"
        try:
            record = self._request("GET", f"/objects/{_segment(obj)}/records/{_segment(record_id)}", what)
        except KnackHTTPError as exc:
            if exc.status == 404:
                raise RecordGone(404, str(exc)) from None
            raise
        return self._status_in(record, record_id, status_field, what)

    def _status_in(self, record: object, record_id: str, status_field: str, what: str) -> str:
        """The status a record answered by Knack holds: its raw value, else its display value."""
        if not isinstance(record, dict):
            raise self._outage(what, "answer is not a record")
        if "id" in record and record["id"] != record_id:
            raise self._outage(what, f"answer is about record {str(record['id'])[:40]!r}, not this one")
        for key in (f"{status_field}_raw", status_field):
            value = record.get(key)
            if isinstance(value, list) and len(value) == 1:  # a multiple choice field may hold a list
                value = value[0]
            if isinstance(value, str):
                return value
        raise self._outage(what, f"answer does not show the record's {status_field}")


# ----- the app metadata -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AppSchema:
    """What the run needs from the app metadata."""

    scene: str
    field_types: dict[str, str]  # field key -> Knack field type, for the activity object
    timezone_name: str | None


class _Unusable(Exception):
    pass


def _app_schema(data: object, obj: str, view: str) -> AppSchema:
    """The scene of the view, the object's field types and the timezone, from Knack's metadata answer.

    Metadata of the wrong shape is Knack's (or a proxy's) problem, not the operator's: an OutageError. Only a
    well-formed answer without the configured view or object is a ConfigError.
    """
    try:
        app = data.get("application") if isinstance(data, dict) else None
        if not isinstance(app, dict):
            raise _Unusable("it has no 'application' object")
        scene = None
        for index, candidate in enumerate(_dicts(app.get("scenes"), "application.scenes")):
            views = _dicts(candidate.get("views", []), f"application.scenes[{index}].views")
            if any(v.get("key") == view for v in views):
                scene = candidate.get("key")
                if not isinstance(scene, str) or not scene:
                    raise _Unusable(f"the scene holding {view} has no key")
                break
        if scene is None:
            raise ConfigError(f"config.py view {view!r} is not in the Knack app's metadata")
        objects = {o.get("key"): o for o in _dicts(app.get("objects"), "application.objects")}
        if obj not in objects:
            raise ConfigError(f"config.py obj {obj!r} is not in the Knack app's metadata")
        field_types = {}
        for f in _dicts(objects[obj].get("fields", []), f"the fields of {obj}"):
            if not isinstance(f.get("key"), str) or not isinstance(f.get("type", ""), str):
                raise _Unusable(f"a field of {obj} has no key or a type that is not text")
            field_types[f["key"]] = f.get("type", "")
        settings = app.get("settings", {})
        if not isinstance(settings, dict):
            raise _Unusable("application.settings is not an object")
        timezone = settings.get("timezone")
        if timezone is not None and not isinstance(timezone, str):
            raise _Unusable("application.settings.timezone is not text")
    except _Unusable as exc:
        raise OutageError(f"Knack app metadata: {exc}; the answer cannot be used") from None
    return AppSchema(scene=scene, field_types=field_types, timezone_name=timezone or None)


def _dicts(value: object, where: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise _Unusable(f"{where} is not a list of objects")
    return value


# ----- helpers --------------------------------------------------------------------------------------------------

def _ready_filters(emi_field: str, status_field: str) -> str:
    """The view filter for the records to send: READY_TO_SEND, with an EMI id."""
    return json.dumps({"match": "and", "rules": [
        {"field": emi_field, "operator": "is not blank"},
        {"field": status_field, "operator": "is", "value": READY_TO_SEND},
    ]})


def _segment(text: str) -> str:
    """A path segment: every reserved character escaped, so that an id like 'recB?x=1' or 'recB#' addresses
    that record and not recB."""
    return quote(text, safe="")


def _count(value: object) -> int | None:
    """A page or record count from Knack (0 when absent, None when not a number)."""
    if value in (None, ""):
        return 0
    if isinstance(value, bool):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return max(number, 0)


def _plausible_pages(first: dict, page_size: int) -> int:
    """The most pages Knack's own record count allows (one more for a record added while paging)."""
    total_records = _count(first.get("total_records"))
    if not total_records or page_size <= 0:
        return MAX_PAGES
    return min(MAX_PAGES, math.ceil(total_records / page_size) + 1)


def _after(call: _Call) -> str:
    return f" (after {call.attempts} attempts)" if call.attempts > 1 else ""


def _excerpt(body: bytes, limit: int = 200) -> str:
    text = body[: limit * 4].decode("utf-8", errors="replace")
    text = " ".join(text.split())
    return (text[:limit] + "...") if len(text) > limit else (text or "(empty)")


def _error_text(body: bytes, reason: str) -> str:
    """Knack's own error messages ({"errors": [{"message": ...}]}), else the start of the body."""
    try:
        errors = json.loads(body).get("errors")
        if isinstance(errors, list) and errors:
            return "; ".join(str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in errors)[:200]
    except (ValueError, AttributeError, RecursionError):
        pass
    return f"{reason} {_excerpt(body)}".strip() if body else reason


def _chain(exc: BaseException | None):
    """An exception and every exception it wraps (requests -> urllib3 -> socket/ssl)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if not isinstance(current, BaseException) or id(current) in seen or len(seen) > 20:
            continue  # (ssl.SSLError's reason is text, not an exception)
        seen.add(id(current))
        yield current
        todo += [getattr(current, "reason", None), getattr(current, "original_error", None),
                 current.__cause__, current.__context__, *getattr(current, "args", ())]


def _transport_cause(exc: BaseException | None, address: str) -> str:
    """What went wrong on the way to Knack, in words an operator can act on, with the address."""
    chain = list(_chain(exc))

    def found(*types):
        return next((e for e in chain if isinstance(e, types)), None)

    if found(requests.exceptions.ProxyError, Urllib3ProxyError):
        return f"the proxy on the way to {address} failed (check HTTPS_PROXY / HTTP_PROXY)"
    if found(NameResolutionError, socket.gaierror):
        return f"the name of {address} could not be resolved (check KNACK_API_URL and DNS)"
    if found(ssl.SSLError, Urllib3SSLError, requests.exceptions.SSLError):
        detail = next((getattr(e, "verify_message", None) or getattr(e, "reason", None)
                       for e in chain if isinstance(e, ssl.SSLError)), None)
        return f"TLS with {address} failed ({detail or 'handshake failed'})"
    if found(ConnectionRefusedError):
        return f"{address} refused the connection (connection refused)"
    unreachable = next((e for e in chain if isinstance(e, OSError)
                        and e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)), None)
    if unreachable is not None:
        return f"{address} cannot be reached (network unreachable)"
    # urllib3's NewConnectionError is a ConnectTimeoutError too (for compatibility): a refusal is not a timeout
    if found(requests.exceptions.ConnectTimeout) or any(
            isinstance(e, ConnectTimeoutError) and not isinstance(e, NewConnectionError) for e in chain):
        return f"connecting to {address} timed out"
    if found(NewConnectionError):
        return f"could not connect to {address}"
    if found(ReadTimeoutError, requests.exceptions.ReadTimeout, TimeoutError):
        return f"{address} did not answer in time (timed out)"
    if found(ProtocolError, RemoteDisconnected, ConnectionResetError, requests.exceptions.ChunkedEncodingError):
        return f"{address} closed the connection without a complete answer"
    if found(requests.exceptions.InvalidURL, requests.exceptions.InvalidHeader):
        return "the request could not be made (check KNACK_API_URL, KNACK_APP_ID and KNACK_API_KEY)"
    return f"request to {address} failed ({type(exc).__name__})"

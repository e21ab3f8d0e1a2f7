"""The Knack REST API: app metadata, a page of a view's records, one record's status, status updates.

Knack allows an app 10 requests a second and answers 429 beyond; it also has bad moments (5xx, timeouts).
Every attempt, urllib3's retries included, takes a slot of the client's pacing.Pacer (KNACK_MAX_RPS, slower
while Knack's X-RateLimit headers show other users of the app, nothing until the reset after a 429), and
urllib3's Retry retries 429, 5xx, timeouts and dropped connections with exponential backoff, honouring
Retry-After; each retry is logged as it happens. The app's daily plan budget (X-PlanLimit-*) is shared with its
other users: once it is spent nothing is retried or started (KnackBudgetSpent) until it resets, and
may_start_record keeps KNACK_PLAN_RESERVE calls for the others.

Every request, with its retries, runs through the run's Stop (stopping.py): it is abandoned when it has no
complete answer within KNACK_TIMEOUT (requests' own timeouts bound each socket read, so an answer trickled a
byte at a time would never trip them), a read is abandoned at once on SIGTERM/SIGINT and a status update gets
the stop grace, and no retry starts after a stop signal, past the run's deadline or past the request's own
ESB_TIMEOUT. A request abandoned by the caller makes no further attempt in the background either.

What Knack (or a proxy in front of it) answers is not trusted: at most 50 MB is read, JSON that cannot be
parsed or metadata of the wrong shape is an outage (one clean line, exit 1), and text it sends back is stripped
of the API key and application id before it is printed. Which page to read next, and when paging ends even when
Knack's page counts lie, is listing.py's.
"""

from __future__ import annotations

import errno
import json
import math
import socket
import ssl
import threading
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

from . import pacing
from .errors import ConfigError, OutageError
from .http import AnswerTooLarge, RetryStopped, StoppableRetry, read_capped, with_stop
from .stopping import CutShort, Stop

READY_TO_SEND = "READY_TO_SEND"
SENT = "SENT"
DO_NOT_SEND = "DO_NOT_SEND"

ROWS_PER_PAGE = 1000  # Knack's maximum
MAX_ANSWER_BYTES = 50 * 1024 * 1024  # a page of 1000 records is a few MB; beyond this an answer is broken
REDACT_MIN = 8     # characters: see KnackClient._secrets


class KnackHTTPError(OutageError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RecordGone(KnackHTTPError):
    """Knack answered 404 for one record: it no longer exists (deleted by staff)."""


class KnackNotSent(OutageError):
    """The request never left: no pacer slot before the run's deadline (Knack's second shared with the app's other
    users), or a stop signal or the run's time came first. Knack said nothing, so this is no sign of Knack
    trouble: the caller leaves the record as it is for the next run."""


class KnackBudgetSpent(OutageError):
    """The app's daily Knack API budget is used up (a 429 with X-PlanLimit-Remaining 0, or the pacer's own count):
    no request, and no retry, can succeed before the budget resets."""

    def __init__(self, message: str, budget: pacing.PlanBudget):
        super().__init__(message)
        self.budget = budget


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
    went wrong last, and the pacer's ticket of the attempt under way. urllib3 runs the retries in the thread that
    makes the request (a Stop.call worker), so the retry policy finds the call in a thread-local."""

    what: str
    timeout: float
    clock: Callable[[], float]
    deadline: float = 0.0
    abandoned: threading.Event = field(default_factory=threading.Event)
    attempts: int = 1
    last_cause: str = ""
    gave_up: str = ""
    budget_spent: bool = False  # a retry was refused because the app's daily Knack budget is used up
    ticket: pacing.Ticket | None = None
    _ticket_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.deadline = self.clock() + self.timeout

    def remaining(self) -> float:
        return self.deadline - self.clock()

    def hold(self, ticket: pacing.Ticket | None) -> None:
        with self._ticket_lock:
            self.ticket = ticket

    def take_ticket(self) -> pacing.Ticket | None:
        """The ticket of the attempt under way, taken once: the caller that abandons a call and the thread that
        runs it may both want to give it back, and the pacer must hear of each attempt once."""
        with self._ticket_lock:
            ticket, self.ticket = self.ticket, None
            return ticket


_current = threading.local()

_NO_RETRY_PAST_DEADLINE = "no retry past the run's deadline (--max-runtime + ESB_TIMEOUT)"
_NO_RETRY_BUDGET = "no retry: the app's daily Knack API budget is spent"


class _KnackRetry(StoppableRetry):
    """The run's StoppableRetry, which also keeps within the request it serves, paces each retry with the client's
    Pacer and says each retry out loud.

    Without the request's own deadline, a call abandoned by its caller at ESB_TIMEOUT would go on retrying
    in its background thread: a status update could then land long after the run reported it failed. Without the
    pacer, retries would add requests on top of the paced ones, in the very second Knack is already answering 429.
    """

    log: Callable[[str], None] | None = None
    address: str = ""
    pacer: pacing.Pacer | None = None

    def new(self, **kw) -> _KnackRetry:
        copy = super().new(**kw)
        copy.log = self.log
        copy.address = self.address
        copy.pacer = self.pacer
        return copy

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        call: _Call | None = getattr(_current, "call", None)
        if call is None:
            return super().increment(method, url, response, error, _pool, _stacktrace)
        call.last_cause = (f"HTTP {response.status} from {self.address}" if response is not None
                           else _transport_cause(error, self.address))
        refusal = ""
        if response is not None and _daily_budget_spent(response.status, response.headers):
            call.budget_spent = True
            refusal = _NO_RETRY_BUDGET  # a retry before the daily reset only spends other users' calls on 429s
        elif self.stop is not None and self.stop.stopped:
            refusal = f"no retry after {self.stop.signal_name}"
        elif self.stop is not None and self.stop.remaining() <= 0:
            refusal = _NO_RETRY_PAST_DEADLINE
        elif call.abandoned.is_set() or call.remaining() <= 0:
            refusal = f"no retry past the request's {call.timeout:g}s limit (KNACK_TIMEOUT)"
        if refusal:
            call.gave_up = refusal
            raise MaxRetryError(_pool, url or "", RetryStopped(refusal))
        retry = super().increment(method, url, response, error, _pool, _stacktrace)
        # A retry follows: this attempt is over. (An attempt that ends the request is handed to the pacer by
        # _exchange, with the answer the caller sees.)
        ticket = call.take_ticket()
        if self.pacer is not None and ticket is not None:
            self.pacer.after_answer(response.status if response is not None else None,
                                    response.headers if response is not None else None, ticket)
        return retry

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
                            _NO_RETRY_PAST_DEADLINE)
            raise
        if self.pacer is not None:
            self._paced(call)
        call.attempts += 1

    def _paced(self, call: _Call) -> None:
        """Take the retry's slot from the pacer, after the backoff: the retry is a request like any other."""
        try:
            call.hold(self.pacer.before_request())
        except pacing.StopRequested:
            call.gave_up = f"no retry after {self.stop.signal_name if self.stop else 'a stop signal'}"
            raise RetryStopped(call.gave_up) from None
        except pacing.DeadlineReached:
            call.gave_up = _NO_RETRY_PAST_DEADLINE
            raise RetryStopped(call.gave_up) from None
        except pacing.DailyBudgetSpent:
            call.budget_spent = True
            call.gave_up = _NO_RETRY_BUDGET
            raise RetryStopped(call.gave_up) from None
        if call.abandoned.is_set() or call.remaining() <= 0:
            # the caller gave up while this thread waited for the slot: no attempt behind its back
            ticket = call.take_ticket()
            if ticket is not None:
                self.pacer.after_answer(None, None, ticket)
            call.gave_up = f"no retry past the request's {call.timeout:g}s limit (KNACK_TIMEOUT)"
            raise RetryStopped(call.gave_up)


class KnackClient:
    def __init__(self, api_url: str, app_id: str, api_key: str, *, timeout: float = 30.0,
                 max_rps: float = pacing.DEFAULT_MAX_RPS, plan_reserve: int | None = None,
                 retry: Retry | None = None, stop: Stop | None = None,
                 log: Callable[[str], None] | None = None):
        """max_rps: KNACK_MAX_RPS; plan_reserve: KNACK_PLAN_RESERVE, the daily calls left to the app's other users
        (None: 10% of the plan's daily limit). One Pacer paces every attempt of every thread using this client."""
        self._base = api_url.rstrip("/")
        self._app_id = app_id
        self._stop = stop if stop is not None else Stop(request_timeout=timeout)
        self._log_line = log
        self._total = timeout  # ESB_TIMEOUT: one request with its retries, connect to the last byte
        self._timeout = (min(10.0, timeout), timeout)
        self._pacer = pacing.Pacer(max_rps, stop=self._stop, plan_reserve=plan_reserve)
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
        retries.pacer = self._pacer
        # the pacer may start a second's worth of requests at once, and a page read may run beside them: a pool
        # smaller than that would open and throw away connections (and urllib3 would warn on stderr each time)
        adapter = HTTPAdapter(max_retries=retries, pool_maxsize=max(10, math.ceil(self._pacer.max_rps) + 4))
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

    def _not_sent(self, what: str, detail: str) -> KnackNotSent:
        return KnackNotSent(self._redact(f"Knack {what}: {detail}"))

    def _budget_spent(self, what: str, detail: str) -> KnackBudgetSpent:
        budget = self._pacer.plan()
        return KnackBudgetSpent(self._redact(f"Knack {what}: {detail}: the app's daily Knack API budget is spent, "
                                             f"nothing more is tried before it resets ({budget.describe()})"), budget)

    # ----- the pacer: Knack's per-second limit and the daily budget ------------------------------------------------

    def plan_budget(self) -> pacing.PlanBudget:
        """The app's daily Knack budget as the last answer (less the calls started since) tells it."""
        return self._pacer.plan()

    def calls_left_today(self) -> int | None:
        """Knack calls left in the app's daily budget (all its users'), None until an answer said."""
        return self._pacer.plan().remaining

    def may_start_record(self, in_flight: int = 0) -> bool:
        """Whether one more record (one Knack call, its status update) may start with `in_flight` records started
        and not finished, and still leave the reserve of today's calls to the app's other users."""
        return self._pacer.may_start_record(in_flight=in_flight)

    @property
    def throttled(self) -> int:
        """Answers of 429 (per-second limit or daily budget) this client has seen, retried ones included."""
        return self._pacer.throttled

    def _first_ticket(self, what: str, write: bool) -> pacing.Ticket | None:
        """The pacer's slot for a request's first attempt, waited for here, in the caller, where a stop signal ends
        the wait. None: a write that goes without a slot."""
        stop = self._stop
        try:
            return self._pacer.before_request()
        except pacing.StopRequested:
            if write:  # the update of a message the ESB just accepted goes at once, inside the stop grace
                return None
            raise self._not_sent(what, f"not started: {stop.signal_name} received") from None
        except pacing.DeadlineReached:
            if write and stop.stopped and stop.remaining() > 0:
                return None  # as above: the stop grace, not the pacing, bounds that update
            raise self._not_sent(what, f"not started: {stop.signal_name} received" if stop.stopped else
                                 "not started: no request slot before the run's time (--max-runtime + "
                                 "ESB_TIMEOUT) was up") from None
        except pacing.DailyBudgetSpent:
            raise self._budget_spent(what, "not started") from None

    # ----- one request ----------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, what: str, *, write: bool = False, **kwargs) -> object:
        """One request (with its retries) -> the parsed JSON answer. OutageError for anything else."""
        return self._exchange(method, path, what, write=write, **kwargs)[0]

    def _exchange(self, method: str, path: str, what: str, *, write: bool = False,
                  **kwargs) -> tuple[object, Mapping[str, str]]:
        """One request (with its retries) -> the parsed JSON answer and the answer's headers."""
        stop = self._stop
        if stop.stopped and not write:
            raise self._not_sent(what, f"not started: {stop.signal_name} received")
        if stop.remaining() <= 0:
            raise self._not_sent(what, f"not started: {stop.signal_name} received" if stop.stopped else
                                 "not started: the run's time (--max-runtime + ESB_TIMEOUT) is up")
        call = _Call(what, self._total, stop.clock)
        call.hold(self._first_ticket(what, write))
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

        def no_answer() -> None:
            ticket = call.take_ticket()
            if ticket is not None:
                self._pacer.after_answer(None, None, ticket)

        try:
            status, reason, location, body, headers = stop.call(attempt, timeout=self._total,
                                                                what=f"Knack {what}", write=write)
        except CutShort as exc:
            call.abandoned.set()
            no_answer()
            if exc.by_signal:
                cause = f"cut short by {stop.signal_name}"
            elif stop.remaining() <= 0:
                cause = "cut short: the run's time (--max-runtime + ESB_TIMEOUT) is up"
            else:
                cause = f"no complete answer from {self._address} within {self._total:g}s (KNACK_TIMEOUT)"
            if call.attempts > 1:
                cause += f" (after {call.attempts} attempts, the one before: {call.last_cause})"
            raise self._outage(what, cause) from None
        except RetryStopped:
            no_answer()
            if call.budget_spent:
                raise self._budget_spent(what, f"{call.last_cause}{_after(call)}") from None
            raise self._outage(what, f"{call.last_cause}; {call.gave_up or 'no retry'}{_after(call)}") from None
        except AnswerTooLarge:
            no_answer()
            raise self._outage(what, f"answer from {self._address} is over the "
                                     f"{MAX_ANSWER_BYTES // (1024 * 1024)} MB this program reads") from None
        except requests.RequestException as exc:
            no_answer()
            if call.gave_up:  # a retry refused by the stop, the deadline or the request's limit
                raise self._outage(what, f"{call.last_cause}; {call.gave_up}{_after(call)}") from None
            raise self._outage(what, _transport_cause(exc, self._address) + _after(call)) from None
        except BaseException:
            no_answer()
            raise

        ticket = call.take_ticket()
        if ticket is not None:
            self._pacer.after_answer(status, headers, ticket)
        if status == 429 and (call.budget_spent or _daily_budget_spent(status, headers)):
            raise self._budget_spent(what, f"HTTP 429 {_error_text(body, reason)}{_after(call)}")

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
        return app_schema_from(self.app_metadata(), obj, view)

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
        """How many records wait to be sent (Knack's total_records for the filter ready_page uses; None when
        Knack's count is not a number), and the answer's headers (Knack's rate and daily plan limits): one
        request for a one-record page."""
        data, headers = self._view_records(scene, view, f"view {view} records count",
                                           {"filters": _ready_filters(emi_field, status_field),
                                            "rows_per_page": 1, "page": 1})
        return _count(data.get("total_records")), headers

    def _view_records(self, scene: str, view: str, what: str,
                      params: dict[str, object]) -> tuple[dict, Mapping[str, str]]:
        """One GET of a view's records -> the answer (a dict holding a records list) and its headers."""
        try:
            data, headers = self._exchange("GET", f"/pages/{_segment(scene)}/views/{_segment(view)}/records", what,
                                           params=params)
        except KnackHTTPError as exc:
            if exc.status in (401, 403):
                raise ConfigError(f"{exc} (check KNACK_API_KEY and KNACK_APP_ID)") from None
            raise
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            raise self._outage(what, "reply has no records list")
        return data, headers

    def ready_page(self, scene: str, view: str, emi_field: str, status_field: str, page: int,
                   sort_field: str) -> Page:
        """One page (ROWS_PER_PAGE records, numbered from 1) of the READY_TO_SEND records with an EMI id, sorted by
        `sort_field` ascending: one request.

        Knack applies the filter afresh on every request, so a record set to SENT drops out and shifts the later
        pages; a caller that changes statuses between pages must allow for that.
        """
        what = f"view {view} records page {page}"
        data, _ = self._view_records(scene, view, what, {"filters": _ready_filters(emi_field, status_field),
                                                         "rows_per_page": ROWS_PER_PAGE, "page": page,
                                                         "sort_field": sort_field, "sort_order": "asc"})
        total_pages = _count(data.get("total_pages"))
        if total_pages is None:
            raise self._outage(what, "total_pages is not a number")
        # a record with an unusable id is kept: the run must count it and say it cannot be marked (intake.py)
        records = [record for record in data["records"] if isinstance(record, dict)]
        return Page(records=records, total_pages=total_pages, total_records=_count(data.get("total_records")))

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


@dataclass(frozen=True)
class Page:
    """One page of a view's records as Knack answered it."""

    records: list[dict]        # every record (a JSON object) of the page, in Knack's order; ids are not checked here
    total_pages: int           # Knack's count for the whole filter (0 when nothing matches)
    total_records: int | None  # Knack's count, None when it is not a number


class _Unusable(Exception):
    pass


def app_schema_from(data: object, obj: str, view: str) -> AppSchema:
    """The scene of the view, the object's field types and the timezone, from Knack's metadata answer (as
    KnackClient.app_metadata returns it, fresh or cached).

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


def _daily_budget_spent(status: int, headers: Mapping[str, str]) -> bool:
    """A 429 for the day, not for the second: Knack says so only in X-PlanLimit-Remaining (its body is no contract)."""
    return status == 429 and str(headers.get("X-PlanLimit-Remaining", "")).strip() == "0"


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

"""The Knack REST API: app metadata, a view's records (every page), record status updates.

Knack allows an app 10 requests a second and answers 429 beyond; it also has bad moments (5xx, timeouts).
Requests are paced below the limit, and urllib3's Retry retries 429, 5xx, timeouts and dropped connections
with exponential backoff, honouring Retry-After.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .errors import ConfigError, OutageError
from .stopping import Stop

READY_TO_SEND = "READY_TO_SEND"
SENT = "SENT"
DO_NOT_SEND = "DO_NOT_SEND"

ROWS_PER_PAGE = 1000  # Knack's maximum


class _Pacer:
    """Spaces request starts at least 1/rate seconds apart (thread-safe), to stay under Knack's limit."""

    def __init__(self, rate: float):
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self._interval
        if start > now:
            time.sleep(start - now)


class _PacedAdapter(HTTPAdapter):
    def __init__(self, pacer: _Pacer, **kwargs):
        self._pacer = pacer
        super().__init__(**kwargs)

    def send(self, request, *args, **kwargs):
        self._pacer.wait()
        return super().send(request, *args, **kwargs)


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
        retry_after_max=30,  # a long Retry-After must not eat the run's time budget
        raise_on_status=False,
    )


@dataclass(frozen=True)
class AppSchema:
    """What the run needs from the app metadata."""

    scene: str
    field_types: dict[str, str]  # field key -> Knack field type, for the activity object
    timezone_name: str | None


class KnackClient:
    def __init__(self, api_url: str, app_id: str, api_key: str, *, timeout: float = 30.0,
                 max_rps: float = 8.0, retry: Retry | None = None, stop: Stop | None = None):
        self._base = api_url.rstrip("/")
        self._app_id = app_id
        self._stop = stop
        self._timeout = (min(10.0, timeout), timeout)
        self._session = requests.Session()
        self._session.headers.update({
            "X-Knack-Application-Id": app_id,
            "X-Knack-REST-API-Key": api_key,
            "Content-Type": "application/json",
        })
        adapter = _PacedAdapter(_Pacer(max_rps), max_retries=retry or knack_retry())
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def close(self) -> None:
        self._session.close()

    def _request(self, method: str, path: str, what: str, **kwargs) -> object:
        url = f"{self._base}{path}"
        try:
            reply = self._session.request(method, url, timeout=self._timeout, **kwargs)
        except requests.RequestException as exc:
            raise OutageError(f"Knack {what}: {_reason(exc)}") from None
        if reply.status_code >= 400:
            raise KnackHTTPError(reply.status_code, f"Knack {what}: HTTP {reply.status_code} {_knack_message(reply)}")
        try:
            return reply.json()
        except ValueError:
            raise OutageError(f"Knack {what}: reply is not JSON (HTTP {reply.status_code})") from None

    def app_schema(self, obj: str, view: str) -> AppSchema:
        """Fetch the app metadata once: the scene holding the view, the activity object's field types, timezone."""
        try:
            data = self._request("GET", f"/applications/{self._app_id}", "app metadata")
        except KnackHTTPError as exc:
            if exc.status in (401, 403, 404):
                raise ConfigError(f"{exc} (check KNACK_APP_ID)") from None
            raise OutageError(str(exc)) from None
        app = data.get("application") if isinstance(data, dict) else None
        if not isinstance(app, dict):
            raise OutageError("Knack app metadata: reply has no 'application'")
        scene = next((s.get("key") for s in app.get("scenes") or [] for v in s.get("views") or []
                      if isinstance(v, dict) and v.get("key") == view), None)
        if scene is None:
            raise ConfigError(f"config.py view {view!r} is not in the Knack app's metadata")
        objects = {o.get("key"): o for o in app.get("objects") or [] if isinstance(o, dict)}
        if obj not in objects:
            raise ConfigError(f"config.py obj {obj!r} is not in the Knack app's metadata")
        field_types = {f["key"]: f.get("type", "") for f in objects[obj].get("fields") or []
                       if isinstance(f, dict) and "key" in f}
        timezone_name = (app.get("settings") or {}).get("timezone")
        return AppSchema(scene=scene, field_types=field_types, timezone_name=timezone_name)

    def ready_records(self, scene: str, view: str, emi_field: str, status_field: str) -> list[dict]:
        """Every READY_TO_SEND record with an EMI id, from all pages.

        Knack applies the filter afresh on every request, so a record set to SENT drops out and shifts the
        later pages: the caller must read all pages before changing any status (this returns them all).
        """
        filters = json.dumps({"match": "and", "rules": [
            {"field": emi_field, "operator": "is not blank"},
            {"field": status_field, "operator": "is", "value": READY_TO_SEND},
        ]})
        records: dict[str, dict] = {}
        page = 1
        while True:
            what = f"view {view} records page {page}"
            try:
                data = self._request("GET", f"/pages/{scene}/views/{view}/records", what,
                                     params={"filters": filters, "rows_per_page": ROWS_PER_PAGE, "page": page})
            except KnackHTTPError as exc:
                if exc.status in (401, 403):
                    raise ConfigError(f"{exc} (check KNACK_API_KEY and KNACK_APP_ID)") from None
                raise OutageError(str(exc)) from None
            if not isinstance(data, dict) or not isinstance(data.get("records"), list):
                raise OutageError(f"Knack {what}: reply has no records list")
            for record in data["records"]:
                if isinstance(record, dict) and record.get("id"):
                    records.setdefault(str(record["id"]), record)
            try:
                total_pages = int(data.get("total_pages") or 0)
            except (TypeError, ValueError):
                raise OutageError(f"Knack {what}: total_pages is not a number") from None
            if page >= total_pages or not data["records"]:
                return list(records.values())
            page += 1

    def set_status(self, obj: str, record_id: str, status_field: str, status: str) -> None:
        """Set one record's ESB status (retried by the adapter; raises OutageError or KnackHTTPError)."""
        what = f"update of record {record_id}"
        record = self._request("PUT", f"/objects/{obj}/records/{record_id}", what,
                               data=json.dumps({status_field: status}))
        # Knack answers with the updated record: believe the record, not the 200 alone
        if not isinstance(record, dict):
            raise OutageError(f"Knack {what}: reply is not a record")
        held = record.get(f"{status_field}_raw", record.get(status_field, status))
        if held != status:
            raise OutageError(f"Knack {what}: answered but the record still says {str(held)[:40]!r}, not {status}")

    # Minimal stand-in for the knackapi branch's version (same signature); the lead keeps that one at merge.
    def record_status(self, obj: str, record_id: str, status_field: str) -> str:
        """One record's status raw value, read with one GET of the record (raises OutageError on failure)."""
        what = f"read of record {record_id}"
        record = self._request("GET", f"/objects/{obj}/records/{quote(record_id, safe='')}", what)
        if not isinstance(record, dict):
            raise OutageError(f"Knack {what}: reply is not a record")
        return str(record.get(f"{status_field}_raw", record.get(status_field, "")))


class KnackHTTPError(OutageError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _knack_message(reply: requests.Response) -> str:
    try:
        errors = reply.json().get("errors")
        if errors:
            return "; ".join(str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in errors)[:200]
    except (ValueError, AttributeError):
        pass
    return reply.reason or ""


def _reason(exc: requests.RequestException) -> str:
    """A short, secret-free description of a transport failure."""
    if isinstance(exc, requests.exceptions.RetryError):
        return "gave up after retries (too many 429/5xx answers)"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    return type(exc).__name__

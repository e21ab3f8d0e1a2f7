"""HEALTHCHECK_URL: a dead man's switch in the healthchecks.io convention.

A run that is killed (SIGKILL, the host going down) or never started raises no alert of its own; a
healthchecks service notices the missing ping instead. Each run pings
    URL/start          when it starts (after it got the app's run lock)
    URL/<exit code>    when it ends: /0 is success, /1 and /2 are failures; the body is the summary line
    URL/log            instead, when another run was active (exit 75): logged there, no change of state
each carrying the same `rid` (run id) so the service pairs the start with the end and measures the duration.

A ping is bounded by a short timeout, never longer than the time the run has left, and by a wall-clock limit
(a server trickling its answer byte by byte cannot hold the run). A failed ping is a warning in the log and
never changes the run's outcome or exit code. The URL's path is a secret (whoever knows it can ping): only
the host is ever printed.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from urllib.parse import urlencode, urlsplit, urlunsplit

import requests

from .errors import ConfigError
from .outcomes import EXIT_LOCKED, Reader, ReportError, RunReport

PING_TIMEOUT = 5.0  # seconds; healthchecks answers in milliseconds, and the run must not wait on it


def healthcheck_url(value: str) -> str:
    """HEALTHCHECK_URL, checked with the settings (the error names the host only, never the secret path)."""
    url = value.strip()
    bad_port = ConfigError("HEALTHCHECK_URL has a port that is not a number from 1 to 65535 (or a malformed host)")
    try:
        parts = urlsplit(url)
        # urllib reads the port only when asked, and raises ValueError for `abc` or 99999: ask now, while a bad
        # value is still a configuration error, not a crash at the first ping
        port = parts.port
    except ValueError:
        raise bad_port from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise ConfigError("HEALTHCHECK_URL must be an http(s) URL such as https://hc-ping.com/<uuid>")
    if port == 0:
        raise bad_port
    return url


def ping_host(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


def ping_url(url: str, suffix: str, run_id: str) -> str:
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode({"rid": run_id})) if q)
    return urlunsplit((parts.scheme, parts.netloc, f"{parts.path.rstrip('/')}/{suffix}", query, ""))


class Healthcheck(Reader):
    def __init__(self, url: str, *, timeout: float = PING_TIMEOUT,
                 deadline: float | Callable[[], float] | None = None,
                 clock: Callable[[], float] = time.monotonic, run_id: str | None = None):
        """`deadline` (on `clock`) is when the process must be done, e.g. the scheduler's kill time; a callable
        is asked at each ping (a stop signal brings the run's end closer)."""
        self.url = url
        self.host = ping_host(url)
        self.timeout = timeout
        self.deadline = deadline
        self._clock = clock
        self.run_id = run_id or str(uuid.uuid4())

    def started(self, app: str) -> None:
        self.ping("start")

    def finished(self, report: RunReport) -> None:
        if report.dry_run:
            return
        if report.exit_code == EXIT_LOCKED:
            self.ping("log", f"another run for {report.app} is active; this run sent nothing")
        else:
            self.ping(str(report.exit_code), report.summary_text())

    def ping(self, suffix: str, body: str = "") -> None:
        """One ping; ReportError (host and reason only) when it does not get a 2xx answer in time."""
        what = f"healthcheck ping /{suffix} to {self.host}"
        limit = self.timeout
        if self.deadline is not None:
            deadline = self.deadline() if callable(self.deadline) else self.deadline
            limit = min(limit, deadline - self._clock())
        if limit <= 0:
            raise ReportError(f"{what} skipped: no time left")
        outcome: dict[str, object] = {}

        def request() -> None:
            try:
                reply = requests.post(ping_url(self.url, suffix, self.run_id), data=body.encode("utf-8"),
                                      timeout=(limit, limit), headers={"Content-Type": "text/plain; charset=utf-8"})
                reply.close()
                outcome["status"] = reply.status_code
            except requests.RequestException as exc:
                outcome["error"] = _reason(exc, limit)

        # requests' timeouts bound each connect and each read, not the whole exchange: the thread bounds that
        worker = threading.Thread(target=request, name="knack311-healthcheck", daemon=True)
        worker.start()
        worker.join(limit)
        if worker.is_alive():
            raise ReportError(f"{what} failed: no answer within {limit:g}s")
        if "error" in outcome:
            raise ReportError(f"{what} failed: {outcome['error']}")
        status = int(outcome["status"])  # type: ignore[call-overload]
        if not 200 <= status < 300:
            raise ReportError(f"{what} failed: HTTP {status}")


def _reason(exc: requests.RequestException, limit: float) -> str:
    """A transport failure in a few words; never str(exc), which holds the URL and so the secret."""
    if isinstance(exc, requests.Timeout):
        return f"no answer within {limit:g}s"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS handshake failed"
    if isinstance(exc, requests.ConnectionError):
        return "cannot connect"
    return type(exc).__name__

"""What the Knack and ESB clients share about HTTP: retries that obey the run's stop signal and deadline, and
answers read only up to a size limit."""

from __future__ import annotations

import requests
from urllib3.exceptions import MaxRetryError
from urllib3.util.retry import Retry

from .stopping import Stop


class RetryStopped(Exception):
    """A retry was due but the run is stopping or its time is up: no further request is made."""


class StoppableRetry(Retry):
    """urllib3's Retry, except that no retry starts after a stop signal or past the run's hard deadline.

    Its backoff and Retry-After sleeps wait on the stop signal instead of time.sleep, and a wait that would end
    past the deadline is not begun: the retry gives up at once. urllib3 copies a Retry for every attempt through
    `new()`, so the Stop is carried along there.
    """

    stop: Stop | None = None

    def new(self, **kw) -> StoppableRetry:
        copy = super().new(**kw)
        copy.stop = self.stop
        return copy

    def increment(self, *args, **kwargs) -> StoppableRetry:
        if self.stop is not None and (self.stop.stopped or self.stop.remaining() <= 0):
            raise MaxRetryError(kwargs.get("_pool"), kwargs.get("url") or "", RetryStopped("the run is stopping"))
        return super().increment(*args, **kwargs)

    def sleep(self, response=None) -> None:
        if self.stop is None:
            return super().sleep(response)
        delay = None
        if self.respect_retry_after_header and response is not None:
            delay = self.get_retry_after(response)
        if delay is None:
            delay = self.get_backoff_time()
        if delay >= self.stop.remaining() or self.stop.wait(delay):
            raise RetryStopped(f"a retry {delay:.1f}s from now would pass the run's deadline or follow a stop signal")


def with_stop(retry: Retry, stop: Stop | None) -> Retry:
    """The same retry policy (every setting and the history so far), made to obey `stop`."""
    if stop is None:
        return retry
    stoppable = StoppableRetry.__new__(StoppableRetry)
    stoppable.__dict__.update(retry.__dict__)
    stoppable.stop = stop
    return stoppable


class AnswerTooLarge(Exception):
    """The answer's body is larger than this program will read."""


def read_capped(reply: requests.Response, limit: int) -> bytes:
    """The body of a streamed reply (requests' stream=True), refusing to hold more than `limit` bytes.

    An endless or huge body (a broken proxy, a gateway looping) would otherwise grow the process without bound.
    """
    declared = reply.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        reply.close()
        raise AnswerTooLarge(f"answer of {int(declared)} bytes is over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in reply.iter_content(chunk_size=65536):
            size += len(chunk)
            if size > limit:
                raise AnswerTooLarge(f"answer is over the {limit}-byte limit")
            chunks.append(chunk)
    finally:
        reply.close()
    return b"".join(chunks)

"""Stopping: one stop signal and one set of deadlines that every wait of a run consults.

`docker stop` and Airflow's task kill send SIGTERM, then SIGKILL 10 s later; the run must be gone within
STOP_WITHIN seconds of the signal, with its summary printed, whatever Knack or the ESB are doing. And no request
may outlive the run's budget, even against a server that trickles one byte a second.

Why network calls run in a thread the caller can abandon (`call`):
- requests' timeouts bound each socket operation, not the request: a server that sends a byte every second
  never trips them, and no total-deadline option exists in requests or urllib3;
- a signal handler cannot interrupt a blocking recv: Python retries the system call after the handler runs
  (PEP 475), and in any other thread than the main one the handler never even runs;
- shutting sockets down from the handler would need every socket of urllib3's pools in hand, which its API does
  not give, and SIGALRM is one timer per process, main thread only, so it does not compose with a pool of workers.
So the calling thread waits for the call on an Event, polling the stop flag, and gives up at the deadline or on
the signal. The abandoned call goes on in a daemon thread, which cannot keep the process alive; its result is
dropped. The caller treats a call cut short exactly like a read timeout: a Knack read has had no effect, an ESB
POST's outcome is unknown (the journal keeps it `sending`).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

STOP_WITHIN = 8.0  # after SIGTERM/SIGINT the process is gone within this (Docker's SIGKILL follows at 10 s)
WRITE_GRACE = 6.0  # of which an in-flight ESB POST or Knack update may use this to finish; the rest is the wrap-up
POLL = 0.05        # how often a waiting caller looks at the stop flag


class CutShort(Exception):
    """A call was abandoned before it answered: its deadline passed, or a stop signal came."""

    def __init__(self, what: str, *, by_signal: bool, waited: float):
        self.by_signal = by_signal
        self.waited = waited
        cause = "stop signal" if by_signal else f"no complete answer within {waited:.0f}s"
        super().__init__(f"{what}: cut short ({cause})")


class ProcessSignals:
    """SIGTERM and SIGINT for the whole process, from the entry script's first lines until the process exits.

    Why handlers of the process and not of each run: python as PID 1 (a container) ignores a signal it has no
    handler for, so a `docker stop` before the handlers are in place is lost, and a signal that comes after they
    are taken down (a second SIGTERM while the summary is being written) kills the process with exit 143, after
    the run had decided its own code. So the entry script installs these first, before the imports that take
    time, and keeps them; a `Stop` attaches itself while it runs and hears of a signal that came before it, too.
    """

    def __init__(self) -> None:
        self.installed = False
        self.name = ""                # the first signal, once one came
        self.at: float | None = None  # when it came (time.monotonic)
        self._stops: list[Stop] = []

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        self.installed = True

    def ignore_from_now(self) -> None:
        """The process is ending with the exit code it decided: a later signal changes nothing. (Python resets
        handlers that are Python functions to the default while it shuts down; ignored signals stay ignored.)"""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)

    def attach(self, stop: Stop) -> None:
        self._stops.append(stop)
        if self.name:
            stop.request(self.name, at=self.at)

    def detach(self, stop: Stop) -> None:
        if stop in self._stops:
            self._stops.remove(stop)

    def _handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if not self.name:
            self.name, self.at = name, time.monotonic()
        for stop in list(self._stops):
            stop.request(name)


PROCESS_SIGNALS = ProcessSignals()


class Stop:
    """The run's stop signal (SIGTERM, SIGINT or a request from the code) and its time limits.

    `work_deadline` is when the run starts no new record (--max-runtime); `hard_deadline` is when nothing of the
    run may still be waiting (--max-runtime + the request timeout). Thread-safe.
    """

    def __init__(self, *, max_runtime: float = float("inf"), request_timeout: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.started = clock()
        self.work_deadline = self.started + max_runtime
        self.hard_deadline = self.work_deadline + request_timeout
        self.signal_name = ""
        self._signalled_at: float | None = None
        self._event = threading.Event()
        self._previous: dict[int, object] = {}

    # -- the signal ------------------------------------------------------------------------------------------
    def install(self) -> None:
        """Hear SIGTERM/SIGINT: through the process's handlers when the entry script installed them (a signal that
        came before counts), else with handlers of this Stop's own until `restore()` (a library use, a test)."""
        if PROCESS_SIGNALS.installed:
            PROCESS_SIGNALS.attach(self)
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        PROCESS_SIGNALS.detach(self)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, name: str, at: float | None = None) -> None:
        """Stop as if a signal of that name had come (the first one counts); `at`: when it came (time.monotonic),
        if before this call."""
        if not self._event.is_set():
            self.signal_name = name
            self._signalled_at = at if at is not None and self.clock is time.monotonic else self.clock()
            self._event.set()

    @property
    def stopped(self) -> bool:
        return self._event.is_set()

    # -- time ------------------------------------------------------------------------------------------------
    def remaining(self) -> float:
        """Seconds until nothing may wait any more: the hard deadline, or the stop grace once signalled."""
        return max(0.0, self._limit(grace=True) - self.clock())

    def exit_by(self) -> float:
        """When the process must be gone: STOP_WITHIN after a signal, else when the run's time is up."""
        if self._signalled_at is not None:
            return min(self._signalled_at + STOP_WITHIN, self.hard_deadline + STOP_WITHIN)
        return self.hard_deadline + STOP_WITHIN

    def work_time_left(self) -> bool:
        """True while new work may start: no stop signal and the --max-runtime budget not spent."""
        return not self.stopped and self.clock() < self.work_deadline

    def wait(self, seconds: float) -> bool:
        """Sleep (a backoff, a pacing gap) unless stopped; never past the hard deadline. True if stopped."""
        seconds = min(max(0.0, seconds), self.remaining())
        return self._event.wait(seconds) or self.stopped

    def _limit(self, *, grace: bool) -> float:
        limit = self.hard_deadline
        if self._signalled_at is not None:
            limit = min(limit, self._signalled_at + (WRITE_GRACE if grace else 0.0))
        return limit

    # -- calls -----------------------------------------------------------------------------------------------
    def call(self, fn: Callable[[], T], *, timeout: float, what: str, write: bool = False) -> T:
        """fn() in a daemon thread, waited for at most `timeout` seconds and never past the run's limits.

        A read (`write=False`) is abandoned as soon as a stop signal comes: it has no effect to lose. A write
        (an ESB POST, a Knack status update) gets what is left of WRITE_GRACE after the signal to finish, so
        that a message in flight is not made uncertain without need. Raises CutShort when abandoned; fn's own
        exception when it raised.
        """
        done = threading.Event()
        outcome: dict[str, object] = {}

        def target() -> None:
            try:
                outcome["value"] = fn()
            except BaseException as exc:  # handed to the caller, whatever it is
                outcome["error"] = exc
            finally:
                done.set()

        started = self.clock()
        deadline = started + timeout
        worker = threading.Thread(target=target, name=f"call: {what}", daemon=True)
        worker.start()
        while not done.is_set():
            run_limit = self._limit(grace=write)
            limit = min(deadline, run_limit)
            now = self.clock()
            if now >= limit:
                if done.is_set():
                    break
                by_signal = self.stopped and run_limit <= deadline
                raise CutShort(what, by_signal=by_signal, waited=now - started)
            done.wait(min(POLL, limit - now))
        if "error" in outcome:
            raise outcome["error"]  # type: ignore[misc]
        return outcome["value"]  # type: ignore[return-value]

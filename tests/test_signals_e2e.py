"""SIGTERM and SIGINT from the program's first line to its last (issue 13 item 6, issue 14 item 6), end to end.

Every mode ends within 8 s of the signal with its own output (`--check` its table, `--dry-run` and a run their
summary), also as PID 1 (python ignores a signal it has no handler for there); the handlers stay until the
process exits, so a second SIGTERM cannot turn the run's exit code into 143 after its summary.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ENTRY, statuses
from tests.test_check_e2e import parse_table

APP = "data-tracker"
STOP_WITHIN = 8.0
SUMMARY = re.compile(rf"^\S+ {APP} summary(?: \(dry run\))?: .*$", re.MULTILINE)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail("the program ended before the awaited moment:\n" + "".join(proc.communicate()))
        assert time.monotonic() < end, "the awaited moment never came"
        time.sleep(0.02)


def hung(knack, path_part: str):
    """Whether the program's request to `path_part` is held by the simulator (arrived, not answered)."""
    return lambda: any(path_part in r.path and r.status == 0 for r in knack.request_log)


def signal_and_finish(proc: subprocess.Popen, signum=signal.SIGTERM, *, target: int | None = None
                      ) -> tuple[float, str, str]:
    signalled = time.monotonic()
    os.kill(target or proc.pid, signum)
    stdout, stderr = proc.communicate(timeout=30)
    return time.monotonic() - signalled, stdout, stderr


@pytest.mark.timing
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_check_ends_with_its_table_when_a_signal_comes_during_a_hung_knack_read(knack, esb, start_bridge,
                                                                                     signum):
    knack.inject("GET", "/applications/", hang=True)
    proc = start_bridge("--check", env={"ESB_TIMEOUT": "30"})  # the signal, not a timeout, must end it
    wait_for(hung(knack, "/applications/"), proc)

    took, stdout, stderr = signal_and_finish(proc, signum)

    assert took < STOP_WITHIN, f"ended {took:.1f}s after the signal"
    assert proc.returncode == 1, stdout + stderr  # stopped early, as a run stopped by a signal
    assert "Traceback" not in stdout + stderr
    table = parse_table(stdout)
    name = signal.Signals(signum).name
    assert table.verdict.endswith(f"stopped by {name} before every item was checked"), table.verdict
    assert table.status("Knack app metadata") == "SKIP" and name in table.detail("Knack app metadata")
    assert table.status("KNACK_API_KEY") == "OK"  # what was checked before the signal is shown
    assert esb.received == []


@pytest.mark.timing
def test_a_dry_run_ends_with_its_summary_when_sigterm_comes_during_a_hung_knack_read(knack, esb, seed,
                                                                                     start_bridge):
    seed(3)
    knack.inject("GET", "/views/", hang=True)
    proc = start_bridge("--dry-run", env={"ESB_TIMEOUT": "30"})
    wait_for(hung(knack, "/views/"), proc)

    took, stdout, stderr = signal_and_finish(proc)

    assert took < STOP_WITHIN, f"ended {took:.1f}s after the signal"
    assert proc.returncode == 1, stdout + stderr
    assert "Traceback" not in stdout + stderr
    [line] = SUMMARY.findall(stdout)
    assert " summary (dry run): " in line and line.endswith("stopped: received SIGTERM"), line
    assert esb.received == [] and set(statuses(knack).values()) == {"READY_TO_SEND"}


@pytest.mark.timing
def test_more_sigterms_after_the_first_cannot_change_the_runs_exit_code(knack, esb, seed, start_bridge):
    seed(30)
    esb.latency = 0.3
    proc = start_bridge()
    wait_for(lambda: len(esb.received) >= 3, proc)

    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    # then more, until the process is gone: a handler taken down at any moment before the exit (the summary
    # written, the interpreter shutting down) would let one of these end it with 143 (-15 here)
    while proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            break
        time.sleep(0.01)
    stdout, stderr = proc.communicate(timeout=30)
    took = time.monotonic() - signalled

    assert proc.returncode == 1, (proc.returncode, stdout + stderr)
    assert took < STOP_WITHIN, f"ended {took:.1f}s after the first signal"
    [line] = SUMMARY.findall(stdout)  # printed once
    assert line.endswith("stopped: received SIGTERM"), line
    assert "Traceback" not in stdout + stderr


def _pid_namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _child_of(pid: int, timeout: float = 10) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        if children:
            return int(children[0])
        time.sleep(0.01)
    pytest.fail(f"process {pid} started no child")


@pytest.mark.timing
@pytest.mark.skipif(not _pid_namespaces_work(), reason="no PID namespace here (unshare --pid --fork)")
def test_as_pid_1_the_check_still_ends_on_sigterm(knack, esb, bridge_env, tmp_path):
    """As in a container: python is PID 1 of its namespace, where a signal without a handler is ignored."""
    knack.inject("GET", "/applications/", hang=True)
    proc = subprocess.Popen(["unshare", "--pid", "--fork", sys.executable, str(ENTRY), APP, "--check"],
                            env={**bridge_env, "ESB_TIMEOUT": "30"}, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        python = _child_of(proc.pid)
        wait_for(hung(knack, "/applications/"), proc)

        took, stdout, stderr = signal_and_finish(proc, target=python)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert took < STOP_WITHIN, f"ended {took:.1f}s after the signal"
    assert "Traceback" not in stdout + stderr
    assert parse_table(stdout).verdict.endswith("stopped by SIGTERM before every item was checked"), stdout + stderr
    assert proc.returncode == 1, stdout + stderr

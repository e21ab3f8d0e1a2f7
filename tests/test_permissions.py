"""The container's uid (10001) meets files that belong to someone else: the city's checkout mounted over /app
(`docker run -v "$(pwd)":/app IMAGE python send_esb_message.py data-tracker`) brings esb.pem and state/ owned by
the host user. The program must say so in one line that names the path and the fix, exit 2, send nothing.

Real permissions, not mocks: as root the command runs as uid 10001 through `setpriv` against files owned by uid
1000 (what the container meets); as another user the files are made unreadable to that user with chmod.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from knack311.access import access_fix
from tests.conftest import ENTRY, statuses

APP = "data-tracker"
CONTAINER_UID = 10001
HOST_UID = 1000  # the operator's uid on the host, who owns the mounted checkout
AS_ROOT = os.geteuid() == 0


def as_the_container(command: list[str]) -> list[str]:
    """The command as uid 10001 (when we are root), else as ourselves."""
    if not AS_ROOT:
        return command
    return ["setpriv", f"--reuid={CONTAINER_UID}", f"--regid={CONTAINER_UID}", "--clear-groups", *command]


@pytest.fixture(scope="module")
def runner_uid() -> int:
    """The uid the command runs as; skips where that uid could not even start the program."""
    if AS_ROOT and shutil.which("setpriv") is None:
        pytest.skip("running as root needs setpriv (util-linux) to drop to uid 10001")
    probe = subprocess.run(as_the_container([sys.executable, str(ENTRY), "--help"]), capture_output=True,
                           text=True, timeout=60, cwd="/")
    if probe.returncode != 0:
        pytest.skip(f"uid {CONTAINER_UID} cannot run this checkout's interpreter or program: {probe.stderr[-200:]}")
    return CONTAINER_UID if AS_ROOT else os.geteuid()


@pytest.fixture
def checkout():
    """A folder every uid may enter (pytest's own tmp folders are owner-only), like a checkout on the host."""
    path = Path(tempfile.mkdtemp(prefix="knack311-permissions-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def hand_to_host_user(path: Path, mode: int) -> None:
    """As the operator's checkout has it: owned by the host user, `mode`; a non-root runner can only take its
    own rights away."""
    if AS_ROOT:
        os.chown(path, HOST_UID, HOST_UID)
        path.chmod(mode)
    else:
        path.chmod(0o555 if path.is_dir() else 0)  # a folder stays readable: only creating in it is refused


@pytest.fixture
def mounted(checkout, pki, bridge_env):
    """esb.cert, esb.pem and the CA in the checkout, readable by everyone; STATE_DIR=<checkout>/state (absent)."""
    for name, source in (("esb.cert", pki.client_cert), ("esb.pem", pki.client_key), ("ca.pem", pki.ca_bundle)):
        shutil.copyfile(source, checkout / name)
        (checkout / name).chmod(0o644)
    env = {**bridge_env, "ESB_CERT": str(checkout / "esb.cert"), "ESB_KEY": str(checkout / "esb.pem"),
           "ESB_CA_BUNDLE": str(checkout / "ca.pem"), "STATE_DIR": str(checkout / "state")}
    return checkout, env


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(as_the_container([sys.executable, str(ENTRY), APP, *args]), env=env, cwd="/",
                          capture_output=True, text=True, timeout=120)


def assert_one_line_naming(result: subprocess.CompletedProcess, path: Path, runner_uid: int) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("configuration error: ") and str(path) in line and f"by uid {runner_uid}" in line, line
    if AS_ROOT:  # the two fixes: run as the owner, or give it to the container's uid
        assert f"docker run --user {HOST_UID}:{HOST_UID}" in line, line
        assert re.search(rf"chown (-R )?{CONTAINER_UID}\b", line), line
    return line


def test_a_key_the_container_uid_cannot_read_is_one_line_with_the_fix(mounted, runner_uid, knack, esb, seed):
    checkout, env = mounted
    records = seed(2)
    hand_to_host_user(checkout / "esb.pem", 0o600)
    result = run(env)
    assert_one_line_naming(result, checkout / "esb.pem", runner_uid)
    assert "ESB_KEY" in result.stderr
    assert esb.received == [] and knack.request_log == []  # stopped before any network call
    assert set(statuses(knack).values()) == {"READY_TO_SEND"} and len(records) == 2


def test_a_certificate_the_container_uid_cannot_read_is_one_line_with_the_fix(mounted, runner_uid, knack, esb):
    checkout, env = mounted
    hand_to_host_user(checkout / "esb.cert", 0o600)
    result = run(env)
    assert_one_line_naming(result, checkout / "esb.cert", runner_uid)
    assert "ESB_CERT" in result.stderr and esb.received == []


def test_a_state_folder_the_container_uid_cannot_create_is_one_line_with_the_fix(mounted, runner_uid, knack, esb,
                                                                                 seed):
    checkout, env = mounted
    seed(1)
    hand_to_host_user(checkout, 0o755)  # the checkout root, where state/ does not exist yet
    result = run(env)
    line = assert_one_line_naming(result, checkout / "state", runner_uid)
    # as root: the checkout is the host user's; otherwise it is our own folder, made read-only
    assert (f"mkdir state && chown {runner_uid} state" if AS_ROOT else "chmod u+rwX") in line, line
    assert not (checkout / "state").exists()
    assert esb.received == [] and knack.request_log == []
    assert set(statuses(knack).values()) == {"READY_TO_SEND"}


def test_a_state_folder_the_container_uid_cannot_write_is_one_line_with_the_fix(mounted, runner_uid, knack, esb):
    checkout, env = mounted
    (checkout / "state").mkdir()
    hand_to_host_user(checkout / "state", 0o755)
    result = run(env)
    assert_one_line_naming(result, checkout / "state", runner_uid)
    assert esb.received == [] and knack.request_log == []


def test_a_lock_left_by_a_run_as_another_uid_is_one_line_with_the_fix(mounted, runner_uid, knack, esb):
    """An older image ran as root: its state folder is handed over, the files in it are not."""
    checkout, env = mounted
    state = checkout / "state"
    state.mkdir()
    if AS_ROOT:
        os.chown(state, CONTAINER_UID, CONTAINER_UID)
    (state / f"{APP}.lock").write_text("")
    hand_to_host_user(state / f"{APP}.lock", 0o600)
    result = run(env)
    assert_one_line_naming(result, state / f"{APP}.lock", runner_uid)
    assert esb.received == []


def test_a_state_dir_that_is_a_file_is_one_line(mounted, knack, esb):
    checkout, env = mounted
    (checkout / "state").write_text("not a folder")
    result = subprocess.run([sys.executable, str(ENTRY), APP], env=env, cwd="/", capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"configuration error: STATE_DIR {checkout / 'state'} is not a directory: point " \
                                    "STATE_DIR at a folder (or mount one there)"
    assert esb.received == [] and knack.request_log == []


def test_check_names_the_same_fix_in_its_state_dir_row(mounted, runner_uid, knack, esb):
    checkout, env = mounted
    hand_to_host_user(checkout, 0o755)
    result = run(env, "--check")
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output
    rows = [line for line in output.splitlines() if line.startswith("STATE_DIR")]
    assert len(rows) == 1 and "FAIL" in rows[0] and f"by uid {runner_uid}" in rows[0], output
    assert (f"chown {runner_uid} state" if AS_ROOT else "chmod u+rwX") in rows[0]
    assert esb.accepted == [] and not (checkout / "state").exists()


# ----- the pure part -----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not AS_ROOT, reason="giving a file to another owner needs root")
def test_the_fix_names_owner_and_mode_and_never_proposes_root(checkout):
    key = checkout / "esb.pem"
    key.write_text("k")
    os.chown(key, HOST_UID, HOST_UID + 1)
    key.chmod(0o600)
    assert access_fix(key) == (f"by uid 0 (owner uid {HOST_UID}, mode 0600): run as its owner (`docker run --user "
                               f"{HOST_UID}:{HOST_UID + 1}`) or `chown 0` it (on the host, for a mounted file)")
    os.chown(key, 0, 0)
    assert "--user" not in access_fix(key)


def test_a_path_that_vanished_still_gets_a_fix_not_a_crash(checkout):
    assert access_fix(checkout / "gone" / "esb.pem") == \
        f"by uid {os.geteuid()}: `chown {os.geteuid()}` it (on the host, for a mounted file)"

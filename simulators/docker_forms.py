"""The image's command forms, for `make docker-smoke` (simulators/docker_smoke.py runs these after the scheduled
runs): each form that sends gets fresh READY_TO_SEND activities and must deliver each exactly once.

    IMAGE data-tracker                                     (docker_smoke.py's scheduled runs)
    IMAGE python send_esb_message.py data-tracker          the scheduler's options, the command run as given
    docker run --env-file env_file -v CHECKOUT:/app IMAGE python send_esb_message.py data-tracker
                                                           the seed's mounted checkout: first as the image's uid,
                                                           which may not read the host's key (one line, exit 2),
                                                           then with the fix the line names (--user OWNER:GROUP)
    IMAGE --version, IMAGE --help, IMAGE bash -c ...       options to the program, other commands as given (PID 1)
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

from config import CONFIG
from simulators.activities import activity_record
from simulators.esb import ESBSimulator
from simulators.knack_api import KnackSimulator

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROGRAM_FILES = ["send_esb_message.py", "config.py", "knack311", "templates"]
HOST_UID = 1000  # the operator who owns the checkout on the host, when we are root and can play them
RUN_TIMEOUT = 300


def record_id(atd: int) -> str:
    return f"64c1{atd:020d}"


def seed_batch(knack: KnackSimulator, app: str, first_atd: int, count: int = 2) -> list[str]:
    """`count` sendable activities of one new service request; their Knack record ids."""
    config = CONFIG[app]
    records = [activity_record(config, app_name=app, record_id=record_id(atd), atd_activity_id=atd,
                               emi_id=f"EMI-{atd}", sr_number=f"24-0004{atd:04d}", activity_name="Dispatch Technician",
                               activity_datetime=dt.datetime(2024, 7, 4, 9, 15), activity_details=f"form {atd}")
               for atd in range(first_atd, first_atd + count)]
    knack.add_records(config["obj"], records)
    return [r["id"] for r in records]


def run(command: list[str], timeout: float = RUN_TIMEOUT) -> tuple[int | None, str]:
    print("$ " + " ".join(command), flush=True)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "(timed out)"
    output = proc.stdout + proc.stderr
    print(textwrap.indent(output.rstrip("\n") or "(no output)", "  | "), flush=True)
    return proc.returncode, output


def delivered_once(esb: ESBSimulator, knack: KnackSimulator, app: str, ids: list[str]) -> tuple[bool, str]:
    copies = esb.copies()
    key = CONFIG[app]["fields"]["esb_status"]
    status = {r["id"]: r.get(f"{key}_raw", r.get(key)) for r in knack.records(CONFIG[app]["obj"])}
    ok = all(copies.get(i) == 1 and status.get(i) == "SENT" for i in ids)
    return ok, f"copies {[copies.get(i) for i in ids]}, statuses {[status.get(i) for i in ids]}"


def make_checkout(tmp: Path, pki, owner: tuple[int, int] | None) -> Path:
    """The city's checkout: the program, esb.cert and esb.pem in its root, the key mode 0600 as a careful
    operator leaves it, everything owned by the host user (`owner`, when we can play them)."""
    checkout = tmp / "checkout"
    checkout.mkdir()
    for name in PROGRAM_FILES:
        source = PROJECT_ROOT / name
        if source.is_dir():
            shutil.copytree(source, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, checkout / name)
    shutil.copyfile(pki.client_cert, checkout / "esb.cert")
    shutil.copyfile(pki.client_key, checkout / "esb.pem")
    shutil.copyfile(pki.ca_bundle, checkout / "esb-ca.pem")  # the simulator's CA; the real ESB's is system-trusted
    for path in [checkout, *checkout.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
        if owner:
            os.chown(path, *owner)
    (checkout / "esb.pem").chmod(0o600)
    return checkout


def write_city_env_file(path: Path, knack: KnackSimulator, esb: ESBSimulator, app_id: str, api_key: str) -> None:
    """The seed's env_file: no ESB_CERT, ESB_KEY or STATE_DIR, so esb.cert, esb.pem and state/ in /app (the
    checkout) are used."""
    lines = [f"KNACK_APP_ID={app_id}", f"KNACK_API_KEY={api_key}", f"KNACK_API_URL={knack.url}",
             f"ESB_ENDPOINT={esb.url}", "ESB_CA_BUNDLE=/app/esb-ca.pem", "ESB_TIMEOUT=10"]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")


def check_command_forms(check: Callable[..., bool], *, image: str, app: str, knack: KnackSimulator,
                        esb: ESBSimulator, pki, tmp: Path, scheduler_options: list[str], app_id: str,
                        api_key: str) -> None:
    """The forms that send (each with fresh activities), then the ones that only answer."""
    # --- the command run as given, with the scheduler's options (hardened, state volume, certificates) ---
    ids = seed_batch(knack, app, 701)
    code, output = run(["docker", "run", "--rm", *scheduler_options, image, "python", "send_esb_message.py", app])
    ok, detail = delivered_once(esb, knack, app, ids)
    check(code == 0 and ok, f"IMAGE python send_esb_message.py {app}: runs as given, exit 0, each new activity "
          "delivered once and SENT", f"exit {code}, {detail}")
    check(api_key not in output, "the API key does not appear in that output")

    # --- the seed's mounted checkout, as the image's uid: the host's 0600 key is not readable to it ---
    owner = (HOST_UID, HOST_UID) if os.geteuid() == 0 else None
    uid, gid = owner or (os.getuid(), os.getgid())
    checkout = make_checkout(tmp, pki, owner)
    env_file = tmp / "env_file"
    write_city_env_file(env_file, knack, esb, app_id, api_key)
    ids = seed_batch(knack, app, 711)
    mounted = ["docker", "run", "--rm", "--env-file", str(env_file), "-v", f"{checkout}:/app", "--network", "host"]
    before = len(esb.received)
    code, output = run([*mounted, image, "python", "send_esb_message.py", app])
    lines = output.strip().splitlines()
    fix = f"docker run --user {uid}:{gid}"
    check(code == 2 and len(lines) == 1 and "/app/esb.pem" in lines[0] and fix in lines[0]
          and "Traceback" not in output and len(esb.received) == before,
          "mounted checkout whose esb.pem uid 10001 cannot read: one line naming /app/esb.pem and the fix "
          f"({fix}), exit 2, nothing sent", f"exit {code}, {len(lines)} line(s), sent {len(esb.received) - before}")

    # --- the same command with the fix the line gave: it runs and keeps its journal in the checkout ---
    code, output = run([*mounted, "--user", f"{uid}:{gid}", image, "python", "send_esb_message.py", app])
    ok, detail = delivered_once(esb, knack, app, ids)
    journal = checkout / "state" / f"{app}.journal.sqlite3"
    check(code == 0 and ok and journal.is_file(),
          f"the seed's command (checkout mounted over /app, --user {uid}:{gid}): exit 0, each new activity "
          "delivered once and SENT, the journal in the checkout's state/",
          f"exit {code}, {detail}, journal there: {journal.is_file()}")
    check(api_key not in output, "the API key does not appear in that output")


def check_answering_forms(check: Callable[..., bool], *, image: str, labels: dict[str, str]) -> None:
    """--version and --help go to the program; bash runs as given, as PID 1, with the venv's python on PATH."""
    code, output = run(["docker", "run", "--rm", image, "--version"], timeout=120)
    want = f"knack-311 {labels.get('version')} (revision {labels.get('revision')})"
    check(code == 0 and output.strip() == want, f"IMAGE --version prints {want!r} (the image's labels)",
          f"exit {code}, printed {output.strip()!r}")

    code, output = run(["docker", "run", "--rm", image, "--help"], timeout=120)
    check(code == 0 and "usage: send_esb_message.py" in output and "--version" in output,
          "IMAGE --help: the program's usage, exit 0", f"exit {code}")

    script = ('echo "shell pid $$"; echo "python $(command -v python)"; '
              'python -c "import sys, requests, lxml; print(\'prefix\', sys.prefix)"')
    code, output = run(["docker", "run", "--rm", image, "bash", "-c", script], timeout=120)
    found = dict(re.findall(r"^(shell pid|python|prefix) (.*)$", output, re.MULTILINE))
    check(code == 0 and found == {"shell pid": "1", "python": "/opt/venv/bin/python", "prefix": "/opt/venv"},
          "IMAGE bash -c ...: runs as given, as PID 1 (exec); `python` on PATH is the venv's, with the requirements",
          f"exit {code}, {found}")

    code, output = run(["docker", "run", "--rm", image, "python", "-c", "import os; print('pid', os.getpid())"],
                       timeout=120)
    check(code == 0 and output.strip() == "pid 1", "IMAGE python ...: python itself is PID 1 (gets docker stop's "
          "SIGTERM)", f"exit {code}, printed {output.strip()!r}")

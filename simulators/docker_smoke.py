"""Docker smoke test: build the image and run it the way the scheduler does, against simulators on this host.

    make docker-smoke        (or: .venv/bin/python -m simulators.docker_smoke)

Needs a running Docker engine (`docker info` must work). It builds `knack-311:smoke` with the OCI label build
args (git revision, version, build time), or takes an image already built when KNACK311_SMOKE_IMAGE names one
(CI builds the image it publishes, then tests that one), makes a throwaway PKI, starts the Knack simulator
(HTTP) and the ESB simulator (HTTPS, client certificate required) on 127.0.0.1, seeds data-tracker activities,
writes an env file and runs the container as README.md and the Dockerfile say, hardened:

    docker run --rm --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
        --env-file ENVFILE -v CERTDIR:/certs:ro -v knack-311-smoke-state-PID:/app/state \
        --network host knack-311:smoke data-tracker

(`--network host` only so that the container reaches the simulators on 127.0.0.1; the state is a throwaway
named volume, removed at the end). Then it checks what the ESB received, what Knack now says, what the container
printed, the journal in the state volume, who the container runs as, what the image holds, its labels, and that
no interpreter in it can run pip. Prints "ok: ..." / "FAIL: ..." per check and a final line; exits 0 only if
every check passed, 1 if any failed, 2 if Docker is not available.

Then the other command forms (simulators/docker_forms.py): `IMAGE python send_esb_message.py data-tracker`, the
seed's checkout mounted over /app (refused in one line as uid 10001, then run with the `--user` fix it names),
`IMAGE --version`, `IMAGE --help` and `IMAGE bash -c ...` (run as given, as PID 1).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from config import CONFIG
from simulators.activities import activity_record, app_metadata
from simulators.certs import CLIENT_NAME, make_pki
from simulators.docker_forms import check_answering_forms, check_command_forms
from simulators.esb import ESBSimulator, parse_message
from simulators.knack_api import KnackSimulator

PROJECT_ROOT = Path(__file__).resolve().parents[1]
IMAGE = "knack-311:smoke"
APP = "data-tracker"
APP_ID = "5d79512148c4af00106d1507"
API_KEY = "smoke-canary-api-key-7d41b0c2"  # must never appear in the container's output
CONTAINER_UID = 10001  # the image's USER
RUN_TIMEOUT = 300  # seconds; the scheduler's own limit is 5 minutes
STATE_VOLUME = f"knack-311-smoke-state-{os.getpid()}"  # never the deployment's knack-311-state
# what the scheduler adds to `docker run` (README.md, Dockerfile): the container needs no writable root, no
# capability and no privilege escalation; SQLite may put a scratch file in /tmp
HARDENING = ["--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
LABEL_PREFIX = "org.opencontainers.image."

NON_ASCII = "Señal dañada en Congress & 6th — café ☕, 日本語 <ok>"

# (atd id, SR, activity name, local time, details, extra); "sendable" is whether a message must reach the ESB
ACTIVITIES = [
    (601, "24-00031001", "Dispatch Technician", dt.datetime(2024, 7, 4, 9, 15), "Crew sent to Lamar & 5th.", {}),
    (602, "24-00031001", "Close Issue (Resolved)", dt.datetime(2024, 7, 4, 11, 5), "Resolved on site.\nAll good.",
     {"issue_status": "closed_resolved"}),
    (603, "24-00031002", "Identify Asset", dt.datetime(2024, 1, 15, 8, 30), NON_ASCII, {}),
    (604, "24-00031002", "Other", dt.datetime(2024, 1, 15, 8, 45), "Internal note, not for 311.", {}),
    (605, "24-00031003", "Close Issue (Duplicate)", dt.datetime(2024, 11, 3, 1, 30), "Same as 24-00031001.",
     {"issue_status": "closed_duplicate"}),
    (606, "24-00031004", "Adjust Timing", dt.datetime(2024, 3, 10, 3, 1), 'Cycle 120 -> 100s; "ped" < 7s fixed.',
     {"csr_activity_id": "CSR-445566"}),
]
DO_NOT_SEND = {604}
SENDABLE = [atd for atd, *_ in ACTIVITIES if atd not in DO_NOT_SEND]


def record_id(atd: int) -> str:
    return f"64c0{atd:020d}"


class Checks:
    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []

    def check(self, condition: bool, what: str, detail: str = "") -> bool:
        if condition:
            self.passed += 1
            print(f"ok: {what}", flush=True)
        else:
            self.failed.append(what)
            print(f"FAIL: {what}" + (f" ({detail})" if detail else ""), flush=True)
        return condition

    def finish(self) -> int:
        total = self.passed + len(self.failed)
        if self.failed:
            print(f"docker smoke: FAILED, {len(self.failed)} of {total} checks failed", flush=True)
            return 1
        print(f"docker smoke: all {total} checks passed", flush=True)
        return 0


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def docker_available() -> str | None:
    """None if `docker info` works, else why not."""
    try:
        info = docker("info", "--format", "{{.ServerVersion}}", timeout=30)
    except FileNotFoundError:
        return "the docker command is not installed"
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if info.returncode != 0:
        return (info.stderr.strip().splitlines() or ["`docker info` failed"])[-1]
    return None


def seed(knack: KnackSimulator) -> None:
    config = CONFIG[APP]
    records = [
        activity_record(config, app_name=APP, record_id=record_id(atd), atd_activity_id=atd, emi_id=f"EMI-{atd}",
                        sr_number=sr, activity_name=name, activity_datetime=when, activity_details=details,
                        issue_status=extra.get("issue_status", "open"),
                        **{k: v for k, v in extra.items() if k != "issue_status"})
        for atd, sr, name, when, details, extra in ACTIVITIES
    ]
    knack.add_records(config["obj"], list(reversed(records)))  # newest first, as staff add them


def statuses(knack: KnackSimulator) -> dict[str, str]:
    key = CONFIG[APP]["fields"]["esb_status"]
    return {r["id"]: r.get(f"{key}_raw", r.get(key)) for r in knack.records(CONFIG[APP]["obj"])}


def make_cert_mount(tmp: Path, pki) -> Path:
    """The certificate folder, mounted read-only at /certs.

    The container runs as uid 10001, so the key must be readable by that uid: as root we give the copy to it
    with mode 0400 (what operators do with the real key); otherwise the temporary copy is made world-readable.
    """
    certs = tmp / "certs"
    certs.mkdir()
    certs.chmod(0o755)
    shutil.copyfile(pki.client_cert, certs / "esb.cert")
    shutil.copyfile(pki.client_key, certs / "esb.pem")
    shutil.copyfile(pki.ca_bundle, certs / "ca.pem")
    (certs / "esb.cert").chmod(0o644)
    (certs / "ca.pem").chmod(0o644)
    if os.geteuid() == 0:
        os.chown(certs / "esb.pem", CONTAINER_UID, CONTAINER_UID)
        (certs / "esb.pem").chmod(0o400)
    else:
        (certs / "esb.pem").chmod(0o644)
    return certs


def write_env_file(path: Path, knack: KnackSimulator, esb: ESBSimulator) -> None:
    # docker's --env-file format: KEY=value per line, taken literally (no quotes, no expansion).
    # STATE_DIR is left to its default, /app/state, where the volume is mounted.
    lines = [
        f"KNACK_APP_ID={APP_ID}",
        f"KNACK_API_KEY={API_KEY}",
        f"KNACK_API_URL={knack.url}",
        f"ESB_ENDPOINT={esb.url}",
        "ESB_CERT=/certs/esb.cert",
        "ESB_KEY=/certs/esb.pem",
        "ESB_CA_BUNDLE=/certs/ca.pem",
        "ESB_TIMEOUT=10",
    ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")


def run_container(env_file: Path, certs: Path) -> tuple[int | None, str]:
    command = ["docker", "run", "--rm", *HARDENING, "--env-file", str(env_file),
               "-v", f"{certs}:/certs:ro", "-v", f"{STATE_VOLUME}:/app/state", "--network", "host", IMAGE, APP]
    print("$ " + " ".join(command), flush=True)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        return None, out
    output = proc.stdout + proc.stderr
    print(textwrap.indent(output.rstrip("\n") or "(no output)", "  | "), flush=True)
    return proc.returncode, output


def build_args() -> dict[str, str]:
    """The OCI label build args: this checkout's revision, a version naming it, the build time in UTC."""
    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    revision = git("rev-parse", "HEAD") or "unknown"
    return {
        "REVISION": revision,
        "VERSION": git("describe", "--tags", "--always", "--dirty") or f"0+{revision[:12]}",
        "CREATED": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def build(checks: Checks, args: dict[str, str]) -> bool:
    command = ["docker", "build", "-t", IMAGE]
    for name, value in args.items():
        command += ["--build-arg", f"{name}={value}"]
    command.append(str(PROJECT_ROOT))
    print("$ " + " ".join(command), flush=True)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    except subprocess.TimeoutExpired:
        return checks.check(False, f"docker build -t {IMAGE} .", "timed out after 20 minutes")
    if not checks.check(proc.returncode == 0, f"docker build -t {IMAGE} .", f"exit {proc.returncode}"):
        print(textwrap.indent("\n".join((proc.stdout + proc.stderr).splitlines()[-40:]), "  | "))
        return False
    return True


def check_scheduled_runs(checks: Checks) -> None:
    """Two scheduled runs, hardened, against the simulators: what 311 got, what Knack says, the state volume."""
    config = CONFIG[APP]
    with tempfile.TemporaryDirectory(prefix="knack311-docker-smoke-", ignore_cleanup_errors=True) as tmp_name:
        tmp = Path(tmp_name)
        Path(tmp).chmod(0o755)  # the bind mount below is read through it
        pki = make_pki(tmp / "pki")
        certs = make_cert_mount(tmp, pki)
        key_pem = pki.client_key.read_text()
        key_body = "".join(line for line in key_pem.splitlines() if line and not line.startswith("-----"))
        metadata = app_metadata(APP, config, timezone="Central Time (US & Canada)", app_id=APP_ID)
        with KnackSimulator(app_id=APP_ID, api_key=API_KEY, metadata=metadata, host="127.0.0.1") as knack, \
                ESBSimulator(server_cert=pki.server_cert, server_key=pki.server_key,
                             client_ca_bundle=pki.client_ca_bundle, host="127.0.0.1") as esb:
            seed(knack)
            env_file = tmp / "knack-311.env"
            write_env_file(env_file, knack, esb)
            print(f"Knack simulator at {knack.url}, ESB simulator at {esb.url}; "
                  f"{len(ACTIVITIES)} activities READY_TO_SEND in {APP}", flush=True)

            # --- the scheduled run ---
            returncode, output = run_container(env_file, certs)
            checks.check(returncode == 0, "the container exited 0 (read-only root, no capabilities, "
                         "no-new-privileges)", "timed out" if returncode is None else f"exit {returncode}")

            # 311 knows an activity by its Knack record id: the message's data/csr/id
            copies = esb.copies()
            expected = {record_id(atd): 1 for atd in SENDABLE}
            checks.check(dict(copies) == expected,
                         f"the ESB accepted each of the {len(SENDABLE)} sendable messages exactly once, "
                         "each carrying its Knack record id", f"accepted copies per record: {dict(copies)}")
            checks.check(all(record_id(atd) not in copies for atd in DO_NOT_SEND),
                         "no message for the activity 311 does not want (Other)")
            checks.check(bool(esb.accepted) and all(r.client_subject == CLIENT_NAME for r in esb.accepted),
                         f"every message came over mutual TLS with the mounted client certificate ({CLIENT_NAME})",
                         f"subjects: {sorted({r.client_subject for r in esb.accepted})}")
            by_id = {parse_message(r.body)["id"]: parse_message(r.body) for r in esb.accepted}
            sent_603 = by_id.get(record_id(603), {})
            checks.check(sent_603.get("activity_details") == NON_ASCII,
                         "non-ASCII text arrived intact", f"got {sent_603.get('activity_details')!r}")
            sent_605 = by_id.get(record_id(605), {})
            checks.check(sent_605.get("issue_status_code") == "closed_resolved",
                         "closed_duplicate went as closed_resolved", f"got {sent_605.get('issue_status_code')!r}")

            want = {record_id(atd): ("DO_NOT_SEND" if atd in DO_NOT_SEND else "SENT") for atd, *_ in ACTIVITIES}
            now = statuses(knack)
            checks.check(now == want, "Knack records are now SENT / DO_NOT_SEND",
                         f"differ: { {k: v for k, v in now.items() if want.get(k) != v} }")

            checks.check(API_KEY not in output, "the API key does not appear in the container output")
            checks.check("PRIVATE KEY" not in output and key_body[:40] not in output,
                         "no key material in the container output")
            journal = f"{APP}.journal.sqlite3"
            state = docker("run", "--rm", "-v", f"{STATE_VOLUME}:/app/state", "--entrypoint", "sh", IMAGE, "-c",
                           "stat -c '%u %a' /app/state && ls -A /app/state")
            lines = state.stdout.split("\n", 1)
            owner, names = (lines[0].strip(), lines[1].split()) if len(lines) == 2 else ("", [])
            checks.check(state.returncode == 0 and journal in names,
                         f"the delivery journal is in the state volume ({journal})",
                         f"exit {state.returncode}, volume holds {names} {state.stderr.strip()}")
            checks.check(owner == f"{CONTAINER_UID} 700",
                         f"the named state volume took the image's owner and mode ({CONTAINER_UID}, 0700)",
                         f"owner and mode {owner!r}")

            # --- the next scheduled run: nothing left to do, nothing sent again ---
            print("the next scheduled run:", flush=True)
            returncode2, output2 = run_container(env_file, certs)
            checks.check(returncode2 == 0 and dict(esb.copies()) == expected,
                         "a second run exits 0 and sends nothing again (the journal persisted in the volume)",
                         f"exit {returncode2}, accepted copies {dict(esb.copies())}")
            checks.check(API_KEY not in output2, "the API key does not appear in the second run's output either")

            # --- docker stop while Knack hangs: the program must end on SIGTERM, before Docker's SIGKILL ---
            check_docker_stop(checks, knack, env_file, certs)

            # --- the other forms of the command: run as given, the seed's mounted checkout ---
            scheduler_options = [*HARDENING, "--env-file", str(env_file), "-v", f"{certs}:/certs:ro",
                                 "-v", f"{STATE_VOLUME}:/app/state", "--network", "host"]
            check_command_forms(checks.check, image=IMAGE, app=APP, knack=knack, esb=esb, pki=pki, tmp=tmp,
                                scheduler_options=scheduler_options, app_id=APP_ID, api_key=API_KEY)


def check_docker_stop(checks: Checks, knack: KnackSimulator, env_file: Path, certs: Path) -> None:
    """`docker stop` (default 10 s grace) while a Knack request hangs: exit 1 with a summary naming SIGTERM,
    not 137 (SIGKILL), and nothing sent."""
    name = f"knack-311-smoke-stop-{os.getpid()}"
    knack.inject("GET", "/views/", hang=True, count=1)
    before = len(knack.request_log)
    command = ["docker", "run", "--name", name, *HARDENING, "--env-file", str(env_file),
               "-v", f"{certs}:/certs:ro", "-v", f"{STATE_VOLUME}:/app/state", "--network", "host", IMAGE, APP]
    print("$ " + " ".join(command) + "   (then docker stop while Knack hangs)", flush=True)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("/views/" in r.path for r in knack.request_log[before:]):
            time.sleep(0.2)
        time.sleep(1.0)  # well inside the hang
        started = time.monotonic()
        docker("stop", name, timeout=60)
        took = time.monotonic() - started
        output, _ = proc.communicate(timeout=60)
        code = docker("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
    finally:
        if proc.poll() is None:
            proc.kill()
        docker("rm", "--force", name)
    print(textwrap.indent(output.rstrip("\n") or "(no output)", "  | "), flush=True)
    last = output.strip().splitlines()[-1] if output.strip() else ""
    checks.check(code == "1" and "summary" in last and "SIGTERM" in last and took < 10,
                 "docker stop while a Knack request hangs: the program ends on SIGTERM within Docker's grace, "
                 "exit 1, the summary naming the signal",
                 f"exit {code or '?'} after {took:.1f}s; last line {last!r}")


def check_image(checks: Checks, args: dict[str, str] | None) -> dict[str, str]:
    """Who the container runs as, what the image holds, its labels, and that nothing in it can run pip; returns
    the OCI labels. `args`: the build args this run passed (None for an image built elsewhere, whose revision
    label must then be this checkout's commit)."""
    who = docker("run", "--rm", "--entrypoint", "id", IMAGE, "-u")
    uid = who.stdout.strip()
    checks.check(who.returncode == 0 and uid.isdigit() and int(uid) != 0, f"the container runs as non-root (uid {uid})",
                 f"`id -u` gave {uid!r}, exit {who.returncode}, {who.stderr.strip()}")
    listing = docker("run", "--rm", "--entrypoint", "ls", IMAGE, "-A", "/app", "/app/knack311")
    names = set(listing.stdout.split())
    print(textwrap.indent(listing.stdout.rstrip("\n"), "  | "), flush=True)
    forbidden = {"esb.cert", "esb.pem", "simulators", "tests", "bench", ".venv", ".git", ".env"}
    present = sorted(n for n in names if n in forbidden or n.endswith((".pem", ".key", ".crt", ".env")))
    program = {"send_esb_message.py", "config.py", "templates", "knack311"}
    checks.check(listing.returncode == 0 and program <= names and not present,
                 "the image holds the program but no esb.cert, esb.pem, keys, env files, tests or simulators",
                 f"unexpected: {present}, missing: {sorted(program - names)}" if listing.returncode == 0
                 else listing.stderr.strip())

    inspect = docker("image", "inspect", "--format", "{{json .Config.Labels}}", IMAGE)
    labels = (json.loads(inspect.stdout) or {}) if inspect.returncode == 0 else {}
    oci = {k.removeprefix(LABEL_PREFIX): v for k, v in labels.items() if k.startswith(LABEL_PREFIX)}
    print(textwrap.indent("\n".join(f"{k}={v}" for k, v in sorted(oci.items())), "  | "), flush=True)
    required = {"title", "description", "source", "revision", "version", "created"}
    checks.check(required <= set(oci) and all(oci[n].strip() for n in required),
                 "the image carries the OCI labels title, description, source, revision, version, created",
                 f"has {sorted(oci)}")
    if args is not None:
        passed = {"revision": args["REVISION"], "version": args["VERSION"], "created": args["CREATED"]}
        checks.check(all(oci.get(k) == v for k, v in passed.items()),
                     "the revision, version and created labels are the build args passed",
                     f"labels {({k: oci.get(k) for k in passed})}, passed {passed}")
    else:
        head = build_args()["REVISION"]
        checks.check(oci.get("revision") == head, "the image's revision label is this checkout's commit",
                     f"label {oci.get('revision')!r}, HEAD {head!r}")

    # `python -m pip` with the venv's interpreter (first on PATH), then the base image's own interpreter
    probe = docker("run", "--rm", "--entrypoint", "sh", IMAGE, "-c",
                   'base=$(python -c "import sys; print(sys._base_executable)"); echo "base $base"; '
                   'for py in python "$base"; do '
                   '  $py -m pip --version >/dev/null 2>&1 && echo "pip runs under $py"; '
                   '  $py -c "import setuptools" >/dev/null 2>&1 && echo "setuptools imports under $py"; '
                   '  $py -m ensurepip --version >/dev/null 2>&1 && echo "ensurepip runs under $py"; '
                   'done; echo probed')
    print(textwrap.indent(probe.stdout.rstrip("\n"), "  | "), flush=True)
    found = [line for line in probe.stdout.splitlines() if " under " in line]
    checks.check(probe.returncode == 0 and "probed" in probe.stdout and not found,
                 "`python -m pip` fails in the image, under the venv's and the base image's interpreter "
                 "(no pip, setuptools or ensurepip)", "; ".join(found) or probe.stderr.strip())
    return oci


def main() -> int:
    global IMAGE
    problem = docker_available()
    if problem:
        print(f"docker smoke: needs a running Docker engine, and `docker info` failed: {problem}\n"
              "Start Docker (Docker Desktop, or `sudo systemctl start docker`), check that `docker info` works for "
              "this user, and run `make docker-smoke` again.", file=sys.stderr)
        return 2

    checks = Checks()
    prebuilt = os.environ.get("KNACK311_SMOKE_IMAGE", "").strip()
    args = None
    if prebuilt:
        IMAGE = prebuilt
        found = docker("image", "inspect", IMAGE)
        if not checks.check(found.returncode == 0, f"KNACK311_SMOKE_IMAGE {IMAGE} is in the engine",
                            found.stderr.strip()):
            return checks.finish()
    else:
        args = build_args()
        print(f"building {IMAGE} from {PROJECT_ROOT} ...", flush=True)
        if not build(checks, args):
            return checks.finish()
    try:
        check_scheduled_runs(checks)
    finally:
        docker("volume", "rm", "--force", STATE_VOLUME)
    labels = check_image(checks, args)
    check_answering_forms(checks.check, image=IMAGE, labels=labels)
    return checks.finish()


if __name__ == "__main__":
    sys.exit(main())

"""The example Airflow DAG run for real: `airflow dags test` against the simulators, with the image built here.

    make airflow-check       (after deploy/airflow_check.py has loaded the DAG file into a DagBag)

Runs with the project's virtualenv (the simulators) and calls the `airflow` command of .venv-airflow (or
AIRFLOW_VENV), with its own AIRFLOW_HOME and a DAGs folder holding a copy of deploy/airflow_dag.py, as an
operator installs it. A stand-in Slack webhook on 127.0.0.1 receives the alerts through the DAG's connection
(`AIRFLOW_CONN_SLACK_KNACK311`). What it shows:

1. an app without its env file: its DAG loads, its run fails naming the file, Slack gets the alert;
2. with a Docker engine (skipped, with one line saying so, without one): the image built from this checkout as
   `knack-311:airflow-check` (the deployment's `knack-311:latest` is left alone), the Knack simulator (HTTP)
   and the ESB simulator (HTTPS, client certificate required) on 127.0.0.1, reached by the container through
   host networking (KNACK311_DOCKER_NETWORK=host), and three runs of knack311_data_tracker:
   - a run that succeeds: every sendable activity reaches the ESB once, Knack says SENT, no alert;
   - a run skipped on exit 75: another run of the app holds the lock in the state volume (a container of the
     same image, stuck on a Knack read), so the task is skipped, nothing is sent, no alert;
   - a run that fails on a record (exit 1): the alert names the app, exit code 1 and the log URL.
Prints "ok: ..." / "FAIL: ..." per check; exits 0 only if every check passed.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from config import CONFIG
from simulators.activities import activity_record, app_metadata
from simulators.certs import make_pki
from simulators.docker_smoke import (
    ACTIVITIES,
    API_KEY,
    APP,
    APP_ID,
    DO_NOT_SEND,
    SENDABLE,
    Checks,
    docker,
    docker_available,
    make_cert_mount,
    record_id,
    seed,
    statuses,
    write_env_file,
)
from simulators.esb import ESBSimulator
from simulators.knack_api import KnackSimulator

PROJECT_ROOT = Path(__file__).resolve().parents[1]
IMAGE = "knack-311:airflow-check"
STATE_VOLUME = f"knack-311-airflow-check-state-{os.getpid()}"  # never the deployment's knack-311-state
LOCK_HOLDER = f"knack-311-airflow-check-holder-{os.getpid()}"
DAG_OF = {app: f"knack311_{app.replace('-', '_')}" for app in CONFIG}
AIRFLOW_TIMEOUT = 600  # seconds for one `airflow dags test`; the task's own limit is 280 s
UNKNOWN_ACTIVITY = 699  # a record data-tracker cannot send: its run fails with exit 1


class SlackStandIn:
    """An Incoming Webhook on 127.0.0.1 that keeps the text of every alert posted to it."""

    def __init__(self) -> None:
        alerts = self.alerts = []

        class Webhook(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                alerts.append(json.loads(body).get("text", ""))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T0000/B0000/airflow-check"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Airflow:
    """The `airflow` command of the Airflow virtualenv, with this check's home, DAGs folder and settings."""

    def __init__(self, tmp: Path, slack: SlackStandIn) -> None:
        venv = Path(os.environ.get("AIRFLOW_VENV", PROJECT_ROOT / ".venv-airflow"))
        self.command = str(venv / "bin" / "airflow")
        dags = tmp / "dags"
        dags.mkdir()
        shutil.copy(PROJECT_ROOT / "deploy" / "airflow_dag.py", dags)  # as an operator installs it
        self.env_dir = tmp / "env"
        self.env_dir.mkdir()
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": os.environ.get("AIRFLOW_HOME", str(PROJECT_ROOT / ".airflow-home")),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW_CONN_SLACK_KNACK311": json.dumps({"conn_type": "slackwebhook", "password": slack.url}),
            "KNACK311_ENV_DIR": str(self.env_dir),
            "KNACK311_IMAGE": IMAGE,
            "KNACK311_STATE_VOLUME": STATE_VOLUME,
            "KNACK311_METRICS_DIR": "",
            "KNACK311_DOCKER_NETWORK": "host",  # the simulators listen on 127.0.0.1 only
        }
        self.log = tmp / "airflow.log"

    def run(self, *args: str, timeout: float = AIRFLOW_TIMEOUT) -> subprocess.CompletedProcess:
        """The command, its output (Airflow logs to stdout) appended to the log file."""
        with self.log.open("ab") as log:
            log.write(f"\n$ airflow {' '.join(args)}\n".encode())
            log.flush()
            return subprocess.run([self.command, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout)

    def test_run(self, app: str) -> tuple[str, str, str]:
        """`airflow dags test` of the app's DAG: (run state, task state, the task log's lines worth showing)."""
        dag_id = DAG_OF[app]
        print(f"$ airflow dags test {dag_id}", flush=True)
        start = self.log.stat().st_size if self.log.exists() else 0
        try:
            self.run("dags", "test", dag_id)
        except subprocess.TimeoutExpired:
            return "timed out", "?", ""
        output = self.log.read_bytes()[start:].decode(errors="replace")
        finished = re.search(r"DagRun Finished: dag_id=\S+ .*?run_id=([^,]+),.*?state=(\w+)", output)
        if not finished:
            return "not finished", "?", "\n".join(output.splitlines()[-30:])
        run_id, run_state = finished.groups()
        states = subprocess.run([self.command, "tasks", "states-for-dag-run", dag_id, run_id, "--output", "json"],
                                env=self.env, capture_output=True, text=True, timeout=120)
        try:
            task_state = json.loads(states.stdout)[0]["state"]
        except (ValueError, LookupError):
            task_state = "?"
        print(textwrap.indent("\n".join(task_log_lines(output)) or "(no output)", "  | "), flush=True)
        print(f"  -> DAG run {run_state}, task {task_state}", flush=True)
        return run_state, task_state, output


def task_log_lines(output: str) -> list[str]:
    """What the program printed in the container and what the DAG's own code logged, without Airflow's chatter."""
    shown = []
    for line in output.splitlines():
        logged = re.match(r"\S+ \[\w+\s*\] (.*?) \[([\w.]+)\] loc=\S+$", line)
        failure = re.match(r"[\w.]*\.(EnvFileMissing|DockerContainerFailedException): (.*)", line)
        if logged and (logged.group(2).endswith("DockerOperator") or logged.group(1).startswith("knack-311:")):
            line = logged.group(1)
        elif failure:
            line = f"task failed: {failure.group(1)}: {failure.group(2)}"
        else:
            continue
        if line not in shown:  # the DAG file is parsed twice per test run: its warning would show twice
            shown.append(line)
    return shown


def check_missing_env_file(checks: Checks, airflow: Airflow, slack: SlackStandIn) -> None:
    """Only data-tracker's env file: signs-markings' DAG loads, its run fails naming its file, Slack is told."""
    (airflow.env_dir / f"{APP}.env").write_text("KNACK_APP_ID=placeholder\n")
    missing = airflow.env_dir / "signs-markings.env"
    run_state, task_state, _ = airflow.test_run("signs-markings")
    checks.check(run_state == "failed" and task_state == "failed",
                 "without signs-markings.env its DAG still loads and its run fails",
                 f"run {run_state}, task {task_state}")
    alert = slack.alerts[-1] if slack.alerts else ""
    print(f"  slack: {alert}", flush=True)
    checks.check(len(slack.alerts) == 1 and "knack-311 signs-markings" in alert and str(missing) in alert
                 and "Log: http" in alert, "the Slack alert names the app, the missing file and the log URL",
                 f"alerts: {slack.alerts}")
    missing.write_text("KNACK_APP_ID=placeholder\n")  # from here on, only data-tracker runs


def start_lock_holder(env_file: Path, certs: Path, knack: KnackSimulator) -> bool:
    """Another run of the app, in a container of the same image, held on a Knack read: it holds the run lock."""
    holder_env = env_file.with_name("holder.env")
    holder_env.write_text(env_file.read_text() + "ESB_TIMEOUT=200\n")  # its stuck read outlasts the DAG's run
    knack.inject("GET", "/views/", hang=True, count=1)
    before = len(knack.request_log)
    started = docker("run", "-d", "--name", LOCK_HOLDER, "--env-file", str(holder_env), "-v", f"{certs}:/certs:ro",
                     "-v", f"{STATE_VOLUME}:/app/state", "--network", "host", IMAGE, APP)
    if started.returncode != 0:
        print(textwrap.indent(started.stderr.strip(), "  | "), flush=True)
        return False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any("/views/" in r.path for r in knack.request_log[before:]):
            return True  # the program takes the lock before its first Knack call
        time.sleep(0.2)
    return False


def check_dag_runs(checks: Checks, airflow: Airflow, slack: SlackStandIn, tmp: Path) -> None:
    pki = make_pki(tmp / "pki")
    certs = make_cert_mount(tmp, pki)
    airflow.env["KNACK311_CERTS_DIR"] = str(certs)
    metadata = app_metadata(APP, CONFIG[APP], timezone="Central Time (US & Canada)", app_id=APP_ID)
    with KnackSimulator(app_id=APP_ID, api_key=API_KEY, metadata=metadata, host="127.0.0.1") as knack, \
            ESBSimulator(server_cert=pki.server_cert, server_key=pki.server_key,
                         client_ca_bundle=pki.client_ca_bundle, host="127.0.0.1") as esb:
        seed(knack)
        env_file = airflow.env_dir / f"{APP}.env"
        write_env_file(env_file, knack, esb)
        alerts_before = len(slack.alerts)

        # --- a run that succeeds ---
        run_state, task_state, output = airflow.test_run(APP)
        checks.check(run_state == "success" and task_state == "success", f"{DAG_OF[APP]}: a run that succeeds",
                     f"run {run_state}, task {task_state}")
        expected = {record_id(atd): 1 for atd in SENDABLE}
        checks.check(dict(esb.copies()) == expected, f"the ESB accepted each of the {len(SENDABLE)} sendable "
                     "messages exactly once", f"accepted copies per record: {dict(esb.copies())}")
        want = {record_id(atd): ("DO_NOT_SEND" if atd in DO_NOT_SEND else "SENT") for atd, *_ in ACTIVITIES}
        checks.check(statuses(knack) == want, "Knack records are now SENT / DO_NOT_SEND", f"{statuses(knack)}")
        checks.check(API_KEY not in output, "the API key does not appear in Airflow's output")

        # --- a run skipped on exit 75: another run holds the lock ---
        add_unknown_activity(knack)  # ready to send: the skipped run must not touch it
        held = start_lock_holder(env_file, certs, knack)
        checks.check(held, "another run of data-tracker holds the lock (a container stuck on a Knack read)")
        try:
            if held:
                run_state, task_state, output = airflow.test_run(APP)
                checks.check(task_state == "skipped" and run_state == "success",
                             f"{DAG_OF[APP]}: a run skipped on exit 75 (skip_on_exit_code)",
                             f"run {run_state}, task {task_state}")
                checks.check("another run for data-tracker is active" in output and
                             dict(esb.copies()) == expected, "the skipped run said why and sent nothing")
        finally:
            docker("stop", LOCK_HOLDER, timeout=60)
            docker("rm", "--force", LOCK_HOLDER)
            knack.clear_faults()
        checks.check(len(slack.alerts) == alerts_before, "no Slack alert for the run that succeeded or the "
                     "skipped one", f"alerts: {slack.alerts[alerts_before:]}")

        # --- a run that fails on a record: the alert names the exit code ---
        run_state, task_state, _ = airflow.test_run(APP)
        alert = slack.alerts[-1] if len(slack.alerts) > alerts_before else ""
        print(f"  slack: {alert}", flush=True)
        checks.check(run_state == "failed" and task_state == "failed", f"{DAG_OF[APP]}: a run with a record "
                     "that cannot be sent fails", f"run {run_state}, task {task_state}")
        checks.check(len(slack.alerts) == alerts_before + 1 and "knack-311 data-tracker" in alert and
                     "exit code 1 (a record failed" in alert and "Log: http" in alert,
                     "its Slack alert names the app, exit code 1 and the log URL", f"alerts: {slack.alerts}")


def add_unknown_activity(knack: KnackSimulator) -> None:
    config = CONFIG[APP]
    knack.add_records(config["obj"], [activity_record(
        config, app_name=APP, record_id=record_id(UNKNOWN_ACTIVITY), atd_activity_id=UNKNOWN_ACTIVITY,
        emi_id=f"EMI-{UNKNOWN_ACTIVITY}", sr_number="24-00031099", activity_name="Repaint Crosswalk",
        activity_datetime=dt.datetime(2024, 7, 5, 9, 0), activity_details="Not a data-tracker activity.")])


def build_image(checks: Checks) -> bool:
    print(f"$ docker build -t {IMAGE} {PROJECT_ROOT}", flush=True)
    try:
        built = subprocess.run(["docker", "build", "-t", IMAGE, str(PROJECT_ROOT)], capture_output=True, text=True,
                               timeout=1200)
    except subprocess.TimeoutExpired:
        return checks.check(False, f"docker build -t {IMAGE} .", "timed out after 20 minutes")
    if not checks.check(built.returncode == 0, f"docker build -t {IMAGE} .", f"exit {built.returncode}"):
        print(textwrap.indent("\n".join((built.stdout + built.stderr).splitlines()[-40:]), "  | "), flush=True)
        return False
    return True


def main() -> int:
    checks = Checks()
    slack = SlackStandIn()
    with tempfile.TemporaryDirectory(prefix="knack311-airflow-check-", ignore_cleanup_errors=True) as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)  # the certificate folder below it is bind-mounted into the container
        airflow = Airflow(tmp, slack)
        try:
            migrated = airflow.run("db", "migrate")
            if not checks.check(migrated.returncode == 0, "airflow db migrate", f"exit {migrated.returncode}"):
                return 1
            check_missing_env_file(checks, airflow, slack)
            problem = docker_available()
            if problem:
                print(f"airflow check: the DAG runs against Docker SKIPPED: no Docker engine ({problem})", flush=True)
            elif build_image(checks):
                check_dag_runs(checks, airflow, slack, tmp)
        finally:
            slack.close()
            docker_ready = shutil.which("docker") is not None
            if docker_ready:
                docker("volume", "rm", "--force", STATE_VOLUME)
            if checks.failed:  # the folder goes with the run: show the end of what Airflow said
                print(textwrap.indent(airflow.log.read_text()[-6000:], "  > "), flush=True)
    total = checks.passed + len(checks.failed)
    if checks.failed:
        print(f"airflow check: FAILED, {len(checks.failed)} of {total} checks failed", flush=True)
        return 1
    print(f"airflow check: all {total} checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

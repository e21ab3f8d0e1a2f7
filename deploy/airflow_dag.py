"""knack-311 in Airflow: one DAG per Knack app, each running the bridge's image every 5 minutes (at minute 1, 6,
11, ... : `1-59/5 * * * *`, the city's schedule).

One DAG per app, not one task per app in a shared DAG: the apps are separate Knack applications with their
own keys, backlogs and failures, and `max_active_runs=1` must hold per app, so that a slow data-tracker run
never delays signs-markings, and an alert names the app.

Per run: `docker run knack-311 APP --max-runtime 240` with
- the app's env file, /etc/knack-311/APP.env (deploy/example.env shows every variable), read when the DAG is
  parsed: secrets go to `private_environment` (hidden from the Airflow UI), the rest to `environment`. The file
  must be on every Airflow host that parses DAGs. A missing file stops that app only: its DAG still loads
  (its description says the file is missing) and each of its runs fails before Docker is called, with
  "knack-311: env file /etc/knack-311/APP.env for app APP not found", which raises that app's alert. (Airflow
  keeps import errors per file, and this one file makes every app's DAG: an exception here would hide them all);
- the certificates mounted read-only at /certs (ESB_CERT=/certs/esb.cert in the env file);
- the state volume at /app/state (delivery journal and run lock: the no-duplicate guarantee lives there);
- optionally node_exporter's textfile directory at /metrics (METRICS_FILE=/metrics/knack311-{app}.prom).

Exit codes: 0 success; 1 a record failed or the run stopped early (the task fails: the alert fires); 2 a
configuration error (fails too); 75 another run of the app still holds the lock (the task is skipped, no alert).

The alert: a failed task posts one Slack message naming the app, the exit code (read from the Docker failure;
"none" when the container never ran or was stopped by the timeout) and the task's log URL, through the Slack
webhook connection named by KNACK311_SLACK_CONN_ID (default `slack_knack311`; conn type "Slack Incoming
Webhook", its password the webhook's `https://hooks.slack.com/services/...` path or URL), with
apache-airflow-providers-slack installed. Neither is needed to load the DAGs: without them the failure is still
a failed task, and the task log says in one line why the alert was not sent.

Settings, at the top of this file, each overridable by an environment variable of the Airflow workers and DAG
processors: KNACK311_ENV_DIR, KNACK311_IMAGE, KNACK311_CERTS_DIR, KNACK311_STATE_VOLUME, KNACK311_METRICS_DIR,
KNACK311_DOCKER_NETWORK (unset: Docker's default bridge) and KNACK311_SLACK_CONN_ID.
The execution timeout sits above --max-runtime, so the program stops starting records and ends by itself first;
if it does not, Airflow stops the container (`docker stop`: SIGTERM, SIGKILL 10 s later; the program ends
within 8 s of SIGTERM, journal written, exit 1), still inside the 5-minute window.
DockerOperator cannot pass `--read-only`, `--cap-drop ALL` or `no-new-privileges` (see README, Docker): set
them in the Docker daemon's defaults or an authorization plugin if the hardened run line is required.

`make airflow-check` loads this file into a real Airflow (its own virtualenv) to prove it imports cleanly, with
and without an app's env file, and runs it with `airflow dags test` against local stand-ins of Knack, the ESB
and Slack.
"""

from __future__ import annotations

import logging
import os
import re
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

from airflow.providers.docker.operators.docker import DockerOperator
from docker.types import Mount
from dotenv import dotenv_values

try:  # Airflow 3
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG

APPS = ("data-tracker", "signs-markings")  # the keys of CONFIG in config.py
IMAGE = os.environ.get("KNACK311_IMAGE", "knack-311:latest")
DOCKER_URL = "unix://var/run/docker.sock"
DOCKER_NETWORK = os.environ.get("KNACK311_DOCKER_NETWORK") or None  # None: Docker's default bridge
SCHEDULE = "1-59/5 * * * *"  # the city's: one minute past the five-minute marks, off the top-of-hour crowd

ENV_DIR = Path(os.environ.get("KNACK311_ENV_DIR", "/etc/knack-311"))  # APP.env per app
# esb.cert, esb.pem (readable by uid 10001), ca.pem
CERTS_DIR = os.environ.get("KNACK311_CERTS_DIR", "/etc/knack-311/certs")
STATE_VOLUME = os.environ.get("KNACK311_STATE_VOLUME", "knack-311-state")  # a named Docker volume, kept between runs
# "" if there is no node_exporter on the host
METRICS_DIR = os.environ.get("KNACK311_METRICS_DIR", "/var/lib/node_exporter/textfile")
SLACK_CONN_ID = os.environ.get("KNACK311_SLACK_CONN_ID", "slack_knack311")  # a Slack Incoming Webhook connection

MAX_RUNTIME = 240  # seconds, the program's --max-runtime: no record is started after it
# Above --max-runtime by the time the record in hand may take, below the 5-minute schedule.
EXECUTION_TIMEOUT = timedelta(seconds=MAX_RUNTIME + 40)
EXIT_ANOTHER_RUN_ACTIVE = 75
EXIT_MEANINGS = {1: "a record failed or the run stopped early", 2: "configuration error"}  # README's exit codes

# Never shown in the Airflow UI or the task's rendered fields.
SECRET_VARIABLES = frozenset({"KNACK_API_KEY", "ESB_KEY_PASSWORD", "HEALTHCHECK_URL", "ESB_PROXY"})

log = logging.getLogger(__name__)


class EnvFileMissing(Exception):
    """The app's env file is not on this host: the app cannot run, the other apps can."""


def env_file(app: str) -> Path:
    return ENV_DIR / f"{app}.env"


def app_environment(app: str) -> tuple[dict[str, str], dict[str, str]]:
    """(environment, private_environment) from the app's env file; empty values are left unset."""
    path = env_file(app)
    if not path.is_file():
        raise EnvFileMissing(f"knack-311: env file {path} for app {app} not found (see deploy/example.env)")
    values = {name: value for name, value in dotenv_values(path).items() if value}
    public = {name: value for name, value in values.items() if name not in SECRET_VARIABLES}
    private = {name: value for name, value in values.items() if name in SECRET_VARIABLES}
    return public, private


def refuse_to_run(problem: str, context) -> None:
    """pre_execute of an app whose env file is missing: fail the run, before Docker, with the reason."""
    raise EnvFileMissing(problem)


def mounts() -> list[Mount]:
    found = [
        Mount(target="/certs", source=CERTS_DIR, type="bind", read_only=True),
        Mount(target="/app/state", source=STATE_VOLUME, type="volume"),
    ]
    if METRICS_DIR:
        found.append(Mount(target="/metrics", source=METRICS_DIR, type="bind"))
    return found


def exit_code_of(exception: BaseException | None) -> str:
    """The container's exit code from DockerOperator's failure ("Docker container failed: {'StatusCode': 1, ...}"),
    or why there is none."""
    found = re.search(r"'StatusCode': (\d+)", str(exception or ""))
    if found:
        code = int(found.group(1))
        return f"{code} ({EXIT_MEANINGS[code]})" if code in EXIT_MEANINGS else str(code)
    if exception is None:
        return "none (no exception in the task's context)"
    return f"none ({type(exception).__name__}: {str(exception)[:300]})"


def alert_slack(app: str, context) -> None:
    """on_failure_callback: one Slack message naming the app, the exit code and the log URL.

    The provider and the connection are looked up here, not at import, so that a host without them still loads
    the DAGs; an alert that cannot be sent is one ERROR line in the task log (never an exception: the task's own
    failure is what must show)."""
    task_instance = context.get("task_instance") or context.get("ti")
    log_url = getattr(task_instance, "log_url", None) or "(no log URL)"
    text = (f":red_circle: knack-311 {app}: run {context.get('run_id', '?')} failed, "
            f"exit code {exit_code_of(context.get('exception'))}. Log: {log_url}")
    try:
        from airflow.providers.slack.hooks.slack_webhook import SlackWebhookHook
    except ImportError:
        log.error("knack-311: Slack alert for %s not sent: apache-airflow-providers-slack is not installed. "
                  "The alert: %s", app, text)
        return
    try:
        SlackWebhookHook(slack_webhook_conn_id=SLACK_CONN_ID).send(text=text)
    except Exception as exc:  # a missing connection, a refused webhook: say so, the failure itself stands
        log.error("knack-311: Slack alert for %s not sent through connection %r (KNACK311_SLACK_CONN_ID): %s: %s. "
                  "The alert: %s", app, SLACK_CONN_ID, type(exc).__name__, exc, text)
        return
    log.info("knack-311: Slack alert for %s sent through connection %r", app, SLACK_CONN_ID)


for app_name in APPS:
    try:
        environment, private_environment = app_environment(app_name)
        problem = None
    except EnvFileMissing as missing:
        environment, private_environment, problem = {}, {}, str(missing)
        log.warning("%s: its DAG loads, its runs fail until the file is there", problem)
    with DAG(
        dag_id=f"knack311_{app_name.replace('-', '_')}",
        description=f"Send {app_name}'s Knack 311 activities to the ESB"
                    + (f" - env file {env_file(app_name)} MISSING: every run fails" if problem else ""),
        schedule=SCHEDULE,
        start_date=datetime(2026, 1, 1, tzinfo=UTC),
        catchup=False,  # a missed slot needs no catching up: the next run takes every ready record
        max_active_runs=1,
        default_args={"retries": 0},  # the next run, 5 minutes later, is the retry
        tags=["knack-311", app_name],
        doc_md=__doc__,
    ) as dag:
        DockerOperator(
            task_id="send_esb_messages",
            image=IMAGE,
            command=[app_name, "--max-runtime", str(MAX_RUNTIME)],
            environment=environment,
            private_environment=private_environment,
            mounts=mounts(),
            mount_tmp_dir=False,  # the program needs no temporary directory, and a remote Docker host has none
            tty=True,
            docker_url=DOCKER_URL,
            network_mode=DOCKER_NETWORK,
            auto_remove="force",  # the state is in the volume; the output is in the task log
            skip_on_exit_code=EXIT_ANOTHER_RUN_ACTIVE,
            execution_timeout=EXECUTION_TIMEOUT,
            do_xcom_push=False,
            on_failure_callback=partial(alert_slack, app_name),
            pre_execute=partial(refuse_to_run, problem) if problem else None,
        )
    globals()[dag.dag_id] = dag  # Airflow 2 finds DAGs among the module's globals

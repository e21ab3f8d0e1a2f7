"""knack-311 in Airflow: one DAG per Knack app, each running the bridge's image every 5 minutes.

One DAG per app, not one task per app in a shared DAG: the apps are separate Knack applications with their
own keys, backlogs and failures, and `max_active_runs=1` must hold per app, so that a slow data-tracker run
never delays signs-markings, and an alert names the app.

Per run: `docker run knack-311 APP --max-runtime 240` with
- the app's env file, /etc/knack-311/APP.env (deploy/example.env shows every variable), read when the DAG is
  parsed: secrets go to `private_environment` (hidden from the Airflow UI), the rest to `environment`. The file
  must be on every Airflow host that parses DAGs; a missing file is an import error naming it;
- the certificates mounted read-only at /certs (ESB_CERT=/certs/esb.cert in the env file);
- the state volume at /app/state (delivery journal and run lock: the no-duplicate guarantee lives there);
- optionally node_exporter's textfile directory at /metrics (METRICS_FILE=/metrics/knack311-{app}.prom).

Exit codes: 0 success; 1 a record failed or the run stopped early (the task fails: the alert fires); 2 a
configuration error (fails too); 75 another run of the app still holds the lock (the task is skipped, no alert).
The execution timeout sits above --max-runtime, so the program stops starting records and ends by itself first;
if it does not, Airflow stops the container (`docker stop`: SIGTERM, SIGKILL 10 s later; the program ends
within 8 s of SIGTERM, journal written, exit 1), still inside the 5-minute window.
DockerOperator cannot pass `--read-only`, `--cap-drop ALL` or `no-new-privileges` (see README, Docker): set
them in the Docker daemon's defaults or an authorization plugin if the hardened run line is required.

`make airflow-check` loads this file into a real Airflow (its own virtualenv) to prove it imports cleanly.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from airflow.providers.docker.operators.docker import DockerOperator
from docker.types import Mount
from dotenv import dotenv_values

try:  # Airflow 3
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG

APPS = ("data-tracker", "signs-markings")  # the keys of CONFIG in config.py
IMAGE = "knack-311:latest"
DOCKER_URL = "unix://var/run/docker.sock"
SCHEDULE = "*/5 * * * *"

ENV_DIR = Path(os.environ.get("KNACK311_ENV_DIR", "/etc/knack-311"))  # APP.env per app
CERTS_DIR = "/etc/knack-311/certs"            # esb.cert, esb.pem (readable by uid 10001), ca.pem
STATE_VOLUME = "knack-311-state"              # a named Docker volume, kept between runs
METRICS_DIR = "/var/lib/node_exporter/textfile"  # "" if there is no node_exporter on the host

MAX_RUNTIME = 240  # seconds, the program's --max-runtime: no record is started after it
# Above --max-runtime by the time the record in hand may take, below the 5-minute schedule.
EXECUTION_TIMEOUT = timedelta(seconds=MAX_RUNTIME + 40)
EXIT_ANOTHER_RUN_ACTIVE = 75

# Never shown in the Airflow UI or the task's rendered fields.
SECRET_VARIABLES = frozenset({"KNACK_API_KEY", "ESB_KEY_PASSWORD", "HEALTHCHECK_URL", "ESB_PROXY"})


def app_environment(app: str) -> tuple[dict[str, str], dict[str, str]]:
    """(environment, private_environment) from the app's env file; empty values are left unset."""
    path = ENV_DIR / f"{app}.env"
    if not path.is_file():
        raise FileNotFoundError(f"knack-311: env file {path} for app {app} not found (see deploy/example.env)")
    values = {name: value for name, value in dotenv_values(path).items() if value}
    public = {name: value for name, value in values.items() if name not in SECRET_VARIABLES}
    private = {name: value for name, value in values.items() if name in SECRET_VARIABLES}
    return public, private


def mounts() -> list[Mount]:
    found = [
        Mount(target="/certs", source=CERTS_DIR, type="bind", read_only=True),
        Mount(target="/app/state", source=STATE_VOLUME, type="volume"),
    ]
    if METRICS_DIR:
        found.append(Mount(target="/metrics", source=METRICS_DIR, type="bind"))
    return found


for app_name in APPS:
    environment, private_environment = app_environment(app_name)
    with DAG(
        dag_id=f"knack311_{app_name.replace('-', '_')}",
        description=f"Send {app_name}'s Knack 311 activities to the ESB",
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
            auto_remove="force",  # the state is in the volume; the output is in the task log
            skip_on_exit_code=EXIT_ANOTHER_RUN_ACTIVE,
            execution_timeout=EXECUTION_TIMEOUT,
            do_xcom_push=False,
        )
    globals()[dag.dag_id] = dag  # Airflow 2 finds DAGs among the module's globals

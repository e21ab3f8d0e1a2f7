"""`make airflow-check`: load deploy/airflow_dag.py into a real Airflow's DagBag and show what it built.

Runs in its own virtualenv (.venv-airflow, from deploy/requirements-airflow.txt), with the example env file
standing in for each app's /etc/knack-311/APP.env. Exit 0 when the file imports cleanly and holds one DAG per
app of config.py; 1 otherwise, with the import errors.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from inspect import signature
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from config import CONFIG  # plain data: importable without the program's dependencies

    with tempfile.TemporaryDirectory() as env_dir:
        for app in CONFIG:
            env_file = Path(env_dir) / f"{app}.env"
            shutil.copy(HERE / "example.env", env_file)
            with env_file.open("a") as extra:  # stand-ins for what the operator fills in, to see the split
                extra.write("KNACK_APP_ID=check-app-id\nKNACK_API_KEY=check-placeholder\n"
                            "HEALTHCHECK_URL=https://hc-ping.example/check-placeholder\n")
        os.environ["KNACK311_ENV_DIR"] = env_dir
        try:  # Airflow 3.1+
            from airflow.dag_processing.dagbag import DagBag
        except ImportError:  # Airflow 2 and 3.0
            from airflow.models.dagbag import DagBag
        options = {"include_examples": False} if "include_examples" in signature(DagBag).parameters else {}
        bag = DagBag(dag_folder=str(HERE / "airflow_dag.py"), **options)

    if bag.import_errors:
        for path, error in bag.import_errors.items():
            print(f"IMPORT ERROR in {path}:\n{error}")
        return 1
    import airflow

    print(f"Airflow {airflow.__version__}: {HERE / 'airflow_dag.py'} imports cleanly, {len(bag.dags)} DAG(s)")
    for dag_id, dag in sorted(bag.dags.items()):
        task = dag.get_task("send_esb_messages")
        private = sorted(getattr(task, "_private_environment", {}))
        print(f"- {dag_id}: schedule {getattr(dag, 'schedule', None) or dag.timetable.summary!s}, "
              f"max_active_runs={dag.max_active_runs}, catchup={dag.catchup}")
        print(f"    {type(task).__name__} {task.task_id}: image={task.image} command={task.command}")
        print(f"    skip_on_exit_code={sorted(task.skip_on_exit_code)} execution_timeout={task.execution_timeout} "
              f"mount_tmp_dir={task.mount_tmp_dir} tty={task.tty} auto_remove={task.auto_remove}")
        print("    mounts: " + ", ".join(f"{m['Source']}->{m['Target']} ({m['Type']}{', ro' if m['ReadOnly'] else ''})"
                                         for m in task.mounts))
        print(f"    environment: {', '.join(sorted(task.environment))}; private_environment: {', '.join(private)}")
        if private != ["HEALTHCHECK_URL", "KNACK_API_KEY"] or set(private) & set(task.environment):
            print("    the secrets are not (only) in private_environment")
            return 1
    expected = {f"knack311_{app.replace('-', '_')}" for app in CONFIG}
    if set(bag.dags) != expected:
        print(f"expected DAGs {sorted(expected)}, found {sorted(bag.dags)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make airflow-check`: load deploy/airflow_dag.py into a real Airflow's DagBag and show what it built.

Runs in its own virtualenv (.venv-airflow, from deploy/requirements-airflow.txt), with the example env file
standing in for each app's /etc/knack-311/APP.env. Loads it twice: with every app's env file, then with the
last app's file missing, where every app's DAG must still load and only that app's task must refuse to run.
Exit 0 when both hold (one DAG per app of config.py, secrets only in private_environment, the Slack alert on
each task); 1 otherwise, with the import errors. (simulators/airflow_smoke.py then runs a DAG.)
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


def load_dag_file(env_dir: Path, apps_with_env_file) -> object:
    """A DagBag of airflow_dag.py, with the example env file as the env file of each app given."""
    for path in env_dir.glob("*.env"):
        path.unlink()
    for app in apps_with_env_file:
        env_file = env_dir / f"{app}.env"
        shutil.copy(HERE / "example.env", env_file)
        with env_file.open("a") as extra:  # stand-ins for what the operator fills in, to see the split
            extra.write("KNACK_APP_ID=check-app-id\nKNACK_API_KEY=check-placeholder\n"
                        "HEALTHCHECK_URL=https://hc-ping.example/check-placeholder\n")
    os.environ["KNACK311_ENV_DIR"] = str(env_dir)
    try:  # Airflow 3.1+
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 2 and 3.0
        from airflow.models.dagbag import DagBag
    options = {"include_examples": False} if "include_examples" in signature(DagBag).parameters else {}
    return DagBag(dag_folder=str(HERE / "airflow_dag.py"), **options)


def import_errors(bag) -> bool:
    for path, error in bag.import_errors.items():
        print(f"IMPORT ERROR in {path}:\n{error}")
    return bool(bag.import_errors)


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from config import CONFIG  # plain data: importable without the program's dependencies

    expected = {f"knack311_{app.replace('-', '_')}" for app in CONFIG}
    with tempfile.TemporaryDirectory() as env_dir:
        bag = load_dag_file(Path(env_dir), CONFIG)
        if import_errors(bag) or not show(bag, expected):
            return 1
        missing_app = list(CONFIG)[-1]
        print(f"\nwithout {missing_app}.env:")
        bag = load_dag_file(Path(env_dir), [app for app in CONFIG if app != missing_app])
        if import_errors(bag) or not one_app_refuses(bag, expected, missing_app):
            return 1
    return 0


def one_app_refuses(bag, expected: set[str], missing_app: str) -> bool:
    """Every DAG loads; only the missing app's task has the pre_execute that fails its runs."""
    if set(bag.dags) != expected:
        print(f"expected DAGs {sorted(expected)}, found {sorted(bag.dags)}")
        return False
    for dag_id, dag in sorted(bag.dags.items()):
        refuses = dag.get_task("send_esb_messages")._pre_execute_hook is not None
        print(f"- {dag_id}: loads; {'its runs fail: ' + dag.description if refuses else 'runs as usual'}")
        if refuses != (dag_id == f"knack311_{missing_app.replace('-', '_')}"):
            print("    only the app without its env file may refuse to run")
            return False
    return True


def show(bag, expected: set[str]) -> bool:
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
        callbacks = task.on_failure_callback if isinstance(task.on_failure_callback, list) else \
            [task.on_failure_callback]
        alert = [c for c in callbacks if getattr(c, "func", None) and c.func.__name__ == "alert_slack"]
        module = sys.modules[alert[0].func.__module__] if alert else None
        print(f"    on failure: {'Slack alert for ' + alert[0].args[0] if alert else 'NO ALERT'}"
              f"{f' through connection {module.SLACK_CONN_ID!r}' if module else ''}")
        if private != ["HEALTHCHECK_URL", "KNACK_API_KEY"] or set(private) & set(task.environment):
            print("    the secrets are not (only) in private_environment")
            return False
        if not alert:
            return False
    if set(bag.dags) != expected:
        print(f"expected DAGs {sorted(expected)}, found {sorted(bag.dags)}")
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())

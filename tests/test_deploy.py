"""The deployment files, without Airflow: the DAG's settings read from its syntax tree, the example env file
against the variables the program reads. (`make airflow-check` loads the DAG into a real Airflow.)"""

from __future__ import annotations

import ast
import datetime as dt
import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest

from config import CONFIG
from knack311.settings import DEFAULT_MAX_RUNTIME

ROOT = Path(__file__).resolve().parent.parent
DAG_FILE = ROOT / "deploy" / "airflow_dag.py"
EXAMPLE_ENV = ROOT / "deploy" / "example.env"
SCHEDULER_WINDOW = dt.timedelta(minutes=5)
SECRETS = {"KNACK_API_KEY", "HEALTHCHECK_URL", "ESB_KEY_PASSWORD", "ESB_PROXY"}  # ESB_PROXY may hold a password
# Read by the reporting and check modules once the entry script wires them (settings reads the others).
OPERATOR_VARIABLES = {"LOG_FORMAT", "PROGRESS", "METRICS_FILE", "HEALTHCHECK_URL"}


@pytest.fixture(scope="module")
def dag_tree() -> ast.Module:
    return ast.parse(DAG_FILE.read_text(), str(DAG_FILE))


@pytest.fixture(scope="module")
def constants(dag_tree) -> dict[str, object]:
    """The module-level constants, evaluated from the tree (names: earlier constants and timedelta only)."""
    found: dict[str, object] = {}
    for node in dag_tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                found[node.targets[0].id] = evaluate(node.value, found)
            except (NameError, ValueError, TypeError):
                pass  # not a plain constant (e.g. read from the environment)
    return found


def evaluate(node: ast.expr, names: dict[str, object]) -> object:
    allowed = (ast.Constant, ast.Name, ast.Load, ast.Tuple, ast.List, ast.Set, ast.BinOp, ast.Add, ast.Sub,
               ast.Mult, ast.Call, ast.keyword, ast.UnaryOp, ast.USub)
    for child in ast.walk(node):
        if not isinstance(child, allowed):
            raise ValueError(f"not a constant expression: {ast.dump(child)[:60]}")
        if isinstance(child, ast.Call) and not (isinstance(child.func, ast.Name) and
                                                child.func.id in ("timedelta", "frozenset")):
            raise ValueError("only timedelta() and frozenset() calls")
    scope = {"timedelta": dt.timedelta, "frozenset": frozenset, **names}
    return eval(compile(ast.Expression(node), str(DAG_FILE), "eval"), {"__builtins__": {}}, scope)


def call_of(tree: ast.AST, name: str) -> ast.Call:
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == name]
    assert len(calls) == 1, f"expected one {name}() call in {DAG_FILE.name}, found {len(calls)}"
    return calls[0]


def keywords(call: ast.Call) -> dict[str, ast.expr]:
    return {k.arg: k.value for k in call.keywords}


def test_one_dag_per_configured_app(dag_tree, constants):
    assert set(constants["APPS"]) == set(CONFIG)
    loop = next(n for n in dag_tree.body if isinstance(n, ast.For))
    assert isinstance(loop.iter, ast.Name) and loop.iter.id == "APPS"
    assert any(isinstance(n, ast.With) for n in ast.walk(loop))  # DAG and its task are made per app


def test_the_dag_runs_one_at_a_time_on_the_citys_schedule(dag_tree, constants):
    dag = keywords(call_of(dag_tree, "DAG"))
    assert evaluate(dag["max_active_runs"], constants) == 1
    assert evaluate(dag["catchup"], constants) is False
    assert evaluate(dag["schedule"], constants) == "1-59/5 * * * *"  # minute 1, 6, ..., 56: every 5 minutes
    assert evaluate(dag["default_args"].values[0], constants) == 0  # retries: the next run is the retry


def test_the_docker_task(dag_tree, constants):
    task = keywords(call_of(dag_tree, "DockerOperator"))
    assert evaluate(task["skip_on_exit_code"], constants) == 75
    assert evaluate(task["mount_tmp_dir"], constants) is False
    assert evaluate(task["tty"], constants) is True
    assert evaluate(task["auto_remove"], constants) in ("force", "success")
    timeout = evaluate(task["execution_timeout"], constants)
    max_runtime = constants["MAX_RUNTIME"]
    assert max_runtime == DEFAULT_MAX_RUNTIME
    assert dt.timedelta(seconds=max_runtime) < timeout < SCHEDULER_WINDOW
    command = task["command"]
    assert isinstance(command, ast.List) and ast.unparse(command) == "[app_name, '--max-runtime', str(MAX_RUNTIME)]"
    assert ast.unparse(task["environment"]) == "environment"
    assert ast.unparse(task["private_environment"]) == "private_environment"
    assert ast.unparse(task["mounts"]) == "mounts()"
    assert ast.unparse(task["on_failure_callback"]) == "partial(alert_slack, app_name)"


def test_the_slack_provider_is_imported_only_when_an_alert_is_sent(dag_tree):
    """A host without apache-airflow-providers-slack must still load the DAGs."""
    top_level = {alias.name if isinstance(node, ast.Import) else node.module
                 for node in dag_tree.body if isinstance(node, ast.Import | ast.ImportFrom)
                 for alias in node.names}
    assert not any("slack" in (name or "") for name in top_level)
    alert = next(n for n in dag_tree.body if isinstance(n, ast.FunctionDef) and n.name == "alert_slack")
    guarded = [n for n in ast.walk(alert) if isinstance(n, ast.Try) and
               any(isinstance(i, ast.ImportFrom) and i.module == "airflow.providers.slack.hooks.slack_webhook"
                   for i in n.body)]
    assert guarded and any(ast.unparse(h.type) == "ImportError" for h in guarded[0].handlers)


def test_secrets_go_to_private_environment_only(dag_tree, constants):
    assert constants["SECRET_VARIABLES"] == SECRETS
    split = next(n for n in dag_tree.body if isinstance(n, ast.FunctionDef) and n.name == "app_environment")
    source = ast.unparse(split)
    assert "name not in SECRET_VARIABLES" in source and "name in SECRET_VARIABLES" in source


def test_state_volume_and_read_only_certificates_are_mounted(dag_tree, constants):
    mounts = [keywords(c) for c in ast.walk(dag_tree) if isinstance(c, ast.Call) and getattr(c.func, "id", "") ==
              "Mount"]
    by_target = {evaluate(m["target"], constants): m for m in mounts}
    assert evaluate(by_target["/app/state"]["type"], constants) == "volume"  # the image's STATE_DIR
    certs = by_target["/certs"]
    assert evaluate(certs["read_only"], constants) is True
    assert evaluate(certs["type"], constants) == "bind"
    env = env_file_values()
    assert env["ESB_CERT"].startswith("/certs/") and env["ESB_KEY"].startswith("/certs/")


def env_file_values() -> dict[str, str]:
    """VAR=value lines of example.env, commented-out ones included (with the value they show)."""
    values = {}
    for line in EXAMPLE_ENV.read_text().splitlines():
        match = re.fullmatch(r"(?:# )?([A-Z][A-Z0-9_]*)=(.*)", line)
        if match:
            values[match.group(1)] = match.group(2)
    return values


def variables_the_program_reads() -> set[str]:
    names = set(OPERATOR_VARIABLES)
    pattern = re.compile(r'env(?:\.get)?\(\s*"([A-Z][A-Z0-9_]+)"|env\[\s*"([A-Z][A-Z0-9_]+)"\]|'
                         r'\(env, "([A-Z][A-Z0-9_]+)"')
    for path in (ROOT / "knack311").glob("*.py"):
        for match in pattern.finditer(path.read_text()):
            names.add(next(g for g in match.groups() if g))
    return names


def test_example_env_documents_every_variable_and_holds_no_secret():
    lines = EXAMPLE_ENV.read_text().splitlines()
    values = env_file_values()
    read = variables_the_program_reads()
    assert {"KNACK_APP_ID", "KNACK_API_KEY", "ESB_ENDPOINT", "ESB_TIMEOUT", "STATE_DIR"} <= read
    assert read <= set(values), f"undocumented in example.env: {sorted(read - set(values))}"
    assignment = re.compile(r"(?:# )?[A-Z][A-Z0-9_]*=.*")
    for index, line in enumerate(lines):
        if assignment.fullmatch(line):
            above = index - 1
            while above >= 0 and assignment.fullmatch(lines[above]):
                above -= 1  # variables documented together (ESB_CERT and ESB_KEY)
            assert lines[above].startswith("# ") and lines[above][2:].strip(), \
                f"example.env: {line!r} has no comment above it"
    assert values["KNACK_API_KEY"] == "" and values["KNACK_APP_ID"] == ""
    assert "your-check-uuid" in values["HEALTHCHECK_URL"]
    assert "\nHEALTHCHECK_URL=" not in EXAMPLE_ENV.read_text()  # the secret ones stay unset here
    # docker --env-file takes values literally: no quotes, no trailing comments
    for line in lines:
        if not line.startswith("#") and "=" in line:
            assert '"' not in line and "'" not in line and " #" not in line


def test_example_env_is_tracked_despite_the_env_ignore_rules():
    gitignore = (ROOT / ".gitignore").read_text().splitlines()
    assert "*.env" in gitignore and "!deploy/example.env" in gitignore


# ----- the DAG file run under a stubbed Airflow: what it builds per app, what its alert says -----

class StubDAG:
    def __init__(self, **settings):
        self.settings = settings
        self.dag_id = settings["dag_id"]
        self.tasks: list[StubOperator] = []

    def __enter__(self):
        StubDAG.open = self
        return self

    def __exit__(self, *exc_info):
        StubDAG.open = None


class StubOperator:
    def __init__(self, **settings):
        self.settings = settings
        StubDAG.open.tasks.append(self)


class StubSlackWebhookHook:
    sent: list[tuple[str, str]] = []
    refuse: Exception | None = None

    def __init__(self, slack_webhook_conn_id: str):
        self.conn_id = slack_webhook_conn_id

    def send(self, text: str) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.sent.append((self.conn_id, text))


def stub_module(monkeypatch, name: str, **attributes) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    monkeypatch.setitem(sys.modules, name, module)


def simple_dotenv_values(path) -> dict[str, str]:
    lines = Path(path).read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


@pytest.fixture
def load_dag(monkeypatch, tmp_path):
    """Import the DAG file with stand-ins for Airflow, docker and dotenv, and env files for the apps given."""
    for name in ("airflow", "airflow.providers", "airflow.providers.docker", "airflow.providers.docker.operators"):
        stub_module(monkeypatch, name)
    stub_module(monkeypatch, "airflow.sdk", DAG=StubDAG)
    stub_module(monkeypatch, "airflow.providers.docker.operators.docker", DockerOperator=StubOperator)
    stub_module(monkeypatch, "docker")
    stub_module(monkeypatch, "docker.types", Mount=lambda **kw: kw)
    stub_module(monkeypatch, "dotenv", dotenv_values=simple_dotenv_values)
    for name in ("airflow.providers.slack", "airflow.providers.slack.hooks"):
        stub_module(monkeypatch, name)
    stub_module(monkeypatch, "airflow.providers.slack.hooks.slack_webhook", SlackWebhookHook=StubSlackWebhookHook)
    monkeypatch.setattr(StubSlackWebhookHook, "sent", [])
    monkeypatch.setenv("KNACK311_ENV_DIR", str(tmp_path))
    monkeypatch.delenv("KNACK311_SLACK_CONN_ID", raising=False)

    def load(*apps_with_env_file: str) -> types.ModuleType:
        for app in apps_with_env_file:
            (tmp_path / f"{app}.env").write_text(
                f"KNACK_APP_ID=id-of-{app}\nKNACK_API_KEY=key-of-{app}\nESB_TIMEOUT=\n")
        spec = importlib.util.spec_from_file_location("knack311_airflow_dag_under_test", DAG_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


def dags_of(module) -> dict[str, StubDAG]:
    """The DAGs as Airflow 2 finds them: module globals named by their dag_id."""
    return {name: value for name, value in vars(module).items()
            if isinstance(value, StubDAG) and name == value.dag_id}


def test_each_app_gets_its_dag_with_its_own_env_file(load_dag):
    module = load_dag(*CONFIG)
    dags = dags_of(module)
    assert set(dags) == {f"knack311_{app.replace('-', '_')}" for app in CONFIG}
    for app in CONFIG:
        (task,) = dags[f"knack311_{app.replace('-', '_')}"].tasks
        assert task.settings["command"][0] == app
        assert task.settings["environment"] == {"KNACK_APP_ID": f"id-of-{app}"}  # the empty ESB_TIMEOUT left unset
        assert task.settings["private_environment"] == {"KNACK_API_KEY": f"key-of-{app}"}
        assert task.settings["pre_execute"] is None


def test_a_missing_env_file_stops_only_its_own_app(load_dag, tmp_path, caplog):
    module = load_dag("data-tracker")  # signs-markings.env is missing
    dags = dags_of(module)
    assert set(dags) == {"knack311_data_tracker", "knack311_signs_markings"}  # both load
    (tracker,) = dags["knack311_data_tracker"].tasks
    assert tracker.settings["pre_execute"] is None and tracker.settings["private_environment"]
    signs = dags["knack311_signs_markings"]
    (task,) = signs.tasks
    missing = str(tmp_path / "signs-markings.env")
    assert missing in signs.settings["description"] and "MISSING" in signs.settings["description"]
    assert task.settings["environment"] == {} and task.settings["private_environment"] == {}
    with pytest.raises(module.EnvFileMissing) as refused:
        task.settings["pre_execute"]({"run_id": "scheduled__x"})  # before Docker is called
    assert missing in str(refused.value) and "signs-markings" in str(refused.value)
    assert any(missing in r.getMessage() for r in caplog.records)  # said when the DAG file is parsed, too


def failure_context(exception: BaseException | None) -> dict:
    log_url = "http://airflow.example/dags/knack311_data_tracker/runs/r1/tasks/send_esb_messages?try_number=1"
    return {"task_instance": types.SimpleNamespace(log_url=log_url), "run_id": "scheduled__2026-12-06T00:01:00",
            "exception": exception}


@pytest.mark.parametrize(("status", "said"), [(1, "exit code 1 (a record failed"), (2, "exit code 2 (configuration"),
                                              (137, "exit code 137")])
def test_the_alert_names_the_app_the_exit_code_and_the_log_url(load_dag, status, said):
    module = load_dag(*CONFIG)
    (task,) = dags_of(module)["knack311_data_tracker"].tasks
    failure = Exception(f"Docker container failed: {{'StatusCode': {status}, 'Error': None}}")
    task.settings["on_failure_callback"](failure_context(failure))
    ((conn_id, text),) = StubSlackWebhookHook.sent
    assert conn_id == "slack_knack311"
    assert "knack-311 data-tracker" in text and said in text
    assert failure_context(None)["task_instance"].log_url in text


def test_the_alert_without_an_exit_code_says_why(load_dag, tmp_path):
    module = load_dag("data-tracker")
    (task,) = dags_of(module)["knack311_signs_markings"].tasks
    missing = module.EnvFileMissing(f"knack-311: env file {tmp_path}/signs-markings.env for app signs-markings ...")
    task.settings["on_failure_callback"](failure_context(missing))
    ((_, text),) = StubSlackWebhookHook.sent
    assert "knack-311 signs-markings" in text and "exit code none (EnvFileMissing" in text
    assert "signs-markings.env" in text


def test_the_alert_connection_is_one_setting(load_dag, monkeypatch):
    monkeypatch.setenv("KNACK311_SLACK_CONN_ID", "slack_city_ops")
    module = load_dag(*CONFIG)
    (task,) = dags_of(module)["knack311_signs_markings"].tasks
    task.settings["on_failure_callback"](failure_context(None))
    assert [conn_id for conn_id, _ in StubSlackWebhookHook.sent] == ["slack_city_ops"]


@pytest.mark.parametrize("cause", ["provider not installed", "connection missing"])
def test_an_alert_that_cannot_be_sent_is_one_clear_log_line(load_dag, monkeypatch, caplog, cause):
    module = load_dag(*CONFIG)  # the DAGs load either way: the provider is looked up at alert time
    if cause == "provider not installed":
        monkeypatch.setitem(sys.modules, "airflow.providers.slack.hooks.slack_webhook", None)
    else:
        monkeypatch.setattr(StubSlackWebhookHook, "refuse", LookupError("The conn_id `slack_knack311` isn't defined"))
    (task,) = dags_of(module)["knack311_data_tracker"].tasks
    failure = Exception("Docker container failed: {'StatusCode': 1, 'Error': None}")
    task.settings["on_failure_callback"](failure_context(failure))  # does not raise
    assert StubSlackWebhookHook.sent == []
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "Slack alert for data-tracker not sent" in line and "exit code 1" in line
    assert ("apache-airflow-providers-slack is not installed" in line if cause == "provider not installed"
            else "'slack_knack311' (KNACK311_SLACK_CONN_ID)" in line)

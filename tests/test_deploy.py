"""The deployment files, without Airflow: the DAG's settings read from its syntax tree, the example env file
against the variables the program reads. (`make airflow-check` loads the DAG into a real Airflow.)"""

from __future__ import annotations

import ast
import datetime as dt
import re
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


def test_the_dag_runs_one_at_a_time_every_5_minutes(dag_tree, constants):
    dag = keywords(call_of(dag_tree, "DAG"))
    assert evaluate(dag["max_active_runs"], constants) == 1
    assert evaluate(dag["catchup"], constants) is False
    assert evaluate(dag["schedule"], constants) == "*/5 * * * *"
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

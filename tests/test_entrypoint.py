"""docker-entrypoint.sh, run by /bin/sh against this checkout (the image's layout set through KNACK311_PYTHON and
KNACK311_APP_DIR): an app name or an option goes to the program, anything else runs as given, both through exec
so that what runs keeps the entrypoint's PID (PID 1 in the container, where docker stop's SIGTERM lands).
`make docker-smoke` runs the same forms in the real image."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from config import CONFIG
from tests.conftest import PROJECT_ROOT

ENTRYPOINT = PROJECT_ROOT / "docker-entrypoint.sh"


def entrypoint(*args: str, app_dir: Path = PROJECT_ROOT, env: dict | None = None) -> subprocess.Popen:
    full_env = {"PATH": os.environ.get("PATH", ""), "KNACK311_PYTHON": sys.executable,
                "KNACK311_APP_DIR": str(app_dir), **(env or {})}
    return subprocess.Popen(["/bin/sh", str(ENTRYPOINT), *args], env=full_env, cwd=app_dir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_an_option_goes_to_the_program():
    code, out, err = finish(entrypoint("--version"))
    assert code == 0 and out.startswith("knack-311 ") and "(revision " in out, (out, err)


def test_an_app_name_goes_to_the_program():
    app = next(iter(CONFIG))
    # --version after the app: the program answers, proving it got both arguments
    code, out, err = finish(entrypoint(app, "--version"))
    assert code == 0 and out.startswith("knack-311 "), (out, err)


def test_no_argument_gives_the_programs_usage_and_exit_2():
    code, out, err = finish(entrypoint())
    assert code == 2 and "usage: send_esb_message.py" in err and "APP_NAME" in err


def test_a_mistyped_app_gets_the_programs_line_naming_the_apps_not_command_not_found():
    code, out, err = finish(entrypoint("data-trackr"))
    assert code == 2 and "unknown app 'data-trackr'" in err and all(app in err for app in CONFIG), err


def test_a_command_runs_as_given_in_place_of_the_entrypoint():
    proc = entrypoint("sh", "-c", 'echo "pid $$"')
    code, out, _ = finish(proc)
    assert (code, out) == (0, f"pid {proc.pid}\n")  # exec: the same process, so PID 1 in the container


def test_the_seeds_command_runs_the_program_in_place_of_the_entrypoint():
    # `IMAGE python send_esb_message.py data-tracker`: python here is whatever the PATH finds (the venv's in the image)
    python_dir = str(Path(sys.executable).parent)
    env = {"PATH": f"{python_dir}:{os.environ.get('PATH', '')}"}
    proc = entrypoint("python", "-c", "import os, sys; print(os.getpid(), sys.prefix)", env=env)
    code, out, err = finish(proc)
    assert code == 0, err
    pid, prefix = out.split()
    assert int(pid) == proc.pid and prefix == sys.prefix
    code, out, err = finish(entrypoint("python", "send_esb_message.py", "--version", env=env))
    assert code == 0 and out.startswith("knack-311 "), (out, err)


def test_an_app_named_like_a_command_still_goes_to_the_program(tmp_path):
    """An app name wins over a command of the same name: config.py decides, read at run time (a checkout mounted
    over /app brings its own config.py)."""
    for name in ("send_esb_message.py", "knack311", "templates"):
        source = PROJECT_ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, tmp_path / name)
    (tmp_path / "config.py").write_text(f"CONFIG = {{'env': {CONFIG['data-tracker']!r}}}\n")
    code, out, err = finish(entrypoint("env", "--version", app_dir=tmp_path))
    assert code == 0 and out.startswith("knack-311 "), (out, err)  # `env` itself would list the environment
    code, out, _ = finish(entrypoint("true", app_dir=tmp_path))
    assert (code, out) == (0, "")  # not an app there: the command runs


@pytest.mark.skipif(shutil.which("dash") is None and not Path("/bin/sh").exists(), reason="needs a POSIX sh")
def test_the_script_is_plain_posix_sh():
    """The image's /bin/sh is dash: no bash-only syntax."""
    shell = shutil.which("dash") or "/bin/sh"
    result = subprocess.run([shell, "-n", str(ENTRYPOINT)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert os.access(ENTRYPOINT, os.X_OK)  # the Dockerfile chmods it too, but a checkout should run it as is

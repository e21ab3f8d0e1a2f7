"""--version: `knack-311 VERSION (revision REV)` from git in a checkout, from the image's build variables
elsewhere; exit 0 and no traceback whatever git does."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from knack311.version import version_line
from tests.conftest import ENTRY, PROJECT_ROOT

LINE = re.compile(r"^knack-311 (\S+) \(revision (\S+)\)$")
# what the image runs: the program files, without the .git of a checkout
PROGRAM = ["send_esb_message.py", "config.py", "knack311", "templates"]
HAS_GIT = shutil.which("git") is not None


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@invalid"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def program_copy(tmp_path: Path) -> Path:
    """The program laid out as in the image: no .git beside it."""
    root = tmp_path / "app"
    root.mkdir()
    for name in PROGRAM:
        source = PROJECT_ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, root / name)
    return root


def version(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(root / "send_esb_message.py"), "--version"], env=env, cwd="/",
                          capture_output=True, text=True, timeout=60)


# ----- the pure part -----------------------------------------------------------------------------------------------

def test_outside_a_checkout_the_image_variables_name_the_build(tmp_path):
    env = {"KNACK311_VERSION": "production", "KNACK311_REVISION": "0123456789abcdef0123456789abcdef01234567"}
    assert version_line(tmp_path, env) == \
        "knack-311 production (revision 0123456789abcdef0123456789abcdef01234567)"


def test_neither_a_checkout_nor_build_variables_says_unknown(tmp_path):
    assert version_line(tmp_path, {"KNACK311_VERSION": " "}) == "knack-311 unknown (revision unknown)"


@pytest.mark.skipif(not HAS_GIT, reason="needs git")
def test_a_checkout_answers_with_its_tag_and_commit_not_the_image_variables(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "f").write_text("x")
    git(tmp_path, "add", "f")
    git(tmp_path, "commit", "-q", "-m", "one")
    git(tmp_path, "tag", "v1.4.0")
    head = git(tmp_path, "rev-parse", "HEAD")
    env = {"KNACK311_VERSION": "from-the-image", "KNACK311_REVISION": "f" * 40}
    assert version_line(tmp_path, env) == f"knack-311 v1.4.0 (revision {head})"
    (tmp_path / "f").write_text("changed")
    assert version_line(tmp_path, env) == f"knack-311 v1.4.0-dirty (revision {head})"


# ----- the real command --------------------------------------------------------------------------------------------

def test_the_command_in_this_checkout_prints_its_git_revision(tmp_path):
    result = version(PROJECT_ROOT, {"PATH": os.environ.get("PATH", "")})
    assert result.returncode == 0, result.stderr
    match = LINE.match(result.stdout.strip())
    assert match, result.stdout
    if HAS_GIT and (PROJECT_ROOT / ".git").exists():
        # what git itself says here ("unknown" where git refuses, e.g. a checkout owned by another user)
        head = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert match.group(2) == (head.stdout.strip() if head.returncode == 0 else "unknown")
    assert result.stderr == ""


def test_the_command_as_laid_out_in_the_image_prints_the_build_variables(tmp_path):
    root = program_copy(tmp_path)
    env = {"PATH": os.environ.get("PATH", ""), "KNACK311_VERSION": "main", "KNACK311_REVISION": "a" * 40}
    result = version(root, env)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"knack-311 main (revision {'a' * 40})\n", "")


def test_a_checkout_without_git_installed_says_unknown_without_a_traceback(tmp_path):
    root = program_copy(tmp_path)
    (root / ".git").mkdir()  # a checkout, mounted where git is not installed (the slim image)
    no_git = tmp_path / "bin"
    no_git.mkdir()  # a PATH that finds no git
    result = version(root, {"PATH": str(no_git), "KNACK311_VERSION": "main", "KNACK311_REVISION": "b" * 40})
    assert (result.returncode, result.stdout, result.stderr) == (0, "knack-311 unknown (revision unknown)\n", "")


def test_version_needs_no_app_name_and_contacts_nothing(tmp_path):
    # no Knack or ESB settings at all: --version ends before any of them is read
    result = subprocess.run([sys.executable, str(ENTRY), "--version"], env={"PATH": os.environ.get("PATH", "")},
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and LINE.match(result.stdout.strip()), result

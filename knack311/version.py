"""--version: which code this is, from the git checkout it runs in or, in the image, from its build.

The image holds no .git (.dockerignore), so its build passes the version and revision as build args, which the
Dockerfile turns into KNACK311_VERSION and KNACK311_REVISION (the same values as its OCI labels).
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

UNKNOWN = "unknown"


def _git(project_root: Path, *args: str) -> str:
    """git's answer in the project root, or "" when git is missing, fails or hangs."""
    try:
        out = subprocess.run(["git", "-C", str(project_root), *args], capture_output=True, text=True, timeout=10,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def version_line(project_root: Path, env: dict[str, str]) -> str:
    """`knack-311 VERSION (revision REV)`.

    A checkout (project_root holds .git) answers with git: its code may differ from any image, so the image's
    variables would misname it (the seed's command mounts a checkout over the image's /app). Elsewhere the
    KNACK311_* variables the image sets from its build args; "unknown" for what neither knows.
    """
    if (project_root / ".git").exists():
        revision = _git(project_root, "rev-parse", "HEAD")
        version = _git(project_root, "describe", "--tags", "--always", "--dirty")
    else:
        revision = env.get("KNACK311_REVISION", "").strip()
        version = env.get("KNACK311_VERSION", "").strip()
    return f"knack-311 {version or UNKNOWN} (revision {revision or UNKNOWN})"


class VersionAction(argparse.Action):
    """Like argparse's "version" action, but asks git only when --version is given, not on every run."""

    def __init__(self, option_strings, dest, project_root: Path, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)
        self.project_root = project_root

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line(self.project_root, dict(os.environ)), flush=True)
        parser.exit(0)

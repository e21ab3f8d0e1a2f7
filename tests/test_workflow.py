""".github/workflows/docker.yml, read as YAML: what it runs on, what it runs, what it publishes and with which
rights. A workflow only shows its mistakes on GitHub, after a push; these checks fail here first."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT

WORKFLOW = PROJECT_ROOT / ".github" / "workflows" / "docker.yml"
PINNED = re.compile(r"^\s*(?:-\s*)?uses:\s*([\w.-]+/[\w.-]+)@([0-9a-f]{40})\s+#\s*v\d+(?:\.\d+){0,2}\s*$")
NEEDED_ACTIONS = {"actions/checkout", "docker/setup-buildx-action", "docker/login-action", "docker/metadata-action",
                  "docker/build-push-action"}


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def steps(workflow: dict) -> list[tuple[str, dict]]:
    return [(name, step) for name, job in workflow["jobs"].items() for step in job["steps"]]


def uses(step: dict) -> str:
    return step.get("uses", "").split("@")[0]


def test_runs_on_every_push_and_pull_request_never_on_pull_request_target(workflow):
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert set(triggers) == {"push", "pull_request"}
    # no branch filter: every branch and every pull request is built and tested
    assert not (triggers["push"] or {}) and not (triggers["pull_request"] or {})
    assert "pull_request_target" not in WORKFLOW.read_text()


def test_every_action_is_pinned_to_a_full_commit_sha_with_its_release_in_a_comment():
    lines = [line for line in WORKFLOW.read_text().splitlines() if re.match(r"^\s*(-\s*)?uses:", line)]
    assert lines
    unpinned = [line.strip() for line in lines if not PINNED.match(line)]
    assert unpinned == []
    assert NEEDED_ACTIONS <= {PINNED.match(line).group(1) for line in lines}
    # one action, one pin: two SHAs of the same action would mean a half-done update
    pins: dict[str, set[str]] = {}
    for line in lines:
        action, sha = PINNED.match(line).groups()
        pins.setdefault(action, set()).add(sha)
    assert all(len(shas) == 1 for shas in pins.values()), pins


def test_least_privilege_and_no_credentials_left_in_the_checkout(workflow):
    assert workflow["permissions"] == {}
    for name, job in workflow["jobs"].items():
        assert job["permissions"] == {"contents": "read"}, name
    checkouts = [step for _, step in steps(workflow) if uses(step) == "actions/checkout"]
    assert len(checkouts) == len(workflow["jobs"])
    assert all(step["with"]["persist-credentials"] is False for step in checkouts)


def test_it_runs_make_test_and_make_docker_smoke_on_the_built_image(workflow):
    runs = {name: [step.get("run", "") for step in job["steps"]] for name, job in workflow["jobs"].items()}
    assert any(r.strip() == "make test" for r in runs["test"])
    assert any(r.strip() == "make docker-smoke" for r in runs["image"])
    image = workflow["jobs"]["image"]
    assert image["needs"] == "test"  # nothing is published from a commit whose tests fail
    build = next(s for s in image["steps"] if uses(s) == "docker/build-push-action")
    smoke = next(s for s in image["steps"] if s.get("run", "").strip() == "make docker-smoke")
    assert build["with"]["load"] is True and build["with"]["push"] is False
    # the smoke test takes the image just built, not one it builds itself
    assert smoke["env"]["KNACK311_SMOKE_IMAGE"] in build["with"]["tags"].split()
    assert image["steps"].index(build) < image["steps"].index(smoke)


def test_publishes_only_a_push_to_main_or_production(workflow):
    publish = workflow["env"]["PUBLISH"]
    assert "github.event_name == 'push'" in publish
    assert set(re.findall(r"github\.ref == '([^']+)'", publish)) == {"refs/heads/main", "refs/heads/production"}
    image = workflow["jobs"]["image"]["steps"]
    login = next(s for s in image if uses(s) == "docker/login-action")
    push = [s for s in image if uses(s) == "docker/build-push-action" and s["with"].get("push") is True]
    assert len(push) == 1
    for step in (login, push[0]):
        assert step["if"] == "env.PUBLISH == 'true'"
    # after the smoke test: a build that fails it is never published
    smoke = next(s for s in image if s.get("run", "").strip() == "make docker-smoke")
    assert image.index(smoke) < image.index(login) < image.index(push[0])


def test_docker_hub_credentials_come_from_repository_secrets(workflow):
    login = next(s for _, s in steps(workflow) if uses(s) == "docker/login-action")
    assert login["with"] == {"username": "${{ secrets.DOCKERHUB_USERNAME }}",
                             "password": "${{ secrets.DOCKERHUB_TOKEN }}"}
    text = WORKFLOW.read_text()
    assert text.count("secrets.") == 2  # nowhere else, and never in a run: script


def test_tags_are_the_branch_name_and_the_commit_sha_with_oci_labels_from_git(workflow):
    image = workflow["jobs"]["image"]["steps"]
    meta = next(s for s in image if uses(s) == "docker/metadata-action")
    tags = {line.strip() for line in meta["with"]["tags"].splitlines() if line.strip()}
    assert "type=ref,event=branch" in tags
    assert any(t.startswith("type=sha") and "format=long" in t for t in tags)
    assert meta["with"]["flavor"] == "latest=false"  # the city pulls :production, never a moving :latest
    for build in (s for s in image if uses(s) == "docker/build-push-action"):
        assert "${{ steps.meta.outputs.tags }}" in build["with"]["tags"]
        assert build["with"]["labels"] == "${{ steps.meta.outputs.labels }}"
        args = dict(line.strip().split("=", 1) for line in build["with"]["build-args"].splitlines() if line.strip())
        # what --version prints in the image (KNACK311_REVISION/VERSION come from these)
        assert args["REVISION"] == "${{ github.sha }}" and args["VERSION"] == "${{ steps.meta.outputs.version }}"
        assert set(args) == {"REVISION", "VERSION", "CREATED", "SOURCE"}


def test_no_expression_is_pasted_into_a_shell_script(workflow):
    """Script injection: a value reaches a run: step through env, never as ${{ }} inside the script."""
    assert all("${{" not in step.get("run", "") for _, step in steps(workflow))


def _tool(name: str) -> str | None:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def test_zizmor_finds_nothing_offline():
    zizmor = _tool("zizmor")
    if zizmor is None:
        pytest.skip("zizmor is not installed (requirements-dev.txt)")
    result = subprocess.run([zizmor, "--offline", "--quiet", str(WORKFLOW.parent)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_finds_nothing():
    actionlint = _tool("actionlint")
    if actionlint is None:
        pytest.skip("actionlint is not installed (requirements-actionlint.txt could not fetch it)")
    result = subprocess.run([actionlint, str(WORKFLOW)], capture_output=True, text=True, timeout=120,
                            cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr

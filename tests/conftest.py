"""End-to-end fixtures: the real command against a Knack simulator (HTTP) and an ESB simulator (HTTPS with a
client certificate), with certificates made at test time."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from config import CONFIG
from simulators.activities import activity_record, app_metadata
from simulators.certs import make_pki
from simulators.esb import ESBSimulator
from simulators.knack_api import KnackSimulator

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENTRY = PROJECT_ROOT / "send_esb_message.py"
APP_ID = "5d79512148c4af00106d1507"
# canaries: tests assert these never appear in any output
API_KEY = "canary-api-key-3f9c1e77"


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def esb(pki):
    with ESBSimulator(server_cert=pki.server_cert, server_key=pki.server_key,
                      client_ca_bundle=pki.client_ca_bundle) as simulator:
        yield simulator


def make_knack(app: str = "data-tracker", *, rate_limit: float | None = 10.0, timezone="Central Time (US & Canada)",
               **kwargs) -> KnackSimulator:
    return KnackSimulator(app_id=APP_ID, api_key=API_KEY,
                          metadata=app_metadata(app, CONFIG[app], timezone=timezone, app_id=APP_ID),
                          rate_limit=rate_limit, **kwargs)


@pytest.fixture
def knack():
    with make_knack() as simulator:
        yield simulator


class Seeder:
    """Adds data-tracker activities with sensible defaults; returns the records added."""

    def __init__(self, knack: KnackSimulator, app: str = "data-tracker"):
        self.knack = knack
        self.app = app
        self.next_id = 1000

    def __call__(self, count: int = 1, **values) -> list[dict]:
        records = []
        for _ in range(count):
            self.next_id += 1
            n = self.next_id
            fields = dict(record_id=f"rec{n:021d}", atd_activity_id=n, emi_id=f"EMI-{n}", sr_number=f"20-{n:08d}",
                          activity_datetime=dt.datetime(2024, 7, 4, 10, 26), activity_details=f"details {n}",
                          activity_name="Dispatch Technician", issue_status="open")
            fields.update(values)
            records.append(activity_record(CONFIG[self.app], app_name=self.app, omit_empty_raw=True, **fields))
        self.knack.add_records(CONFIG[self.app]["obj"], records)
        return records


@pytest.fixture
def seed(knack):
    return Seeder(knack)


def statuses(knack: KnackSimulator, app: str = "data-tracker") -> dict[str, str]:
    """record id -> esb_status as Knack now holds it."""
    key = CONFIG[app]["fields"]["esb_status"]
    return {r["id"]: r.get(f"{key}_raw", r.get(key)) for r in knack.records(CONFIG[app]["obj"])}


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture
def bridge_env(knack, esb, pki, tmp_path):
    """The environment the scheduler gives the program, pointed at the simulators."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "KNACK_APP_ID": APP_ID,
        "KNACK_API_KEY": API_KEY,
        "KNACK_API_URL": knack.url,
        "ESB_ENDPOINT": esb.url,
        "ESB_CERT": str(pki.client_cert),
        "ESB_KEY": str(pki.client_key),
        "ESB_CA_BUNDLE": str(pki.ca_bundle),
        "ESB_TIMEOUT": "5",
        "STATE_DIR": str(tmp_path / "state"),
    }


@pytest.fixture
def state_dir(bridge_env) -> Path:
    """Where the run under test keeps its journal, lock and metadata cache."""
    return Path(bridge_env["STATE_DIR"])


def _command(app: str, args) -> list[str]:
    return [sys.executable, str(ENTRY), app, *args]


@pytest.fixture
def run_bridge(bridge_env, tmp_path):
    """Run the real command (from a foreign working directory) and wait for it."""

    def run(*args: str, app: str = "data-tracker", env: dict | None = None, timeout: float = 240) -> Run:
        full_env = {**bridge_env, **(env or {})}
        full_env = {k: v for k, v in full_env.items() if v is not None}
        proc = subprocess.run(_command(app, args), env=full_env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=timeout)
        return Run(proc.returncode, proc.stdout, proc.stderr)

    return run


@pytest.fixture
def start_bridge(bridge_env, tmp_path):
    """Start the real command without waiting (for signals, kills and overlapping runs)."""
    procs = []

    def start(*args: str, app: str = "data-tracker", env: dict | None = None) -> subprocess.Popen:
        full_env = {**bridge_env, **(env or {})}
        proc = subprocess.Popen(_command(app, args), env=full_env, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

"""`send_esb_message.py APP --check` end to end: the real command against the Knack and ESB simulators.

Each test reads the table back (item -> status), asserts on the rows and the exit code, and on what the check
left behind: nothing sent to the ESB (not even a request: the handshake is the only contact), no Knack status
changed and no PUT made, no journal, and no secret in the output.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from config import CONFIG
from simulators.activities import app_metadata
from simulators.certs import SERVER_NAMES
from simulators.esb import ESBSimulator
from tests.conftest import API_KEY, APP_ID, statuses

APP = CONFIG["data-tracker"]
FIELDS = APP["fields"]


@dataclass(frozen=True)
class Table:
    rows: list[tuple[str, str, str]]  # (item, status, detail), in order
    verdict: str

    def status(self, item: str) -> str:
        return self.row(item)[1]

    def detail(self, item: str) -> str:
        return self.row(item)[2]

    def row(self, item: str) -> tuple[str, str, str]:
        found = [row for row in self.rows if row[0] == item]
        assert len(found) == 1, f"{item!r} in {self.rows}"
        return found[0]

    def with_status(self, status: str) -> list[str]:
        return [item for item, row_status, _ in self.rows if row_status == status]


def parse_table(stdout: str) -> Table:
    """The check's table: a header "ITEM  STATUS  DETAIL", one row a line in those columns, then the verdict."""
    lines = stdout.splitlines()
    header = lines[0]
    assert header.startswith("ITEM ") and header.endswith("STATUS  DETAIL"), stdout
    status_at, detail_at = header.index("STATUS"), header.index("DETAIL")
    rows = []
    for line in lines[1:-1]:
        rows.append((line[:status_at].rstrip(), line[status_at:detail_at].strip(), line[detail_at:]))
    assert lines[-1].startswith("check: "), stdout
    return Table(rows, lines[-1])


def check(run_bridge, **env: str | None):
    run = run_bridge("--check", env=env, timeout=60)
    assert "Traceback" not in run.output, run.output
    return run, parse_table(run.stdout)


def assert_nothing_changed(knack, esb, before: dict[str, str], state_dir: Path) -> None:
    assert esb.received == []  # no POST, no request of any kind
    assert statuses(knack) == before
    assert knack.updates == []
    assert [r for r in knack.request_log if r.method != "GET"] == []
    assert not (state_dir.exists() and any(state_dir.iterdir())), "the check left files in STATE_DIR"


def container_warnings(table: Table) -> list[str]:
    """The one WARN a test run inside a container gets: its STATE_DIR (under /tmp) is not a mounted volume."""
    if Path("/.dockerenv").exists() and "is not a mounted volume" in table.detail("STATE_DIR"):
        return ["STATE_DIR"]
    return []


def assert_no_secrets(run, *key_files: Path) -> None:
    assert API_KEY not in run.output
    assert "PRIVATE KEY" not in run.output
    for key_file in key_files:
        for line in key_file.read_text().splitlines()[1:-1]:
            assert line not in run.output


# --- certificates of our own ESB CA, for expiry dates of our choosing ------------------------------------------

@dataclass(frozen=True)
class OwnPKI:
    directory: Path
    ca: trustme.CA
    ca_bundle: Path
    server_cert: Path
    server_key: Path

    def client(self, name: str, not_after: dt.datetime) -> tuple[Path, Path]:
        leaf = self.ca.issue_cert(name, common_name=name, not_before=not_after - dt.timedelta(days=400),
                                  not_after=not_after)
        cert, key = self.directory / f"{name}.cert", self.directory / f"{name}.pem"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        key.touch(mode=0o600)
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key


@pytest.fixture(scope="module")
def own_pki(tmp_path_factory) -> OwnPKI:
    directory = tmp_path_factory.mktemp("own-pki")
    ca = trustme.CA(organization_name="City ESB test CA (own)")
    server = ca.issue_cert(*SERVER_NAMES, common_name="esb.test")
    ca_bundle, server_cert, server_key = directory / "ca.pem", directory / "server.pem", directory / "server-key.pem"
    ca.cert_pem.write_to_path(str(ca_bundle))
    server.cert_chain_pems[0].write_to_path(str(server_cert))
    server.private_key_pem.write_to_path(str(server_key))
    return OwnPKI(directory, ca, ca_bundle, server_cert, server_key)


@pytest.fixture
def own_esb(own_pki):
    with ESBSimulator(server_cert=own_pki.server_cert, server_key=own_pki.server_key,
                      client_ca_bundle=own_pki.ca_bundle) as simulator:
        yield simulator


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- ready --------------------------------------------------------------------------------------------------------

def test_all_ok_sends_nothing_and_changes_nothing(run_bridge, knack, esb, seed, pki, bridge_env):
    seed(3)
    seed(1, esb_status="SENT")
    before = statuses(knack)
    state_dir = Path(bridge_env["STATE_DIR"])
    state_dir.mkdir()  # an existing, empty STATE_DIR: the check must not create the journal in it

    run, table = check(run_bridge)

    assert run.returncode == 0, run.output
    assert table.with_status("FAIL") == table.with_status("SKIP") == []
    assert table.with_status("WARN") == container_warnings(table)
    assert table.verdict.endswith(": ready")
    assert {"KNACK_APP_ID", "ESB_ENDPOINT", "config.py entry", "view view_1653", "object object_75",
            "field esb_status", "timezone", "ESB_CERT", "ESB_KEY", "ESB_CA_BUNDLE", "ESB TLS handshake",
            "STATE_DIR", "journal", "Knack daily calls", "records waiting"} <= {row[0] for row in table.rows}
    assert table.detail("records waiting").startswith("3 READY_TO_SEND record(s)")
    handshake = table.detail("ESB TLS handshake")
    assert "TLSv1.3" in handshake and "CN=esb.test" in handshake and "days left" in handshake
    plan_left = knack.plan_remaining()
    # Knack's figure in the answer to the check's read, which was the last request
    assert table.detail("Knack daily calls").startswith(f"{plan_left:,} of 25,000 left today")
    # one metadata read and one one-record read of the records to send, with the run's own filter
    assert [r.path for r in knack.request_log] == [f"/v1/applications/{APP_ID}",
                                                   "/v1/pages/scene_1/views/view_1653/records"]
    read = knack.request_log[1].query
    assert read["rows_per_page"] == "1"
    assert {"field": FIELDS["esb_status"], "operator": "is", "value": "READY_TO_SEND"} in \
        json.loads(read["filters"])["rules"]
    assert esb.handshake_failures == 0
    assert_nothing_changed(knack, esb, before, state_dir)
    assert_no_secrets(run, pki.client_key)


@pytest.mark.parametrize("tls_version", ["1.2", "1.3"])
def test_the_handshake_names_the_tls_version_the_esb_speaks(run_bridge, pki, tls_version):
    with ESBSimulator(server_cert=pki.server_cert, server_key=pki.server_key, client_ca_bundle=pki.client_ca_bundle,
                      tls_version=tls_version) as pinned:
        run, table = check(run_bridge, ESB_ENDPOINT=pinned.url)
        assert pinned.received == [] and pinned.handshake_failures == 0
    assert run.returncode == 0, run.output
    assert table.status("ESB TLS handshake") == "OK"
    assert f"TLSv{tls_version}, ESB_CERT accepted" in table.detail("ESB TLS handshake")


def test_a_certificate_expiring_within_30_days_warns_and_passes(run_bridge, knack, own_esb, own_pki):
    expires = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=12, hours=1)
    cert, key = own_pki.client("renew-me", expires)

    run, table = check(run_bridge, ESB_ENDPOINT=own_esb.url, ESB_CERT=str(cert), ESB_KEY=str(key),
                       ESB_CA_BUNDLE=str(own_pki.ca_bundle))

    assert run.returncode == 0, run.output
    assert table.with_status("WARN") == ["ESB_CERT"] + container_warnings(table)
    assert table.with_status("FAIL") == []
    assert f"expires on {expires:%Y-%m-%d}, 12 day(s) left: renew it soon" in table.detail("ESB_CERT")
    assert table.status("ESB TLS handshake") == "OK"  # the ESB still takes it
    assert own_esb.received == []
    assert_no_secrets(run, key)


def test_low_daily_knack_calls_warn(run_bridge, knack, seed):
    seed(1)
    knack.plan_limit, knack.plan_used = 1000, 950

    run, table = check(run_bridge)

    assert run.returncode == 0, run.output
    assert table.with_status("WARN") == container_warnings(table) + ["Knack daily calls"]
    assert table.detail("Knack daily calls").startswith("48 of 1,000 left today")  # two requests of the check
    assert "under 10%" in table.detail("Knack daily calls")


# --- not ready ----------------------------------------------------------------------------------------------------

def test_a_field_key_missing_from_the_knack_object_fails_naming_it(run_bridge, knack, esb, seed, bridge_env):
    seed(2)
    before = statuses(knack)
    metadata = app_metadata("data-tracker", APP, timezone="Central Time (US & Canada)", app_id=APP_ID)
    obj = next(o for o in metadata["application"]["objects"] if o["key"] == APP["obj"])
    obj["fields"] = [f for f in obj["fields"] if f["key"] != FIELDS["activity_details"]]
    knack.set_metadata(metadata)

    run, table = check(run_bridge)

    assert run.returncode == 2, run.output
    assert table.with_status("FAIL") == ["field activity_details"]
    assert FIELDS["activity_details"] in table.detail("field activity_details")
    assert table.verdict.endswith("not ready: fix the FAIL rows")
    assert_nothing_changed(knack, esb, before, Path(bridge_env["STATE_DIR"]))
    assert_no_secrets(run)


def test_an_expired_client_certificate_fails_with_its_date(run_bridge, own_esb, own_pki):
    expired = dt.datetime(2025, 3, 14, 12, 0, tzinfo=dt.UTC)
    cert, key = own_pki.client("expired", expired)

    run, table = check(run_bridge, ESB_ENDPOINT=own_esb.url, ESB_CERT=str(cert), ESB_KEY=str(key),
                       ESB_CA_BUNDLE=str(own_pki.ca_bundle))

    assert run.returncode == 2, run.output
    assert table.with_status("FAIL") == ["ESB_CERT"]
    assert "expired on 2025-03-14" in table.detail("ESB_CERT")
    # the ESB is not asked about a certificate that is known to be expired
    assert table.row("ESB TLS handshake")[1:] == ("SKIP", "not tried: fix ESB_CERT first")
    assert own_esb.handshake_failures == 0 and own_esb.received == []
    assert_no_secrets(run, key)


@pytest.mark.parametrize("tls_version", ["1.2", "1.3"])
def test_the_esb_refusing_our_client_certificate_fails_naming_esb_cert(run_bridge, pki, tls_version):
    # A client certificate of another CA: valid in itself (ESB_CERT and ESB_KEY pass), refused by the ESB. With
    # TLS 1.3 the refusal comes after our side of the handshake is done.
    with ESBSimulator(server_cert=pki.server_cert, server_key=pki.server_key, client_ca_bundle=pki.client_ca_bundle,
                      tls_version=tls_version) as pinned:
        run, table = check(run_bridge, ESB_ENDPOINT=pinned.url, ESB_CERT=str(pki.rogue_client_cert),
                           ESB_KEY=str(pki.rogue_client_key))
        assert pinned.received == []
        assert pinned.handshake_failures == 1

    assert run.returncode == 2, run.output
    assert table.with_status("FAIL") == ["ESB TLS handshake"]
    assert table.status("ESB_CERT") == table.status("ESB_KEY") == "OK"
    assert table.detail("ESB TLS handshake").startswith(
        f"the ESB did not accept our client certificate (ESB_CERT {pki.rogue_client_cert}): ")
    assert_no_secrets(run, pki.rogue_client_key)


def test_an_esb_certificate_that_cannot_be_verified_fails_naming_esb_ca_bundle(run_bridge, esb, pki):
    run, table = check(run_bridge, ESB_CA_BUNDLE=str(pki.rogue_ca_bundle))

    assert run.returncode == 2, run.output
    assert table.with_status("FAIL") == ["ESB TLS handshake"]
    assert table.status("ESB_CA_BUNDLE") == "OK"  # a good CA file, only not the ESB's
    assert table.detail("ESB TLS handshake").startswith(
        f"the ESB's certificate could not be verified (ESB_CA_BUNDLE {pki.rogue_ca_bundle}): certificate verify failed")
    assert esb.received == []


def test_an_unreachable_esb_fails_naming_esb_endpoint(run_bridge, knack, seed):
    seed(1)
    port = closed_port()

    run, table = check(run_bridge, ESB_ENDPOINT=f"https://127.0.0.1:{port}/submitKnack")

    assert run.returncode == 2, run.output
    assert table.with_status("FAIL") == ["ESB TLS handshake"]
    assert table.detail("ESB TLS handshake") == (f"cannot connect to the ESB at 127.0.0.1:{port} (connection refused): "
                                                 "check ESB_ENDPOINT and the route to it")
    assert table.status("records waiting") == "OK"  # the rest of the table is still checked


def test_an_unreachable_knack_fails_and_its_usage_is_not_asked(run_bridge, esb, bridge_env):
    port = closed_port()

    run, table = check(run_bridge, KNACK_API_URL=f"http://127.0.0.1:{port}/v1", ESB_TIMEOUT="2")

    assert run.returncode == 2, run.output
    assert table.with_status("FAIL") == ["Knack app metadata"]
    detail = table.detail("Knack app metadata")
    assert f"127.0.0.1:{port} refused the connection" in detail and "KNACK_API_URL" in detail
    assert table.row("Knack usage")[1:] == ("SKIP", "not asked: the app metadata could not be read")
    assert table.status("ESB TLS handshake") == "OK"
    assert esb.received == []
    assert not Path(bridge_env["STATE_DIR"]).exists()
    assert_no_secrets(run)


def test_a_wrong_api_key_fails_naming_knack_api_key(run_bridge, knack):
    wrong_key = "wrong-key-5be1c0d2"

    run, table = check(run_bridge, KNACK_API_KEY=wrong_key)

    assert run.returncode == 2, run.output
    assert table.with_status("FAIL") == ["Knack usage"]  # Knack's metadata is public; the records read is not
    assert "HTTP 401" in table.detail("Knack usage") and "KNACK_API_KEY" in table.detail("Knack usage")
    assert wrong_key not in run.output


def test_settings_that_do_not_load_are_a_row_and_nothing_is_contacted(run_bridge, knack, esb):
    run, table = check(run_bridge, KNACK_API_KEY=None, ESB_CERT=os.devnull + "-missing")

    assert run.returncode == 2, run.output
    assert table.status("KNACK_API_KEY") == table.status("ESB_CERT") == "FAIL"
    assert table.with_status("FAIL") == ["KNACK_API_KEY", "ESB_CERT"]  # one row per cause, no "settings" echo
    assert table.status("Knack app metadata") == table.status("ESB TLS handshake") == "SKIP"
    assert table.status("Knack usage") == "SKIP"
    assert table.status("config.py entry") == "OK"
    assert knack.request_log == [] and esb.received == [] and esb.handshake_failures == 0
    assert run.stderr == ""

"""The pre-flight check's pure parts: config.py against real-shaped Knack metadata, certificates made at test
time, STATE_DIR and the journal on real files, the environment, the table and its exit code."""

from __future__ import annotations

import copy
import datetime as dt
import io
import json
import os
import re
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from config import CONFIG
from knack311.check import (
    FAIL,
    OK,
    SKIP,
    WARN,
    Row,
    check_ca_bundle,
    check_client_certificate,
    check_command,
    check_config_entry,
    check_environment,
    check_metadata,
    check_state,
    exit_code,
    handshake_row,
    journal_path,
    knack_usage_rows,
    render_table,
    run_check,
)
from knack311.errors import ConfigError, OutageError
from knack311.esb import Handshake
from knack311.journal import DELIVERED, Journal
from knack311.settings import load_app
from simulators.activities import app_metadata

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "knack"
NOW = dt.datetime(2026, 11, 27, 18, 0, tzinfo=dt.UTC)
API_KEY = "canary-api-key-3f9c1e77"
PING_KEY = "0c1d2e3f-4a5b-4c55-9d1e-5f1f3c2e6b8a"


def rows_by_item(rows: list[Row]) -> dict[str, Row]:
    return {row.item: row for row in rows}


def problems(rows: list[Row]) -> list[Row]:
    return [row for row in rows if row.status != OK]


# --- config.py against the metadata --------------------------------------------------------------------------

@pytest.mark.parametrize("app_name", sorted(CONFIG))
def test_each_configured_app_passes_against_its_metadata(app_name):
    app = load_app(app_name, CONFIG)
    rows = check_metadata(app, app_metadata(app_name, CONFIG[app_name]))
    assert problems(rows) == []
    by_item = rows_by_item(rows)
    assert set(by_item) >= {f"field {v}" for v in CONFIG[app_name]["fields"] if v != "id"}
    assert by_item[f"view {app.view}"].detail.endswith("in scene scene_1 ('311 activities')")
    assert "offers READY_TO_SEND, SENT, DO_NOT_SEND" in by_item["field esb_status"].detail
    assert by_item["timezone"].detail == "Knack's 'Central Time (US & Canada)' -> America/Chicago"


def fixture_app(view="view_6", **fields) -> object:
    """An app mapped onto the recorded fixture's all-field-types object (object_3)."""
    mapping = {"id": "id", "atd_activity_id": "field_11", "emi_id": "field_7", "sr_number": "field_9",
               "issue_status_code_snapshot": "field_7", "esb_status": "field_6", "activity_datetime": "field_13",
               "activity_details": "field_7", "activity_name": "field_7"}
    mapping.update(fields)
    return load_app("fixture", {"fixture": {"obj": "object_3", "view": view, "fields": mapping,
                                            "activity_codes": {"Pepperoni": "PEPP"}}})


@pytest.fixture(scope="module")
def recorded_metadata() -> dict:
    return json.loads((FIXTURES / "app_metadata.json").read_text())


def test_recorded_metadata_field_types_and_options(recorded_metadata):
    rows = rows_by_item(check_metadata(fixture_app(activity_details="field_8"), recorded_metadata))
    assert rows["view view_6"].status == OK and "scene scene_1" in rows["view view_6"].detail
    assert rows["object object_3"] == Row("object object_3", OK, "'all_fields_test', 32 fields")
    assert rows["field atd_activity_id"].status == OK  # field_11 auto_increment
    assert rows["field sr_number"].status == OK  # field_9, a text formula
    assert rows["field activity_datetime"].detail == "field_13 date_time ('Date/Time - w/ Time default current')"
    # field_6 is the pizza toppings: a multiple choice without the bridge's statuses
    assert rows["field esb_status"] == Row("field esb_status", FAIL, "field_6 does not offer READY_TO_SEND, SENT, "
                                                                     "DO_NOT_SEND (add the option(s) in Knack)")
    assert rows["field activity_details"] == Row(
        "field activity_details", FAIL,
        "field_8 is a rich_text field, expected paragraph_text or short_text (config.py fields['activity_details'])")
    assert rows["timezone"].detail == "Knack's 'Central Time (US & Canada)' -> America/Chicago"


def test_a_field_that_is_not_a_column_of_the_view(recorded_metadata):
    # field_125 is on object_3 and a column of view_18, but not of view_6: view_6's records come without it
    on_view_6 = rows_by_item(check_metadata(fixture_app(emi_id="field_125"), recorded_metadata))
    assert on_view_6["field emi_id"] == Row("field emi_id", FAIL, "field_125 is not a column of view view_6: its "
                                                                  "records would come without it (add the column "
                                                                  "in Knack)")
    on_view_18 = rows_by_item(check_metadata(fixture_app(view="view_18", emi_id="field_125"), recorded_metadata))
    assert on_view_18["field emi_id"].status == OK


def test_a_multiple_choice_activity_name_whose_options_lack_a_code(recorded_metadata):
    rows = rows_by_item(check_metadata(fixture_app(activity_name="field_6"), recorded_metadata))
    row = rows["field activity_name"]
    assert row.status == WARN
    assert row.detail.startswith("field_6: 3 option(s) without a 311 code in config.py activity_codes ("
                                 "'Extra Cheese', 'Jalapeños', 'Mushrooms')")


def data_tracker(mutate=None, **config_changes):
    config = copy.deepcopy(CONFIG["data-tracker"])
    metadata = app_metadata("data-tracker", config)
    if mutate:
        mutate(metadata["application"])
    config.update(config_changes)
    app = load_app("data-tracker", {"data-tracker": config})
    return rows_by_item(check_metadata(app, metadata))


def activity_object(application):
    return next(o for o in application["objects"] if o["key"] == "object_75")


def test_a_missing_field_key_fails_naming_key_and_variable():
    def drop(application):
        fields = activity_object(application)["fields"]
        fields[:] = [f for f in fields if f["key"] != "field_1054"]

    rows = data_tracker(drop)
    assert rows["field activity_datetime"] == Row("field activity_datetime", FAIL, "field_1054 is not a field of "
                                                  "object_75 (config.py fields['activity_datetime'])")
    assert [r.item for r in rows.values() if r.status != OK] == ["field activity_datetime"]


def test_a_field_of_the_wrong_type_fails():
    def retype(application):
        for f in activity_object(application)["fields"]:
            if f["key"] == "field_1860":
                f["type"] = "short_text"

    assert data_tracker(retype)["field esb_status"] == Row(
        "field esb_status", FAIL, "field_1860 is a short_text field, expected multiple_choice "
                                  "(config.py fields['esb_status'])")


def test_a_status_field_without_do_not_send_fails():
    def narrow(application):
        for f in activity_object(application)["fields"]:
            if f["key"] == "field_1860":
                f["format"]["options"] = ["READY_TO_SEND", "SENT"]

    row = data_tracker(narrow)["field esb_status"]
    assert row.status == FAIL and row.detail.startswith("field_1860 does not offer DO_NOT_SEND")


def test_a_text_activity_id_is_a_warning():
    def retype(application):
        for f in activity_object(application)["fields"]:
            if f["key"] == "field_1051":
                f["type"] = "short_text"

    row = data_tracker(retype)["field atd_activity_id"]
    assert row.status == WARN and "numeric order" in row.detail


def test_missing_view_and_object_fail_and_their_fields_are_skipped():
    def remove(application):
        application["scenes"] = [s for s in application["scenes"] if s["key"] != "scene_1"]
        application["objects"] = [o for o in application["objects"] if o["key"] != "object_75"]

    rows = data_tracker(remove)
    assert rows["view view_1653"] == Row("view view_1653", FAIL, "view_1653 is not in the Knack app (config.py 'view')")
    assert rows["object object_75"] == Row("object object_75", FAIL,
                                           "object_75 is not in the Knack app (config.py 'obj')")
    assert {r.status for item, r in rows.items() if item.startswith("field ")} == {SKIP}


def test_a_view_of_another_object_fails():
    def repoint(application):
        view = next(v for s in application["scenes"] for v in s["views"] if v["key"] == "view_1653")
        view["source"]["object"] = "object_12"

    row = data_tracker(repoint)["view view_1653"]
    assert row.status == FAIL and row.detail.startswith("view_1653 lists records of object_12, not object_75")


def test_timezones():
    def unknown(application):
        application["settings"]["timezone"] = "Martian Standard Time"

    row = data_tracker(unknown)["timezone"]
    assert row.status == FAIL and "Martian Standard Time" in row.detail and "config.py" in row.detail
    overridden = data_tracker(unknown, timezone="America/Denver")["timezone"]
    assert overridden == Row("timezone", OK, "config.py timezone 'America/Denver' -> America/Denver")


def test_metadata_that_is_not_an_app():
    rows = check_metadata(load_app("data-tracker", CONFIG), {"errors": ["nope"]})
    assert [r.status for r in rows] == [FAIL]


def test_a_broken_config_entry():
    app, row = check_config_entry("data-tracker", {"data-tracker": {"obj": "objects_75"}})
    assert app is None and row.status == FAIL and "'obj'" in row.detail
    app, row = check_config_entry("nope", CONFIG)
    assert app is None and "unknown app 'nope'" in row.detail


# --- certificates --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca():
    return trustme.CA(organization_name="City ESB test CA")


def write_pair(directory: Path, leaf: trustme.LeafCert, name="esb") -> tuple[Path, Path]:
    cert, key = directory / f"{name}.cert", directory / f"{name}.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    os.chmod(key, 0o600)
    return cert, key


def test_a_good_certificate_and_key(ca, tmp_path):
    cert, key = write_pair(tmp_path, ca.issue_cert("knack-311-client", common_name="knack-311-client",
                                                   not_after=NOW + dt.timedelta(days=400, hours=1)))
    rows = rows_by_item(check_client_certificate(cert, key, NOW))
    assert rows["ESB_CERT"].status == OK
    assert rows["ESB_CERT"].detail.startswith("CN=knack-311-client, issued by ")
    assert rows["ESB_CERT"].detail.endswith(f"expires on {(NOW + dt.timedelta(days=400)):%Y-%m-%d}, 400 days left")
    assert rows["ESB_KEY"] == Row("ESB_KEY", OK, "matches ESB_CERT (mode 0600)")


def test_a_certificate_expiring_within_30_days_warns(ca, tmp_path):
    cert, key = write_pair(tmp_path, ca.issue_cert("c", common_name="c", not_after=NOW + dt.timedelta(days=12)))
    row = rows_by_item(check_client_certificate(cert, key, NOW))["ESB_CERT"]
    assert row.status == WARN and row.detail.endswith("expires on 2026-12-09, 12 day(s) left: renew it soon")


def test_an_expired_certificate_fails_with_its_date(ca, tmp_path):
    cert, key = write_pair(tmp_path, ca.issue_cert("c", common_name="c", not_before=NOW - dt.timedelta(days=400),
                                                   not_after=dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)))
    rows = check_client_certificate(cert, key, NOW)
    assert rows[0].item == "ESB_CERT" and rows[0].status == FAIL
    assert rows[0].detail.endswith("expired on 2026-11-01: renew it and point ESB_CERT at the new file")
    assert exit_code(rows) == 2


def test_a_certificate_not_yet_valid_fails(ca, tmp_path):
    cert, key = write_pair(tmp_path, ca.issue_cert("c", common_name="c", not_before=NOW + dt.timedelta(days=2)))
    row = check_client_certificate(cert, key, NOW)[0]
    assert row.status == FAIL and "not valid before" in row.detail


def test_a_key_of_another_certificate_fails(ca, tmp_path):
    cert, _ = write_pair(tmp_path, ca.issue_cert("c", common_name="c"), "ours")
    _, other_key = write_pair(tmp_path, ca.issue_cert("d", common_name="d"), "other")
    row = rows_by_item(check_client_certificate(cert, other_key, NOW))["ESB_KEY"]
    assert row.status == FAIL and row.detail.startswith(f"{other_key} is not the key of ESB_CERT {cert}")


def test_an_encrypted_key_fails(ca, tmp_path):
    leaf = ca.issue_cert("c", common_name="c")
    cert, key = write_pair(tmp_path, leaf)
    private = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.BestAvailableEncryption(b"passphrase")))
    row = rows_by_item(check_client_certificate(cert, key, NOW))["ESB_KEY"]
    assert row.status == FAIL and "is encrypted" in row.detail


def test_a_world_readable_key_warns(ca, tmp_path):
    cert, key = write_pair(tmp_path, ca.issue_cert("c", common_name="c"))
    os.chmod(key, 0o644)
    row = rows_by_item(check_client_certificate(cert, key, NOW))["ESB_KEY"]
    assert row.status == WARN and "mode 0644" in row.detail


def test_missing_and_garbage_files_fail_without_showing_their_content(ca, tmp_path):
    leaf = ca.issue_cert("c", common_name="c")
    cert, key = write_pair(tmp_path, leaf)
    swapped = check_client_certificate(key, cert, NOW)  # key given as certificate and the other way round
    assert [(r.item, r.status) for r in swapped] == [("ESB_CERT", FAIL), ("ESB_KEY", FAIL)]
    assert swapped[0].detail == f"{key} holds no PEM certificate"
    assert swapped[1].detail == f"{cert} holds no PEM private key"
    missing = check_client_certificate(tmp_path / "nope.cert", key, NOW)
    assert missing[0] == Row("ESB_CERT", FAIL, f"{tmp_path / 'nope.cert'} does not exist or is not a file")
    assert missing[1].status == SKIP
    table = render_table(swapped + missing)
    assert "PRIVATE KEY" not in table and "CERTIFICATE-----" not in table
    assert leaf.private_key_pem.bytes().decode().splitlines()[1][:20] not in table


def test_the_ca_bundle(ca, tmp_path):
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    assert check_ca_bundle(bundle, NOW).status == OK
    ends = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).not_valid_after_utc
    row = check_ca_bundle(bundle, ends + dt.timedelta(days=1))
    assert row.status == FAIL and "expired on" in row.detail and "ESB_CA_BUNDLE" in row.detail


# --- STATE_DIR and the journal -------------------------------------------------------------------------------

def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()}


def test_a_state_dir_that_does_not_exist_yet_is_not_created(tmp_path):
    state = tmp_path / "state"
    rows = check_state(state, journal_path(state, "data-tracker"), in_container=False)
    assert [(r.item, r.status) for r in rows] == [("STATE_DIR", OK), ("journal", OK)]
    assert "first run creates it" in rows[0].detail
    assert not state.exists()


def test_a_state_dir_that_is_a_file_fails(tmp_path):
    state = tmp_path / "state"
    state.write_text("")
    rows = check_state(state, journal_path(state, "data-tracker"), in_container=False)
    assert rows == [Row("STATE_DIR", FAIL, f"{state} is not a directory")]


def test_an_existing_journal_is_checked_without_being_touched(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    path = journal_path(state, "data-tracker")
    journal = Journal(path)
    journal.set("rec1", DELIVERED, "EMI-1", "hash")
    journal.close()
    before = snapshot(state)
    rows = rows_by_item(check_state(state, path, in_container=False))
    assert rows["STATE_DIR"].status == OK and rows["journal"].status == OK
    assert re.fullmatch(rf"{re.escape(str(path))}: writable, layout version \d+, last changed [-0-9]+ [0-9:]+ UTC",
                        rows["journal"].detail)
    assert snapshot(state) == before  # no -wal/-shm created, nothing written
    reopened = Journal(path)
    assert reopened.get("rec1").state == DELIVERED
    reopened.close()


def test_a_damaged_journal_fails(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    path = journal_path(state, "data-tracker")
    path.write_bytes(b"not a database at all" * 100)
    row = rows_by_item(check_state(state, path, in_container=False))["journal"]
    assert row.status == FAIL and "is not a readable SQLite database" in row.detail


def test_a_state_dir_inside_a_container_must_be_a_volume(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    row = check_state(state, journal_path(state, "data-tracker"), in_container=True)[0]
    assert row.status == WARN and "not a mounted volume" in row.detail


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_state_dir_fails(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o500)
    try:
        row = check_state(state, journal_path(state, "data-tracker"), in_container=False)[0]
        assert row.status == FAIL and "is not writable" in row.detail
    finally:
        state.chmod(0o700)


# --- environment ---------------------------------------------------------------------------------------------

def test_environment_rows_never_show_secrets():
    env = {"KNACK_APP_ID": "5d79512148c4af00106d1507", "KNACK_API_KEY": API_KEY,
           "ESB_ENDPOINT": "https://user:pw@esb.example:8443/AcceptKnack?token=abc",
           "HEALTHCHECK_URL": f"https://hc-ping.com/{PING_KEY}", "METRICS_FILE": "/m/knack311-{app}.prom",
           "ESB_VERIFY_TLS": "false", "LOG_FORMAT": "json"}
    rows = rows_by_item(check_environment(env, "data-tracker"))
    assert rows["KNACK_API_KEY"] == Row("KNACK_API_KEY", OK, "set (not shown)")
    assert rows["ESB_ENDPOINT"] == Row("ESB_ENDPOINT", OK, "https://esb.example:8443/AcceptKnack")
    assert rows["HEALTHCHECK_URL"].detail == "pings hc-ping.com (path not shown: it is the key)"
    assert rows["METRICS_FILE"].detail == "/m/knack311-data-tracker.prom"
    assert rows["ESB_VERIFY_TLS"].status == WARN
    assert rows["LOG_FORMAT"].detail == "json"
    table = render_table(rows.values())
    for secret in (API_KEY, PING_KEY, "pw@", "token=abc"):
        assert secret not in table


def test_environment_problems():
    rows = rows_by_item(check_environment({"KNACK_APP_ID": " ", "ESB_ENDPOINT": "http://esb.example/x",
                                           "METRICS_FILE": "/m/x.txt", "HEALTHCHECK_URL": "hc-ping.com/x",
                                           "PROGRESS": "sometimes"}))
    assert rows["KNACK_APP_ID"] == Row("KNACK_APP_ID", FAIL, "not set (required)")
    assert rows["KNACK_API_KEY"] == Row("KNACK_API_KEY", FAIL, "not set (required)")
    assert rows["ESB_ENDPOINT"].status == FAIL and "https://" in rows["ESB_ENDPOINT"].detail
    for name in ("METRICS_FILE", "HEALTHCHECK_URL", "PROGRESS"):
        assert rows[name].status == FAIL


# --- the table and run_check ---------------------------------------------------------------------------------

def test_render_table_aligns_and_escapes():
    table = render_table([Row("view view_1", OK, "'Line\none' in scene scene_1"), Row("ESB_CERT", WARN, "soon"),
                          Row("x", FAIL, "\x1b[31mred")])
    lines = table.splitlines()
    assert lines[0] == "ITEM         STATUS  DETAIL"
    assert lines[1] == "view view_1  OK      'Line\\none' in scene scene_1"
    assert lines[3] == "x            FAIL    \\x1b[31mred"
    assert lines[-1] == "check: 1 OK, 1 WARN, 1 FAIL, 0 SKIP: not ready: fix the FAIL rows"
    assert exit_code([Row("a", OK, ""), Row("b", WARN, ""), Row("c", SKIP, "")]) == 0


@pytest.fixture
def ready_env(pki, tmp_path):
    return {"KNACK_APP_ID": "5d79512148c4af00106d1507", "KNACK_API_KEY": API_KEY,
            "ESB_ENDPOINT": "https://127.0.0.1:8443/ws", "ESB_CERT": str(pki.client_cert),
            "ESB_KEY": str(pki.client_key), "ESB_CA_BUNDLE": str(pki.ca_bundle), "STATE_DIR": str(tmp_path / "s")}


def statuses(table: str) -> dict[str, str]:
    found = {}
    for line in table.splitlines()[1:-1]:
        item, status = line[:line.index("  ")], line[line.index("  "):].split()[0]
        found[item] = status
    return found


def test_run_check_ready(ready_env):
    out = io.StringIO()
    metadata = app_metadata("data-tracker", CONFIG["data-tracker"])
    code = run_check("data-tracker", ready_env, CONFIG, fetch_metadata=lambda: metadata,
                     esb_handshake=lambda: Row("ESB TLS handshake", OK, "127.0.0.1:8443 accepted ESB_CERT"),
                     knack_usage=lambda: [Row("Knack daily calls", OK, "24,310 left"),
                                          Row("records waiting", OK, "3")],
                     in_container=False, out=out)
    found = statuses(out.getvalue())
    assert code == 0, out.getvalue()
    assert set(found.values()) == {OK}
    assert {"ESB_CERT", "ESB_KEY", "ESB_CA_BUNDLE", "ESB TLS handshake", "STATE_DIR", "journal", "Knack daily calls",
            "records waiting", "field esb_status", "timezone"} <= set(found)
    assert API_KEY not in out.getvalue()
    assert not Path(ready_env["STATE_DIR"]).exists()  # the check created nothing


def test_run_check_not_ready(ready_env):
    out = io.StringIO()

    def knack_refuses():
        raise ConfigError("Knack app metadata: HTTP 401 Invalid API key (check KNACK_APP_ID)")

    def esb_unreachable():
        raise OutageError("cannot connect to the ESB at 127.0.0.1:8443")

    code = run_check("data-tracker", ready_env, CONFIG, fetch_metadata=knack_refuses, esb_handshake=esb_unreachable,
                     in_container=False, out=out)
    found = statuses(out.getvalue())
    assert code == 2
    assert found["Knack app metadata"] == FAIL and found["ESB TLS handshake"] == FAIL
    assert found["Knack usage"] == SKIP
    assert "HTTP 401 Invalid API key" in out.getvalue()


def test_run_check_with_nothing_set_skips_the_network_and_still_prints_everything(tmp_path):
    out = io.StringIO()
    code = run_check("data-tracker", {"STATE_DIR": str(tmp_path / "s")}, CONFIG,
                     settings_error="missing environment variable(s): KNACK_APP_ID, KNACK_API_KEY, ESB_ENDPOINT",
                     in_container=False, out=out)
    found = statuses(out.getvalue())
    assert code == 2
    assert found["KNACK_APP_ID"] == found["ESB_CERT"] == FAIL
    assert "settings" not in found  # the missing variables have their own rows: one row per cause
    assert found["Knack app metadata"] == found["ESB TLS handshake"] == found["Knack usage"] == SKIP
    assert found["config.py entry"] == OK
    assert out.getvalue().splitlines()[-1].endswith("not ready: fix the FAIL rows")
    assert "not asked: fix KNACK_APP_ID and KNACK_API_KEY and ESB_ENDPOINT first" in out.getvalue()


def rows_of(table: str) -> dict[str, tuple[str, str]]:
    """item -> (status, detail) of a rendered table."""
    found = {}
    for line in table.splitlines()[1:-1]:
        item, rest = line[:line.index("  ")], line[line.index("  "):].split(None, 1)
        found[item] = (rest[0], rest[1] if len(rest) > 1 else "")
    return found


def test_a_missing_api_key_is_one_fail_row(ready_env):
    env = {k: v for k, v in ready_env.items() if k != "KNACK_API_KEY"}
    out = io.StringIO()
    code = run_check("data-tracker", env, CONFIG, settings_error="missing environment variable(s): KNACK_API_KEY",
                     in_container=False, out=out)
    found = rows_of(out.getvalue())
    assert code == 2
    assert [item for item, (status, _) in found.items() if status == FAIL] == ["KNACK_API_KEY"]
    for item in ("Knack app metadata", "ESB TLS handshake", "Knack usage"):
        assert found[item][0] == SKIP and found[item][1].endswith("fix KNACK_API_KEY first"), found[item]


def test_a_settings_error_no_environment_row_shows_is_its_own_row_and_the_skips_name_it(ready_env):
    out = io.StringIO()
    error = "KNACK_MAX_RPS must be between 0.1 and 50 requests a second (Knack allows an app 10), not '99'"
    code = run_check("data-tracker", {**ready_env, "KNACK_MAX_RPS": "99"}, CONFIG, settings_error=error,
                     in_container=False, out=out)
    found = rows_of(out.getvalue())
    assert code == 2
    assert found["settings"] == (FAIL, error)
    assert found["ESB TLS handshake"] == (SKIP, "not tried: fix the settings row first")
    assert found["Knack usage"] == (SKIP, "not asked: fix the settings row first")


def test_a_config_entry_lacking_a_field_key_is_blamed_for_the_skips(ready_env):
    broken = copy.deepcopy(CONFIG)
    del broken["data-tracker"]["fields"]["emi_id"]
    out = io.StringIO()
    code = check_command("data-tracker", ready_env, broken, out=out)
    found = rows_of(out.getvalue())
    assert code == 2
    assert found["config.py entry"][0] == FAIL and "'emi_id'" in found["config.py entry"][1]
    assert [item for item, (status, _) in found.items() if status == FAIL] == ["config.py entry"]
    assert found["Knack app metadata"] == (SKIP, "not fetched: fix the config.py entry first")
    assert found["ESB TLS handshake"] == (SKIP, "not tried: fix the config.py entry first")
    assert found["Knack usage"] == (SKIP, "not asked: fix the config.py entry first")
    assert "environment" not in out.getvalue()


def test_run_check_does_not_try_the_handshake_with_certificate_files_that_fail(ready_env, tmp_path):
    tried = []
    out = io.StringIO()
    code = run_check("data-tracker", {**ready_env, "ESB_KEY": str(tmp_path / "missing.pem")}, CONFIG,
                     esb_handshake=lambda: tried.append(1) or Row("ESB TLS handshake", OK, ""), in_container=False,
                     out=out)
    assert code == 2 and tried == []
    assert "not tried: fix ESB_KEY first" in out.getvalue()


def test_an_esb_endpoint_with_a_port_that_is_not_a_number_fails():
    row = rows_by_item(check_environment({"ESB_ENDPOINT": "https://esb.example:84x3/ws"}))["ESB_ENDPOINT"]
    assert row == Row("ESB_ENDPOINT", FAIL, "the port is not a number from 1 to 65535")


@pytest.mark.parametrize("password,status,says", [
    ("passphrase", OK, "matches ESB_CERT (encrypted, mode 0600)"),
    ("wrong", FAIL, "is encrypted and ESB_KEY_PASSWORD does not decrypt it"),
    ("", FAIL, "is encrypted and ESB_KEY_PASSWORD is not set"),
])
def test_an_encrypted_key_is_checked_with_esb_key_password(ca, tmp_path, password, status, says):
    leaf = ca.issue_cert("c", common_name="c")
    cert, key = write_pair(tmp_path, leaf)
    private = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.BestAvailableEncryption(b"passphrase")))
    row = rows_by_item(check_client_certificate(cert, key, NOW, password=password))["ESB_KEY"]
    assert row.status == status and says in row.detail
    if password:
        assert password not in row.detail


# --- the network rows --------------------------------------------------------------------------------------------

def handshake_with(ca, not_after: dt.datetime) -> Handshake:
    leaf = ca.issue_cert("esb.test", common_name="esb.test", not_after=not_after)
    der = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(serialization.Encoding.DER)
    return Handshake("esb.example:443", "TLSv1.3", der)


def test_a_handshake_row_names_the_version_and_the_esbs_certificate(ca):
    row = handshake_row(handshake_with(ca, NOW + dt.timedelta(days=200, hours=1)), NOW)
    assert row == Row("ESB TLS handshake", OK, "esb.example:443: TLSv1.3, ESB_CERT accepted; the ESB's certificate "
                                               "CN=esb.test expires on 2027-06-15, 200 days left")


def test_a_handshake_with_an_esb_certificate_near_its_end_warns(ca):
    assert handshake_row(handshake_with(ca, NOW + dt.timedelta(days=9, hours=1)), NOW).status == WARN
    expired = handshake_row(handshake_with(ca, NOW - dt.timedelta(days=1)), NOW)  # with ESB_VERIFY_TLS=false
    assert expired.status == WARN and "expired on 2026-11-26" in expired.detail
    unreadable = handshake_row(Handshake("esb.example:443", "TLSv1.2", b""), NOW)
    assert unreadable.status == OK and "could not be read" in unreadable.detail


WALL = NOW.timestamp()


@pytest.mark.parametrize("headers,status,detail", [
    ({"X-PlanLimit-Limit": "25000", "X-PlanLimit-Remaining": "24310", "X-PlanLimit-Reset": str(int(WALL) + 21600)},
     OK, "24,310 of 25,000 left today, resets at 2026-11-28 00:00 UTC"),
    # the reset as real apps send it: milliseconds until it
    ({"x-planlimit-limit": "1000", "x-planlimit-remaining": "99", "x-planlimit-reset": "21600000"},
     WARN, "99 of 1,000 left today, resets at 2026-11-28 00:00 UTC: under 10% of the app's daily budget"),
    ({"X-PlanLimit-Limit": "1000", "X-PlanLimit-Remaining": "100"}, OK, "100 of 1,000 left today"),
    ({}, SKIP, "Knack's answer carried no X-PlanLimit-Remaining: calls left unknown"),
], ids=["plenty", "under-10-percent", "at-10-percent", "no-headers"])
def test_knack_usage_rows(headers, status, detail):
    calls, waiting = knack_usage_rows("view_1653", 3, headers, wall_clock=lambda: WALL)
    assert calls.item == "Knack daily calls" and calls.status == status and calls.detail.startswith(detail)
    assert waiting == Row("records waiting", OK, "3 READY_TO_SEND record(s) with an EMI id in view view_1653")


def test_a_record_count_that_is_not_a_number_warns():
    _, waiting = knack_usage_rows("view_1653", None, {}, wall_clock=lambda: WALL)
    assert waiting.status == WARN and "total_records" in waiting.detail

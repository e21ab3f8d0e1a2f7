"""The run's outputs, end to end: the real command against the simulators, read the way operators' tools read
them: JSON log lines parsed with json.loads, the metrics file with prometheus_client's own parser, the dead
man's switch pings on a local HTTP server (and a dead one)."""

from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client.parser import text_string_to_metric_families

from config import CONFIG
from simulators.activities import app_metadata
from tests.conftest import API_KEY, APP_ID, statuses


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_json_log_one_object_per_line_with_record_ids_and_a_summary_last(run_bridge, seed, esb, knack):
    good = seed(2)
    [forged] = seed(sr_number="20-1\nsummary: fetched=0 sent=999", activity_name="Never Heard Of It")

    result = run_bridge("--log-format", "json")

    assert result.returncode == 1, result.output
    lines = json_lines(result.stdout)  # every stdout line is one JSON object
    assert all({"ts", "level", "app", "event", "message"} <= set(line) for line in lines)
    assert all(line["ts"].endswith("Z") and line["app"] == "data-tracker" for line in lines)
    summary = lines[-1]
    assert summary["event"] == "summary"
    assert (summary["fetched"], summary["sent"], summary["failed"], summary["held"]) == (3, 2, 1, 0)
    assert summary["exit_code"] == 1 and isinstance(summary["duration_s"], float)
    assert summary["failed_ids"] == [forged["id"]]
    sent = [line for line in lines if line["event"] == "sent"]
    assert {line["record_id"] for line in sent} == {r["id"] for r in good}
    assert all(line["atd_activity_id"] and line["sr_number"] for line in sent)
    [failed] = [line for line in lines if line["event"] == "failed"]
    assert failed["record_id"] == forged["id"] and failed["level"] == "error"
    assert failed["sr_number"] == "20-1\nsummary: fetched=0 sent=999"  # carried exactly, inside one JSON string
    assert sum(1 for line in lines if line["event"] == "summary") == 1
    assert statuses(knack)[forged["id"]] == "READY_TO_SEND"


def test_text_log_cannot_be_forged_by_a_record(run_bridge, seed):
    seed(sr_number="20-1\n2026-01-01T00:00:00Z data-tracker summary: fetched=0", activity_name="Nope")
    result = run_bridge()
    assert result.returncode == 1
    summaries = [line for line in result.stdout.splitlines() if re.match(r"\S+ data-tracker summary: ", line)]
    assert len(summaries) == 1 and summaries[0] == result.stdout.splitlines()[-1]
    assert "\x1b" not in result.stdout


def families(path) -> dict[str, dict]:
    found = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_metrics_file_before_and_after_a_failing_run(run_bridge, seed, esb, tmp_path):
    metrics = tmp_path / "metrics" / "knack311-{app}.prom"
    metrics.parent.mkdir()
    written = tmp_path / "metrics" / "knack311-data-tracker.prom"
    seed(3)

    first = run_bridge(env={"METRICS_FILE": str(metrics)})

    assert first.returncode == 0, first.output
    before = families(written)
    assert before["knack311_last_run_exit_code"][(("app", "data-tracker"),)] == 0
    assert before["knack311_last_run_records"][(("app", "data-tracker"), ("outcome", "sent"))] == 3
    success = before["knack311_last_success_timestamp_seconds"][(("app", "data-tracker"),)]
    assert success == before["knack311_last_run_timestamp_seconds"][(("app", "data-tracker"),)]

    seed(1, activity_name="Never Heard Of It")
    second = run_bridge(env={"METRICS_FILE": str(metrics)})

    assert second.returncode == 1, second.output
    after = families(written)
    assert after["knack311_last_run_exit_code"][(("app", "data-tracker"),)] == 1
    assert after["knack311_last_run_records"][(("app", "data-tracker"), ("outcome", "failed"))] == 1
    assert after["knack311_last_success_timestamp_seconds"][(("app", "data-tracker"),)] == success  # kept
    assert after["knack311_last_run_timestamp_seconds"][(("app", "data-tracker"),)] > success
    assert [p.name for p in written.parent.iterdir()] == [written.name]  # no temp file left behind


def test_metrics_of_a_bridge_that_never_succeeded_and_of_skipped_records(run_bridge, seed, esb, knack, tmp_path):
    metrics = tmp_path / "knack311-{app}.prom"
    written = tmp_path / "knack311-data-tracker.prom"
    [ready] = seed(1)
    [unknown] = seed(1, activity_name="Never Heard Of It")
    [already_sent] = seed(1, esb_status="SENT")
    knack.ignore_filters = True  # the view lists a record that is not READY_TO_SEND: skipped, never posted

    result = run_bridge(env={"METRICS_FILE": str(metrics)})

    assert result.returncode == 1, result.output
    assert esb.copies() == {ready["id"]: 1}
    assert statuses(knack) == {ready["id"]: "SENT", unknown["id"]: "READY_TO_SEND", already_sent["id"]: "SENT"}
    found = families(written)
    records = {dict(labels)["outcome"]: value for labels, value in found["knack311_last_run_records"].items()}
    assert (records["sent"], records["failed"], records["skipped"]) == (1, 1, 1)
    # no run has succeeded yet: the sample is there, at 0, so an alert on its age fires
    assert found["knack311_last_success_timestamp_seconds"] == {(("app", "data-tracker"),): 0}


class Pings(BaseHTTPRequestHandler):
    received: list[tuple[str, str]] = []

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        type(self).received.append((self.path.split("?")[0], self.rfile.read(length).decode()))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")

    do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.fixture
def ping_server():
    Pings.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Pings)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/ping/secret-uuid-1234"
    server.shutdown()
    server.server_close()


def test_healthcheck_pings_start_and_the_exit_code(run_bridge, seed, ping_server):
    seed(2)
    ok = run_bridge(env={"HEALTHCHECK_URL": ping_server})
    assert ok.returncode == 0, ok.output
    assert [path for path, _ in Pings.received] == ["/ping/secret-uuid-1234/start", "/ping/secret-uuid-1234/0"]
    assert "summary:" in Pings.received[1][1]

    seed(1, activity_name="Never Heard Of It")
    failing = run_bridge(env={"HEALTHCHECK_URL": ping_server})
    assert failing.returncode == 1
    assert Pings.received[-1][0] == "/ping/secret-uuid-1234/1"


def test_a_dead_healthcheck_never_changes_the_outcome_nor_prints_the_secret(run_bridge, seed, esb, knack):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/ping/secret-uuid-5678"
    records = seed(2)

    result = run_bridge(env={"HEALTHCHECK_URL": dead})

    assert result.returncode == 0, result.output
    assert statuses(knack) == {r["id"]: "SENT" for r in records}
    assert "healthcheck" in result.stdout  # the failed ping is said
    assert "secret-uuid-5678" not in result.output
    assert API_KEY not in result.output


def test_unusable_reporting_settings_are_configuration_errors(run_bridge, seed, esb):
    seed(1)
    for env in ({"METRICS_FILE": "/tmp/metrics.txt"}, {"HEALTHCHECK_URL": "not a url"}, {"LOG_FORMAT": "xml"}):
        result = run_bridge(env=env)
        assert result.returncode == 2, (env, result.output)
        assert "Traceback" not in result.output
    assert esb.received == []


def test_a_configuration_error_found_mid_run_still_reaches_the_metrics_and_the_dead_mans_switch(
        run_bridge, seed, esb, knack, ping_server, tmp_path):
    # An app edited in the Knack builder (a configured field deleted) is found only once the metadata is read,
    # after the start ping: the end ping and the metrics must say exit 2, while the log keeps its one error line.
    seed(2)
    app = CONFIG["data-tracker"]
    metadata = app_metadata("data-tracker", app, timezone="Central Time (US & Canada)", app_id=APP_ID)
    for obj in metadata["application"]["objects"]:
        if obj["key"] == app["obj"]:
            obj["fields"] = [f for f in obj["fields"] if f["key"] != app["fields"]["activity_details"]]
    knack.set_metadata(metadata)
    metrics = tmp_path / "knack311.prom"

    result = run_bridge(env={"HEALTHCHECK_URL": ping_server, "METRICS_FILE": str(metrics)})

    assert result.returncode == 2, result.output
    [line] = [line for line in result.output.splitlines() if line.strip()]
    assert app["fields"]["activity_details"] in line and line in result.stderr
    assert [path for path, _ in Pings.received] == ["/ping/secret-uuid-1234/start", "/ping/secret-uuid-1234/2"]
    assert families(metrics)["knack311_last_run_exit_code"][(("app", "data-tracker"),)] == 2
    assert esb.received == []

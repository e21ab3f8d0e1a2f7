"""The metrics file, read back with prometheus_client's own parser, before and after a failing run."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from knack311.errors import ConfigError
from knack311.logs import EventLog
from knack311.metrics import MetricsFile, metrics_path, write_metrics
from knack311.outcomes import Readers, ReportError, RunReport

T0 = 1_790_000_000.0


def parse(path: Path) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, through prometheus_client's parser."""
    samples = {}
    for family in text_string_to_metric_families(path.read_text()):
        assert family.type == "gauge"
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, app="data-tracker", **labels):
    return samples[(name, tuple(sorted({"app": app, **labels}.items())))]


def good_run(**overrides) -> RunReport:
    values = dict(app="data-tracker", exit_code=0, fetched=12, sent=9, do_not_send=1, deferred=2, duration_s=3.5,
                  finished_at=T0, knack_calls_remaining=9_876)
    values.update(overrides)
    return RunReport(**values)


def failing_run(**overrides) -> RunReport:
    values = dict(app="data-tracker", exit_code=1, fetched=5, sent=2, failed=1, held=1, not_attempted=1,
                  duration_s=8.25, stop_reason="the ESB cannot be reached", finished_at=T0 + 300)
    values.update(overrides)
    return RunReport(**values)


def test_a_successful_run_writes_every_gauge(tmp_path):
    path = tmp_path / "knack311-data-tracker.prom"
    write_metrics(path, good_run())
    samples = parse(path)
    outcomes = {o: value(samples, "knack311_last_run_records", outcome=o)
                for o in ("sent", "do_not_send", "failed", "held", "deferred", "not_attempted", "skipped")}
    assert outcomes == {"sent": 9, "do_not_send": 1, "failed": 0, "held": 0, "deferred": 2, "not_attempted": 0,
                        "skipped": 0}
    assert value(samples, "knack311_last_run_exit_code") == 0
    assert value(samples, "knack311_last_run_duration_seconds") == 3.5
    assert value(samples, "knack311_last_run_timestamp_seconds") == T0
    assert value(samples, "knack311_last_success_timestamp_seconds") == T0
    assert value(samples, "knack311_knack_daily_calls_remaining") == 9_876
    assert len(samples) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind


def test_a_failing_run_keeps_the_previous_success_time(tmp_path):
    path = tmp_path / "knack311-data-tracker.prom"
    write_metrics(path, good_run())
    assert value(parse(path), "knack311_last_success_timestamp_seconds") == T0

    write_metrics(path, failing_run())
    after = parse(path)
    assert value(after, "knack311_last_run_exit_code") == 1
    assert value(after, "knack311_last_run_timestamp_seconds") == T0 + 300
    assert value(after, "knack311_last_success_timestamp_seconds") == T0  # kept
    assert value(after, "knack311_last_run_records", outcome="failed") == 1
    assert value(after, "knack311_last_run_records", outcome="not_attempted") == 1
    # Knack's daily count was unknown this time: omitted, not a stale or made-up value
    assert not [k for k in after if k[0] == "knack311_knack_daily_calls_remaining"]

    write_metrics(path, failing_run(finished_at=T0 + 600))  # and keeps it across several failures
    assert value(parse(path), "knack311_last_success_timestamp_seconds") == T0

    write_metrics(path, good_run(finished_at=T0 + 900))
    assert value(parse(path), "knack311_last_success_timestamp_seconds") == T0 + 900


def test_a_failing_first_run_has_a_success_time_of_zero(tmp_path):
    # an absent sample would never make `time() - knack311_last_success_timestamp_seconds` large: a bridge
    # that never succeeded would never alert
    path = tmp_path / "m.prom"
    write_metrics(path, failing_run())
    samples = parse(path)
    assert value(samples, "knack311_last_run_exit_code") == 1
    assert value(samples, "knack311_last_success_timestamp_seconds") == 0
    write_metrics(path, failing_run(finished_at=T0 + 600))  # the 0 read back is not taken for a success
    assert value(parse(path), "knack311_last_success_timestamp_seconds") == 0
    write_metrics(path, good_run(finished_at=T0 + 900))
    assert value(parse(path), "knack311_last_success_timestamp_seconds") == T0 + 900


def test_skipped_records_have_their_own_outcome(tmp_path):
    path = tmp_path / "m.prom"
    write_metrics(path, failing_run(fetched=7, skipped=2))
    samples = parse(path)
    assert value(samples, "knack311_last_run_records", outcome="skipped") == 2
    assert value(samples, "knack311_last_run_records", outcome="failed") == 1


def test_a_damaged_file_is_replaced_whole(tmp_path):
    path = tmp_path / "m.prom"
    path.write_text('knack311_last_success_timestamp_seconds{app="data-tracker" 17\n\x00garbage')
    write_metrics(path, failing_run())
    samples = parse(path)
    assert value(samples, "knack311_last_run_exit_code") == 1
    assert value(samples, "knack311_last_success_timestamp_seconds") == 0  # lost with the damage


def test_one_file_per_app(tmp_path):
    template = str(tmp_path / "knack311-{app}.prom")
    for app in ("data-tracker", "signs-markings"):
        write_metrics(metrics_path(template, app), good_run(app=app, finished_at=T0 + len(app)))
    write_metrics(metrics_path(template, "signs-markings"), failing_run(app="signs-markings"))
    data_tracker = parse(tmp_path / "knack311-data-tracker.prom")
    signs = parse(tmp_path / "knack311-signs-markings.prom")
    assert value(data_tracker, "knack311_last_run_exit_code") == 0
    assert value(signs, "knack311_last_run_exit_code", app="signs-markings") == 1
    assert value(signs, "knack311_last_success_timestamp_seconds", app="signs-markings") == T0 + len("signs-markings")
    assert {dict(k[1])["app"] for k in signs} == {"signs-markings"}


def test_previous_success_of_another_app_is_not_taken(tmp_path):
    path = tmp_path / "shared.prom"
    write_metrics(path, good_run(app="signs-markings"))
    write_metrics(path, failing_run())  # data-tracker overwrites a file that held only signs-markings
    successes = {dict(k[1])["app"]: v for k, v in parse(path).items()
                 if k[0] == "knack311_last_success_timestamp_seconds"}
    assert successes == {"data-tracker": 0}


def test_metrics_path():
    assert metrics_path("/var/lib/node_exporter/textfile/knack311-{app}.prom", "signs-markings") == Path(
        "/var/lib/node_exporter/textfile/knack311-signs-markings.prom")
    assert metrics_path("  /m/knack311.prom ", "data-tracker") == Path("/m/knack311.prom")
    assert metrics_path("rel/{app}.prom", "data-tracker") == Path.cwd() / "rel/data-tracker.prom"
    with pytest.raises(ConfigError, match=r"must end in \.prom"):
        metrics_path("/m/knack311.txt", "data-tracker")


def test_the_old_file_stays_whole_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "m.prom"
    write_metrics(path, good_run())
    before = path.read_bytes()

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", no_rename)
    with pytest.raises(ReportError, match=r"METRICS_FILE .*m\.prom cannot be written \(No space left on device\)"):
        write_metrics(path, failing_run())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.prom"]


def test_an_unwritable_metrics_file_is_a_warning_not_a_failure(tmp_path):
    out = io.StringIO()
    readers = Readers([MetricsFile(tmp_path / "missing-dir" / "m.prom"), EventLog("data-tracker", "json", out)])
    readers.finished(good_run())
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["report_failed", "summary"]
    assert "cannot be written" in events[0]["message"] and events[1]["exit_code"] == 0


def test_dry_runs_and_locked_runs_leave_the_file_alone(tmp_path):
    path = tmp_path / "m.prom"
    reader = MetricsFile(path)
    reader.finished(good_run(dry_run=True))
    reader.finished(RunReport(app="data-tracker", exit_code=75))
    assert not path.exists()
    reader.finished(failing_run())
    assert value(parse(path), "knack311_last_run_exit_code") == 1


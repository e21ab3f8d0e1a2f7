"""METRICS_FILE: after each run, what it did in Prometheus text format, for node_exporter's textfile collector.

    knack311_last_run_records{app,outcome}           sent, do_not_send, failed, held, deferred, not_attempted,
                                                     skipped
    knack311_last_run_exit_code{app}
    knack311_last_run_duration_seconds{app}
    knack311_last_run_timestamp_seconds{app}         when the last run ended (Unix time)
    knack311_last_success_timestamp_seconds{app}     when the last run with exit code 0 ended; 0 before the first
    knack311_knack_daily_calls_remaining{app}        only when Knack told us

One file per app: METRICS_FILE may hold `{app}` (`/var/lib/node_exporter/textfile/knack311-{app}.prom`),
replaced by the app name. The apps run on their own schedules, in their own containers, so each writes only
its own file and never has to merge with another's; a METRICS_FILE without `{app}` is fine for a single app.
The file is replaced atomically (prometheus_client writes a temporary file beside it and renames it), so the
collector never reads half a file. A failed run keeps the previous success time, read back from the file with
prometheus_client's own parser; until a first success it is 0, so an alert on its age fires for a bridge that
has never succeeded (an absent sample would silence it). A dry run writes nothing, nor does a run that found
another one active (75): that one reports when it ends.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
from prometheus_client.parser import text_string_to_metric_families

from .errors import ConfigError
from .outcomes import EXIT_LOCKED, EXIT_OK, OUTCOME_NAMES, Reader, ReportError, RunReport

LAST_SUCCESS = "knack311_last_success_timestamp_seconds"
NEVER = 0.0  # the success time of an app that has not succeeded yet: the Unix epoch, as old as it gets
# What became of the fetched records, each an `outcome` label; `skipped` (listed by Knack though not
# READY_TO_SEND, never posted) too, so a view that lost its filter shows up on a dashboard.
RECORD_OUTCOMES = (*OUTCOME_NAMES, "skipped")


def metrics_path(template: str, app: str) -> Path:
    """The metrics file of `app` from METRICS_FILE (checked with the settings, before anything is sent)."""
    template = template.strip()
    if not template.endswith(".prom"):
        # node_exporter's textfile collector reads *.prom only: any other name would never be scraped
        raise ConfigError(f"METRICS_FILE must end in .prom (node_exporter reads only those), not {template!r}")
    return Path(template.replace("{app}", app)).expanduser().absolute()


def previous_success(path: Path, app: str) -> float | None:
    """The last success time of `app` in an existing metrics file; None if there is none (or it is unreadable)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    try:
        for family in text_string_to_metric_families(text):
            if family.name == LAST_SUCCESS:
                for sample in family.samples:
                    if sample.labels.get("app") == app:
                        return float(sample.value)
    except ValueError:  # a damaged file: the success time is lost, the new file is whole again
        return None
    return None


def registry_for(report: RunReport, last_success: float | None) -> CollectorRegistry:
    registry = CollectorRegistry()
    records = Gauge("knack311_last_run_records", "Records of the last run, by what became of them",
                    ["app", "outcome"], registry=registry)
    for outcome in RECORD_OUTCOMES:
        records.labels(app=report.app, outcome=outcome).set(getattr(report, outcome))

    def gauge(name: str, help_text: str, value: float) -> None:
        Gauge(name, help_text, ["app"], registry=registry).labels(app=report.app).set(value)

    gauge("knack311_last_run_exit_code", "Exit code of the last run (0 ok, 1 failed or stopped, 2 configuration)",
          report.exit_code)
    gauge("knack311_last_run_duration_seconds", "Duration of the last run", report.duration_s)
    gauge("knack311_last_run_timestamp_seconds", "When the last run ended (Unix time)", report.finished_at)
    gauge(LAST_SUCCESS, "When the last run that exited 0 ended (Unix time; 0: never)",
          NEVER if last_success is None else last_success)
    if report.knack_calls_remaining is not None:
        gauge("knack311_knack_daily_calls_remaining", "Knack API calls the app has left today",
              report.knack_calls_remaining)
    return registry


def write_metrics(path: Path, report: RunReport) -> None:
    """Replace the metrics file with this run's figures; ReportError (one line) if it cannot be written."""
    last_success = report.finished_at if report.exit_code == EXIT_OK else previous_success(path, report.app)
    try:
        write_to_textfile(str(path), registry_for(report, last_success))
    except OSError as exc:
        raise ReportError(f"METRICS_FILE {path} cannot be written ({exc.strerror or type(exc).__name__})") from None


class MetricsFile(Reader):
    """The reader that writes the metrics file when a run ends."""

    def __init__(self, path: Path):
        self.path = path

    def finished(self, report: RunReport) -> None:
        if report.dry_run or report.exit_code == EXIT_LOCKED:
            return
        write_metrics(self.path, report)

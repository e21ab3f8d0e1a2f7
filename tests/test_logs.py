"""The event log (text and JSON), control-character escaping, progress lines and bar, the reader fan-out."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import threading
import time
from dataclasses import dataclass

import pytest

from knack311.errors import ConfigError
from knack311.logs import (
    EventLog,
    ProgressBar,
    ProgressLines,
    log_format_setting,
    printable,
    progress_event,
    progress_reader,
    progress_setting,
)
from knack311.outcomes import ERROR, WARNING, Event, Reader, Readers, ReportError, RunReport

FORGED = "2026-01-01T00:00:00Z data-tracker record=x activity=1 sr=y set SENT"
EVIL_SR = f"24-00012003\n{FORGED}\r\x1b[31mred\x00\u2028end"


@dataclass(frozen=True)
class Activity:
    """What the log needs of message.Activity (the RecordRef protocol)."""

    record_id: str
    atd_activity_id: str
    sr_number: str


def activity(record_id="64b0a1c2d3e4f50617180506", atd="506", sr="24-00012003") -> Activity:
    return Activity(record_id=record_id, atd_activity_id=atd, sr_number=sr)


def a_run(readers: Readers, sr: str = "24-00012003") -> None:
    """The events of a small run that meets each kind of line."""
    readers.planned(3)
    readers.emit("fetched", "fetched 3 record(s) ready to send", fetched=3)  # as dispatch.SendLoop reports a read
    readers.emit("sent", "set SENT", record=activity(sr=sr))
    readers.emit("failed", "activity 'Repaint Crosswalk' has no 311 code in config.py activity_codes", level=ERROR,
                 record=activity(atd="507", sr=sr))
    readers.emit("held", "an earlier activity of this service request failed", level=WARNING,
                 record=activity(atd="508", sr=sr))
    readers.emit("failed", "record lacks field field_1054 (activity_datetime)", level=ERROR, record_id="rec9")
    readers.emit("tls_unverified", "ESB_VERIFY_TLS=false: the ESB's certificate is NOT verified", level=WARNING)
    readers.finished(RunReport(app="data-tracker", exit_code=1, fetched=3, sent=1, failed=2, held=1,
                               duration_s=1.25, stop_reason="the ESB cannot be reached"))


def log_output(log_format: str, sr: str = "24-00012003") -> list[str]:
    out = io.StringIO()
    log = EventLog("data-tracker", log_format, out)
    a_run(Readers([log]), sr=sr)
    log.close()
    assert out.getvalue().endswith("\n")
    return out.getvalue().split("\n")[:-1]


# --- text ---------------------------------------------------------------------------------------------------

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ data-tracker (?P<rest>.*)$")


def test_text_lines_keep_the_format_operators_grep():
    lines = log_output("text")
    rests = [TEXT_LINE.match(line).group("rest") for line in lines]
    assert rests == [
        "fetched 3 record(s) ready to send",
        "record=64b0a1c2d3e4f50617180506 activity=506 sr=24-00012003 set SENT",
        "record=64b0a1c2d3e4f50617180506 activity=507 sr=24-00012003 FAILED: activity 'Repaint Crosswalk' has no "
        "311 code in config.py activity_codes",
        "record=64b0a1c2d3e4f50617180506 activity=508 sr=24-00012003 HELD: an earlier activity of this service "
        "request failed",
        "record=rec9 sr=- FAILED: record lacks field field_1054 (activity_datetime)",
        "WARNING: ESB_VERIFY_TLS=false: the ESB's certificate is NOT verified",
        "summary: fetched=3 sent=1 do_not_send=0 failed=2 held=1 deferred=0 not_attempted=0 skipped=0 duration=1.2s "
        "stopped: the ESB cannot be reached",
    ]


def test_an_error_event_is_tagged_error_in_text():
    out = io.StringIO()
    Readers([EventLog("signs-markings", "text", out)]).emit("stopped", "Knack status updates keep failing", level=ERROR)
    assert out.getvalue().rstrip("\n").endswith(" signs-markings ERROR: Knack status updates keep failing")


def test_a_newline_in_an_sr_number_cannot_forge_a_text_line():
    lines = log_output("text", sr=EVIL_SR)
    assert len(lines) == 7  # one per event, as with a clean SR number
    assert all(TEXT_LINE.match(line) for line in lines)
    assert not any(line.startswith(FORGED) for line in lines)
    body = "\n".join(lines)
    for raw in ("\r", "\x1b", "\x00", "\u2028"):
        assert raw not in body
    assert f"sr=24-00012003\\n{FORGED}\\r\\x1b[31mred\\x00\\u2028end FAILED:" in body


def test_printable_escapes_controls_and_keeps_text():
    assert printable("a\nb\tc\rd") == "a\\nb\\tc\\rd"
    assert printable("\x00\x07\x1b[2J\x7f\x9b") == "\\x00\\x07\\x1b[2J\\x7f\\x9b"
    assert printable("\u202eevil\u2029") == "\\u202eevil\\u2029"
    assert printable("Café Ñandú – 東京 \\n") == "Café Ñandú – 東京 \\n"  # letters and a literal backslash stay
    assert printable(506) == "506"


# --- JSON ---------------------------------------------------------------------------------------------------

def test_json_lines_parse_and_carry_the_record_on_every_record_event():
    lines = log_output("json")
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events] == ["fetched", "sent", "failed", "held", "failed", "tls_unverified", "summary"]
    for e in events:
        assert list(e)[:5] == ["ts", "level", "app", "event", "message"]
        assert e["app"] == "data-tracker"
        stamp = dt.datetime.fromisoformat(e["ts"])
        assert e["ts"].endswith("Z") and stamp.utcoffset() == dt.timedelta(0)
        assert abs(stamp - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)
    assert [e["level"] for e in events] == ["info", "info", "error", "warning", "error", "warning", "error"]
    sent, failed, held, unreadable = events[1:5]
    assert sent["message"] == "set SENT"
    assert failed["message"].startswith("activity 'Repaint Crosswalk'")  # the tag lives in event/level
    for e, atd in ((sent, "506"), (failed, "507"), (held, "508")):
        assert (e["record_id"], e["atd_activity_id"], e["sr_number"]) == ("64b0a1c2d3e4f50617180506", atd,
                                                                          "24-00012003")
    assert (unreadable["record_id"], unreadable["atd_activity_id"], unreadable["sr_number"]) == ("rec9", None, None)
    for e in (events[0], events[5], events[6]):
        assert not {"record_id", "atd_activity_id", "sr_number"} & set(e)
    assert events[0]["fetched"] == 3


def test_json_summary_is_last_with_numbers():
    summary = json.loads(log_output("json")[-1])
    assert summary["event"] == "summary"
    counts = {k: summary[k] for k in ("fetched", "sent", "do_not_send", "failed", "held", "deferred", "not_attempted")}
    assert counts == {"fetched": 3, "sent": 1, "do_not_send": 0, "failed": 2, "held": 1, "deferred": 0,
                      "not_attempted": 0}
    assert all(type(v) is int for v in counts.values())
    assert summary["duration_s"] == 1.25 and summary["exit_code"] == 1
    assert summary["stop_reason"] == "the ESB cannot be reached"


def test_json_summary_of_a_clean_run_has_a_null_stop_reason_and_info_level():
    out = io.StringIO()
    Readers([EventLog("data-tracker", "json", out)]).finished(RunReport(app="data-tracker", exit_code=0, fetched=2,
                                                                        sent=2, duration_s=0.5))
    summary = json.loads(out.getvalue())
    assert summary["stop_reason"] is None and summary["level"] == "info" and summary["sent"] == 2


def test_a_newline_in_an_sr_number_cannot_forge_a_json_line():
    lines = log_output("json", sr=EVIL_SR)
    assert len(lines) == 7
    events = [json.loads(line) for line in lines]
    assert events[1]["sr_number"] == EVIL_SR  # escaped on the wire, exact once parsed
    for raw in ("\r", "\x1b", "\x00", "\u2028"):
        assert raw not in "\n".join(lines)


def test_json_keeps_non_ascii_text_exact_and_lines_ascii():
    out = io.StringIO()
    Readers([EventLog("data-tracker", "json", out)]).emit("failed", "ESB answered a SOAP Fault: Café inválido",
                                                          level=ERROR, record=activity(sr="24-Ñ"))
    line = out.getvalue()
    assert line.isascii()
    event = json.loads(line)
    assert event["message"] == "ESB answered a SOAP Fault: Café inválido" and event["sr_number"] == "24-Ñ"


def test_extra_fields_go_into_json_but_never_hide_a_standard_key():
    out = io.StringIO()
    Readers([EventLog("data-tracker", "json", out)]).emit("delivered", "delivered to ESB (HTTP 200, attempt 2)",
                                                          record=activity(), http_status=200, attempts=2,
                                                          app="forged", module="m", process="p")
    event = json.loads(out.getvalue())
    assert event["app"] == "data-tracker"
    assert (event["http_status"], event["attempts"], event["module"], event["process"]) == (200, 2, "m", "p")


def test_a_closed_stdout_does_not_break_the_run():
    out = io.StringIO()
    log = EventLog("data-tracker", "json", out)
    out.close()
    Readers([log]).emit("sent", "set SENT", record=activity())  # no exception, no traceback


def test_unknown_log_format_is_refused():
    with pytest.raises(ValueError):
        EventLog("data-tracker", "xml")


# --- settings helpers ----------------------------------------------------------------------------------------

def test_log_format_setting():
    assert log_format_setting(None, {}) == "text"
    assert log_format_setting(None, {"LOG_FORMAT": " JSON "}) == "json"
    assert log_format_setting("text", {"LOG_FORMAT": "json"}) == "text"  # the flag wins
    with pytest.raises(ConfigError, match="LOG_FORMAT must be text or json"):
        log_format_setting(None, {"LOG_FORMAT": "yaml"})
    with pytest.raises(ConfigError, match="--log-format"):
        log_format_setting("xml", {})


def test_progress_setting():
    assert progress_setting(False, {}) is False
    assert progress_setting(False, {"PROGRESS": "0"}) is False
    assert progress_setting(False, {"PROGRESS": "1"}) is True
    assert progress_setting(True, {}) is True
    with pytest.raises(ConfigError, match="PROGRESS"):
        progress_setting(False, {"PROGRESS": "maybe"})


# --- the fan-out ---------------------------------------------------------------------------------------------

class Recorder(Reader):
    def __init__(self):
        self.calls = []

    def started(self, app):
        self.calls.append(("started", app))

    def planned(self, total):
        self.calls.append(("planned", total))

    def event(self, event):
        self.calls.append(("event", event.name))

    def finished(self, report):
        self.calls.append(("finished", report.exit_code))


class Broken(Reader):
    def started(self, app):
        raise ReportError("healthcheck ping /start to hc-ping.com failed: timed out after 5s")

    def finished(self, report):
        raise ReportError("METRICS_FILE /nowhere/x.prom cannot be written")


def test_a_failing_reader_becomes_a_warning_before_the_summary_and_changes_nothing_else():
    out = io.StringIO()
    recorder = Recorder()
    readers = Readers([recorder, Broken(), EventLog("data-tracker", "json", out)])
    readers.started("data-tracker")
    readers.planned(0)
    readers.finished(RunReport(app="data-tracker", exit_code=0))
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["event"], e["level"]) for e in events] == [("report_failed", "warning"),
                                                          ("report_failed", "warning"), ("summary", "info")]
    assert "hc-ping.com" in events[0]["message"] and events[-1]["exit_code"] == 0
    assert recorder.calls == [("started", "data-tracker"), ("event", "report_failed"), ("planned", 0),
                              ("finished", 0), ("event", "report_failed")]


def test_other_exceptions_are_bugs_and_propagate():
    class Buggy(Reader):
        def planned(self, total):
            raise KeyError("bug")

    with pytest.raises(KeyError):
        Readers([Buggy()]).planned(1)


# --- progress ------------------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_progress_lines_come_every_interval_while_records_remain():
    clock, emitted = FakeClock(), []
    progress = ProgressLines(emitted.append, interval=10, clock=clock, background=False)
    progress.planned(100)
    assert progress.tick() is None
    for _ in range(40):
        progress.event(Event("sent", "set SENT", record_id="r"))
    progress.event(Event("delivered", "delivered", record_id="r"))  # not an outcome: not counted
    clock.now += 9.9
    assert progress.tick() is None
    clock.now += 0.1
    line = progress.tick()
    assert line is not None and emitted == [line]
    assert line.name == "progress" and line.fields == {"done": 40, "total": 100, "rate_per_s": 4.0, "eta_s": 15.0}
    assert line.message == "progress: 40/100 records, 4.0 records/s, about 15s left"
    assert progress.tick() is None  # not due again yet
    for name in ("failed", "held", "do_not_send"):
        progress.event(Event(name, "", record_id="r"))
    clock.now += 10
    assert progress.tick().fields["done"] == 43
    for _ in range(57):
        progress.event(Event("sent", "", record_id="r"))
    clock.now += 10
    assert progress.tick() is None  # all done: the summary says the rest
    assert len(emitted) == 2


def test_no_time_estimate_once_the_run_is_stopping():
    clock = FakeClock()
    stopping = False
    progress = ProgressLines(lambda e: None, interval=10, clock=clock, background=False, stopping=lambda: stopping)
    progress.planned(100)
    for _ in range(40):
        progress.event(Event("sent", "set SENT", record_id="r"))
    clock.now += 10
    assert progress.tick().fields["eta_s"] == 15.0

    stopping = True  # a SIGTERM, the time budget or an outage: nothing new starts
    clock.now += 10
    line = progress.tick()
    assert line.fields["eta_s"] is None
    assert line.message == "progress: 40/100 records, 2.0 records/s, stopping: no new record starts"
    assert "left" not in line.message


def test_progress_event_without_any_record_done_yet():
    event = progress_event(0, 2200, 12.0)
    assert event.message == "progress: 0/2200 records, 0.0 records/s, time left unknown"
    assert event.fields["eta_s"] is None
    assert progress_event(120, 2200, 15.0).message == "progress: 120/2200 records, 8.0 records/s, about 4m20s left"


def test_progress_lines_keep_coming_while_one_record_takes_long():
    """The background thread prints on time even when no record finishes (a slow ESB)."""
    out = io.StringIO()
    log = EventLog("data-tracker", "text", out)
    progress = progress_reader(False, log, interval=0.05)
    progress.planned(5)
    deadline = time.monotonic() + 5
    while out.getvalue().count("progress: 0/5") < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    progress.finished(RunReport(app="data-tracker", exit_code=0))
    assert out.getvalue().count("progress: 0/5 records") >= 3
    settled = out.getvalue()
    time.sleep(0.2)
    assert out.getvalue() == settled  # the thread stopped with the run
    assert not [t for t in threading.enumerate() if t.name == "knack311-progress"]


def test_no_progress_thread_for_an_empty_run():
    progress = ProgressLines(lambda e: None, interval=0.01)
    progress.planned(0)
    assert not [t for t in threading.enumerate() if t.name == "knack311-progress"]
    progress.close()


def test_progress_bar_draws_on_its_own_stream_only_on_request():
    bar_out, log_out = io.StringIO(), io.StringIO()
    log = EventLog("data-tracker", "text", log_out)
    bar = ProgressBar(log, file=bar_out)
    readers = Readers([bar, log])
    readers.planned(3)
    readers.emit("sent", "set SENT", record=activity())
    readers.emit("failed", "no code", level=ERROR, record=activity(atd="507"))
    readers.finished(RunReport(app="data-tracker", exit_code=1, fetched=3, sent=1, failed=1, deferred=1))
    assert "2/3" in bar_out.getvalue()
    assert "\r" not in log_out.getvalue() and len(log_out.getvalue().splitlines()) == 3
    assert isinstance(progress_reader(True, log), ProgressBar)
    assert isinstance(progress_reader(False, log), ProgressLines)


def test_the_summary_gives_the_range_of_esb_posts_in_flight_when_the_run_posted():
    report = RunReport(app="data-tracker", exit_code=0, fetched=5, sent=5, esb_in_flight=(2, 17))
    assert " esb_in_flight=2..17" in report.summary_text()
    assert report.summary_fields()["esb_in_flight"] == [2, 17]
    dry = RunReport(app="data-tracker", exit_code=0, fetched=5, dry_run=True, rendered=5)
    assert "esb_in_flight" not in dry.summary_text() and "esb_in_flight" not in dry.summary_fields()

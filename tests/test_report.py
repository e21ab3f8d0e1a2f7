"""`--report`: what the delivery journal knows, read without Knack, the ESB, their settings or the certificates."""

from __future__ import annotations

import re
import sqlite3

from tests.test_run_failures import (
    JOURNAL_NAME,
    SENT,
    journal_states,
    make_journal,
    no_traceback,
    status_updates_not_applied,
)

# Only what --report needs: the app name (argument) and STATE_DIR. Everything else is unset.
WITHOUT_REMOTE_SETTINGS = {name: None for name in ("KNACK_APP_ID", "KNACK_API_KEY", "KNACK_API_URL", "ESB_ENDPOINT",
                                                   "ESB_CERT", "ESB_KEY", "ESB_CA_BUNDLE", "ESB_TIMEOUT")}


def report(run_bridge, knack, esb, *args: str, env: dict | None = None):
    """Run --report and check it touched neither Knack nor the ESB."""
    knack_before, esb_before = len(knack.request_log), len(esb.received)
    result = run_bridge("--report", *args, env={**WITHOUT_REMOTE_SETTINGS, **(env or {})})
    assert len(knack.request_log) == knack_before and len(esb.received) == esb_before
    no_traceback(result)
    return result


def section(output: str, title: str) -> list[str]:
    """The indented lines under the heading that starts with `title`."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    body = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        body.append(line)
    return body


def test_the_report_after_a_failed_status_update_shows_the_record_delivered_not_marked(knack, esb, seed, run_bridge,
                                                                                      state_dir):
    records = seed(2)
    status_updates_not_applied(knack, records[0])
    run = run_bridge()
    assert run.returncode == 1, run.output
    assert journal_states(state_dir)[records[0]["id"]] == "delivered"

    result = report(run_bridge, knack, esb)

    assert result.returncode == 0, result.output
    [delivered] = section(result.stdout, "delivered to the ESB, not yet marked SENT")
    assert f"record={records[0]['id']}" in delivered and "(EMI message EMI-1001)" in delivered, delivered
    assert records[1]["id"] not in "".join(section(result.stdout, "delivered to the ESB"))  # that one is done
    assert section(result.stdout, "delivery in doubt") == []
    [failing] = section(result.stdout, "records that keep failing")
    assert f"record={records[0]['id']}" in failing and "in 1 run;" in failing and "status update" in failing
    [last_run] = section(result.stdout, "last runs")
    assert re.search(r" exit=1 fetched=2 sent=1 do_not_send=0 failed=1 ", last_run), last_run

    # the report is only a reader: the next run still sets it SENT without posting it again
    knack.clear_faults()
    assert run_bridge().returncode == 0
    assert esb.copies()[records[0]["id"]] == 1 and knack.record("object_75", records[0]["id"])
    after = report(run_bridge, knack, esb)
    assert section(after.stdout, "delivered to the ESB") == [] and section(after.stdout, "records that keep") == []
    assert [line.split(" exit=")[1][:1] for line in section(after.stdout, "last runs")] == ["0", "1"]


def log_names(output: str, record_id: str) -> dict[str, str]:
    """The record=, activity= and sr= of the log's FAILED line about a record."""
    [line] = [line for line in output.splitlines() if f"record={record_id} " in line and " FAILED: " in line]
    return dict(re.findall(r" (record|activity|sr)=(\S+)", line.split(" FAILED: ")[0]))


def test_the_report_names_records_as_the_log_does(knack, esb, seed, run_bridge, state_dir):
    [unmarked, unknown] = seed(1), seed(1, activity_name="Never Heard Of It")
    unmarked, unknown = unmarked[0], unknown[0]
    status_updates_not_applied(knack, unmarked)
    run = run_bridge()
    assert run.returncode == 1, run.output

    result = report(run_bridge, knack, esb)

    for record, heading in ((unmarked, "delivered to the ESB"), (unmarked, "records that keep failing"),
                            (unknown, "records that keep failing")):
        names = log_names(run.stdout, record["id"])
        assert names["record"] == record["id"] and names["sr"].startswith("20-"), names
        [line] = [line for line in section(result.stdout, heading) if record["id"] in line]
        # the same words and values as the log
        assert line.split()[:3] == [f"record={names['record']}", f"activity={names['activity']}",
                                    f"sr={names['sr']}"], (line, names)
        assert "emi=" not in line


def test_the_report_says_why_a_delivery_is_in_doubt(knack, esb, seed, run_bridge, state_dir):
    seed(2)
    esb.inject(delay=3, count=1)  # the first message to arrive
    assert run_bridge(env={"ESB_TIMEOUT": "1"}).returncode == 1
    [in_doubt] = [record_id for record_id, state in journal_states(state_dir).items() if state == "sending"]

    result = report(run_bridge, knack, esb)

    assert result.returncode == 0, result.output
    [doubt] = section(result.stdout, "delivery in doubt")
    assert f"record={in_doubt}" in doubt and "may have the message" in doubt, doubt


def test_a_run_that_never_finished_shows_as_such(knack, esb, seed, run_bridge, state_dir):
    seed(1)
    assert run_bridge().returncode == 0
    db = sqlite3.connect(str(state_dir / JOURNAL_NAME))
    with db:  # what a SIGKILL leaves: a run row without an end
        db.execute("INSERT INTO runs (started) VALUES (strftime('%s', 'now'))")
    db.close()

    result = report(run_bridge, knack, esb)

    runs = section(result.stdout, "last runs")
    assert "did not finish" in runs[0] and " exit=0 " in runs[1], runs


def test_without_a_journal_the_report_says_so_and_exits_0(knack, esb, run_bridge, state_dir):
    result = report(run_bridge, knack, esb)

    assert result.returncode == 0, result.output
    assert "no delivery journal" in result.stdout and str(state_dir / JOURNAL_NAME) in result.stdout
    assert not state_dir.exists()  # reading creates nothing


def test_the_report_of_an_unknown_app_or_journal_layout_is_a_usage_error(knack, esb, run_bridge, state_dir):
    unknown_app = run_bridge("--report", app="no-such-app", env=WITHOUT_REMOTE_SETTINGS)
    assert unknown_app.returncode == 2 and "no-such-app" in unknown_app.stderr

    make_journal(state_dir / JOURNAL_NAME, "CREATE TABLE deliveries (record_id TEXT, colour TEXT)")
    result = report(run_bridge, knack, esb)
    assert result.returncode == 2, result.output
    assert str(state_dir / JOURNAL_NAME) in result.stderr


def test_report_and_dry_run_together_are_a_usage_error(knack, esb, run_bridge):
    result = run_bridge("--report", "--dry-run", env=WITHOUT_REMOTE_SETTINGS)
    assert result.returncode == 2 and "--report" in result.stderr
    assert knack.request_log == [] and esb.received == []


def test_the_report_of_a_journal_left_by_the_first_layout(knack, esb, run_bridge, state_dir):
    make_journal(state_dir / JOURNAL_NAME, """CREATE TABLE deliveries (record_id TEXT PRIMARY KEY, state TEXT NOT NULL,
        emi TEXT NOT NULL, message_hash TEXT NOT NULL, updated REAL NOT NULL)""",
                 "INSERT INTO deliveries VALUES ('rec1', 'delivered', 'EMI-1', 'h', 1700000000)")

    result = report(run_bridge, knack, esb)

    assert result.returncode == 0, result.output
    assert "earlier version" in result.stdout
    assert [line.split()[0] for line in section(result.stdout, "delivered to the ESB")] == ["record=rec1"]
    assert SENT in result.stdout

"""deploy/alerts.yml: Prometheus rules that parse and name only the metrics and outcomes the program writes."""

from __future__ import annotations

from pathlib import Path

import promql_parser
import pytest
import yaml

from knack311.metrics import registry_for
from knack311.outcomes import RunReport

RULES = Path(__file__).resolve().parent.parent / "deploy" / "alerts.yml"


def written_series() -> tuple[set[str], set[str]]:
    """The metric names and `outcome` label values the metrics file holds, from the code that writes it
    (a run that failed, never succeeded and knew Knack's daily count: every gauge is there)."""
    registry = registry_for(RunReport(app="data-tracker", exit_code=1, knack_calls_remaining=100), None)
    names, outcomes = set(), set()
    for family in registry.collect():
        for sample in family.samples:
            names.add(sample.name)
            if "outcome" in sample.labels:
                outcomes.add(sample.labels["outcome"])
    return names, outcomes


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    found = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)
        elif isinstance(node, promql_parser.MatrixSelector):
            found.append(node.vector_selector)

    promql_parser.walk(promql_parser.parse(expr), visit)  # raises on a syntax error
    return found


def rules() -> list[dict]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    assert set(document) == {"groups"} and document["groups"], "a Prometheus rule file: groups at the top"
    return [rule for group in document["groups"] for rule in group["rules"]]


def alert_names() -> list[str]:
    return [rule.get("alert", "?") for rule in rules()]


def test_the_rule_file_holds_the_alerts_the_readme_promises():
    exprs = {rule["alert"]: rule["expr"] for rule in rules()}
    assert len(exprs) == len(rules()), "alert names are unique"
    used = {name: {s.name for s in selectors(expr)} for name, expr in exprs.items()}
    assert {"knack311_last_success_timestamp_seconds"} in used.values()       # stale success
    assert any("knack311_last_run_exit_code" in names for names in used.values())  # failing runs
    assert {"knack311_knack_daily_calls_remaining"} in used.values()          # daily Knack calls low


@pytest.mark.parametrize("name", alert_names())
def test_each_rule_is_well_formed_and_names_only_written_metrics(name):
    [rule] = [r for r in rules() if r.get("alert") == name]
    assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
    assert rule["labels"]["severity"] in ("page", "warning")
    assert rule["annotations"]["summary"] and "{{ $labels.app }}" in rule["annotations"]["summary"]
    if "for" in rule:
        promql_parser.parse_duration(rule["for"])
    names, outcomes = written_series()
    found = selectors(rule["expr"])
    assert found, f"{name}: no metric in {rule['expr']!r}"
    for selector in found:
        assert selector.name in names, f"{name}: {selector.name} is not written by the program ({sorted(names)})"
        for matcher in selector.matchers.matchers:
            if matcher.name == "outcome":
                values = set(matcher.value.split("|")) if matcher.op == promql_parser.MatchOp.Re else {matcher.value}
                assert values <= outcomes, f"{name}: outcome {values - outcomes} is never written"
            else:
                assert matcher.name == "app", f"{name}: the program writes no label {matcher.name!r}"

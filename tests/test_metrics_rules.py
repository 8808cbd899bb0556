"""The example alert rules and Grafana dashboard of docs/operations.md are sound.

`promtool check rules` and `promtool test rules` (Debian's prometheus package) check
the rules and that they fire on the series a failing box exports; every metric the
rules and the dashboard name is one a running box really exports; every rule's
runbook_url names its own section of docs/alerts.md.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path

import yaml
from webpeer import metrics_listener_box

DOCS = Path(__file__).resolve().parent.parent / "docs"
RULES = DOCS / "prometheus" / "pacs-edge-alerts.yml"
RULE_TESTS = DOCS / "prometheus" / "pacs-edge-alerts.test.yml"
DASHBOARD = DOCS / "grafana" / "pacs-edge-dashboard.json"
RUNBOOKS = DOCS / "alerts.md"
_NAME = re.compile(r"\bpacs_edge_[a-z_]+")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120,
                          check=False, cwd=RULES.parent)


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    check = promtool("check", "rules", RULES.name)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 26 rules found" in check.stdout
    tested = promtool("test", "rules", RULE_TESTS.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def _anchor(heading: str) -> str:
    """A Markdown heading's anchor as GitHub (and most renderers) make it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_rule_links_to_its_own_section_of_the_alerts_doc() -> None:
    """An alert tells the one paged what to do: each rule's runbook_url is
    docs/alerts.md#ANCHOR, ANCHOR the anchor of the section headed with the rule's name;
    the doc has a section for every rule and none for a rule that is gone, and its own
    links to other sections land on one."""
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"]
             for rule in group["rules"]]
    text = RUNBOOKS.read_text()
    sections = {_anchor(title): title for title in re.findall(r"^## (.+)$", text, re.MULTILINE)}
    linked = {rule["alert"]: sections.get(anchor) for rule in rules
              if (anchor := rule["annotations"].get("runbook_url", "")
                  .removeprefix("docs/alerts.md#"))}
    assert linked == {rule["alert"]: rule["alert"] for rule in rules}
    assert sorted(sections.values()) == sorted(rule["alert"] for rule in rules)
    assert sorted(set(re.findall(r"\]\(#([^)]+)\)", text)) - set(sections)) == []


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_rules_and_dashboard_name_only_metrics_a_box_exports(tmp_path: Path) -> None:
    used = set(_NAME.findall(RULES.read_text()))
    for expr in dashboard_expressions():
        used |= set(_NAME.findall(expr))
    assert len(used) > 15
    with metrics_listener_box(tmp_path) as base, \
            urllib.request.urlopen(f"{base}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    exported = set(re.findall(r"^# TYPE (\S+)", text, re.MULTILINE))
    exported |= set(re.findall(r"^(pacs_edge_[a-z_]+)", text, re.MULTILINE))
    assert used <= exported, sorted(used - exported)

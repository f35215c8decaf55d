#!/usr/bin/env python3
"""Checks of deploy/observability that no installed program makes (scripts/observability.sh
runs it after promtool):

- every alert has a promtool unit test in which it fires, and a RUNBOOK.md section its
  runbook_url points to;
- every SLO of the rules is described in SLO.md;
- the configurations of the programs that cannot be installed here (the OpenTelemetry
  Collector, Tempo, Loki, Grafana, Fluent Bit) for STRUCTURE ONLY: they parse, their pipelines
  name components that are defined, the datasources link to each other by uid, the dashboards
  use those uids. Whether those programs accept every key is not checked here.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
problems: list[str] = []


def problem(text: str) -> None:
    problems.append(text)


def load(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        problem(f"{path.relative_to(ROOT)} does not parse: {error}")
        return {}


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to dashes."""
    found = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            title = re.sub(r"[^\w\- ]", "", title)
            found.add(title.replace(" ", "-"))
    return found


# --- alerts: tests and runbooks ---------------------------------------------------------------
rules = [
    rule
    for name in ("mall.yml", "slo.yml")
    for group in load(HERE / "prometheus/rules" / name).get("groups", [])
    for rule in group["rules"]
]
alerts = {rule["alert"]: rule for rule in rules if "alert" in rule}
fired = set()
for test_file in (HERE / "prometheus/tests").glob("*.test.yml"):
    for test in load(test_file).get("tests", []):
        for case in test.get("alert_rule_test", []):
            if case.get("exp_alerts"):
                fired.add(case["alertname"])
runbook = (HERE / "RUNBOOK.md").read_text() if (HERE / "RUNBOOK.md").exists() else ""
runbook_anchors = anchors(runbook)
for name, rule in sorted(alerts.items()):
    if name not in fired:
        problem(f"alert {name} has no promtool test in which it fires (prometheus/tests/)")
    url = rule.get("annotations", {}).get("runbook_url", "")
    anchor = url.partition("#")[2]
    if not url.endswith(f"RUNBOOK.md#{anchor}") or anchor not in runbook_anchors:
        problem(f"alert {name}: runbook_url {url!r} does not point at a RUNBOOK.md section")
    if rule.get("labels", {}).get("severity") not in ("page", "ticket"):
        problem(f"alert {name}: severity must be page or ticket")

slo_doc = (HERE / "SLO.md").read_text() if (HERE / "SLO.md").exists() else ""
for slo in sorted({r["labels"]["slo"] for r in rules if "slo" in r.get("labels", {})}):
    if f"`{slo}`" not in slo_doc:
        problem(f"SLO {slo} is not described in SLO.md")

# --- the OpenTelemetry Collector ----------------------------------------------------------------
collector = load(HERE / "otel-collector/collector.yaml")
for pipeline, spec in collector.get("service", {}).get("pipelines", {}).items():
    for kind in ("receivers", "processors", "exporters"):
        for component in spec.get(kind, []):
            if component not in collector.get(kind, {}):
                problem(f"collector pipeline {pipeline} names {kind[:-1]} {component}, which is not defined")
policies = collector.get("processors", {}).get("tail_sampling", {}).get("policies", [])
if not any("ERROR" in p.get("status_code", {}).get("status_codes", []) for p in policies):
    problem("collector: tail sampling must keep every trace with an error (a status_code ERROR policy)")

# --- Tempo and Loki -------------------------------------------------------------------------------
tempo = load(HERE / "tempo/tempo.yaml")
if "otlp" not in tempo.get("distributor", {}).get("receivers", {}):
    problem("tempo: the distributor must receive OTLP (the collector exports it)")
loki = load(HERE / "loki/loki.yaml")
if not loki.get("limits_config", {}).get("allow_structured_metadata"):
    problem("loki: allow_structured_metadata must be on (log-ingest sends trace_id there)")

# --- Grafana --------------------------------------------------------------------------------------
datasources = {d["uid"]: d for d in load(HERE / "grafana/provisioning/datasources/mall.yaml")["datasources"]}
for uid in ("prometheus", "tempo", "loki"):
    if uid not in datasources:
        problem(f"grafana: no datasource with uid {uid}")
links = [
    ("prometheus", lambda d: d["jsonData"]["exemplarTraceIdDestinations"][0]["datasourceUid"]),
    ("tempo", lambda d: d["jsonData"]["tracesToLogsV2"]["datasourceUid"]),
    ("loki", lambda d: d["jsonData"]["derivedFields"][0]["datasourceUid"]),
]
for uid, target in links:
    try:
        if target(datasources[uid]) not in datasources:
            problem(f"grafana: datasource {uid} links to an unknown datasource")
    except (KeyError, IndexError, TypeError):
        problem(f"grafana: datasource {uid} lacks its link to the others")
# The metrics whose samples carry trace ids as exemplars: what log-ingest derives from
# records (mall-grpc's latency histograms carry none).
EXEMPLARS = re.compile(
    r"_(log_records_total|log_exceptions_total|http_requests_total"
    r"|http_request_duration_seconds_bucket)\b"
)
for board_file in sorted((HERE / "grafana/dashboards").glob("*.json")):
    board = json.loads(board_file.read_text())
    if "mall-platform" not in board.get("tags", []) or not board.get("links"):
        problem(f"{board_file.name}: must be tagged mall-platform and link to the other dashboards")
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            if target.get("datasource", {}).get("uid") not in datasources:
                problem(f"{board_file.name} panel {panel['title']!r}: unknown datasource")
            # A spike on a panel of a metric with exemplars links to its trace only when
            # the query asks for them.
            if EXEMPLARS.search(target.get("expr", "")) and target.get("exemplar") is not True:
                problem(f"{board_file.name} panel {panel['title']!r}: does not ask for the exemplars its metric carries")

# --- Fluent Bit and compose -----------------------------------------------------------------------
for path in (
    ROOT / "deploy/compose/fluent-bit.yaml",
    ROOT / "deploy/fluent-bit/fluent-bit.yaml",
    ROOT / "deploy/k8s/logging/fluent-bit.conf.yaml",
):
    config = load(path)
    name = path.relative_to(ROOT)
    outputs = config.get("pipeline", {}).get("outputs", [])
    forwards = [o for o in outputs if o.get("name") == "forward"]
    if not forwards:
        problem(f"{name}: no forward output to log-ingest")
    for output in forwards:
        # At least once: a chunk is done only when log-ingest acknowledges it, and is never
        # given up on.
        if output.get("require_ack_response") is not True or output.get("retry_limit") != "no_limits":
            problem(f"{name}: the forward output needs require_ack_response: true and retry_limit: no_limits")
    # Fluent Bit's default retry cap (2000 s) leaves chunks refused while log-ingest's buffer
    # was full arriving long after the rest, too far behind their streams for Loki.
    cap = config.get("service", {}).get("scheduler.cap")
    if not isinstance(cap, int) or cap > 300:
        problem(f"{name}: service needs scheduler.cap of at most 300 s (Fluent Bit's default is 2000)")

if problems:
    print("deploy/observability:\n  " + "\n  ".join(problems), file=sys.stderr)
    sys.exit(1)
print(f"deploy/observability: {len(alerts)} alerts tested and documented; configurations well-formed")

#!/usr/bin/env python3
"""Generates the Grafana dashboards and the SLO rules of deploy/observability from code.

    python deploy/observability/generate.py          # rewrite the generated files
    python deploy/observability/generate.py --check  # fail if a committed file differs

Written once here, used three ways: Grafana loads the dashboards (grafana/dashboards/*.json),
Prometheus loads the SLO rules (prometheus/rules/slo.yml) and promtool tests them
(prometheus/tests/slo.test.yml); the end-to-end Prometheus test in tests/e2e evaluates every
dashboard expression and rule against the running services. scripts/observability.sh runs
this with --check, so a hand edit of a generated file fails the test command.

Dashboards are built with grafanalib (PyPI); the SLO rules follow the multi-window,
multi-burn-rate alerts of Google's SRE workbook (chapter 5).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import attr
import yaml
from grafanalib._gen import DashboardEncoder
from grafanalib.core import (
    Dashboard,
    DashboardLink,
    GridPos,
    RowPanel,
    Stat,
    Target,
    Templating,
    TimeSeries,
)

HERE = Path(__file__).resolve().parent
PROMETHEUS = {"type": "prometheus", "uid": "prometheus"}

# gRPC codes that are the server's fault (the error-ratio alerts and the availability SLOs);
# a caller's bad request (INVALID_ARGUMENT, NOT_FOUND, ...) is not, and neither is
# RESOURCE_EXHAUSTED: it is what a caller over its own concurrency limit or with an oversized
# request gets, so one misbehaving client could page (load shedding shows on the connection
# and authorization panels instead).
SERVER_ERRORS = "UNKNOWN|INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS"
# Page alerts need at least this many events per second over their long window: one late
# event among three at night is no reason to wake anyone (the tickets still see it).
PAGE_MIN_RATE = 1 / 60

SERVICES = {
    "product-catalog": "mall_product_catalog",
    "sync-relay": "mall_sync_relay",
    "member-export": "mall_member_export",
    "log-ingest": "mall_log_ingest",
}


# --- dashboards ------------------------------------------------------------------------------


@attr.s
class ExemplarTarget(Target):
    """A Prometheus query that asks for exemplars too, which the Prometheus datasource links
    to Tempo (grafana/provisioning/datasources/mall.yaml). grafanalib's Target has no such
    field; a class of its own (not a mark set on the panel) survives `auto_panel_ids`, which
    rebuilds every panel."""

    def to_json_data(self):
        return {**super().to_json_data(), "exemplar": True}


def ts(title, exprs, unit="short", description="", exemplars=False):
    """A time series panel; `exprs` is a list of (expr, legend)."""
    target = ExemplarTarget if exemplars else Target
    return TimeSeries(
        title=title,
        description=description,
        dataSource=PROMETHEUS,
        targets=[
            target(expr=e, legendFormat=legend, refId=chr(ord("A") + i), datasource=PROMETHEUS)
            for i, (e, legend) in enumerate(exprs)
        ],
        unit=unit,
    )


def stat(title, expr, unit="short", description="", thresholds=None):
    panel = Stat(
        title=title,
        description=description,
        dataSource=PROMETHEUS,
        targets=[Target(expr=expr, refId="A", instant=True, datasource=PROMETHEUS)],
        format=unit,
        reduceCalc="lastNotNull",
    )
    if thresholds:
        panel.thresholds = thresholds
    return panel


def layout(rows):
    """Places rows of panels on Grafana's 24-column grid: each row's panels share its width."""
    panels, y = [], 0
    for title, row in rows:
        panels.append(RowPanel(title=title, gridPos=GridPos(h=1, w=24, x=0, y=y)))
        y += 1
        width = 24 // len(row)
        height = 4 if all(isinstance(p, Stat) for p in row) else 8
        for i, panel in enumerate(row):
            panel.gridPos = GridPos(h=height, w=width, x=i * width, y=y)
            panels.append(panel)
        y += height
    return panels


LINKS = [
    DashboardLink(
        title="mall dashboards",
        type="dashboards",
        tags=["mall-platform"],
        asDropdown=False,
        includeVars=False,
        keepTime=True,
    )
]


def dashboard(uid, title, description, rows):
    return Dashboard(
        uid=uid,
        title=title,
        description=description,
        tags=["mall-platform"],
        timezone="utc",
        refresh="30s",
        links=LINKS,
        templating=Templating(list=[]),
        panels=layout(rows),
    ).auto_panel_ids()


def grpc_rows(service, prefix):
    sel = f'{prefix}_grpc_requests_total{{method!~"/grpc.health.*"}}'
    return [
        (
            "gRPC",
            [
                ts(
                    "Calls per second by method and code",
                    [(f"sum by (method, code) (rate({sel}[$__rate_interval]))", "{{method}} {{code}}")],
                    "reqps",
                ),
                ts(
                    "Server-error ratio by method",
                    [
                        (
                            f'service_method:grpc_server_errors:ratio_rate5m{{service="{service}"}}',
                            "{{method}}",
                        )
                    ],
                    "percentunit",
                    "Share of calls answered UNKNOWN, INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED "
                    "or DATA_LOSS (alert: MallGrpcServerErrors)",
                ),
                ts(
                    "p99 latency by method",
                    [
                        (
                            "histogram_quantile(0.99, sum by (method, le) "
                            f"(rate({prefix}_grpc_request_duration_seconds_bucket"
                            f'{{method!~"/grpc.health.*"}}[$__rate_interval])))',
                            "{{method}}",
                        )
                    ],
                    "s",
                ),
            ],
        ),
        (
            "Connections and readiness",
            [
                ts("Open connections", [(f"sum({prefix}_grpc_connections_open)", "open")]),
                ts(
                    "Refused connections and failed TLS handshakes",
                    [
                        (f"sum(rate({prefix}_grpc_connections_refused_total[$__rate_interval]))", "refused (max_connections)"),
                        (f"sum by (reason) (rate({prefix}_grpc_tls_handshake_failures_total[$__rate_interval]))", "tls {{reason}}"),
                    ],
                    "ops",
                ),
                ts("Ready replicas", [(f"sum({prefix}_ready)", "ready"), (f"count({prefix}_ready)", "replicas")]),
            ],
        ),
    ]


def catalog():
    p = SERVICES["product-catalog"]
    return dashboard(
        "mall-product-catalog",
        "mall / product-catalog",
        "Product metadata reads and bulk writes",
        [
            (
                "Writes",
                [
                    ts(
                        "Items written by source and outcome",
                        [(f"sum by (source, outcome) (rate({p}_write_items_total[$__rate_interval]))", "{{source}} {{outcome}}")],
                        "ops",
                    ),
                    ts("Conflicts retried inside", [(f"sum(rate({p}_write_retries_total[$__rate_interval]))", "retries")], "ops"),
                    ts(
                        "Pending products (fields waiting for their creation)",
                        [(f"sum({p}_pending_products)", "pending"), (f"sum(increase({p}_pending_products_expired_total[1h]))", "expired in 1h")],
                    ),
                ],
            ),
            (
                "Change stream",
                [
                    ts("Change-log head", [(f"max({p}_change_log_head)", "head")]),
                    ts("Oldest change kept", [(f"max({p}_change_log_oldest_age_seconds)", "age")], "s"),
                    ts(
                        "Watch streams and their lag",
                        [
                            (f"sum({p}_watch_streams)", "streams"),
                            (f"histogram_quantile(0.99, sum by (le) (rate({p}_watch_lag_changes_bucket[$__rate_interval])))", "p99 lag (changes)"),
                        ],
                    ),
                ],
            ),
            *grpc_rows("product-catalog", p),
        ],
    )


def relay():
    p = SERVICES["sync-relay"]
    return dashboard(
        "mall-sync-relay",
        "mall / sync-relay",
        "Product changes from Kinesis and gRPC to the catalog",
        [
            (
                "Freshness and backlog",
                [
                    ts(
                        "Event to applied, p50 and p99",
                        [
                            (f"histogram_quantile(0.5, sum by (le) (rate({p}_change_latency_seconds_bucket[$__rate_interval])))", "p50"),
                            (f"histogram_quantile(0.99, sum by (le) (rate({p}_change_latency_seconds_bucket[$__rate_interval])))", "p99"),
                        ],
                        "s",
                    ),
                    ts("Lane queue messages", [(f'max by (state) ({p}_queue_messages)', "{{state}}")]),
                    ts("Kinesis: behind the stream's tip, per shard", [(f"max by (shard_id) ({p}_kinesis_millis_behind_latest)", "{{shard_id}}")], "ms"),
                ],
            ),
            (
                "Flow",
                [
                    ts("Changes received by source", [(f"sum by (source) (rate({p}_changes_received_total[$__rate_interval]))", "{{source}}")], "ops"),
                    ts("Catalog items by outcome", [(f"sum by (outcome) (rate({p}_changes_applied_total[$__rate_interval]))", "{{outcome}}")], "ops"),
                    ts(
                        "Quarantined and retried",
                        [
                            (f"sum by (stage) (increase({p}_changes_quarantined_total[$__rate_interval]))", "quarantined at {{stage}}"),
                            (f"sum by (kind) (increase({p}_apply_retries_total[$__rate_interval]))", "retry {{kind}}"),
                        ],
                    ),
                ],
            ),
            (
                "Catalog calls and Kinesis",
                [
                    ts("BulkUpdateProducts by code", [(f"sum by (code) (rate({p}_catalog_calls_total[$__rate_interval]))", "{{code}}")], "reqps"),
                    ts("Kinesis records read per shard", [(f"sum by (shard_id) (rate({p}_kinesis_records_read_total[$__rate_interval]))", "{{shard_id}}")], "ops"),
                    ts("Kinesis leases", [(f"sum({p}_kinesis_leases_held)", "held"), (f"sum by (kind) (increase({p}_kinesis_lease_events_total[$__rate_interval]))", "{{kind}}")]),
                ],
            ),
            *grpc_rows("sync-relay", p),
        ],
    )


def members():
    p = SERVICES["member-export"]
    return dashboard(
        "mall-member-export",
        "mall / member-export",
        "Consented members' marketing data to the marketing platform",
        [
            (
                "Deliveries",
                [
                    ts("Members by outcome", [(f"sum by (outcome) (rate({p}_deliveries_total[$__rate_interval]))", "{{outcome}}")], "ops"),
                    ts(
                        "Partner requests vs the partner's limit",
                        [
                            (f"sum by (outcome) (rate({p}_partner_requests_total[$__rate_interval]))", "{{outcome}}"),
                            (f"max({p}_rate_limit_per_second)", "limit in force"),
                        ],
                        "reqps",
                    ),
                    ts(
                        "Recorded to accepted, p50 and p99",
                        [
                            (f"histogram_quantile(0.5, sum by (le) (rate({p}_delivery_freshness_seconds_bucket[$__rate_interval])))", "p50"),
                            (f"histogram_quantile(0.99, sum by (le) (rate({p}_delivery_freshness_seconds_bucket[$__rate_interval])))", "p99"),
                        ],
                        "s",
                    ),
                ],
            ),
            (
                "Queue, retries, alerts",
                [
                    ts("Delivery queue messages", [(f"max by (state) ({p}_queue_messages)", "{{state}}")]),
                    ts(
                        "Retrying, paused, in flight",
                        [
                            (f"sum({p}_batches_retrying)", "batches retrying"),
                            (f"max({p}_configuration_paused)", "paused (configuration error)"),
                            (f"sum({p}_partner_requests_in_flight)", "requests in flight"),
                        ],
                    ),
                    ts("Alerts sent and suppressed", [(f"sum by (outcome) (increase({p}_alerts_total[$__rate_interval]))", "{{outcome}}")]),
                ],
            ),
            (
                "Enqueue and failover",
                [
                    ts("Changes enqueued by outcome", [(f"sum by (outcome) (rate({p}_changes_enqueued_total[$__rate_interval]))", "{{outcome}}")], "ops"),
                    ts("Rate-limit wait, p99", [(f"histogram_quantile(0.99, sum by (le) (rate({p}_rate_limit_wait_seconds_bucket[$__rate_interval])))", "p99")], "s"),
                    ts(
                        "Failover jobs",
                        [
                            (f"sum by (state) (increase({p}_failover_jobs_total[$__rate_interval]))", "jobs {{state}}"),
                            (f"sum by (outcome) (rate({p}_failover_job_members_total[$__rate_interval]))", "members {{outcome}}"),
                        ],
                    ),
                ],
            ),
            *grpc_rows("member-export", p),
        ],
    )


def logs():
    p = SERVICES["log-ingest"]
    return dashboard(
        "mall-log-ingest",
        "mall / log-ingest",
        "Legacy servers' logs from Fluent Bit and OTLP to Loki",
        [
            (
                "Buffer and Loki",
                [
                    ts(
                        "Durable buffer, share of its bound per replica (MallLogBufferFilling past 80%)",
                        [(f"max by (instance) ({p}_buffer_bytes / {p}_buffer_max_bytes)", "{{instance}}")],
                        "percentunit",
                    ),
                    ts("Records waiting for Loki", [(f"sum({p}_records_waiting)", "waiting")]),
                    ts(
                        "Received to in Loki, p50 and p99 (SLO: 99% within 60 s)",
                        [
                            (f"histogram_quantile(0.5, sum by (le) (rate({p}_delivery_freshness_seconds_bucket[$__rate_interval])))", "p50"),
                            (f"histogram_quantile(0.99, sum by (le) (rate({p}_delivery_freshness_seconds_bucket[$__rate_interval])))", "p99"),
                        ],
                        "s",
                    ),
                    ts(
                        "Loki pushes by outcome, seconds since the last accepted",
                        [
                            (f"sum by (outcome) (rate({p}_loki_pushes_total[$__rate_interval]))", "{{outcome}}"),
                            # None before the first accepted push (its timestamp is 0 until then).
                            (f"time() - max by (instance) ({p}_loki_last_push_timestamp_seconds > 0)", "seconds since last push, {{instance}}"),
                        ],
                    ),
                ],
            ),
            (
                "Inputs",
                [
                    ts("Records received by source", [(f"sum by (source) (rate({p}_records_received_total[$__rate_interval]))", "{{source}}")], "ops"),
                    ts(
                        "Forward and OTLP outcomes",
                        [
                            (f"sum by (outcome) (rate({p}_forward_messages_total[$__rate_interval]))", "forward {{outcome}}"),
                            (f"sum by (outcome) (rate({p}_otlp_records_total[$__rate_interval]))", "otlp {{outcome}}"),
                            (f"sum(rate({p}_otlp_ids_removed_total[$__rate_interval]))", "otlp ids removed (records kept)"),
                        ],
                        "ops",
                    ),
                    ts(
                        "Forward connections closed, by reason (tls, handshake: a CA or shared key no sender matches)",
                        [(f"sum by (reason) (rate({p}_forward_connections_closed_total[$__rate_interval]))", "{{reason}}")],
                        "ops",
                    ),
                    ts(
                        "Dropped and unparsed",
                        [
                            (f"sum by (reason) (rate({p}_records_dropped_total[$__rate_interval]))", "dropped {{reason}}"),
                            (f"sum by (source) (rate({p}_parse_errors_total[$__rate_interval]))", "parse errors {{source}}"),
                            (f"sum(rate({p}_fields_omitted_total[$__rate_interval]))", "fields left out of structured metadata"),
                            (f"sum(rate({p}_loki_metadata_refused_total[$__rate_interval]))", "records without metadata (Loki refuses it)"),
                            (f"sum(rate({p}_records_completed_early_total[$__rate_interval]))", "records completed early (pipeline.max_pending_bytes)"),
                            (f"sum(rate({p}_buffer_corrupt_total[$__rate_interval]))", "buffer stretches skipped (disk corrupted them)"),
                        ],
                        "ops",
                    ),
                ],
            ),
            (
                # Derived from the records themselves; exemplars link a spike to a trace.
                "From the records (exemplars link to traces)",
                [
                    ts(
                        "Records shipped by level",
                        [(f"sum by (level) (rate({p}_log_records_total[$__rate_interval]))", "{{level}}")],
                        "ops",
                        exemplars=True,
                    ),
                    ts(
                        "Exceptions by class (top 10)",
                        [(f"topk(10, sum by (exception) (rate({p}_log_exceptions_total[$__rate_interval])))", "{{exception}}")],
                        "ops",
                        exemplars=True,
                    ),
                    ts(
                        "Access logs: requests by status, p95 time taken",
                        [
                            (f"sum by (status) (rate({p}_http_requests_total[$__rate_interval]))", "{{status}}"),
                            (f"histogram_quantile(0.95, sum by (le) (rate({p}_http_request_duration_seconds_bucket[$__rate_interval])))", "p95 seconds"),
                        ],
                        exemplars=True,
                    ),
                ],
            ),
            (
                "Streams and tails",
                [
                    ts("Forward connections", [(f"sum({p}_forward_connections)", "connections")]),
                    ts(
                        "Forward memory budget taken (forward.max_bytes_in_flight: senders wait at it)",
                        [(f"max by (instance) ({p}_forward_in_flight_bytes)", "{{instance}}")],
                        "bytes",
                    ),
                    ts("Loki streams", [(f"sum({p}_streams)", "streams"), (f"sum(rate({p}_streams_folded_total[$__rate_interval]))", "folded/s"), (f"sum({p}_open_streams)", "multi-line states"), (f"sum(rate({p}_streams_evicted_total[$__rate_interval]))", "multi-line states evicted/s")]),
                    ts("Tails", [(f"sum({p}_tails_open)", "open"), (f"sum(rate({p}_tail_records_dropped_total[$__rate_interval]))", "dropped/s")]),
                ],
            ),
            *grpc_rows("log-ingest", p),
        ],
    )


def overview():
    c, r, m, l = (SERVICES[s] for s in ("product-catalog", "sync-relay", "member-export", "log-ingest"))
    return dashboard(
        "mall-overview",
        "mall / overview: is anything stuck?",
        "One screen per question: is a service down, is a backlog growing, is anything dead-lettered",
        [
            (
                "Is everything up?",
                [
                    stat(f"{name} ready replicas", f"sum({SERVICES[name]}_ready)")
                    for name in SERVICES
                ],
            ),
            (
                "Is a product change stuck?",
                [
                    ts("Relay: behind Kinesis per shard", [(f"max by (shard_id) ({r}_kinesis_millis_behind_latest)", "{{shard_id}}")], "ms"),
                    ts("Relay: lane backlog and dead letters", [(f'max by (state) ({r}_queue_messages{{state=~"visible|dead"}})', "{{state}}")]),
                    ts(
                        "Relay: quarantined, event to applied p99",
                        [
                            (f"sum(increase({r}_changes_quarantined_total[1h]))", "quarantined in 1h"),
                            (f"histogram_quantile(0.99, sum by (le) (rate({r}_change_latency_seconds_bucket[5m])))", "p99 seconds"),
                        ],
                    ),
                    ts(
                        "Catalog: writes and server errors",
                        [
                            (f'sum(rate({c}_write_items_total{{outcome="applied"}}[$__rate_interval]))', "items applied/s"),
                            (f'sum(service_method:grpc_server_errors:ratio_rate5m{{service="product-catalog"}})', "server-error ratio"),
                        ],
                    ),
                ],
            ),
            (
                "Is a member change stuck?",
                [
                    ts(
                        "Deliveries vs the partner's limit",
                        [
                            (f'sum(rate({m}_partner_requests_total{{outcome="accepted"}}[$__rate_interval]))', "accepted requests/s"),
                            (f"max({m}_rate_limit_per_second)", "limit"),
                        ],
                        "reqps",
                    ),
                    ts("Delivery queue and dead letters", [(f'max by (state) ({m}_queue_messages{{state=~"visible|dead"}})', "{{state}}")]),
                    ts(
                        "Configuration paused, alerts suppressed",
                        [
                            (f"max({m}_configuration_paused)", "paused"),
                            (f'sum(increase({m}_alerts_total{{outcome="suppressed"}}[1h]))', "alerts suppressed in 1h"),
                        ],
                    ),
                ],
            ),
            (
                "Are logs getting through?",
                [
                    ts(
                        "log-ingest buffer, share of its bound per replica",
                        [(f"max by (instance) ({l}_buffer_bytes / {l}_buffer_max_bytes)", "{{instance}}")],
                        "percentunit",
                    ),
                    ts(
                        "Loki push failures",
                        [(f'sum by (outcome) (rate({l}_loki_pushes_total{{outcome!="accepted"}}[$__rate_interval]))', "{{outcome}}")],
                        "ops",
                    ),
                    ts("Records dropped", [(f"sum by (reason) (rate({l}_records_dropped_total[$__rate_interval]))", "{{reason}}")], "ops"),
                ],
            ),
        ],
    )


def to_json(board) -> str:
    data = json.loads(json.dumps(board.to_json_data(), cls=DashboardEncoder))
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


DASHBOARDS = {
    "overview": overview,
    "product-catalog": catalog,
    "sync-relay": relay,
    "member-export": members,
    "log-ingest": logs,
}


# --- SLOs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slo:
    """One objective: the share of good events over 30 days, from a bad and a total rate."""

    name: str
    service: str
    objective: float
    description: str
    bad: str  # PromQL template with {w}: rate of bad events over window w
    total: str  # PromQL template with {w}: rate of all events over window w
    # Synthetic series for promtool: good traffic and outage traffic (bad == total).
    test_series: dict

    @property
    def budget(self) -> float:
        return round(1 - self.objective, 6)

    @staticmethod
    def window(template: str, window: str) -> str:
        return template.replace("{w}", window)

    def record(self, window: str) -> str:
        return f"slo:{self.name}:error_ratio_rate{window}"


def freshness_slo(name: str, service: str, description: str, histogram: str, within_seconds: int) -> Slo:
    """99% of events within `within_seconds` (a bucket of `histogram`): bad events are those
    past that bucket (the count minus it). The bucket's `le` is matched written either way
    ("60" or "60.0")."""
    return Slo(
        name=name,
        service=service,
        objective=0.99,
        description=description,
        bad=(
            f"(sum(rate({histogram}_count[{{w}}]))"
            f' - sum(rate({histogram}_bucket{{le=~"{within_seconds}(\\\\.0)?"}}[{{w}}])))'
        ),
        total=f"sum(rate({histogram}_count[{{w}}]))",
        test_series={"histogram": (histogram, "", f"{within_seconds}.0")},
    )


CATALOG_READS = "/mall.catalog.v1.ProductCatalogService/(GetProduct|BatchGetProducts|ListProducts)"

SLOS = [
    Slo(
        name="catalog_read_availability",
        service="product-catalog",
        objective=0.999,
        description="99.9% of catalog reads (GetProduct, BatchGetProducts, ListProducts) answer without a server error",
        bad=f'sum(rate(mall_product_catalog_grpc_requests_total{{method=~"{CATALOG_READS}",code=~"{SERVER_ERRORS}"}}[{{w}}]))',
        total=f'sum(rate(mall_product_catalog_grpc_requests_total{{method=~"{CATALOG_READS}"}}[{{w}}]))',
        test_series={
            "good": ('mall_product_catalog_grpc_requests_total{method="/mall.catalog.v1.ProductCatalogService/GetProduct",code="OK"}', 'mall_product_catalog_grpc_requests_total{method="/mall.catalog.v1.ProductCatalogService/GetProduct",code="UNAVAILABLE"}'),
        },
    ),
    Slo(
        name="catalog_read_latency",
        service="product-catalog",
        objective=0.99,
        description="99% of catalog reads answer within 100 ms",
        bad=(
            f'(sum(rate(mall_product_catalog_grpc_request_duration_seconds_count{{method=~"{CATALOG_READS}"}}[{{w}}]))'
            f' - sum(rate(mall_product_catalog_grpc_request_duration_seconds_bucket{{method=~"{CATALOG_READS}",le="0.1"}}[{{w}}])))'
        ),
        total=f'sum(rate(mall_product_catalog_grpc_request_duration_seconds_count{{method=~"{CATALOG_READS}"}}[{{w}}]))',
        test_series={
            "histogram": ('mall_product_catalog_grpc_request_duration_seconds', '{method="/mall.catalog.v1.ProductCatalogService/GetProduct",code="OK"}', "0.1"),
        },
    ),
    freshness_slo(
        name="relay_freshness",
        service="sync-relay",
        description="99% of product changes are applied to the catalog within 60 s of their event time",
        histogram="mall_sync_relay_change_latency_seconds",
        within_seconds=60,
    ),
    freshness_slo(
        name="member_delivery_freshness",
        service="member-export",
        description="99% of member changes are accepted by the partner within 5 minutes of being recorded",
        histogram="mall_member_export_delivery_freshness_seconds",
        within_seconds=300,
    ),
    freshness_slo(
        name="log_delivery_freshness",
        service="log-ingest",
        description="99% of log records are in Loki within 60 s of log-ingest receiving them",
        histogram="mall_log_ingest_delivery_freshness_seconds",
        within_seconds=60,
    ),
    Slo(
        name="member_enqueue_availability",
        service="member-export",
        objective=0.999,
        description="99.9% of EnqueueMemberChanges calls answer without a server error",
        bad=f'sum(rate(mall_member_export_grpc_requests_total{{method="/mall.member.v1.MemberExportService/EnqueueMemberChanges",code=~"{SERVER_ERRORS}"}}[{{w}}]))',
        total='sum(rate(mall_member_export_grpc_requests_total{method="/mall.member.v1.MemberExportService/EnqueueMemberChanges"}[{w}]))',
        test_series={
            "good": ('mall_member_export_grpc_requests_total{method="/mall.member.v1.MemberExportService/EnqueueMemberChanges",code="OK"}', 'mall_member_export_grpc_requests_total{method="/mall.member.v1.MemberExportService/EnqueueMemberChanges",code="INTERNAL"}'),
        },
    ),
]

WINDOWS = ["5m", "30m", "1h", "2h", "6h", "1d", "3d"]
# (severity, long window, short window, burn-rate factor, for): the SRE workbook's table for
# a 30-day budget: 2% of it in an hour pages, 5% in six hours pages, 10% in three days tickets.
BURNS = [
    ("page", "1h", "5m", 14.4, "2m"),
    ("page", "6h", "30m", 6, "15m"),
    ("ticket", "1d", "2h", 3, "1h"),
    ("ticket", "3d", "6h", 1, "3h"),
]


def camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def slo_rules() -> dict:
    groups = []
    for slo in SLOS:
        rules = [
            {
                "record": slo.record(w),
                "expr": f"({slo.window(slo.bad, w)}) / ({slo.window(slo.total, w)})",
                "labels": {"slo": slo.name, "service": slo.service},
            }
            for w in WINDOWS
        ]
        for severity, long, short, factor, hold in BURNS:
            threshold = round(factor * slo.budget, 6)
            expr = f"{slo.record(long)} > {threshold} and {slo.record(short)} > {threshold}"
            if severity == "page":
                expr += f" and on () ({slo.window(slo.total, long)}) > {round(PAGE_MIN_RATE, 6)}"
            rules.append(
                {
                    "alert": f"Slo{camel(slo.name)}Burn{long}",
                    "expr": expr,
                    "for": hold,
                    "labels": {"severity": severity, "slo": slo.name, "service": slo.service},
                    "annotations": {
                        "summary": f"{slo.service}: error budget of {slo.name} burning {factor}x ({long} and {short})",
                        "description": f"{slo.description}. At this rate the 30-day budget lasts {round(30 / factor, 1)} days.",
                        "runbook_url": f"https://github.com/mall-platform/mall-platform-services/blob/main/deploy/observability/RUNBOOK.md#slo-{slo.name.replace('_', '-')}",
                    },
                }
            )
        groups.append({"name": f"slo-{slo.name}", "interval": "30s", "rules": rules})
    return {"groups": groups}


def slo_tests() -> dict:
    """promtool unit tests: a total outage fires the fast page within minutes; steady good
    traffic fires nothing; a slow burn at 2x the budget fires only the 3-day ticket."""
    tests = []
    for slo in SLOS:
        fast, slow_ticket = f"Slo{camel(slo.name)}Burn1h", f"Slo{camel(slo.name)}Burn3d"
        if "good" in slo.test_series:
            ok, bad = slo.test_series["good"]

            def series(good_per_min, bad_per_min, minutes):
                return [
                    {"series": ok, "values": f"0+{good_per_min}x{minutes}"},
                    {"series": bad, "values": f"0+{bad_per_min}x{minutes}"},
                ]
        else:
            name, labels, le = slo.test_series["histogram"]
            inner = labels[1:-1] if labels else ""
            sep = "," if inner else ""

            def series(good_per_min, bad_per_min, minutes, name=name, inner=inner, sep=sep, le=le):
                return [
                    {"series": f'{name}_bucket{{{inner}{sep}le="{le}"}}', "values": f"0+{good_per_min}x{minutes}"},
                    {"series": f'{name}_bucket{{{inner}{sep}le="+Inf"}}', "values": f"0+{good_per_min + bad_per_min}x{minutes}"},
                    {"series": f"{name}_count{{{inner}}}", "values": f"0+{good_per_min + bad_per_min}x{minutes}"},
                ]

        labels = {"severity": "page", "slo": slo.name, "service": slo.service}

        def firing(alertname, severity):
            return [
                {
                    "exp_labels": {**labels, "severity": severity},
                    "exp_annotations": alert_annotations(slo, alertname),
                }
            ]

        name = camel(slo.name)
        tests.append(
            {
                "name": f"{slo.name}: an outage pages within minutes, then opens the day's ticket",
                "interval": "1m",
                "input_series": series(0, 100, 120),
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": fast, "exp_alerts": firing(fast, "page")},
                    {"eval_time": "10m", "alertname": f"Slo{name}Burn6h", "exp_alerts": []},
                    {"eval_time": "30m", "alertname": f"Slo{name}Burn6h", "exp_alerts": firing(f"Slo{name}Burn6h", "page")},
                    {"eval_time": "30m", "alertname": f"Slo{name}Burn1d", "exp_alerts": []},
                    {"eval_time": "100m", "alertname": f"Slo{name}Burn1d", "exp_alerts": firing(f"Slo{name}Burn1d", "ticket")},
                ],
            }
        )
        # Over three days at 1-minute steps: 2x the budget (bad share = 2 * budget).
        per_min = 100000
        bad_per_min = int(per_min * slo.budget * 2)
        tests.append(
            {
                "name": f"{slo.name}: a slow burn at twice the budget opens a ticket, not a page",
                "interval": "1m",
                "input_series": series(per_min - bad_per_min, bad_per_min, 3 * 24 * 60 + 240),
                "alert_rule_test": [
                    {"eval_time": "4000m", "alertname": fast, "exp_alerts": []},
                    {
                        "eval_time": "4500m",
                        "alertname": slow_ticket,
                        "exp_alerts": [
                            {
                                "exp_labels": {**labels, "severity": "ticket"},
                                "exp_annotations": alert_annotations(slo, slow_ticket),
                            }
                        ],
                    },
                ],
            }
        )
        tests.append(
            {
                "name": f"{slo.name}: a few bad events at night (under one a minute) page nobody",
                "interval": "1m",
                "input_series": series(0, 0.5, 120),
                "alert_rule_test": [
                    {"eval_time": "100m", "alertname": f"Slo{name}Burn{long}", "exp_alerts": []}
                    for severity, long, _, _, _ in BURNS
                    if severity == "page"
                ],
            }
        )
        tests.append(
            {
                "name": f"{slo.name}: within budget nothing fires",
                "interval": "1m",
                "input_series": series(per_min, 0, 600),
                "alert_rule_test": [
                    {"eval_time": f"{m}m", "alertname": f"Slo{camel(slo.name)}Burn{long}", "exp_alerts": []}
                    for m in (30, 400)
                    for _, long, _, _, _ in BURNS
                ],
            }
        )
    return {"rule_files": ["../rules/slo.yml"], "evaluation_interval": "1m", "tests": tests}


def alert_annotations(slo: Slo, alertname: str) -> dict:
    rules = slo_rules()
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alertname:
                return rule["annotations"]
    raise KeyError(alertname)


HEADER = "# Generated by deploy/observability/generate.py: edit that file, not this one.\n"


def outputs() -> dict[Path, str]:
    files = {
        HERE / "grafana" / "dashboards" / f"{name}.json": to_json(build())
        for name, build in DASHBOARDS.items()
    }
    dump = lambda data: HEADER + yaml.safe_dump(data, sort_keys=False, width=4096)
    files[HERE / "prometheus" / "rules" / "slo.yml"] = dump(slo_rules())
    files[HERE / "prometheus" / "tests" / "slo.test.yml"] = dump(slo_tests())
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a committed file differs")
    args = parser.parse_args()
    stale = []
    for path, text in outputs().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.relative_to(HERE))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(
            "generated files differ from deploy/observability/generate.py: "
            + ", ".join(map(str, stale))
            + "\nrun: python deploy/observability/generate.py (in scripts/observability.sh's venv)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""deploy/grafana/: the dashboard loads, and every PromQL query names only metrics the server exports.

The exported names come from serving.metrics.ServerMetrics' own registry, with the series names
prometheus_client writes for each family type (counter: _total, _created; histogram: _bucket,
_sum, _count, _created), so a renamed metric or a typo in a panel fails here, not on a wall
screen.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from serving.metrics import ServerMetrics
from serving.telemetry import GPU_GAUGES, PROCESS_CPU

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "hrnet-serving.json"
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}
# PromQL words that are not metric names: aggregations, their modifiers, and keywords.
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile",
    "stddev", "stdvar", "count_values", "group", "inf", "nan",
}  # fmt: skip


def exported_series() -> set[str]:
    """ServerMetrics' families, and the telemetry a server adds: its processes' CPU, and the GPU
    gauges it registers once NVML finds a GPU."""
    names = {f"{PROCESS_CPU}_total"} | {name for name, _ in GPU_GAUGES.values()}
    for family in ServerMetrics().registry.collect():
        names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left after strings, label matchers,
    ranges, grouping clauses, function calls, keywords, variables and numbers are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    text = re.sub(r"\b[a-zA-Z_]\w*\s*\(", "(", text)  # function calls
    words = set(re.findall(r"\b[a-zA-Z_:][\w:]*\b", text))
    return {w for w in words if w not in PROMQL_WORDS}


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            out.append((f"${variable['name']}", inner.group(1) if inner else query))
    return out


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_metric_name_parser() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (model, le) (rate(hrnet_request_duration_seconds_bucket"
        '{model=~"$model", code!="OK"}[$__rate_interval]))) / on (model) group_left'
        " sum(hrnet_queue_depth_images)"
    )
    assert metric_names(expr) == {"hrnet_request_duration_seconds_bucket", "hrnet_queue_depth_images"}
    assert metric_names("sum(rate(hrnet_requets_total[5m]))") == {"hrnet_requets_total"}


def test_every_query_names_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    exported = exported_series()
    assert {"hrnet_requests_total", "hrnet_batch_size_bucket", "hrnet_queue_depth_images"} <= exported
    found = queries(dashboard)
    assert len(found) >= 10
    for title, expr in found:
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr}"
        assert names <= exported, f"{title}: {sorted(names - exported)} are not exported by the server"


def test_the_dashboard_covers_what_operators_ask_for(dashboard: dict[str, Any]) -> None:
    used = {name for _, expr in queries(dashboard) for name in metric_names(expr)}
    # Request rate and latency by model, queue depth, the batch size histogram.
    assert {
        "hrnet_requests_total",
        "hrnet_request_duration_seconds_bucket",
        "hrnet_queue_depth_images",
        "hrnet_batch_size_bucket",
    } <= used
    by_model = [expr for _, expr in queries(dashboard) if "hrnet_request" in expr]
    assert all("by (model" in expr for expr in by_model)
    heatmaps = [p for p in dashboard["panels"] if p["type"] == "heatmap"]
    assert any("hrnet_batch_size_bucket" in t["expr"] for p in heatmaps for t in p["targets"])
    # GPU utilization where present (the panel stays empty without NVML), CPU by process role.
    assert {"hrnet_gpu_utilization", "hrnet_gpu_memory_used_bytes", "hrnet_process_cpu_seconds_total"} <= used


def test_dashboard_is_importable(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert (
            set(panel["gridPos"]) == {"x", "y", "w", "h"}
            and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        )
        assert panel["datasource"]["uid"] == "${datasource}"  # the dashboard's Prometheus variable
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    referenced = set(re.findall(r"\$(\w+)", json.dumps(dashboard["panels"]))) - {"__rate_interval"}
    assert referenced <= variables

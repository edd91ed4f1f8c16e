"""The Grafana dashboard (deploy/grafana) queries only metrics that workers, the queue exporter and the gateway
serve, and docker-compose.yml's `monitoring` profile provisions it on the compose Prometheus."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).parents[1]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def panels_of(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def queries(dashboard: dict[str, Any]) -> list[str]:
    """The PromQL expression of every target of every panel."""
    return [target["expr"] for panel in panels_of(dashboard) for target in panel.get("targets", [])]


def metrics_in(expression: str) -> set[str]:
    """The metric names a PromQL expression reads (ours all start with `rerank_`; no label of ours does)."""
    return set(re.findall(r"\b(rerank_[a-z0-9_]+)\b", re.sub(r'"[^"]*"', '""', expression)))


def served(registry: Any) -> set[str]:
    """The sample names a Prometheus registry serves: each family's name, with a histogram's _bucket, _sum and _count."""
    from prometheus_client import generate_latest

    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", generate_latest(registry).decode(), re.MULTILINE):
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    return names


@pytest.fixture(scope="module")
def exposed(redis_server) -> set[str]:
    """What a worker's /metrics, the queue exporter's and the gateway's serve: the collectors each of them registers."""
    from prometheus_client import CollectorRegistry

    from contract.settings import Settings
    from gateway.metrics import GatewayMetrics
    from producer.app import create_app
    from producer.metrics import default_queues, registry_for
    from worker.metrics import WorkerCollector

    worker = CollectorRegistry()
    worker.register(WorkerCollector("cpu@host"))
    settings = Settings(broker_url=redis_server.url)
    exporter = registry_for(create_app(settings), default_queues(settings))
    return served(worker) | served(exporter) | served(GatewayMetrics().registry)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_metric_a_dashboard_queries_is_one_the_fleet_serves(path, exposed):
    # Given a dashboard's PromQL expressions
    dashboard = json.loads(path.read_text())
    read = {name for expression in queries(dashboard) for name in metrics_in(expression)}
    # Then it reads queue, worker and gateway metrics, each of which something serves
    assert {"rerank_queue_messages", "rerank_documents_total", "rerank_gateway_requests_total"} <= read
    assert read <= exposed, f"{path.name} queries metrics nothing serves: {sorted(read - exposed)}"


def test_the_name_check_catches_a_metric_nobody_serves(exposed):
    # Given an expression with a misspelt metric beside a real one, a label value and a function
    expression = 'sum by (queue) (rate(rerank_documents_totl[5m])) / rerank_queue_messages{queue="rerank_x"}'
    # Then the misspelt one is found and is not served, and the label value is not taken for a metric
    assert metrics_in(expression) == {"rerank_documents_totl", "rerank_queue_messages"}
    assert metrics_in(expression) - exposed == {"rerank_documents_totl"}


def test_the_monitoring_profile_provisions_the_dashboard_on_the_compose_prometheus():
    # Given compose's Grafana service and the provisioning files it mounts
    grafana = COMPOSE["services"]["grafana"]
    assert grafana["profiles"] == ["monitoring"] and "prometheus" in grafana["depends_on"]
    mounts = dict(volume.removesuffix(":ro").split(":", 1) for volume in grafana["volumes"] if volume.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provisioning = GRAFANA / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "rerank.yml").read_text())["providers"]
    # Then the dashboards folder is mounted where the provider reads, the data source is the compose
    # Prometheus on its port, and every panel of every dashboard queries that data source
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    prometheus = COMPOSE["services"]["prometheus"]
    assert source["url"] == "http://prometheus:9090" and any(port.endswith(":9090") for port in prometheus["ports"])
    assert "GF_SECURITY_ADMIN_PASSWORD" in grafana["environment"] and grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        panels = [panel for panel in panels_of(dashboard) if panel["type"] != "row"]
        assert panels and len({panel["id"] for panel in panels_of(dashboard)}) == len(panels_of(dashboard))
        for panel in panels:
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]
            assert all(target["datasource"]["uid"] == source["uid"] for target in panel["targets"]), panel["title"]

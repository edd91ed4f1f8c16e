"""docker-compose.yml names our real entry points and settings (Docker cannot run here)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml

from producer.settings import Settings
from worker.cli import build_parser

ROOT = Path(__file__).parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
WORKERS = {name: s for name, s in COMPOSE["services"].items() if name.startswith("worker-")}


def test_the_fleet_has_redis_gpu_workers_a_cpu_worker_and_flower():
    assert {"redis", "flower", "worker-cpu"} <= set(COMPOSE["services"])
    assert len([n for n in WORKERS if n.startswith("worker-gpu")]) >= 2


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_worker_commands_use_our_entry_point_and_real_options(name):
    service = WORKERS[name]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    command = service["command"]
    assert command[0] == "rerank-worker" and scripts["rerank-worker"] == "worker.cli:main"
    args, unknown = build_parser().parse_known_args(command[1:])
    assert unknown == []
    # One process per device: a GPU worker leaves -c to rerank-worker (one process either way)
    assert args.concurrency in ((None, 1) if args.device.startswith("cuda") else (1,)), "one process per device"
    assert args.hostname == f"{service['environment']['WORKER_NAME']}@%h"
    env = service["environment"]
    fields = {f"RERANK_{name.upper()}" for name in Settings.model_fields}
    assert {k for k in env if k.startswith("RERANK_")} <= fields
    assert env["RERANK_BROKER_URL"].startswith("redis://:${REDIS_PASSWORD")
    assert "/models" in " ".join(service["volumes"]) and env["HF_HOME"] == "/models"
    assert "healthcheck" in service


@pytest.mark.parametrize("name", [n for n in sorted(WORKERS) if "gpu" in n])
def test_each_gpu_worker_reserves_the_gpu_it_sees(name):
    service = WORKERS[name]
    devices = service["deploy"]["resources"]["reservations"]["devices"][0]
    assert devices["device_ids"] == [service["environment"]["CUDA_VISIBLE_DEVICES"]]
    assert service["command"][service["command"].index("--device") + 1] == "cuda:0"


def test_redis_persists_never_evicts_and_requires_a_password_and_flower_requires_auth():
    redis = COMPOSE["services"]["redis"]
    redis_command = " ".join(redis["command"])
    assert "--appendonly yes" in redis_command and "requirepass" in redis_command
    # The password goes through a config file and the environment, never a command line
    assert "--requirepass" not in redis_command and "-a " not in " ".join(redis["healthcheck"]["test"])
    assert redis["environment"]["REDISCLI_AUTH"] == redis["environment"]["REDIS_PASSWORD"] and redis["user"] == "redis"
    assert "--maxmemory-policy noeviction" in redis_command
    assert "FLOWER_BASIC_AUTH" in COMPOSE["services"]["flower"]["environment"]


def test_no_password_reaches_a_command_line_outside_redis():
    # Commands are readable by anyone on the host (/proc/<pid>/cmdline); URLs travel in the environment
    for name, service in COMPOSE["services"].items():
        if name == "redis":
            continue
        texts = [" ".join(service.get("command", []))] + [" ".join((service.get("healthcheck") or {}).get("test", []))]
        assert not any("REDIS_PASSWORD" in t or "redis://" in t or "BROKER_URL" in t for t in texts), name


def test_one_container_per_host_pins_one_worker_per_reserved_gpu():
    # Given the alternative service that runs every GPU of a host from one container
    service = COMPOSE["services"]["gpu-host"]
    args, unknown = build_parser().parse_known_args(service["command"][1:])
    assert service["command"][0] == "rerank-worker" and unknown == []
    # Then --devices plans one pinned worker for each GPU the container reserves, and no other
    from worker.cli import pinned_workers

    plan = pinned_workers(args.devices, service["command"][1:])
    reserved = service["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in plan] == reserved
    assert [w.hostname for w in plan] == [f"gpu{n}@%h" for n in reserved]
    assert service["profiles"] == ["one-container"], "it must not start beside the per-GPU services by default"


def test_flower_reads_the_result_backend_so_it_can_show_progress():
    flower = COMPOSE["services"]["flower"]
    assert flower["environment"]["CELERY_RESULT_BACKEND"] == flower["environment"]["CELERY_BROKER_URL"]
    assert "flower" in flower["command"]


def test_prometheus_scrapes_every_worker_and_the_queue_exporter_on_their_real_ports():
    # Given the Prometheus config the compose file mounts
    prometheus = COMPOSE["services"]["prometheus"]
    (mount,) = [v for v in prometheus["volumes"] if v.endswith("/etc/prometheus/prometheus.yml:ro")]
    config = yaml.safe_load((ROOT / mount.split(":")[0]).read_text())
    targets = {t for job in config["scrape_configs"] for group in job["static_configs"] for t in group["targets"]}
    # Then each worker service is scraped on the port its settings serve metrics on
    for name, service in WORKERS.items():
        port = Settings(metrics_port=service["environment"]["RERANK_METRICS_PORT"]).metrics_port
        assert f"{name}:{port}" in targets
    # And the exporter is our `rerank metrics`, scraped on the port it serves
    from producer.cli import build_parser as rerank_parser

    exporter = COMPOSE["services"]["queue-metrics"]
    args = rerank_parser().parse_args(exporter["command"][1:])
    assert exporter["command"][0] == "rerank" and args.command == "metrics"
    assert f"queue-metrics:{args.port}" in targets
    assert exporter["environment"]["RERANK_MODEL"] == WORKERS["worker-cpu"]["environment"]["RERANK_MODEL"], "the same queues"
    assert {t.split(":")[0] for t in targets} <= set(COMPOSE["services"])

"""docker-compose.yml, its overrides and .env.example name our real entry points and settings
(Docker cannot run here: `docker compose config` validates the files where a Docker client is)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

from contract.settings import Settings
from tests.test_security import certificates  # noqa: F401  (the fixture: a throw-away CA and server certificate)
from worker.cli import build_parser, pinned_workers

ROOT = Path(__file__).parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
WORKERS = {name: s for name, s in SERVICES.items() if name.startswith("worker-")}
# Every service that runs workers, the one-container alternative included.
WORKER_SERVICES = {name: s for name, s in SERVICES.items() if s.get("command", [""])[0] == "rerank-worker"}
OVERRIDES = {path.name: yaml.safe_load(path.read_text()) for path in sorted((ROOT / "deploy" / "compose").glob("*.yml"))}
PROMETHEUS = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())


def seconds(duration: str) -> float:
    """A compose duration (`6m`, `1m30s`, `75s`) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[u] for n, u in parts)


def settings_of(service: dict[str, Any]) -> Settings:
    """The settings a service's process reads from its RERANK_* environment (secrets stand in)."""
    env = {k: v for k, v in service["environment"].items() if k.startswith("RERANK_") and "${" not in str(v)}
    return Settings(**{k.removeprefix("RERANK_").lower(): v for k, v in env.items()})


def workers_of(service: dict[str, Any]) -> list[tuple[str, int]]:
    """(worker name, metrics port) of each worker a service runs: one, or one per device with --devices."""
    argv = service["command"][1:]
    args, _ = build_parser().parse_known_args(argv)
    env = {k: str(v) for k, v in service["environment"].items()}
    if args.devices:
        plan = pinned_workers(args.devices, [], environ=env)
        return [(w.hostname.partition("@")[0], int(w.env["RERANK_METRICS_PORT"])) for w in plan]
    return [(args.hostname.partition("@")[0], int(env["RERANK_METRICS_PORT"]))]


def pinged(service: dict[str, Any]) -> list[str]:
    """The worker names a service's healthcheck pings: its WORKER_NAME, or each of WORKER_NAMES."""
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and "celery inspect ping" in test[1]
    env = service["environment"]
    if "$$WORKER_NAMES" in test[1]:
        return env["WORKER_NAMES"].split()
    assert '-d "$$WORKER_NAME@$$HOSTNAME"' in test[1]
    return [env["WORKER_NAME"]]


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
    assert "--appendonly yes --appendfsync always" in redis_command and "requirepass" in redis_command
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


def scraped() -> set[str]:
    """Every `host:port` the compose Prometheus scrapes: static targets, and each DNS name with its port."""
    targets = set()
    for job in PROMETHEUS["scrape_configs"]:
        targets |= {t for group in job.get("static_configs", []) for t in group["targets"]}
        targets |= {f"{n}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for n in sd["names"] if sd["type"] == "A"}
    return targets


def test_prometheus_scrapes_every_worker_and_the_queue_exporter_on_their_real_ports():
    # Given the Prometheus config the compose file mounts
    prometheus = COMPOSE["services"]["prometheus"]
    (mount,) = [v for v in prometheus["volumes"] if v.endswith("/etc/prometheus/prometheus.yml:ro")]
    assert (ROOT / mount.split(":")[0]).resolve() == (ROOT / "deploy" / "prometheus" / "prometheus.yml").resolve()
    targets = scraped()
    # Then each worker of each worker service is scraped on the port its settings serve metrics on,
    # on an address another container reaches
    for name, service in WORKER_SERVICES.items():
        settings = settings_of(service)
        assert settings.metrics_port is not None and not settings.metrics_address.startswith("127."), name
        for worker, port in workers_of(service):
            assert f"{name}:{port}" in targets, (name, worker)
    # And the exporter is our `rerank metrics`, scraped on the port it serves
    from producer.cli import build_parser as rerank_parser

    exporter = COMPOSE["services"]["queue-metrics"]
    args = rerank_parser().parse_args(exporter["command"][1:])
    assert exporter["command"][0] == "rerank" and args.command == "metrics"
    assert f"queue-metrics:{args.port}" in targets
    assert exporter["environment"]["RERANK_MODEL"] == WORKERS["worker-cpu"]["environment"]["RERANK_MODEL"], "the same queues"
    assert {t.split(":")[0] for t in targets} <= set(COMPOSE["services"])
    # A scaled service is scraped once per container: workers are found by DNS, not a fixed target
    worker_job = next(job for job in PROMETHEUS["scrape_configs"] if job["job_name"] == "rerank-workers")
    assert "static_configs" not in worker_job and worker_job["relabel_configs"][0]["source_labels"] == ["__meta_dns_name"]


# Grace periods and healthchecks of every worker service ------------------------------------------


@pytest.mark.parametrize("name", sorted(WORKER_SERVICES))
def test_each_worker_service_outlasts_its_task_time_limit_when_stopped(name):
    # Given a worker service and the task time limit it runs with (its RERANK_TASK_TIME_LIMIT, else the default)
    service = WORKER_SERVICES[name]
    limit = settings_of(service).task_time_limit
    # Then Docker waits longer than that between SIGTERM (warm shutdown) and SIGKILL
    assert seconds(service["stop_grace_period"]) > limit, f"{name}: stop_grace_period must exceed RERANK_TASK_TIME_LIMIT={limit}s"


def test_the_grace_period_check_reads_durations_and_refuses_a_short_one():
    assert seconds("6m") == 360 and seconds("1m30s") == 90 and seconds("75s") == 75
    with pytest.raises(AssertionError):
        seconds("6 minutes")
    # A service that stops after exactly its time limit would be killed mid-task
    short = {**WORKER_SERVICES["worker-cpu"], "stop_grace_period": "5m"}
    assert not seconds(short["stop_grace_period"]) > settings_of(short).task_time_limit


@pytest.mark.parametrize("name", sorted(WORKER_SERVICES))
def test_each_worker_service_has_a_healthcheck_that_pings_every_worker_it_runs(name):
    service = WORKER_SERVICES[name]
    # The healthcheck asks each worker the service runs, by its own name
    assert pinged(service) == [worker for worker, _ in workers_of(service)]
    health = service["healthcheck"]
    # and allows a model load (RERANK_WORKER_START_TIMEOUT) before failures count
    assert seconds(health["start_period"]) >= settings_of(service).worker_start_timeout
    assert seconds(health["timeout"]) > 10 * len(pinged(service)), "longer than the pings' own --timeout"


@pytest.mark.integration
@pytest.mark.parametrize("name", ["worker-cpu", "gpu-host"])
def test_the_healthcheck_command_succeeds_against_a_live_worker(name, shared_worker, redis_server):
    # Given the healthcheck exactly as the compose file writes it ($$ is compose's escaped $)
    test = WORKER_SERVICES[name]["healthcheck"]["test"][1].replace("$$", "$")
    # When it runs in a shell whose HOSTNAME is this host's and whose WORKER_NAME(S) name the live worker
    live = "shared0"
    env = {**os.environ, "CELERY_BROKER_URL": redis_server.url, "HOSTNAME": socket.gethostname(), "WORKER_NAME": live, "WORKER_NAMES": live}
    done = subprocess.run(["sh", "-c", test], env=env, capture_output=True, text=True, timeout=60)
    # Then the worker answers its ping and the check passes
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{live}@{socket.gethostname()}: OK" in done.stdout


# .env.example and the overrides for other hosts ----------------------------------------------------


def _variables(text: str) -> set[str]:
    """Names of the ${VAR...} references compose interpolates (not $$-escaped shell variables)."""
    return set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", text))


def test_env_example_lists_every_variable_the_compose_files_read_with_a_comment():
    # Given .env.example: NAME=value lines, each under a comment
    lines = (ROOT / ".env.example").read_text().splitlines()
    assigned = {}
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            name = line.split("=", 1)[0]
            assigned[name] = line.split("=", 1)[1]
            assert lines[i - 1].startswith("#"), f"{name} has no comment above it"
    # Then it names every variable docker-compose.yml and its overrides interpolate, and nothing else
    files = [ROOT / "docker-compose.yml", *sorted((ROOT / "deploy" / "compose").glob("*.yml"))]
    read = set().union(*(_variables(f.read_text()) for f in files))
    assert read <= set(assigned), read - set(assigned)
    assert set(assigned) - read == {"COMPOSE_FILE"}, "only compose's own COMPOSE_FILE is read by compose itself"
    # And the required secrets (${VAR:?...}) are left empty for the user to fill in
    required = set().union(*(set(re.findall(r"\$\{([A-Z_]+):\?", f.read_text())) for f in files))
    assert {"REDIS_PASSWORD", "FLOWER_BASIC_AUTH", "RERANK_GATEWAY_API_KEYS"} <= required
    assert all(assigned[name] == "" for name in required)
    # And the files COMPOSE_FILE may name exist
    assert (ROOT / assigned["COMPOSE_FILE"]).is_file()


def test_redis_tls_override_publishes_only_a_tls_port_with_the_certificates_mounted():
    # Given the override that opens the compose Redis to other hosts
    redis = OVERRIDES["redis-tls.yml"]["services"]["redis"]
    assert set(OVERRIDES["redis-tls.yml"]["services"]) == {"redis"}
    args = redis["environment"]["REDIS_TLS_ARGS"].split()
    options = dict(zip(args[::2], args[1::2]))
    # Then Redis listens with TLS on the one port it publishes; the plain port stays unpublished
    (published,) = redis["ports"]
    assert published.rsplit(":", 1)[1] == options["--tls-port"] != "6379"
    assert "ports" not in SERVICES["redis"]
    # And every certificate file it names lies in the read-only mount; the base command passes the options on
    (mount,) = redis["volumes"]
    inside = mount.rsplit(":", 2)[1]
    assert mount.endswith(":ro") and all(options[k].startswith(inside + "/") for k in ("--tls-cert-file", "--tls-key-file", "--tls-ca-cert-file"))
    assert "${REDIS_TLS_ARGS:-}" in SERVICES["redis"]["command"][2].replace("$$", "$")
    assert not any(word in redis["environment"]["REDIS_TLS_ARGS"] for word in ("PASSWORD", "requirepass"))


def test_external_redis_override_repoints_every_redis_client_and_leaves_none_on_the_compose_redis():
    override = OVERRIDES["external-redis.yml"]["services"]
    for name, service in SERVICES.items():
        urls = {k: v for k, v in service.get("environment", {}).items() if "@redis:6379" in str(v)}
        if name == "redis" or not urls:
            continue
        # Given a service that talks to the compose Redis, when the override applies
        merged = {**service["environment"], **override[name]["environment"]}
        # Then every URL it had now comes from RERANK_BROKER_URL, and the CA folder is mounted
        assert all(merged[k].startswith("${RERANK_BROKER_URL:?") for k in urls), name
        assert not any("@redis:" in str(v) for v in merged.values()), name
        assert any(v.endswith(":/tls:ro") for v in override[name]["volumes"]), name
    assert set(override) <= set(SERVICES)


def test_the_image_holds_every_package_pyproject_installs():
    # Given the packages pyproject.toml installs (top-level folders matching its include patterns)
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.removesuffix("*") for p in patterns}
    # Then the Dockerfile copies each into the image before `pip install`
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\w+) \./\1$", dockerfile, re.M))
    assert packages <= copied, packages - copied


@pytest.mark.integration
def test_the_compose_redis_with_the_tls_override_serves_tls_to_a_client_that_checks_it(tmp_path, certificates):
    import redis as redis_client

    from tests.helpers import free_port, need_binary, terminate, wait_for

    # Given certificates as the TLS folder (REDIS_TLS_DIR) holds them, and the compose Redis's command with the
    # override's REDIS_TLS_ARGS (its /tls mount and ports moved to this test's own)
    tls = tmp_path / "tls"
    tls.mkdir()
    for source, target in (("server.crt", "redis.crt"), ("server.key", "redis.key"), ("ca.crt", "ca.crt")):
        (tls / target).write_bytes((certificates / source).read_bytes())
    command = SERVICES["redis"]["command"][2].replace("$$", "$").replace("/tmp/redis.conf", str(tmp_path / "redis.conf"))
    tls_args = OVERRIDES["redis-tls.yml"]["services"]["redis"]["environment"]["REDIS_TLS_ARGS"].replace("/tls/", f"{tls}/")
    plain, tls_port = free_port(), free_port()
    tls_args = tls_args.replace("--tls-port 6380", f"--tls-port {tls_port}")
    env = {"PATH": os.environ["PATH"], "REDIS_PASSWORD": "pw-compose",
           "REDIS_TLS_ARGS": f"{tls_args} --port {plain} --bind 127.0.0.1 --dir {tmp_path} --save ''"}
    need_binary("redis-server")
    server = subprocess.Popen(["sh", "-c", command], env=env, stdout=subprocess.DEVNULL)
    try:
        url = f"rediss://:pw-compose@127.0.0.1:{tls_port}/0?ssl_cert_reqs=required&ssl_ca_certs={tls / 'ca.crt'}"
        client = redis_client.Redis.from_url(url)
        # When a client on another host dials the published TLS port, checking the server against the CA
        wait_for(lambda: _pings(client), timeout=10, what="Redis on its TLS port")
        # Then it is served with the password; and the password reached no command line
        assert "pw-compose" not in Path(f"/proc/{server.pid}/cmdline").read_text()
        client.close()
    finally:
        terminate(server, grace=5)


def _pings(client: Any) -> bool:
    import redis as redis_client

    try:
        return client.ping()
    except redis_client.ConnectionError:
        return False

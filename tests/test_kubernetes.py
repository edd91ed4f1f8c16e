"""deploy/kubernetes is valid against the Kubernetes schemas (offline, no cluster), runs our real
entry points, options and settings, and KEDA watches exactly the queues the workers consume."""

from __future__ import annotations

import copy
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from producer.cli import build_parser as rerank_parser
from producer.metrics import default_queues
from producer.names import model_slug, worker_queues
from producer.settings import Settings
from tests.helpers import skip_or_fail
from worker.cli import build_parser as worker_parser

try:
    import kubernetes_validate
except ImportError:
    skip_or_fail("kubernetes-validate is not installed (pip install -e '.[test]')")

ROOT = Path(__file__).parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
LAYOUTS = ["base", "external-redis"]
KUBERNETES_VERSION = "1.30"
CLUSTER_SCOPED = {"Namespace"}


# A small kustomize: what `kubectl kustomize` does with the features these files use -------------


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def build(directory: Path) -> list[dict[str, Any]]:
    """Resources of a kustomization: `resources` (files and directories), `namespace`, `images`
    (name and tag), and strategic-merge `patches` that merge maps or delete a resource (`$patch: delete`)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "namespace", "resources", "patches", "images"}, "build() would ignore a feature"
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        resources += build(path) if path.is_dir() else _documents(path)
    for item in kustomization.get("patches", []):
        patch = yaml.safe_load(item["patch"])
        key = (patch["kind"], patch["metadata"]["name"])
        matches = [r for r in resources if (r["kind"], r["metadata"]["name"]) == key]
        assert len(matches) == 1, f"patch target {key} not found"
        if patch.get("$patch") == "delete":
            resources.remove(matches[0])
        else:
            _merge(matches[0], {k: v for k, v in patch.items() if k not in ("apiVersion", "kind", "metadata")})
    for image in kustomization.get("images", []):
        for resource in resources:
            for c in resource.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if c["image"].split(":")[0] == image["name"]:
                    c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    if "namespace" in kustomization:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource["metadata"]["namespace"] = kustomization["namespace"]
    return resources


BUILT = {layout: build(KUBE / layout) for layout in LAYOUTS}
BASE = BUILT["base"]


def kinds(resources: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


CONFIG = kinds(BASE, "ConfigMap")["rerank-config"]["data"]
WORKERS = {name: d for name, d in kinds(BASE, "Deployment").items() if name.startswith("rerank-worker-")}
SCALED = kinds(BASE, "ScaledObject")


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def settings_of(deployment: dict[str, Any]) -> Settings:
    """The settings the container's process reads: the ConfigMap, then its own RERANK_* values."""
    env = {k: v for k, v in CONFIG.items() if k.startswith("RERANK_")}
    for var in container(deployment).get("env", []):
        if var["name"].startswith("RERANK_") and "value" in var:
            env[var["name"]] = var["value"].replace("$(REDIS_PASSWORD)", "pw").replace("$(REDIS_ADDRESS)", CONFIG["REDIS_ADDRESS"])
    return Settings(**{name.removeprefix("RERANK_").lower(): value for name, value in env.items()})


def consumed(deployment: dict[str, Any]) -> list[str]:
    """The queues this worker consumes: its -Q, or what rerank-worker derives from device, queue and model."""
    args, _ = worker_parser().parse_known_args(container(deployment)["command"][1:])
    settings = settings_of(deployment)
    return args.queues.split(",") if args.queues else worker_queues(args.device, settings.queue, settings.model)


def watched(scaled: dict[str, Any]) -> list[str]:
    return [t["metadata"]["listName"] for t in scaled["spec"]["triggers"]]


# Schemas ----------------------------------------------------------------------------------------

_INT = {"type": "integer", "minimum": 0}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
REDIS_TRIGGER_KEYS = {
    "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "usernameFromEnv", "passwordFromEnv",
    "listName", "listLength", "activationListLength", "enableTLS", "unsafeSsl", "databaseIndex",
}
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _STRINGS, "annotations": _STRINGS},
        },
        "spec": {
            "type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {k: {"type": "string"} for k in ("name", "kind", "apiVersion", "envSourceContainerName")},
                },
                **{k: _INT for k in ("pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount",
                                     "minReplicaCount", "maxReplicaCount")},
                "advanced": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object", "additionalProperties": False,
                            "properties": {"name": {"type": "string"}, "behavior": {"type": "object"}},
                        },
                    },
                },
                "triggers": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"}, "name": {"type": "string"}, "metadata": _STRINGS,
                            "metricType": {"enum": ["AverageValue", "Value"]}, "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {
                                "type": "object", "required": ["name"], "additionalProperties": False,
                                "properties": {"name": {"type": "string"}, "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}},
                            },
                        },
                    },
                },
            },
        },
    },
}
"""KEDA v2's ScaledObject, the fields we may use, strict: a misspelt field fails (KEDA would ignore it)."""


def validate(resource: dict[str, Any]) -> None:
    """Validate one resource: Kubernetes kinds against the bundled schemas (strict), KEDA's against SCALED_OBJECT."""
    if resource["apiVersion"] != "keda.sh/v1alpha1":
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        return
    jsonschema.validate(resource, SCALED_OBJECT)
    behavior = resource["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:
        # KEDA hands `behavior` to the HPA it creates: check it against the HPA's own schema.
        hpa = {
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
            "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 1, "behavior": behavior},
        }
        kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)
    for trigger in resource["spec"]["triggers"]:
        assert trigger["type"] == "redis", "only Redis list triggers are checked here"
        metadata = trigger["metadata"]
        assert set(metadata) <= REDIS_TRIGGER_KEYS, set(metadata) - REDIS_TRIGGER_KEYS
        assert {"listName", "listLength"} <= set(metadata) and ({"address", "addressFromEnv", "host", "hostFromEnv"} & set(metadata))
        for key in ("listLength", "activationListLength", "databaseIndex"):
            if key in metadata:
                assert metadata[key].isdigit(), f"{key} must be a whole number as a string"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(layout):
    resources = BUILT[layout]
    assert len(resources) >= 10
    for resource in resources:
        validate(resource)


def test_validation_catches_a_misspelt_field_a_wrong_type_and_an_unknown_trigger_option():
    # Given valid resources, when one field is misspelt or mistyped, then validation fails
    deployment = copy.deepcopy(WORKERS["rerank-worker-gpu"])
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 360
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    deployment = copy.deepcopy(WORKERS["rerank-worker-gpu"])
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    scaled = copy.deepcopy(SCALED["rerank-worker-gpu-bulk"])
    scaled["spec"]["cooldown"] = 900
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)
    scaled = copy.deepcopy(SCALED["rerank-worker-gpu-bulk"])
    scaled["spec"]["triggers"][0]["metadata"]["listname"] = "x"
    with pytest.raises(AssertionError):
        validate(scaled)
    scaled = copy.deepcopy(SCALED["rerank-worker-gpu"])
    scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["window"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(scaled)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: build() stands in for kustomize")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kubectl_kustomize_builds_the_same_resources(layout):
    out = subprocess.run(["kubectl", "kustomize", str(KUBE / layout)], capture_output=True, text=True, timeout=60, check=True)
    def key(r: dict[str, Any]) -> str:
        return f"{r['kind']}/{r['metadata']['name']}"
    assert sorted(map(key, yaml.safe_load_all(out.stdout))) == sorted(map(key, BUILT[layout]))
    assert {key(r): r for r in yaml.safe_load_all(out.stdout)} == {key(r): r for r in BUILT[layout]}


# Workers ----------------------------------------------------------------------------------------


def test_the_fleet_has_gpu_bulk_and_cpu_workers_redis_flower_and_the_queue_exporter():
    assert set(WORKERS) == {"rerank-worker-gpu", "rerank-worker-gpu-bulk", "rerank-worker-cpu"}
    assert {"rerank-flower", "rerank-queue-metrics"} <= set(kinds(BASE, "Deployment"))
    assert "rerank-redis" in kinds(BASE, "StatefulSet") and "rerank-redis" in kinds(BASE, "Service")
    assert set(SCALED) == set(WORKERS), "one ScaledObject per worker Deployment"


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_worker_commands_use_our_entry_point_real_options_and_real_settings(name):
    deployment = WORKERS[name]
    worker = container(deployment)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert worker["command"][0] == "rerank-worker" and scripts["rerank-worker"] == "worker.cli:main"
    args, unknown = worker_parser().parse_known_args(worker["command"][1:])
    assert unknown == []
    # One process per device: a GPU worker leaves -c to rerank-worker (one process either way)
    assert args.concurrency in ((None, 1) if args.device.startswith("cuda") else (1,)), "one process per device"
    env = {v["name"]: v for v in worker["env"]}
    assert args.hostname == f"{env['WORKER_NAME']['value']}@%h"
    # Every RERANK_* variable is a real setting, and together they pass the settings' own checks
    fields = {f"RERANK_{field.upper()}" for field in Settings.model_fields}
    assert {k for k in [*CONFIG, *env] if k.startswith("RERANK_")} <= fields
    settings = settings_of(deployment)
    assert settings.broker_url.startswith("redis://:pw@rerank-redis.rerank.svc.cluster.local:6379/")
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "rerank-secrets", "key": "redis-password"}
    # GPU workers get exactly one GPU, the CPU worker none
    limits = worker["resources"]["limits"]
    if args.device.startswith("cuda"):
        assert args.device == "cuda:0" and limits["nvidia.com/gpu"] == 1
    else:
        assert args.device == "cpu" and "nvidia.com/gpu" not in limits
    # The model cache is mounted where the hub library looks (HF_HOME)
    mounts = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}
    assert mounts["model-cache"] == CONFIG["HF_HOME"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] in kinds(BASE, "PersistentVolumeClaim")


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_probes_grace_period_and_rollout_suit_a_worker_that_loads_a_model(name):
    deployment = WORKERS[name]
    worker = container(deployment)
    settings = settings_of(deployment)
    # Ready (and started) once it answers ping under its own name: the pool loaded the model first
    for probe in ("startupProbe", "readinessProbe"):
        shell = worker[probe]["exec"]["command"]
        assert shell[:2] == ["sh", "-c"] and shell[2].startswith("celery inspect ping")
        assert '-d "$WORKER_NAME@$HOSTNAME"' in shell[2]
    startup = worker["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= settings.worker_start_timeout
    # Alive while its event loop turns, without asking the broker
    liveness = worker["livenessProbe"]["exec"]["command"]
    assert liveness[:2] == ["rerank-worker", "alive"] and settings.heartbeat_file
    from worker.health import HEARTBEAT_INTERVAL

    max_age = float(liveness[liveness.index("--max-age") + 1])
    assert max_age >= 10 * HEARTBEAT_INTERVAL
    # SIGTERM lets the running task finish before Kubernetes kills the pod
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.task_time_limit
    # A rollout starts a new pod before it stops an old one
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    # Prometheus scrapes the port the worker serves its metrics on
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics_port) and annotations["prometheus.io/scrape"] == "true"


def test_the_liveness_command_exists():
    from worker.health import alive_main

    with pytest.raises(SystemExit) as e:
        alive_main(["--help"])
    assert e.value.code == 0


# KEDA ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCALED))
def test_keda_watches_only_queues_its_target_consumes_and_reads_redis_from_the_targets_env(name):
    scaled = SCALED[name]
    target = WORKERS[scaled["spec"]["scaleTargetRef"]["name"]]
    assert set(watched(scaled)) <= set(consumed(target)), "a queue KEDA watches that the workers never take"
    # The queues carry the model's slug
    slug = model_slug(settings_of(target).model)
    assert all(q.startswith(f"rerank.{slug}") for q in watched(scaled))
    env = {v["name"] for v in container(target)["env"]} | set(CONFIG)
    for trigger in scaled["spec"]["triggers"]:
        assert {trigger["metadata"]["addressFromEnv"], trigger["metadata"]["passwordFromEnv"]} <= env


def test_every_queue_a_worker_consumes_scales_some_worker():
    # Given every queue any worker Deployment takes work from
    queues = {q for deployment in WORKERS.values() for q in consumed(deployment)}
    # Then some ScaledObject watches it, so a backlog there adds pods
    assert queues == {q for scaled in SCALED.values() for q in watched(scaled)}


def test_bulk_workers_scale_from_zero_and_cool_down_over_several_model_loads():
    bulk = SCALED["rerank-worker-gpu-bulk"]["spec"]
    settings = settings_of(WORKERS["rerank-worker-gpu-bulk"])
    assert bulk["minReplicaCount"] == 0 and WORKERS["rerank-worker-gpu-bulk"]["spec"]["replicas"] == 0
    assert consumed(WORKERS["rerank-worker-gpu-bulk"]) == [q for q in consumed(WORKERS["rerank-worker-gpu"]) if q.endswith(".gpu.bulk")]
    # Scaling to zero and back costs a model load (up to RERANK_WORKER_START_TIMEOUT): the cooldown outlasts one
    assert bulk["cooldownPeriod"] >= settings.worker_start_timeout
    for scaled in SCALED.values():
        assert scaled["spec"]["minReplicaCount"] in (0, 1)
        window = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
        assert window >= settings.worker_start_timeout, "pods dropped sooner than a model load takes"


# Redis, Flower, the exporter, secrets -------------------------------------------------------------


def test_redis_persists_never_evicts_and_takes_its_password_from_the_secret():
    redis = container(kinds(BASE, "StatefulSet")["rerank-redis"])
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert "--requirepass $(REDIS_PASSWORD)" in command
    assert {v["name"]: v["valueFrom"]["secretKeyRef"]["key"] for v in redis["env"]} == {"REDIS_PASSWORD": "redis-password"}
    assert CONFIG["REDIS_ADDRESS"].startswith(f"rerank-redis.{kinds(BASE, 'Namespace').popitem()[0]}.svc.")


def test_flower_requires_auth_and_the_exporter_watches_every_queue_keda_watches():
    flower = container(kinds(BASE, "Deployment")["rerank-flower"])
    env = {v["name"]: v for v in flower["env"]}
    assert flower["command"][:2] == ["celery", "flower"]
    assert env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]["key"] == "flower-basic-auth"
    assert env["CELERY_RESULT_BACKEND"]["value"] == env["CELERY_BROKER_URL"]["value"]
    exporter = kinds(BASE, "Deployment")["rerank-queue-metrics"]
    command = container(exporter)["command"]
    assert command[0] == "rerank"
    args = rerank_parser().parse_args(command[1:])
    assert args.command == "metrics" and args.queues is None
    assert exporter["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(args.port)
    queues = default_queues(settings_of(exporter))
    assert {q for scaled in SCALED.values() for q in watched(scaled)} <= set(queues)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_password_reaches_a_command_line_outside_redis(layout):
    for resource in BUILT[layout]:
        spec = resource.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            if resource["metadata"]["name"] == "rerank-redis":
                continue
            texts = [" ".join(c.get("command", []) + c.get("args", []))]
            texts += [" ".join(c.get(p, {}).get("exec", {}).get("command", [])) for p in ("startupProbe", "readinessProbe", "livenessProbe")]
            assert not any("PASSWORD" in t or "redis://" in t or "BROKER_URL" in t for t in texts), resource["metadata"]["name"]


def test_external_redis_drops_the_in_cluster_redis_and_points_everything_at_the_given_address():
    resources = BUILT["external-redis"]
    assert "rerank-redis" not in kinds(resources, "StatefulSet") and "rerank-redis" not in kinds(resources, "Service")
    address = kinds(resources, "ConfigMap")["rerank-config"]["data"]["REDIS_ADDRESS"]
    assert address != CONFIG["REDIS_ADDRESS"] and address.rsplit(":", 1)[1].isdigit()
    assert set(kinds(resources, "ScaledObject")) == set(SCALED)

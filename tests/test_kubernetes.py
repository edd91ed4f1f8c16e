"""deploy/kubernetes is valid against the Kubernetes schemas (offline, no cluster), runs our real
entry points, options and settings, and KEDA watches exactly the queues the workers consume."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import tomllib
import yaml

from contract.names import model_slug, worker_queues
from contract.settings import Settings
from producer.cli import build_parser as rerank_parser
from producer.metrics import default_queues
from tests.helpers import skip_or_fail
from tests.test_security import certificates  # noqa: F401  (the fixture: a throw-away CA and server certificate)
from worker.cli import build_parser as worker_parser

try:
    import kubernetes_validate
except ImportError:
    skip_or_fail("kubernetes-validate is not installed (pip install -e '.[test]')")

ROOT = Path(__file__).parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
LAYOUTS = ["base", "external-redis", "redis-tls"]
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


def settings_of(deployment: dict[str, Any], config: dict[str, str] = CONFIG) -> Settings:
    """The settings the container's process reads: the ConfigMap, then its own RERANK_* values."""
    env = {k: v for k, v in config.items() if k.startswith("RERANK_")}
    for var in container(deployment).get("env", []):
        if var["name"].startswith("RERANK_") and "value" in var:
            env[var["name"]] = var["value"].replace("$(REDIS_PASSWORD)", "pw").replace("$(REDIS_ADDRESS)", config["REDIS_ADDRESS"])
    return Settings(**{name.removeprefix("RERANK_").lower(): value for name, value in env.items()})


# Every Deployment that runs `rerank-worker`, in every layout, with that layout's settings.
ALL_WORKERS = {
    f"{layout}/{d['metadata']['name']}": (d, kinds(BUILT[layout], "ConfigMap")["rerank-config"]["data"])
    for layout in LAYOUTS
    for d in kinds(BUILT[layout], "Deployment").values()
    if container(d)["command"][0] == "rerank-worker"
}


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


def test_every_layout_runs_the_same_workers():
    assert {key.split("/")[1] for key in ALL_WORKERS} == set(WORKERS)
    assert len(ALL_WORKERS) == len(LAYOUTS) * len(WORKERS)


@pytest.mark.parametrize("key", sorted(ALL_WORKERS))
def test_probes_grace_period_and_rollout_suit_a_worker_that_loads_a_model(key):
    deployment, config = ALL_WORKERS[key]
    worker = container(deployment)
    settings = settings_of(deployment, config)
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
    # SIGTERM lets the running task finish (at most RERANK_TASK_TIME_LIMIT) before Kubernetes kills the pod
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.task_time_limit, f"{key}: terminationGracePeriodSeconds must exceed RERANK_TASK_TIME_LIMIT"
    # A rollout starts a new pod before it stops an old one
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    # Prometheus scrapes the port the worker serves its metrics on, bound where the scraper reaches it
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics_port) and annotations["prometheus.io/scrape"] == "true"
    assert {p["name"]: p["containerPort"] for p in worker["ports"]}["metrics"] == settings.metrics_port
    assert not settings.metrics_address.startswith("127."), "a loopback address is out of the scraper's reach"
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"


def test_the_grace_period_check_refuses_a_pod_stopped_before_its_time_limit():
    # Given a worker whose grace period equals its task time limit, then the check fails
    deployment, config = copy.deepcopy(ALL_WORKERS["base/rerank-worker-gpu"])
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = int(config["RERANK_TASK_TIME_LIMIT"])
    ALL_WORKERS["spoilt"] = (deployment, config)
    try:
        with pytest.raises(AssertionError, match="terminationGracePeriodSeconds must exceed"):
            test_probes_grace_period_and_rollout_suit_a_worker_that_loads_a_model("spoilt")
    finally:
        del ALL_WORKERS["spoilt"]


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


def test_redis_persists_never_evicts_runs_as_its_own_user_and_reads_its_password_from_a_file():
    redis_set = kinds(BASE, "StatefulSet")["rerank-redis"]
    spec = redis_set["spec"]["template"]["spec"]
    redis = container(redis_set)
    command = " ".join(redis["command"])
    assert "--appendonly yes --appendfsync always" in command and "--maxmemory-policy noeviction" in command
    # The image's own user (redis, uid 999), not root
    assert spec["securityContext"]["runAsUser"] == 999 and spec["securityContext"]["fsGroup"] == 999
    # The password: from the Secret as a file, into a config file in memory that redis-server reads first
    (init,) = spec["initContainers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    secret = next(v for v in volumes.values() if "secret" in v)
    assert secret["secret"]["secretName"] == "rerank-secrets" and [i["key"] for i in secret["secret"]["items"]] == ["redis-password"]
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    config = next(name for name, v in volumes.items() if v.get("emptyDir", {}).get("medium") == "Memory")
    script = init["command"][2]
    assert init["command"][:2] == ["sh", "-c"] and "requirepass" in script
    assert f"< {mounts[secret['name']]}/redis-password" in script and f"> {mounts[config]}/redis.conf" in script
    assert redis["command"][:2] == ["redis-server", f"{mounts[config]}/redis.conf"]
    # The probe authenticates from its environment
    env = {v["name"]: v["valueFrom"]["secretKeyRef"]["key"] for v in redis["env"]}
    assert env == {"REDISCLI_AUTH": "redis-password"}
    assert "redis-cli ping" in " ".join(redis["readinessProbe"]["exec"]["command"])
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


def _secret_variables(c: dict[str, Any]) -> set[str]:
    """The container's variables that hold a secret: from a Secret, or composed from one (a broker URL)."""
    env = c.get("env", [])
    found = {v["name"] for v in env if "secretKeyRef" in v.get("valueFrom", {})}
    grown = True
    while grown:
        composed = {v["name"] for v in env if any(f"$({name})" in v.get("value", "") for name in found)}
        grown, found = not composed <= found, found | composed
    return found


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_password_reaches_any_command_line(layout):
    # Command lines are readable by anyone on the node (/proc/<pid>/cmdline): secrets travel in
    # the environment or in files, Redis's included
    for resource in BUILT[layout]:
        for spec in pod_specs(resource):
            for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
                texts = [" ".join(c.get("command", []) + c.get("args", []))]
                texts += [" ".join(c.get(p, {}).get("exec", {}).get("command", [])) for p in ("startupProbe", "readinessProbe", "livenessProbe")]
                secret = _secret_variables(c)
                for text in texts:
                    assert not any(word in text for word in ("redis://", "--requirepass", " -a ", "--pass")), (c["name"], text)
                    assert not any(re.search(rf"\$\(?\{{?{name}\b", text) for name in secret), (c["name"], text)


def test_external_redis_drops_the_in_cluster_redis_and_points_everything_at_the_given_address():
    resources = BUILT["external-redis"]
    assert "rerank-redis" not in kinds(resources, "StatefulSet") and "rerank-redis" not in kinds(resources, "Service")
    address = kinds(resources, "ConfigMap")["rerank-config"]["data"]["REDIS_ADDRESS"]
    assert address != CONFIG["REDIS_ADDRESS"] and address.rsplit(":", 1)[1].isdigit()
    assert set(kinds(resources, "ScaledObject")) == set(SCALED)


# Pod Security "restricted" -----------------------------------------------------------------------
# The checks of the Pod Security Standards' baseline and restricted profiles, as Kubernetes's own
# Pod Security admission implements them (k8s.io/pod-security-admission, policy/check_*.go), for
# the KUBERNETES_VERSION these manifests target; every container counts, init containers included.

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP",
    "SETUID", "SYS_CHROOT",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports", "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes",
}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
SECCOMP_RESTRICTED = {"RuntimeDefault", "Localhost"}


def pod_templates(resource: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod (metadata and spec) a workload resource creates; none for other kinds."""
    kind, spec = resource["kind"], resource.get("spec", {})
    if kind == "Pod":
        return [resource]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "ReplicationController"):
        return [spec["template"]]
    return []


def pod_specs(resource: dict[str, Any]) -> list[dict[str, Any]]:
    return [template["spec"] for template in pod_templates(resource)]


def _handlers(c: dict[str, Any]) -> list[dict[str, Any]]:
    probes = [c.get(p) or {} for p in ("livenessProbe", "readinessProbe", "startupProbe")]
    hooks = list((c.get("lifecycle") or {}).values())
    return [h.get(kind) or {} for h in probes + hooks for kind in ("httpGet", "tcpSocket")]


def restricted_violations(template: dict[str, Any]) -> list[str]:
    """What in this pod template the Pod Security "restricted" profile refuses (baseline included); empty when it passes."""
    meta, spec = template.get("metadata") or {}, template["spec"]
    pod = spec.get("securityContext") or {}
    containers = [*spec.get("initContainers", []), *spec.get("containers", []), *spec.get("ephemeralContainers", [])]
    scs = {c["name"]: c.get("securityContext") or {} for c in containers}
    bad = []
    # Baseline
    bad += [f"{field}: true" for field in ("hostNetwork", "hostPID", "hostIPC") if spec.get(field)]
    if (pod.get("windowsOptions") or {}).get("hostProcess") or any((sc.get("windowsOptions") or {}).get("hostProcess") for sc in scs.values()):
        bad.append("hostProcess")
    for c in containers:
        name, sc = c["name"], scs[c["name"]]
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        if set((sc.get("capabilities") or {}).get("add", [])) - BASELINE_CAPABILITIES:
            bad.append(f"{name}: capabilities beyond the baseline set")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            bad.append(f"{name}: hostPort")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{name}: procMount")
        if any(h.get("host") for h in _handlers(c)):
            bad.append(f"{name}: probe or lifecycle host")
        if (sc.get("appArmorProfile") or {}).get("type", "RuntimeDefault") not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: appArmorProfile")
    for owner, sc in [("pod", pod), *scs.items()]:
        selinux = sc.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            bad.append(f"{owner}: seLinuxOptions")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            bad.append(f"{owner}: seccomp Unconfined")
    if (pod.get("appArmorProfile") or {}).get("type", "RuntimeDefault") not in ("RuntimeDefault", "Localhost"):
        bad.append("pod: appArmorProfile")
    for key, value in (meta.get("annotations") or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and value != "runtime/default" and not value.startswith("localhost/"):
            bad.append(f"AppArmor annotation {key}")
    bad += [f"sysctl {s['name']}" for s in pod.get("sysctls", []) if s["name"] not in SAFE_SYSCTLS]
    # Restricted
    for volume in spec.get("volumes", []):
        if not RESTRICTED_VOLUMES & set(volume):
            bad.append(f"volume {volume['name']}: type {sorted(set(volume) - {'name'})}")
    for name, sc in scs.items():
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation is not false")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in capabilities.get("drop", []):
            bad.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: adds capabilities other than NET_BIND_SERVICE")
        if sc.get("runAsNonRoot") is False or (sc.get("runAsNonRoot") is not True and pod.get("runAsNonRoot") is not True):
            bad.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            bad.append(f"{name}: runAsUser 0")
        if (sc.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type") not in SECCOMP_RESTRICTED:
            bad.append(f"{name}: seccompProfile is not RuntimeDefault or Localhost")
    if pod.get("runAsUser") == 0:
        bad.append("pod: runAsUser 0")
    return bad


POD_TEMPLATES = {
    f"{layout}/{r['kind']}/{r['metadata']['name']}": t for layout in LAYOUTS for r in BUILT[layout] for t in pod_templates(r)
}


@pytest.mark.parametrize("name", sorted(POD_TEMPLATES))
def test_every_pod_passes_the_restricted_pod_security_profile_with_no_token_and_a_read_only_root(name):
    template = POD_TEMPLATES[name]
    assert restricted_violations(template) == []
    spec = template["spec"]
    # No service-account token: nothing here talks to the Kubernetes API
    assert spec.get("automountServiceAccountToken") is False
    # Read-only root filesystems; whatever must be written goes to a volume
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        assert (c.get("securityContext") or {}).get("readOnlyRootFilesystem") is True, c["name"]


def test_the_profile_check_refuses_what_the_restricted_profile_refuses():
    # Given a pod that passes, when any one restricted field is set wrong, then the check names it
    good = POD_TEMPLATES["base/StatefulSet/rerank-redis"]
    assert restricted_violations(good) == []
    cases = {
        "allowPrivilegeEscalation is not false": lambda t: t["spec"]["initContainers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        "capabilities do not drop ALL": lambda t: t["spec"]["containers"][0]["securityContext"].update(capabilities={"drop": ["NET_RAW"]}),
        "adds capabilities other than NET_BIND_SERVICE": lambda t: t["spec"]["containers"][0]["securityContext"].update(
            capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]}
        ),
        "runAsNonRoot is not true": lambda t: t["spec"]["securityContext"].pop("runAsNonRoot"),
        "runAsUser 0": lambda t: t["spec"]["initContainers"][0]["securityContext"].update(runAsUser=0),
        "seccomp": lambda t: t["spec"]["securityContext"].pop("seccompProfile"),
        "seccomp Unconfined": lambda t: t["spec"]["containers"][0]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        "volume host": lambda t: t["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
        "hostNetwork": lambda t: t["spec"].update(hostNetwork=True),
        "privileged": lambda t: t["spec"]["containers"][0]["securityContext"].update(privileged=True),
        "hostPort": lambda t: t["spec"]["containers"][0]["ports"][0].update(hostPort=6379),
        "sysctl kernel.msgmax": lambda t: t["spec"]["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
    }
    for expected, spoil in cases.items():
        template = copy.deepcopy(good)
        spoil(template)
        assert any(expected in v for v in restricted_violations(template)), expected


# NetworkPolicy ----------------------------------------------------------------------------------

NAMESPACE = kinds(BASE, "Namespace").popitem()[0]
POLICIES = list(kinds(BASE, "NetworkPolicy").values())
SCRAPER = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
INTRUDER = (NAMESPACE, {"app.kubernetes.io/name": "something-else"})
ELSEWHERE = ("other-team", {"app": "web"})
INTERNET = ("", {})  # outside the cluster: only an ipBlock or an empty peer list admits it


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not set((selector.get("matchLabels") or {}).items()) <= set(labels.items()):
        return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        ok = {"In": present and value in e.get("values", []), "NotIn": not present or value not in e.get("values", []),
              "Exists": present, "DoesNotExist": not present}[e["operator"]]
        if not ok:
            return False
    return True


def _peer_admits(peer: dict[str, Any], policy_namespace: str, other: tuple[str, dict[str, str]]) -> bool:
    namespace, labels = other
    if "ipBlock" in peer:
        return namespace == ""
    if not namespace:
        return False
    if "namespaceSelector" in peer:
        in_namespace = _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace})
    else:
        in_namespace = namespace == policy_namespace
    return in_namespace and _selects(peer.get("podSelector") or {}, labels)


def allowed(direction: str, pod: tuple[str, dict[str, str], dict[str, int]], other: tuple[str, dict[str, str]], port: int) -> bool:
    """Whether `pod`'s policies let traffic in from (Ingress) or out to (Egress) `other` on TCP `port` (named ports: the destination's)."""
    namespace, labels, named = pod
    policies = [
        p for p in POLICIES
        if p["metadata"].get("namespace", NAMESPACE) == namespace and _selects(p["spec"]["podSelector"], labels)
        and direction in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not policies:
        return True
    names = {n for n, number in named.items() if number == port} if direction == "Ingress" else set()
    key, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in policies:
        for rule in policy["spec"].get(key, []):
            ports = rule.get("ports")
            port_ok = not ports or any(p.get("protocol", "TCP") == "TCP" and p.get("port") in (None, port, *names) for p in ports)
            peer_ok = peers not in rule or any(_peer_admits(peer, namespace, other) for peer in rule[peers])
            if port_ok and peer_ok:
                return True
    return False


def connects(source: tuple[str, dict[str, str], dict[str, int]] | tuple[str, dict[str, str]], target: tuple[str, dict[str, str], dict[str, int]], port: int) -> bool:
    """Traffic from `source` reaches `target` on `port`: the source's egress and the target's ingress both allow it."""
    out = allowed("Egress", source, target[:2], port) if len(source) == 3 and source[0] == NAMESPACE else True
    return out and allowed("Ingress", target, source[:2], port)


def _pod(resource: dict[str, Any]) -> tuple[str, dict[str, str], dict[str, int]]:
    template = resource["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", []) if "name" in p}
    return NAMESPACE, template["metadata"]["labels"], ports


PODS = {r["metadata"]["name"]: _pod(r) for r in BASE if r["kind"] in ("Deployment", "StatefulSet")}
CLIENTS = [name for name in PODS if name != "rerank-redis"]


def test_the_namespace_enforces_the_restricted_profile():
    labels = kinds(BASE, "Namespace")[NAMESPACE]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_every_pod_is_denied_all_traffic_but_what_a_policy_allows():
    deny = [p for p in POLICIES if p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert deny, "a default-deny NetworkPolicy for the namespace"
    for name, pod in PODS.items():
        assert connects(pod, (*INTRUDER, {}), 9999) is False, name
        assert connects(INTRUDER, pod, 9999) is False, name
        # DNS: every pod resolves names (UDP is not modelled here; the TCP rule sits beside it)
        assert connects(pod, ("kube-system", {"k8s-app": "kube-dns"}, {}), 53), name


@pytest.mark.parametrize("client", CLIENTS)
def test_redis_is_reachable_from_its_clients_and_keda_only(client):
    redis, port = PODS["rerank-redis"], 6379
    assert PODS[client][1].get("rerank.io/redis-client") == "true"
    assert connects(PODS[client], redis, port)
    # KEDA's operator reads queue lengths from its own namespace; producers elsewhere that label themselves
    assert connects(("keda", {"app": "keda-operator"}), redis, port)
    assert connects(("research", {"rerank.io/redis-client": "true"}), redis, port)
    # Nobody else: an unlabelled pod here or elsewhere, the metrics scraper, the internet
    for stranger in (INTRUDER, ELSEWHERE, SCRAPER, INTERNET):
        assert not connects(stranger, redis, port), stranger
    # Redis itself opens no connection out, and clients reach nothing else in the namespace
    assert not connects(redis, PODS[client], 9809)
    assert not connects(PODS[client], (*INTRUDER, {}), port)


def test_metrics_ports_admit_only_the_scraper_and_only_workers_download_models():
    for name, resource in kinds(BASE, "Deployment").items():
        template = resource["spec"]["template"]
        annotations = template["metadata"].get("annotations") or {}
        if annotations.get("prometheus.io/scrape") != "true":
            continue
        port = int(annotations["prometheus.io/port"])
        assert connects(SCRAPER, PODS[name], port), name
        assert not connects(INTRUDER, PODS[name], port) or name == "rerank-gateway", name
        assert not connects(("monitoring", {"app": "grafana"}), PODS[name], port) or name == "rerank-gateway", name
    # The gateway's API answers the cluster (with an API key); nothing from outside it
    assert connects(ELSEWHERE, PODS["rerank-gateway"], 8080) and not connects(INTERNET, PODS["rerank-gateway"], 8080)
    # HTTPS out (the model's first download) for workers only
    for name, pod in PODS.items():
        assert connects(pod, (*INTERNET, {}), 443) == (pod[1]["app.kubernetes.io/name"] == "rerank-worker"), name


def test_external_redis_lets_clients_out_to_its_port_and_drops_the_in_cluster_redis_policy():
    policies = kinds(BUILT["external-redis"], "NetworkPolicy")
    assert "rerank-redis" not in policies
    (rule,) = policies["rerank-redis-clients"]["spec"]["egress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}] and "ipBlock" in rule["to"][0]


# Redis for clients outside the cluster ---------------------------------------------------------------

def test_base_exposes_nothing_outside_the_cluster():
    for name, service in kinds(BASE, "Service").items():
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", name


def test_redis_tls_overlay_publishes_only_the_tls_port_to_the_listed_ranges():
    resources = BUILT["redis-tls"]
    redis_set = kinds(resources, "StatefulSet")["rerank-redis"]
    redis_ports = {p["name"]: p["containerPort"] for p in container(redis_set)["ports"]}
    # Given the only Service of the overlay that reaches outside the cluster
    (external,) = [s for s in kinds(resources, "Service").values() if s["spec"].get("type", "ClusterIP") != "ClusterIP"]
    spec = external["spec"]
    assert spec["type"] in ("LoadBalancer", "NodePort") and spec["selector"] == redis_set["spec"]["selector"]["matchLabels"]
    # Then it forwards Redis's TLS port and nothing else, keeping the client's address for the NetworkPolicy
    (port,) = spec["ports"]
    assert redis_ports[port["targetPort"]] == redis_ports["redis-tls"] != redis_ports["redis"]
    assert spec["externalTrafficPolicy"] == "Local"
    ranges = spec["loadBalancerSourceRanges"]
    assert ranges and "0.0.0.0/0" not in ranges
    # And a NetworkPolicy admits exactly those ranges, on that port only, to Redis
    (policy,) = [p for p in kinds(resources, "NetworkPolicy").values() if any(
        "ipBlock" in peer for rule in p["spec"].get("ingress", []) for peer in rule.get("from", []))]
    assert policy["spec"]["podSelector"]["matchLabels"] == spec["selector"]
    (rule,) = policy["spec"]["ingress"]
    assert sorted(peer["ipBlock"]["cidr"] for peer in rule["from"]) == sorted(ranges)
    assert rule["ports"] == [{"protocol": "TCP", "port": redis_ports["redis-tls"]}]


def _redis_config(tmp_path: Path, password: str, tls: Path | None) -> dict[str, str]:
    """Run the Redis init container's script with its folders moved under tmp_path; the config it writes."""
    spec = kinds(BASE, "StatefulSet")["rerank-redis"]["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    script = init["command"][2]
    for folder in ("secret", "tls", "config"):
        (tmp_path / folder).mkdir(parents=True)
    # Move the paths the script reads and writes (`< /secret/`, `-f /tls/`, `> /config/`), not those it writes into the config
    script = re.sub(r"(?<=[<>] )/(secret|config)/|(?<=-f )/(tls)/", lambda m: f"{tmp_path}/{m.group(1) or m.group(2)}/", script)
    (tmp_path / "secret" / "redis-password").write_text(password + "\n")
    if tls is not None:
        for source, target in (("server.crt", "tls.crt"), ("server.key", "tls.key"), ("ca.crt", "ca.crt")):
            (tmp_path / "tls" / target).write_bytes((tls / source).read_bytes())
    subprocess.run(["sh", "-c", script], check=True, timeout=10)
    lines = (tmp_path / "config" / "redis.conf").read_text().splitlines()
    return dict(line.split(" ", 1) for line in lines)


def test_redis_init_script_turns_tls_on_only_when_the_certificate_secret_is_mounted(tmp_path, certificates):
    # Given no certificate, the config holds the password alone
    assert _redis_config(tmp_path / "plain", "pw", None) == {"requirepass": "pw"}
    # Given the Secret's three files, Redis also listens with TLS on the port the Pod declares
    config = _redis_config(tmp_path / "tls", "pw", certificates)
    ports = {p["name"]: p["containerPort"] for p in container(kinds(BASE, "StatefulSet")["rerank-redis"])["ports"]}
    assert config["tls-port"] == str(ports["redis-tls"]) and config["tls-auth-clients"] == "no"
    # And the files it names are where the Pod mounts the Secret
    mounts = {m["name"]: m["mountPath"] for m in container(kinds(BASE, "StatefulSet")["rerank-redis"])["volumeMounts"]}
    assert {config[k] for k in ("tls-cert-file", "tls-key-file", "tls-ca-cert-file")} == {f"{mounts['tls']}/{f}" for f in ("tls.crt", "tls.key", "ca.crt")}


@pytest.mark.integration
def test_redis_with_the_init_scripts_config_serves_tls_to_a_client_that_checks_it(tmp_path, certificates):
    import redis

    from tests.helpers import RedisServer, free_port

    # Given the config the init container writes, its files as Kubernetes mounts them (here under tmp_path)
    config = _redis_config(tmp_path, "pw-k8s", certificates)
    options = [part for key, value in config.items() for part in (f"--{key}", value.replace("/tls/", f"{tmp_path}/tls/"))]
    tls_port = free_port()
    server = RedisServer(tmp_path)
    server.start(*options, "--tls-port", str(tls_port))
    try:
        # When a client dials the TLS port, checking the server against the CA, with the password
        client = redis.Redis.from_url(
            f"rediss://:pw-k8s@127.0.0.1:{tls_port}/0?ssl_cert_reqs=required&ssl_ca_certs={certificates / 'ca.crt'}"
        )
        # Then it is served; without the password it is refused
        assert client.ping() is True
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=required&ssl_ca_certs={certificates / 'ca.crt'}").ping()
        client.close()
    finally:
        server.stop()


# Secrets the docs create ---------------------------------------------------------------------------


def secret_keys_read(node: Any, found: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """Every key of every Secret that `node` (resources, or any part of them) needs: env `secretKeyRef`s, secret
    volumes' `items` and KEDA's `secretTargetRef`s; what is marked `optional: true` is left out."""
    found = {} if found is None else found
    if isinstance(node, list):
        for item in node:
            secret_keys_read(item, found)
    elif isinstance(node, dict):
        ref = node.get("secretKeyRef")
        if isinstance(ref, dict) and not ref.get("optional"):
            found.setdefault(ref["name"], set()).add(ref["key"])
        volume = node.get("secret")
        if isinstance(volume, dict) and "secretName" in volume and not volume.get("optional"):
            found.setdefault(volume["secretName"], set()).update(item["key"] for item in volume.get("items", []))
        for target in node.get("secretTargetRef", []) if isinstance(node.get("secretTargetRef"), list) else []:
            found.setdefault(target["name"], set()).add(target["key"])
        for value in node.values():
            secret_keys_read(value, found)
    return found


def secrets_created_by_the_docs() -> list[tuple[str, str, set[str]]]:
    """(where, secret, keys) of each `kubectl create secret generic` in the README's and docs/' shell blocks."""
    from tests.test_doc_examples import PAGES, SHELL, blocks

    made = []
    for page in PAGES:
        for block in blocks(page):
            if block.language not in SHELL:
                continue
            for command in re.findall(r"create secret generic .*", block.code.replace("\\\n", " ")):
                name = command.split()[3]
                keys = set(re.findall(r"--from-(?:literal|file)=([\w.-]+)=", command))
                made.append((block.where, name, keys))
    return made


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_secret_key_a_manifest_reads_is_created_by_each_command_the_docs_give(layout):
    # Given the keys of each Secret the layout's resources read
    needed = secret_keys_read(build(KUBE / layout))
    made = secrets_created_by_the_docs()
    assert needed.get("rerank-secrets"), "the layout reads rerank-secrets"
    for secret, keys in needed.items():
        commands = [(where, created) for where, name, created in made if name == secret]
        # Then the docs create that Secret, and every command that creates it creates every key it needs
        assert commands, f"no command in the README or docs/ creates the Secret {secret}"
        for where, created in commands:
            assert keys <= created, f"{where}: `create secret generic {secret}` leaves out {sorted(keys - created)}"

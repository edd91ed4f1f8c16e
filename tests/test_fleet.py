"""Running it like a fleet: queues by device and priority, one pinned worker per device, scale-out."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contract.names import DEFAULT_QUEUE, queue_name, worker_queues
from producer import RerankClient, Settings
from tests.helpers import QUERY, ROOT, short_papers
from worker.cli import build_parser, celery_argv, pinned_workers

# Queues ---------------------------------------------------------------------------------------


def test_queue_names_by_model_device_class_and_priority():
    model = "BAAI/bge-reranker-v2-m3"
    assert queue_name("gpu", model=model) == "rerank.baai-bge-reranker-v2-m3.gpu.interactive"
    assert queue_name("cpu", "bulk", model=model) == "rerank.baai-bge-reranker-v2-m3.cpu.bulk"
    with pytest.raises(ValueError, match="unknown priority 'urgent'"):
        queue_name("gpu", "urgent", model=model)
    with pytest.raises(ValueError, match="unknown device class 'tpu'"):
        queue_name("tpu", model=model)
    # A worker consumes its model's and class's interactive queue, the shared queue, then its bulk queue
    assert worker_queues("cuda:1") == [
        "rerank.baai-bge-reranker-v2-m3.gpu.interactive", "rerank.baai-bge-reranker-v2-m3", "rerank.baai-bge-reranker-v2-m3.gpu.bulk"
    ]
    # RERANK_QUEUE, when set, replaces the shared queue only
    assert worker_queues("cpu", "mine", "org/small") == ["rerank.org-small.cpu.interactive", "mine", "rerank.org-small.cpu.bulk"]


def test_rerank_worker_names_itself_after_its_device_and_consumes_its_class_queues():
    args, rest = build_parser().parse_known_args(["--device", "cuda:3"])
    settings = Settings(model="org/small")
    argv = celery_argv(args, rest, settings.queue, "cuda:3", settings.model)
    assert "--hostname=gpu3@%h" in argv
    assert "--queues=rerank.org-small.gpu.interactive,rerank.org-small,rerank.org-small.gpu.bulk" in argv
    args, rest = build_parser().parse_known_args(["-Q", "only-this"])
    assert "--queues=only-this" in celery_argv(args, rest, DEFAULT_QUEUE, "cpu")


@pytest.mark.integration
def test_a_worker_takes_interactive_work_before_bulk_work(start_worker, redis_server, tiny_model):
    # Given six bulk jobs queued before three interactive ones, and no worker yet
    def client(queue: str) -> RerankClient:
        return RerankClient(Settings(broker_url=redis_server.url, queue=queue, model=str(tiny_model)))

    bulk = [client("prio.bulk").submit_documents(QUERY, short_papers(4, n), top_k=2) for n in range(6)]
    interactive = [client("prio.interactive").submit_documents(QUERY, short_papers(4, n), top_k=2) for n in range(3)]
    # When one single-process worker consuming "interactive, then bulk" comes up
    start_worker("-Q", "prio.interactive,prio.bulk", name="prio").wait_until_loaded(processes=1)
    for handle in bulk + interactive:
        handle.result(timeout=60)
    # Then every interactive job finished before any bulk job (round robin would interleave them)
    done = {h.id: h.backend.app.AsyncResult(h.id).date_done for h in bulk + interactive}
    order = sorted(done, key=done.get)
    assert set(order[:3]) == {h.id for h in interactive}, order


# One pinned worker per device -------------------------------------------------------------------


def test_each_device_gets_its_own_pinned_worker_named_after_it(capsys):
    plan = pinned_workers("cuda:0,cuda:1,cuda:3,cpu", ["-c", "1", "-n", "ignored@%h"], environ={})
    assert [w.hostname for w in plan] == ["gpu0@%h", "gpu1@%h", "gpu3@%h", "cpu@%h"]
    # Each GPU worker sees exactly its GPU, which it then calls cuda:0; the CPU worker sees none
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in plan] == ["0", "1", "3", ""]
    assert [w.env["RERANK_DEVICE"] for w in plan] == ["cuda:0", "cuda:0", "cuda:0", "cpu"]
    for worker in plan:
        args, unknown = build_parser().parse_known_args(worker.argv)
        assert unknown == [] and args.device == worker.env["RERANK_DEVICE"] and args.hostname == worker.hostname
        assert args.devices is None, "children must not start children"
    # Each serves its metrics on its own port and beats its own heartbeat file
    plan = pinned_workers("cuda:0,cpu", [], environ={"RERANK_METRICS_PORT": "9809", "RERANK_HEARTBEAT_FILE": "/tmp/hb"})
    assert [(w.env["RERANK_METRICS_PORT"], w.env["RERANK_HEARTBEAT_FILE"]) for w in plan] == [("9809", "/tmp/hb.gpu0"), ("9810", "/tmp/hb.cpu")]
    # A wrong list is a settings error: exit code 2 and one line saying what is wrong
    for devices, line in {"cuda:0,cuda:0": "lists a device twice", "gpu1": "not 'gpu1'"}.items():
        with pytest.raises(SystemExit) as refused:
            pinned_workers(devices, [])
        assert refused.value.code == 2 and line in capsys.readouterr().err


SUPERVISOR_PROBE = """
import json, sys
import worker.cli as cli

class Child:
    pid = 0
    returncode = 0
    def poll(self): return 0
    def wait(self): return 0
    def send_signal(self, signum): pass

spawned = []
def spawn(argv, env, **kwargs):
    spawned.append({"argv": argv, "cuda": env["CUDA_VISIBLE_DEVICES"], "device": env["RERANK_DEVICE"], "kwargs": sorted(kwargs)})
    return Child()

code = cli.supervise(cli.pinned_workers("cuda:0,cuda:1,cpu", ["-c", "1"]), spawn=spawn)
print(json.dumps({"code": code, "spawned": spawned, "torch": "torch" in sys.modules,
                  "celery_worker": "worker.app" in sys.modules}))
"""


def test_the_supervisor_never_imports_torch_and_starts_fresh_pinned_processes():
    # Given a fresh interpreter that runs the --devices supervisor with a recording spawn
    out = subprocess.run([sys.executable, "-c", SUPERVISOR_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    # Then it started one new interpreter per device, each with its GPU chosen in the environment
    assert [(s["cuda"], s["device"]) for s in report["spawned"]] == [("0", "cuda:0"), ("1", "cuda:0"), ("", "cpu")]
    assert all(s["argv"][:3] == [sys.executable, "-m", "worker.cli"] for s in report["spawned"])
    assert all("start_new_session" in s["kwargs"] for s in report["spawned"])
    # And the supervisor itself never imported torch (so it cannot have touched CUDA) nor the worker app
    assert report["torch"] is False and report["celery_worker"] is False
    assert report["code"] == 0


def _mapped_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.integration
def test_devices_starts_a_real_pinned_worker_and_the_parent_loads_no_torch(redis_server, tiny_model, tmp_path):
    # Given `rerank-worker --devices cpu` on its own queue
    env = {**os.environ, "RERANK_BROKER_URL": redis_server.url, "RERANK_MODEL": str(tiny_model), "RERANK_TORCH_THREADS": "1"}
    log = tmp_path / "supervisor.log"
    with log.open("wb") as out:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "--devices", "cpu", "-Q", "pinned"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        client = RerankClient(Settings(broker_url=redis_server.url, queue="pinned", model=str(tiny_model)))
        # When it serves a job
        result = client.rerank_documents(QUERY, short_papers(5), top_k=2, timeout=120)
        # Then its child, named after the device, did the work, with no GPU visible
        assert result.info.worker.startswith("cpu@") and result.info.device == "cpu"
        child_pid = result.info.pid
        assert Path(f"/proc/{child_pid}/environ").read_bytes().split(b"\0").count(b"CUDA_VISIBLE_DEVICES=") == 1
        # And the supervisor process has no torch library mapped at all, while the worker does
        assert "libtorch" not in _mapped_libraries(supervisor.pid)
        assert "libtorch" in _mapped_libraries(child_pid)
        # When the supervisor gets SIGTERM, Then it passes it on and every process exits
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0
        assert not Path(f"/proc/{child_pid}").exists() or "zombie" in Path(f"/proc/{child_pid}/status").read_text()
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
    assert "started cpu@%h on cpu" in log.read_text()


# Scale-out --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_jobs_spread_over_workers_and_a_worker_that_joins_takes_jobs(start_worker, redis_server, tiny_model):
    # Given two single-process workers consuming one queue
    workers = [start_worker("-Q", "scale", name=f"scale{n}-") for n in range(2)]
    for worker in workers:
        worker.wait_until_loaded(processes=1)
    client = RerankClient(Settings(broker_url=redis_server.url, queue="scale", model=str(tiny_model)))
    # When 40 jobs are sent at once
    handles = [client.submit_documents(QUERY, short_papers(12, n), top_k=3) for n in range(40)]
    split = collections.Counter(h.result(timeout=120).info.worker.split("@")[0] for h in handles)
    print(f"40 jobs over 2 workers: {dict(sorted(split.items()))}")
    # Then both took a share
    assert sum(split.values()) == 40 and len(split) == 2, split

    # When a third worker joins while work keeps arriving
    joiner = start_worker("-Q", "scale", name="joiner")
    pending, by_worker, deadline = [], collections.Counter(), time.monotonic() + 120
    n = 0
    while by_worker["joiner2"] < 3:
        assert time.monotonic() < deadline, f"the new worker took no jobs: {by_worker}\n{joiner.output()[-2000:]}"
        while len(pending) < 8:  # keep a backlog so that every worker always has something to take
            pending.append(client.submit_documents(QUERY, short_papers(12, n), top_k=3))
            n += 1
        handle = pending.pop(0)
        by_worker[handle.result(timeout=120).info.worker.split("@")[0]] += 1
    for handle in pending:
        by_worker[handle.result(timeout=120).info.worker.split("@")[0]] += 1
    print(f"after the join: {dict(sorted(by_worker.items()))}")
    # Then the newcomer takes jobs beside the others, which were already serving before it came up
    assert by_worker["joiner2"] >= 3
    assert sum(by_worker[f"scale{k}-{k}"] for k in range(2)) > 0


def test_rerank_worker_lists_its_exit_codes_in_its_help_and_the_operations_page_the_same():
    import re

    from worker.cli import EXIT_CODES

    # Given the exit codes rerank-worker defines
    help_text = " ".join(build_parser().format_help().split())
    page = (Path(__file__).parents[1] / "docs" / "operations.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| (.+) \|$", page.split("`rerank-worker`'s", 1)[1], re.MULTILINE)[:3])
    for code, meaning in EXIT_CODES.items():
        # Then its help lists each, and the operations page's table says the same
        assert f"{code} {meaning}" in help_text, code
        assert rows[str(code)].replace("`", "") == meaning, code

"""Flower, the real package, shows our workers, task types, finished tasks, progress, queues and metrics."""

from __future__ import annotations

import importlib.util
import json

import pytest

from producer import RerankClient, Settings
from tests.helpers import CORPUS, FLOWER_COMMAND, QUERY, ROOT, Flower, skip_or_fail, wait_for

if importlib.util.find_spec("flower") is None:
    skip_or_fail("flower is not installed (pip install -e '.[test]')")

@pytest.mark.integration
def test_flower_shows_workers_tasks_progress_queues_and_metrics(start_worker, redis_server, tiny_model, tmp_path):
    # Given Flower with basic auth, and one single-process worker that reports progress after every batch
    flower = Flower(redis_server.url, tmp_path / "flower.log")
    try:
        worker = start_worker(
            "-Q", "flower", env={"RERANK_PROGRESS_INTERVAL": "0", "RERANK_MAX_BATCH_TOKENS": "256"}, name="flower"
        )
        flower.wait_until_up()
        worker.wait_until_loaded(processes=1)
        client = RerankClient(Settings(broker_url=redis_server.url, queue="flower", model=str(tiny_model)))
        papers = [{"id": f"f{i}", "title": CORPUS[i], "text": CORPUS[i + 1]} for i in range(10)]

        # The API needs the password; health and metrics stay open for probes and Prometheus
        assert flower.get("/api/workers", auth=False)[0] == 401
        assert flower.get("/metrics", auth=False)[0] == 200

        # When a two-stage job runs
        done = client.two_stage(QUERY, papers, top_k_docs=3, timeout=60)
        name = done.documents.info.worker

        # Then Flower lists the worker, with our per-worker report among its stats
        # (a pool process writes its counts within half a second of a task)
        def listed() -> dict | None:
            worker = flower.json(f"/api/workers?refresh=1&workername={name}").get(name)
            return worker if worker and worker["stats"]["rerank"]["tasks"] >= 2 else None

        workers = wait_for(listed, 30, "Flower to list the worker and its two tasks", interval=0.2)
        assert workers["stats"]["rerank"]["model"] == str(tiny_model)
        assert "flower" in {q["name"] for q in workers["active_queues"]}
        # And our task types, and each stage finished with its runtime
        types = wait_for(lambda: {"rerank.documents", "rerank.chunks"} <= set(flower.json("/api/task/types")["task-types"]), 30, "Flower to know both task types", interval=0.1)
        assert types
        tasks = wait_for(lambda: [t for t in flower.json("/api/tasks").values() if t["state"] == "SUCCESS"], 30, "Flower to show succeeded tasks", interval=0.1)
        assert {t["name"] for t in tasks} == {"rerank.documents", "rerank.chunks"}
        assert all(t["runtime"] > 0 and t["worker"] == name for t in tasks)
        # (queued work is visible from "sent", before any worker takes it: task_send_sent_event)
        assert all(t["sent"] for t in tasks)
        # And no event carried the query or a paper's text: arguments and results are named by their sizes
        shown = json.dumps(flower.json("/api/tasks"))
        assert QUERY not in shown and papers[0]["title"] not in shown, shown[:2000]
        assert all(t["args"].startswith("<documents: stored in rerank.job.") for t in tasks if t["name"] == "rerank.documents")
        assert all(t["result"].startswith("<scored ") for t in tasks), [t["result"] for t in tasks]

        # When a long job keeps the worker busy and three more wait behind it
        chunks = [{"id": f"c{i}", "doc_id": "d", "section": "Results", "text": f"{CORPUS[i % len(CORPUS)]} ({i})"} for i in range(2000)]
        long_job = client.submit_chunks(QUERY, chunks, top_k=3)
        states = []

        def state() -> str | None:
            status, body = flower.get(f"/api/task/info/{long_job.id}")  # 404 until Flower has an event for it
            states.append(json.loads(body)["state"] if status == 200 else None)
            return states[-1] == "PROGRESS"

        progress = wait_for(state, 30, "Flower to show the task's progress", interval=0.05)
        waiting = [client.submit_documents(QUERY, papers, top_k=2) for _ in range(3)]
        # Then Flower shows its PROGRESS state live, and the backend's batches done of total
        assert progress, states
        # (its result endpoint reads the result backend, as the producer's job.progress() does)
        assert wait_for(lambda: flower.json(f"/api/task/result/{long_job.id}")["state"] == "PROGRESS", 30, "the PROGRESS state in Flower's task result", interval=0.05)
        # And the queue length counts the three waiting jobs
        lengths = wait_for(lambda: {q["name"]: q["messages"] for q in flower.json("/api/queues/length")["active_queues"]}.get("flower") == 3, 30, "Flower to count 3 queued messages", interval=0.05)
        assert lengths, flower.json("/api/queues/length")
        for handle in [long_job, *waiting]:
            handle.result(timeout=120)
        assert wait_for(lambda: {q["name"]: q["messages"] for q in flower.json("/api/queues/length")["active_queues"]}["flower"] == 0, 30, "the queue to drain", interval=0.1)

        # And /metrics (Prometheus) carries our tasks' events and runtimes
        metrics = flower.get("/metrics", auth=False)[1].decode()
        assert 'task="rerank.documents"' in metrics and 'task="rerank.chunks"' in metrics
        runtime = [line for line in metrics.splitlines() if line.startswith("flower_task_runtime_seconds_count") and "rerank.chunks" in line]
        assert runtime and float(runtime[0].rsplit(" ", 1)[1]) >= 2
    finally:
        flower.stop()


def test_the_readme_the_docs_compose_and_kubernetes_start_flower_the_same_way():
    import re

    import yaml

    # Given every Flower command the README and docs/ give (in code spans and blocks)
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    given = set()
    for page in pages:
        fenced = False
        for line in page.read_text().splitlines():
            fenced ^= line.lstrip().startswith("```")
            found = [line.strip()] if fenced and not line.lstrip().startswith(("#", "```")) else re.findall(r"`([^`]+)`", line)
            given |= {(page.name, command) for command in found if re.search(r"\bcelery\b.*\bflower\b", command)}
    # Then there is one, the command the Flower of these tests runs, in the README and in the operations page
    assert {command for _, command in given} == {FLOWER_COMMAND}, given
    assert {"README.md", "operations.md"} <= {page for page, _ in given}
    # And compose and Kubernetes run Flower with the same variables set
    variables = set(re.findall(r"(\w+)=", FLOWER_COMMAND))
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["flower"]
    kube = next(d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/base/flower.yaml").read_text()) if d and d["kind"] == "Deployment")
    (container,) = kube["spec"]["template"]["spec"]["containers"]
    for command, env in ((compose["command"], set(compose["environment"])), (container["command"], {e["name"] for e in container["env"]})):
        assert command[:2] == ["celery", "flower"] and variables <= env

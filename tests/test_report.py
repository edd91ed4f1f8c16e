"""Each worker reports what it serves and how much it did; long jobs report their progress."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from contract.names import PROGRESS_STATE, REPORT_COMMAND
from producer import RerankClient, Settings
from producer.app import create_app
from tests.helpers import CORPUS, QUERY, ROOT, short_papers, wait_for


def report_cli(broker_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RERANK_BROKER_URL": broker_url}
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "report", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


@pytest.mark.integration
def test_a_worker_with_two_processes_reports_its_model_memory_and_work(start_worker, redis_server, tiny_model):
    # Given a worker with two pool processes on its own queue
    worker = start_worker("-c", "2", "-Q", "report", name="report")
    worker.wait_until_loaded(processes=2)
    client = RerankClient(Settings(broker_url=redis_server.url, queue="report", model=str(tiny_model)))
    # When it scores eight jobs of 7 papers each
    handles = [client.submit_documents(QUERY, short_papers(7, n), top_k=3) for n in range(8)]
    served = [h.result(timeout=60) for h in handles]
    app = create_app(Settings(broker_url=redis_server.url))

    name = served[0].info.worker

    def report():
        replies = app.control.broadcast(REPORT_COMMAND, reply=True, timeout=3, destination=[name])
        body = replies[0][name] if replies else None
        return body if body and body["tasks"] == 8 else None

    body = wait_for(report, 20, "a report with all 8 tasks counted", interval=0.1)
    # Then its report counts the work of both processes
    assert body["documents"] == 56 and body["pairs"] == 56
    assert body["documents_per_second"] > 0 and body["busy_seconds"] > 0
    assert {p["pid"] for p in body["processes"]} == {int(pid) for pid in re.findall(r"model loaded: pid=(\d+)", worker.output())}
    assert body["loaded_processes"] == 2 and all(p["alive"] for p in body["processes"])
    assert sum(p["tasks"] for p in body["processes"]) == 8
    # And it describes the model each process serves, its architecture
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_model)
    parameters = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(tiny_model).parameters())
    assert body["model"] == str(tiny_model) and body["device"] == "cpu" and body["dtype"] == "float32"
    assert body["max_length"] == 512 and body["parameters"] == parameters and body["attention"] == "packed"
    arch = body["architecture"]
    assert arch["layers"] == config.num_hidden_layers and arch["hidden_size"] == config.hidden_size
    assert arch["architectures"] == ["XLMRobertaForSequenceClassification"]
    assert "roberta: XLMRobertaModel" in arch["modules"]
    # And its memory: RSS of each live process, no GPU here
    assert body["memory"]["rss_mb"] > 2 * 50 and body["memory"]["gpu_allocated_mb"] is None
    assert body["processes"][0]["memory"]["weights_mb"] == pytest.approx(parameters * 4 / 2**20, abs=0.01)

    # When `inspect stats` is asked (what Flower shows on the worker page), Then the report is there too
    stats = app.control.inspect(timeout=3, destination=[name]).stats()
    assert stats[name]["rerank"]["tasks"] == 8

    # When the CLI prints it, Then it shows the same facts as text and as JSON
    text = report_cli(redis_server.url, "-d", name)
    assert text.returncode == 0, text.stderr
    assert f"model: {tiny_model}" in text.stdout and "8 tasks, 56 documents" in text.stdout
    assert f"parameters: {parameters:,}" in text.stdout and "2 pool process(es)" in text.stdout
    as_json = json.loads(report_cli(redis_server.url, "--json", "-d", name).stdout)
    assert as_json[name]["documents"] == 56


def test_the_report_cli_says_what_is_wrong_without_a_broker_or_workers(redis_server):
    env_free = report_cli("")
    assert env_free.returncode == 2 and "set RERANK_BROKER_URL" in env_free.stderr
    nobody = report_cli(redis_server.url, "-d", "nobody@nowhere", "--timeout", "0.5")
    assert nobody.returncode == 1 and "no worker replied" in nobody.stderr


@pytest.mark.integration
def test_a_long_job_reports_batches_done_of_total_while_it_runs(start_worker, redis_server, tiny_model):
    # Given a worker that packs few pairs per forward pass and reports after every batch
    start_worker(
        "-Q", "progress", env={"RERANK_PROGRESS_INTERVAL": "0", "RERANK_MAX_BATCH_TOKENS": "256"}, name="progress"
    ).wait_until_loaded(processes=1)
    client = RerankClient(Settings(broker_url=redis_server.url, queue="progress", model=str(tiny_model)))
    # When a job with 3,000 distinct chunks runs
    chunks = [{"id": f"c{i}", "doc_id": f"d{i // 10}", "section": "Results", "text": f"{CORPUS[i % len(CORPUS)]} (record {i})"} for i in range(3000)]
    handle = client.submit_chunks(QUERY, chunks, top_k=5)
    seen = []
    deadline = time.monotonic() + 120
    while (meta := client.backend.meta(handle.id))["status"] not in ("SUCCESS", "FAILURE") and time.monotonic() < deadline:
        if meta["status"] == PROGRESS_STATE:  # one read: the state and its meta together
            seen.append(meta["result"])
        time.sleep(0.02)
    final = handle.result(timeout=60)
    # Then the producer saw PROGRESS states counting batches up towards a fixed total
    assert len(seen) >= 3, seen
    totals = {s["total"] for s in seen}
    assert len(totals) == 1 and totals.pop() >= 100
    done = [s["done"] for s in seen]
    assert done == sorted(done) and done[0] < done[-1] < seen[0]["total"]
    assert {s["stage"] for s in seen} == {"chunks"} and seen[0]["worker"].startswith("progress")
    # And the job still finished with all chunks scored
    assert final.scored == 3000 and len(final.items) == 5

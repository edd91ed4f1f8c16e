"""What a worker logs per task: one line at INFO with sizes and timings, never the result; the result at DEBUG."""

from __future__ import annotations

import json
import re

import pytest

from producer import RerankClient, Settings
from producer.jobs import stage1_id
from tests.helpers import QUERY, candidates, short_papers, wait_for

# Celery's worker log format: "[2026-01-02 03:04:05,678: INFO/ForkPoolWorker-1] message"
LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}: (?P<level>[A-Z]+)/[^\]]+\] (?P<message>.*)$")


def lines(log: str, level: str) -> list[str]:
    """The messages of the log's lines at `level`."""
    return [m["message"] for m in map(LINE.match, log.splitlines()) if m and m["level"] == level]


@pytest.mark.integration
def test_a_worker_logs_one_line_per_task_at_info_and_the_result_only_at_debug(start_worker, redis_server, tiny_model):
    # Given a worker logging at DEBUG on its own queue
    worker = start_worker("-l", "DEBUG", "-Q", "task-log", name="tasklog")
    worker.wait_until_loaded(processes=1)
    client = RerankClient(Settings(broker_url=redis_server.url, queue="task-log", model=str(tiny_model)))
    # When it runs a stage-1 job, a plain-passage job and a two-stage job: four tasks
    documents = client.submit_documents(QUERY, short_papers(7), top_k=3)
    passages = client.submit_passages(QUERY, [p["text"] for p in short_papers(5, 1)])
    two_stage = client.submit(QUERY, candidates(6), top_k_docs=2)
    results = {
        ("rerank.documents", documents.id): documents.result(timeout=60),
        ("rerank.passages", passages.id): passages.result(timeout=60),
    }
    both = two_stage.result(timeout=60)
    results[("rerank.documents", stage1_id(two_stage.id))] = both.documents
    results[("rerank.chunks", two_stage.id)] = both.chunks

    def logged_all() -> str | None:
        log = worker.output()
        return log if log.count("] result: ") == 4 else None

    done = wait_for(logged_all, 30, "four results logged at DEBUG")

    info, debug = lines(done, "INFO"), lines(done, "DEBUG")
    for (task, task_id), result in results.items():
        named = [line for line in info if f"[{task_id}]" in line]
        # Then each task has one INFO line of what it did, beside Celery's line for the delivery
        (line,) = [line for line in named if " succeeded in " in line]
        assert named == [f"Task {task}[{task_id}] received", line], named
        # Which gives its sizes and timings as the result counts them, not the result itself
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        assert line.startswith(f"Task {task}[{task_id}] succeeded in ")
        assert int(fields["scored"]) == result.scored and int(fields["pairs"]) == result.info.pairs
        assert int(fields["tokens"]) == result.info.tokens and int(fields["batches"]) == result.info.batches
        assert fields["oom_splits"] == "0" and fields["queue"] == "task-log" and fields["worker"] == result.info.worker
        assert float(fields["forward_ms"]) == pytest.approx(result.info.forward_ms, abs=0.051)
        assert float(fields["tokenize_ms"]) == pytest.approx(result.info.tokenize_ms, abs=0.051)
        assert float(fields["queue_wait_ms"]) >= 0 and float(fields["total_ms"]) >= float(fields["forward_ms"])
        # And DEBUG has the whole result
        (logged,) = [line.split(" result: ", 1)[1] for line in debug if line.startswith(f"Task {task}[{task_id}] result: ")]
        ranking = json.loads(logged)
        ranking = ranking.get("chunks", ranking)
        assert [(i["id"], i["score"]) for i in ranking["items"]] == [(i.id, i.score) for i in result.items]
    # And no INFO line carries a result (its query or items), nor does Celery log its own at any level
    assert not [line for line in info if QUERY in line or "'items'" in line or '"items"' in line]
    assert "succeeded in" not in "\n".join(line for line in debug if "rerank." in line and " result: " not in line)

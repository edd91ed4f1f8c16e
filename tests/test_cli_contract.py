"""`rerank` keeps its word: one exit-code table for every subcommand, `--json` everywhere, `--version`,
`-` for standard input, quiet on a closed pipe, and a `workers` table that fits 80 columns.

Each test runs the command as a user would: a subprocess against a real Redis (and a real worker where
one is needed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contract.errors import WorkerError
from producer.cli import EXIT_CODES
from tests.helpers import RedisServer, free_port

EXAMPLE = Path(__file__).parents[1] / "examples" / "af_ckd_job.json"
JOB = json.loads(EXAMPLE.read_text())
SMALL = {"query": JOB["query"], "candidates": JOB["candidates"][:3], "top_k_docs": 2}
COMMANDS = ("run", "batch", "status", "cancel", "workers", "metrics")


def rerank(*args: str, broker: str | None, model: Path | str = "BAAI/bge-reranker-base", stdin: str | None = None,
           queue: str | None = None) -> subprocess.CompletedProcess:
    """Run `rerank` in a fresh interpreter with only the environment a user would set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    env.update({"RERANK_MODEL": str(model), "RERANK_TORCH_THREADS": "1", "COLUMNS": "80"})
    if broker:
        env["RERANK_BROKER_URL"] = broker
    if queue:
        env["RERANK_QUEUE"] = queue
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], env=env, input=stdin, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def empty_redis(tmp_path_factory: pytest.TempPathFactory):
    """A Redis no worker listens on: nothing answers, nothing runs."""
    server = RedisServer(tmp_path_factory.mktemp("cli-contract-redis"))
    server.start("--appendonly", "no")
    yield server
    server.stop()


def files(tmp_path: Path) -> dict[str, str]:
    job = tmp_path / "job.json"
    job.write_text(json.dumps(SMALL))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(SMALL) + "\n")
    return {"@job": str(job), "@jobs": str(jobs)}


def argv_for(command: str, paths: dict[str, str]) -> list[str]:
    """The least a user types for each subcommand."""
    return {
        "run": ["run", paths["@job"]], "batch": ["batch", paths["@jobs"], "--no-progress"], "status": ["status", "4f1c2b"],
        "cancel": ["cancel", "4f1c2b"], "workers": ["workers", "--timeout", "0.5"], "metrics": ["metrics", "--once"],
    }[command]


def test_the_help_and_every_subcommands_help_list_the_one_exit_code_table():
    # Given the documented table
    # When the top-level help and each subcommand's help are printed
    for args in (["--help"], *([c, "--help"] for c in COMMANDS)):
        completed = rerank(*args, broker=None)
        # Then each lists every code, and each line fits 80 columns
        assert completed.returncode == 0, completed.stderr
        for code in EXIT_CODES:
            assert f"\n  {code:>3}  " in completed.stdout, (args, code)
        assert "--json" in completed.stdout
        assert max(len(line) for line in completed.stdout.splitlines()) <= 80


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    completed = rerank("--version", broker=None)
    assert completed.returncode == 0 and completed.stdout.strip() == f"rerank {version('bge-rerank-celery')}"


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_option_exits_2_with_the_subcommands_own_usage(command, tmp_path):
    completed = rerank(*argv_for(command, files(tmp_path)), "--no-such-option", broker=None)
    assert completed.returncode == 2
    assert completed.stderr.startswith(f"usage: rerank {command} ") and "unrecognized arguments: --no-such-option" in completed.stderr


@pytest.mark.parametrize("command", ["status", "cancel", "workers", "metrics"])
@pytest.mark.parametrize("where", ["after", "before"])
def test_without_a_broker_the_commands_that_need_one_exit_2_and_say_so_in_json(command, where, tmp_path):
    # Given no RERANK_BROKER_URL, and --json before or after the subcommand
    argv = argv_for(command, files(tmp_path))
    argv = argv + ["--json"] if where == "after" else ["--json", *argv]
    # When a command that needs workers runs
    completed = rerank(*argv, broker=None)
    # Then it exits 2 (settings), names the setting, and --json gets the error as JSON
    assert completed.returncode == 2, completed.stderr
    assert "RERANK_BROKER_URL" in completed.stderr and "Traceback" not in completed.stderr
    answer = json.loads(completed.stdout)
    assert answer["exit_code"] == 2 and answer["error"]["type"] == "InvalidRequest" and "RERANK_BROKER_URL" in answer["error"]["message"]


def test_run_no_wait_without_a_broker_exits_2(tmp_path):
    completed = rerank("run", files(tmp_path)["@job"], "--no-wait", broker=None)
    assert completed.returncode == 2 and "RERANK_BROKER_URL" in completed.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_a_broker_that_is_down_exits_3_for_every_subcommand(command, tmp_path):
    # Given a broker URL nothing listens on
    broker = f"redis://127.0.0.1:{free_port()}/0"
    # When any subcommand runs, with --json
    completed = rerank(*argv_for(command, files(tmp_path)), "--json", broker=broker)
    # Then it exits 3, says it cannot reach the broker, and prints that as JSON
    assert completed.returncode == 3, completed.stderr
    assert "cannot reach" in completed.stderr and "Traceback" not in completed.stderr
    assert json.loads(completed.stdout.splitlines()[0] if command == "batch" else completed.stdout)["exit_code"] == 3


@pytest.mark.integration
def test_status_of_an_id_no_job_has_exits_6_and_says_celery_cannot_tell_it_from_queued(empty_redis):
    # Given an id no job has
    # When its status is asked for, as a table and as JSON
    table = rerank("status", "no-job-has-this-id", broker=empty_redis.url)
    as_json = rerank("status", "no-job-has-this-id", "--json", broker=empty_redis.url)
    # Then both exit 6, not 0, and say what that means
    assert table.returncode == 6 and as_json.returncode == 6
    assert "PENDING" in table.stdout and "still queued, or no job has this id" in table.stderr
    assert json.loads(as_json.stdout)["state"] == "PENDING"


@pytest.mark.integration
def test_a_queued_job_no_worker_took_is_6_then_cancel_makes_it_5(empty_redis):
    # Given a job sent to a queue no worker consumes
    sent = rerank("run", "-", "--no-wait", "--json", broker=empty_redis.url, queue="cli-contract", stdin=json.dumps(SMALL))
    assert sent.returncode == 0, sent.stderr
    job_id = json.loads(sent.stdout)["job_id"]
    # When its status is asked for, then it is cancelled, then asked for again
    queued = rerank("status", job_id, broker=empty_redis.url)
    cancel = rerank("cancel", job_id, "--json", broker=empty_redis.url)
    again = rerank("cancel", job_id, broker=empty_redis.url)
    cancelled = rerank("status", job_id, "--json", broker=empty_redis.url)
    # Then queued reads like unknown (6); cancel succeeds (0) once, then says there is nothing to cancel; the job is REVOKED (5)
    assert queued.returncode == 6
    assert cancel.returncode == 0 and json.loads(cancel.stdout) == {"job_id": job_id, "cancelled": True, "state_before": "PENDING"}
    assert again.returncode == 0 and "already finished (REVOKED)" in again.stdout
    assert cancelled.returncode == 5 and json.loads(cancelled.stdout)["state"] == "REVOKED"


@pytest.mark.integration
def test_a_failed_job_exits_1_from_status(empty_redis):
    # Given a job whose stages a worker recorded as failed (Celery's own backend call, as a worker makes it)
    from producer import RerankClient, Settings

    client = RerankClient(Settings(broker_url=empty_redis.url, model="BAAI/bge-reranker-base"))
    job = client.job("failed-job")
    for task_id in job.task_ids.values():
        client.app.backend.mark_as_failure(task_id, WorkerError("scoring failed: out of memory"))
    # When its status is asked for
    completed = rerank("status", "failed-job", "--json", broker=empty_redis.url)
    # Then it exits 1 and names the error
    assert completed.returncode == 1, completed.stderr
    report = json.loads(completed.stdout)
    assert report["state"] == "FAILURE" and "out of memory" in report["stages"][1]["error"]


@pytest.mark.integration
def test_run_that_gets_no_result_in_time_exits_4_and_prints_the_id(empty_redis, tmp_path):
    completed = rerank("run", files(tmp_path)["@job"], "--timeout", "1", "--json", broker=empty_redis.url, queue="cli-contract")
    assert completed.returncode == 4, completed.stderr
    assert json.loads(completed.stdout)["state"] == "TIMEOUT"


@pytest.mark.integration
def test_workers_with_none_answering_exits_6_and_json_is_an_empty_list(empty_redis):
    completed = rerank("workers", "--timeout", "0.5", "--json", broker=empty_redis.url)
    assert completed.returncode == 6 and json.loads(completed.stdout) == [] and "no worker answered" in completed.stderr


@pytest.mark.integration
def test_metrics_once_as_json_lists_each_queue(empty_redis):
    # Given one job waiting on a queue
    rerank("run", "-", "--no-wait", broker=empty_redis.url, queue="cli-metrics", stdin=json.dumps(SMALL))
    # When the queue's metrics are printed once, as JSON
    completed = rerank("metrics", "--once", "--json", "--queues", "cli-metrics,cli-empty", broker=empty_redis.url)
    # Then each queue is there with its depth
    assert completed.returncode == 0, completed.stderr
    depths = {q["queue"]: q for q in json.loads(completed.stdout)}
    assert depths["cli-metrics"]["messages"] == 1 and depths["cli-metrics"]["oldest_age_s"] >= 0
    assert depths["cli-empty"] == {"queue": "cli-empty", "messages": 0, "oldest_age_s": None}


@pytest.mark.integration
def test_an_all_invalid_batch_exits_2_and_queues_nothing(empty_redis):
    from redis import Redis

    completed = rerank("batch", "-", "--no-progress", broker=empty_redis.url, queue="cli-invalid", stdin='{"query": ""}\n[1]\n')
    assert completed.returncode == 2, completed.stderr
    assert [json.loads(line)["state"] for line in completed.stdout.splitlines()] == ["INVALID", "INVALID"]
    assert Redis.from_url(empty_redis.url).llen("cli-invalid") == 0


@pytest.mark.integration
@pytest.mark.parametrize("command", COMMANDS)
def test_a_closed_pipe_ends_quietly_with_141(command, empty_redis, tmp_path):
    # Given a reader that has gone away before the command writes (`rerank ... | head` after head exits)
    argv = {
        "run": ["run", files(tmp_path)["@job"], "--no-wait"], "batch": ["batch", "-", "--no-progress"],
        "status": ["status", "4f1c2b"], "cancel": ["cancel", "4f1c2b"], "workers": ["workers", "--timeout", "0.3"],
        "metrics": ["metrics", "--once"],
    }[command]
    env = {**os.environ, "RERANK_BROKER_URL": empty_redis.url, "RERANK_MODEL": "BAAI/bge-reranker-base", "RERANK_QUEUE": "cli-pipe"}
    process = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", *argv, "--json"], env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    process.stdout.close()
    # When it writes its answer
    _, stderr = process.communicate('{"query": ""}\n', timeout=120)
    # Then it exits 141, as a tool ended by SIGPIPE would, without a traceback
    assert process.returncode == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr


@pytest.mark.integration
def test_run_and_batch_read_jobs_from_standard_input(shared_worker, redis_server, tiny_model):
    # Given one job and a JSONL of two, piped in
    jobs = json.dumps(SMALL) + "\n" + json.dumps({**SMALL, "top_k_docs": 1}) + "\n"
    # When `run -` and `batch -` read them
    run = rerank("run", "-", "--json", broker=redis_server.url, model=tiny_model, stdin=json.dumps(SMALL))
    batch = rerank("batch", "-", "--no-progress", broker=redis_server.url, model=tiny_model, stdin=jobs)
    # Then both ran them
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)["documents"]["items"]) == 2
    assert batch.returncode == 0, batch.stderr
    assert [len(json.loads(line)["result"]["documents"]["items"]) for line in batch.stdout.splitlines()] == [2, 1]


@pytest.mark.integration
def test_workers_fits_80_columns_and_shortens_queues_to_their_distinct_part(shared_worker, redis_server, tiny_model):
    # Given the shared worker, on its model's three queues
    full = rerank("workers", "--json", broker=redis_server.url, model=tiny_model)
    shared = next(w for w in json.loads(full.stdout) if w["name"].startswith("shared0@"))
    stem = min(shared["queues"], key=len)
    # When listed as a table on an 80-column terminal
    completed = rerank("workers", broker=redis_server.url, model=tiny_model)
    # Then every line fits, the model is named once, each queue by what tells it apart, and no raw dict shows
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert stem.removeprefix("rerank.") in completed.stdout
    row = "\n".join(lines)
    for queue in shared["queues"]:
        assert (queue.removeprefix(stem + ".") if queue != stem else "shared") in row
    assert "{" not in completed.stdout and "'" not in completed.stdout


def test_the_readme_lists_the_same_exit_codes():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for code in EXIT_CODES:
        assert f"\n| {code} | " in readme, f"exit code {code} is missing from the README's CLI section"


def job_waiting_in(redis_url: str, queue: str, process: subprocess.Popen) -> str:
    """The id of the job `process` (a waiting `rerank run`) sent to `queue`, read from the queued message's headers."""
    from redis import Redis

    redis = Redis.from_url(redis_url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        for raw in redis.lrange(queue, 0, -1):
            task_id = json.loads(raw)["headers"]["id"]
            if task_id.endswith(":documents"):
                return task_id.removesuffix(":documents")
        time.sleep(0.05)
    raise AssertionError(f"no job reached {queue}: {process.communicate()}")


@pytest.mark.integration
@pytest.mark.parametrize(("ending", "code"), [("cancelled", 5), ("failed", 1)])
def test_run_waiting_on_a_job_exits_5_when_it_is_cancelled_and_1_when_it_fails(ending, code, empty_redis, tmp_path):
    # Given `rerank run` waiting on a job that sits in a queue
    from producer import RerankClient, Settings

    queue = f"cli-run-{ending}"
    env = {**os.environ, "RERANK_BROKER_URL": empty_redis.url, "RERANK_MODEL": "BAAI/bge-reranker-base", "RERANK_QUEUE": queue}
    process = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "run", files(tmp_path)["@job"], "--timeout", "120"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    job_id = job_waiting_in(empty_redis.url, queue, process)
    # When another shell cancels it, or a worker records it failed (Celery's own backend call)
    if ending == "cancelled":
        assert rerank("cancel", job_id, broker=empty_redis.url).returncode == 0
    else:
        client = RerankClient(Settings(broker_url=empty_redis.url, model="BAAI/bge-reranker-base"))
        client.app.backend.mark_as_failure(job_id, WorkerError("scoring failed: out of memory"))
    # Then the waiting command ends with that code and says why
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert ("cancelled" if ending == "cancelled" else "out of memory") in stderr


@pytest.mark.integration
def test_a_batch_that_runs_out_of_time_exits_4(empty_redis, tmp_path):
    completed = rerank("batch", files(tmp_path)["@jobs"], "--timeout", "1", "--no-progress", broker=empty_redis.url, queue="cli-batch-timeout")
    assert completed.returncode == 4, completed.stderr
    assert [json.loads(line)["state"] for line in completed.stdout.splitlines()] == ["TIMEOUT"]

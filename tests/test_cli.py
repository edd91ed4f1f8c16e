"""The `rerank` command on the shipped example job, in-process (no broker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from redis import Redis

from producer import Settings

EXAMPLE = Path(__file__).parents[1] / "examples" / "af_ckd_job.json"


def run_cli(*args: str, model: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RERANK_MODEL": str(model), "RERANK_TORCH_THREADS": "1", "COLUMNS": "80"}
    env.pop("RERANK_BROKER_URL", None)
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], env=env, capture_output=True, text=True, timeout=300)


def test_example_job_runs_in_process_and_prints_json(tiny_model):
    completed = run_cli("run", str(EXAMPLE), "--json", model=tiny_model)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    job = json.loads(EXAMPLE.read_text())
    assert len(result["documents"]["items"]) == job["top_k_docs"] == 20
    assert result["documents"]["scored"] == len(job["candidates"]) == 100
    assert len(result["chunks"]["items"]) == job["top_k_chunks"]
    kept = {item["id"] for item in result["documents"]["items"]}
    assert {item["doc_id"] for item in result["chunks"]["items"]} <= kept


def test_the_result_tables_list_both_stages_and_fit_80_columns(tiny_model):
    completed = run_cli("run", str(EXAMPLE), "--top-k-docs", "3", "--top-k-chunks", "2", model=tiny_model)
    assert completed.returncode == 0, completed.stderr
    assert "Stage 1: 3 of 100 papers" in completed.stdout
    assert "Stage 2: 2 of " in completed.stdout
    assert max(len(line) for line in completed.stdout.splitlines() if not line.startswith(("query:", "model:"))) <= 80


@pytest.mark.parametrize("content", ['{"query": ""', '{"query": "", "candidates": [{"id": "a", "title": "t"}]}'])
def test_an_invalid_job_exits_2_with_the_reason(tmp_path, tiny_model, content):
    job = tmp_path / "job.json"
    job.write_text(content)
    completed = run_cli("run", str(job), model=tiny_model)
    assert completed.returncode == 2
    assert "invalid job" in completed.stderr


def write_jsonl(path: Path, jobs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def test_batch_writes_one_result_per_line_in_input_order_with_progress(tmp_path, tiny_model):
    # Given a JSONL file of three jobs, the second one invalid
    job = json.loads(EXAMPLE.read_text())
    lines = [
        {"query": job["query"], "candidates": job["candidates"][:6], "top_k_docs": 2, "top_k_chunks": 3},
        {"query": "", "candidates": job["candidates"][:2]},
        {"query": job["query"], "candidates": job["candidates"][6:10], "top_k_docs": 1},
    ]
    jobs = write_jsonl(tmp_path / "jobs.jsonl", lines)
    # When run as a batch to a file
    completed = run_cli("batch", str(jobs), "-o", str(tmp_path / "out.jsonl"), "--json", model=tiny_model)
    # Then one line per input, in order, the invalid one with its reason, and exit code 1
    assert completed.returncode == 1, completed.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["line"] for o in out] == [1, 2, 3]
    assert [o["state"] for o in out] == ["SUCCESS", "INVALID", "SUCCESS"]
    assert "query" in out[1]["error"]["message"]
    assert len(out[0]["result"]["documents"]["items"]) == 2 and len(out[0]["result"]["chunks"]["items"]) == 3
    assert out[2]["result"]["documents"]["scored"] == 4
    # And the summary is JSON with the counts, and the progress reached 3/3 on stderr
    assert json.loads(completed.stdout)["states"] == {"SUCCESS": 2, "INVALID": 1}
    assert "3/3 done, 1 failed" in completed.stderr


def run_cli_redis(*args: str, model: Path, broker: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RERANK_MODEL": str(model), "RERANK_BROKER_URL": broker}
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_submit_then_check_by_id_and_list_workers(shared_worker, redis_server, tiny_model):
    # Given a job sent without waiting
    sent = run_cli_redis("run", str(EXAMPLE), "--no-wait", "--json", model=tiny_model, broker=redis_server.url)
    assert sent.returncode == 0, sent.stderr
    job_id = json.loads(sent.stdout)["job_id"]
    # When its status is asked for by id, waiting for it
    status = run_cli_redis("status", job_id, "--wait", "--timeout", "120", "--json", model=tiny_model, broker=redis_server.url)
    # Then both stages succeeded and the result is there
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["state"] == "SUCCESS" and [s["state"] for s in report["stages"]] == ["SUCCESS", "SUCCESS"]
    assert len(report["result"]["chunks"]["items"]) == json.loads(EXAMPLE.read_text())["top_k_chunks"]
    # And the table form names the stages
    table = run_cli_redis("status", job_id, model=tiny_model, broker=redis_server.url)
    assert f"job {job_id}: SUCCESS (100%)" in table.stdout and "Stage 2:" in table.stdout
    # And the shared worker is listed with its queue and both tasks
    workers = run_cli_redis("workers", "--json", model=tiny_model, broker=redis_server.url)
    assert workers.returncode == 0, workers.stderr
    shared = [w for w in json.loads(workers.stdout) if w["name"].startswith("shared0@")]
    assert len(shared) == 1 and Settings(model=str(tiny_model)).queue in shared[0]["queues"] and shared[0]["processes"] == 2
    assert {"rerank.documents", "rerank.chunks"} <= set(shared[0]["registered"])


@pytest.mark.integration
def test_status_of_a_job_that_never_ran_times_out_with_code_4(redis_server, tiny_model):
    completed = run_cli_redis("status", "no-such-job", "--wait", "--timeout", "1", model=tiny_model, broker=redis_server.url)
    assert completed.returncode == 4 and "no result within 1.0s" in completed.stderr


# Edges: every bad option, file or id is an error with its exit code, nothing queued, no traceback

JOB = json.loads(EXAMPLE.read_text())
SMALL = {"query": JOB["query"], "candidates": JOB["candidates"][:3]}


def cli(*args: str, broker: str, queue: str = "cli-edges", **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "RERANK_BROKER_URL": broker, "RERANK_QUEUE": queue, **env}
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], env=environment, capture_output=True, text=True, timeout=120)


def files(tmp_path: Path) -> dict[str, Path]:
    """Job files a careless user might pass."""
    paths = {
        "@job": tmp_path / "job.json", "@unknown-key": tmp_path / "unknown.json", "@not-utf8": tmp_path / "latin1.json",
        "@empty": tmp_path / "empty.jsonl", "@blank": tmp_path / "blank.jsonl", "@batch": tmp_path / "jobs.jsonl",
        "@batch-unknown-key": tmp_path / "unknown.jsonl", "@array": tmp_path / "array.json",
        "@directory": tmp_path, "@missing": tmp_path / "nope.json",
    }
    paths["@job"].write_text(json.dumps(SMALL))
    paths["@unknown-key"].write_text(json.dumps({**SMALL, "top_k": 3}))
    paths["@not-utf8"].write_bytes(json.dumps(SMALL).encode().replace(b'"query": "', b'"query": "\xff', 1))
    paths["@empty"].write_text("")
    paths["@blank"].write_text("\n  \n")
    paths["@batch"].write_text(json.dumps(SMALL) + "\n")
    paths["@batch-unknown-key"].write_text(json.dumps({**SMALL, "priority": 1}) + "\n")
    paths["@array"].write_text(json.dumps([SMALL]))
    return paths


INVALID = [
    ("run", "@job", "--top-k-docs", "0"),
    ("run", "@job", "--top-k-chunks", "0"),
    ("run", "@job", "--top-k-docs", "-3"),
    ("run", "@job", "--windows", "0"),
    ("run", "@job", "--windows", "33"),
    ("run", "@job", "--min-score", "5"),
    ("run", "@job", "--min-score", "nan"),
    ("run", "@job", "--timeout", "0"),
    ("run", "@job", "--timeout", "inf"),
    ("run", "@unknown-key"),
    ("run", "@not-utf8"),
    ("run", "@array"),
    ("run", "@missing"),
    ("batch", "@batch", "--min-score", "5"),
    ("batch", "@batch", "--min-score", "nan"),
    ("batch", "@batch", "--windows", "0"),
    ("batch", "@empty"),
    ("batch", "@blank"),
    ("batch", "@not-utf8"),
    ("batch", "@batch", "-o", "@directory"),
    ("batch", "@batch", "-o", "/nonexistent/dir/out.jsonl"),
    ("status", "JOB:documents"),
    ("status", "bad\x01id"),
    ("cancel", "JOB:documents"),
    ("workers", "--timeout", "0"),
    ("metrics", "--port", "0"),
    ("metrics", "--once", "--bogus"),
]


@pytest.mark.integration
@pytest.mark.parametrize("argv", INVALID, ids=[" ".join(a) for a in INVALID])
def test_bad_options_files_and_ids_exit_2_and_queue_nothing(argv, redis_server, tmp_path):
    paths = files(tmp_path)
    args = [str(paths[a]) if a in paths else a.replace("JOB", "4f1c2b") for a in argv]
    completed = cli(*args, broker=redis_server.url)
    assert completed.returncode == 2, completed.stderr
    assert "Traceback" not in completed.stderr and completed.stderr.strip()
    assert Redis.from_url(redis_server.url).llen("cli-edges") == 0, "nothing was queued"


def test_an_unknown_key_is_refused_by_run_and_batch_alike(redis_server, tmp_path):
    paths = files(tmp_path)
    run = cli("run", str(paths["@unknown-key"]), broker=redis_server.url)
    batch = cli("batch", str(paths["@batch-unknown-key"]), "--json", broker=redis_server.url)
    assert run.returncode == 2 and "top_k" in run.stderr and "Extra inputs are not permitted" in run.stderr
    assert batch.returncode == 2 and "Extra inputs are not permitted" in batch.stdout + batch.stderr


@pytest.mark.parametrize("password", ["Zq7#x9", "Zq7/x9", "Zq7?x9", "Zq7#/?"])
def test_a_password_with_special_characters_is_refused_without_showing_it(password, tmp_path):
    completed = cli("run", str(files(tmp_path)["@job"]), broker=f"redis://:{password}@127.0.0.1:6379/0")
    assert completed.returncode == 2 and "percent-encode" in completed.stderr
    assert "Zq7" not in completed.stderr and "x9" not in completed.stderr

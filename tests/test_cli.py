"""The `rerank` command on the shipped example job, in-process (no broker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[1] / "examples" / "af_ckd_job.json"


def run_cli(*args: str, model: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RERANK_MODEL": str(model), "RERANK_TORCH_THREADS": "1"}
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


def test_table_output_lists_both_stages(tiny_model):
    completed = run_cli("run", str(EXAMPLE), "--top-k-docs", "3", "--top-k-chunks", "2", model=tiny_model)
    assert completed.returncode == 0, completed.stderr
    assert "Stage 1: 3 of 100 papers" in completed.stdout
    assert "Stage 2: 2 of " in completed.stdout


@pytest.mark.parametrize("content", ['{"query": ""', '{"query": "", "candidates": [{"id": "a", "title": "t"}]}'])
def test_an_invalid_job_exits_2_with_the_reason(tmp_path, tiny_model, content):
    job = tmp_path / "job.json"
    job.write_text(content)
    completed = run_cli("run", str(job), model=tiny_model)
    assert completed.returncode == 2
    assert "invalid job" in completed.stderr

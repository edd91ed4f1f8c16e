"""Two-stage jobs end to end: in-process and through Redis to real workers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from producer import InvalidRequest, RerankClient, Settings
from tests.helpers import CORPUS, QUERY, candidates, check_two_stage


def test_in_process_two_stage_matches_the_reference(in_process_settings, tiny_model):
    result = check_two_stage(RerankClient(in_process_settings), tiny_model)
    assert result.documents.info.model_loads == 1


def test_ties_keep_input_order_and_top_k_cuts(in_process_settings):
    # Given three identical papers between two different ones
    same = {"title": "Apixaban", "text": "Apixaban reduced bleeding in kidney disease."}
    papers = [{"id": "a", "title": "Panda", "text": "The giant panda is a bear."}] + [
        {"id": f"same{i}", **same} for i in range(3)
    ] + [{"id": "z", "title": "Stroke", "text": "Thrombectomy for stroke."}]
    # When ranked
    result = RerankClient(in_process_settings).rerank_documents(QUERY, papers, top_k=5)
    ids = [item.id for item in result.items]
    # Then the identical ones keep their input order and top_k bounds the list
    assert [i for i in ids if i.startswith("same")] == ["same0", "same1", "same2"]
    assert RerankClient(in_process_settings).rerank_documents(QUERY, papers, top_k=2).items == result.items[:2]


@pytest.mark.integration
def test_redis_two_stage_matches_the_reference_and_the_in_process_path(shared_worker, redis_settings, in_process_settings, tiny_model):
    # Given a real worker consuming from Redis
    via_redis = check_two_stage(RerankClient(redis_settings), tiny_model)
    in_process = RerankClient(in_process_settings).two_stage(QUERY, candidates(), top_k_docs=5, return_logits=True)
    # Then the worker scored it, and both paths agree
    assert via_redis.documents.info.worker.startswith("shared0@")
    assert [i.id for i in via_redis.chunks.items] == [i.id for i in in_process.chunks.items]
    assert [i.score for i in via_redis.chunks.items] == pytest.approx([i.score for i in in_process.chunks.items], abs=1e-5)


@pytest.mark.integration
def test_each_worker_process_loads_the_model_once(shared_worker, redis_settings):
    # Given a worker with two pool processes
    client = RerankClient(redis_settings)
    # When it serves many jobs
    jobs = [client.submit(QUERY, candidates(8), top_k_docs=3) for _ in range(12)]
    results = [job.result(timeout=60) for job in jobs]
    # Then every result came from a process that had loaded the model exactly once
    infos = [stage.info for r in results for stage in (r.documents, r.chunks)]
    assert {info.model_loads for info in infos} == {1}
    pids = {info.pid for info in infos}
    loads = re.findall(r"model loaded: pid=(\d+)", shared_worker.output())
    assert len(loads) == 2 and len(set(loads)) == 2, "two pool processes, one load each"
    assert pids <= {int(p) for p in loads}


@pytest.mark.integration
def test_a_stage1_failure_in_the_worker_surfaces_from_two_stage(start_worker, redis_server, tiny_model):
    # Given a worker with a stricter limit than the producer (workers never trust a message)
    worker = start_worker("-Q", "strict", env={"RERANK_MAX_CANDIDATES": "3"}, name="strict")
    worker.wait_until_loaded(processes=1)
    client = RerankClient(Settings(broker_url=redis_server.url, queue="strict", model=str(tiny_model)))
    # When a job breaks that limit, Then the chain fails with the worker's typed error and reason
    with pytest.raises(InvalidRequest, match="over the limit of 3 .RERANK_MAX_CANDIDATES."):
        client.two_stage(QUERY, candidates(10), timeout=60)
    # And the worker still serves valid work
    assert len(client.two_stage(QUERY, candidates(3), top_k_docs=2, timeout=60).documents.items) == 2


def broken_copies(model: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Model folders a careless deployment produces, each with the line the worker must print."""
    from worker.synthetic import build_cross_encoder

    def copy(name: str) -> Path:
        return Path(shutil.copytree(model, root / name))

    cases = {"missing folder": (root / "missing-model", "Set RERANK_MODEL to a hub id")}
    folder = copy("no-tokenizer")
    (folder / "tokenizer.json").unlink()
    cases["no tokenizer.json"] = (folder, "its tokenizer files are missing or belong to another model")
    other = build_cross_encoder(root / "other", CORPUS[:20], vocab_size=120)
    folder = copy("foreign-tokenizer")
    shutil.copy(other / "tokenizer.json", folder / "tokenizer.json")
    cases["another model's tokenizer"] = (folder, "its tokenizer files are missing or belong to another model")
    folder = copy("no-weights")
    (folder / "model.safetensors").unlink()
    cases["no weights"] = (folder, "no weights in")
    folder = copy("truncated-weights")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cases["truncated weights"] = (folder, "cannot be read")
    folder = copy("garbage-weights")
    (folder / "model.safetensors").write_bytes(b"not a tensor file" * 64)
    cases["garbage weights"] = (folder, "cannot be read")
    return cases


def test_every_broken_model_folder_is_refused_by_the_check_a_worker_runs_before_its_pool_starts(tiny_model, tmp_path):
    from contract.errors import ModelLoadError
    from scoring.model import check_model

    # Given model folders with a part missing, foreign or damaged
    for name, (folder, line) in broken_copies(tiny_model, tmp_path).items():
        # When the worker's start-up check reads each, Then it refuses it with the line the worker prints
        with pytest.raises(ModelLoadError, match=re.escape(line)):
            check_model(str(folder), None, 512)
    check_model(str(tiny_model), None, 512)  # and the intact folder passes


@pytest.mark.integration
def test_a_worker_that_cannot_load_its_model_stops_at_start_up_with_one_clear_line(start_worker, tiny_model, tmp_path):
    # Given a broken model folder, which the parent's check finds before any pool process forks
    # (a setting to fix: exit code 2), and a hub id this host cannot download (the hub does not answer)
    folder, line = broken_copies(tiny_model, tmp_path)["truncated weights"]
    cases = {"truncated weights": ({"RERANK_MODEL": str(folder)}, line, 2)}
    cases["a hub id, offline"] = ({**offline(tmp_path), "RERANK_MODEL": "BAAI/bge-reranker-v2-m3"}, NOT_HERE, 2)
    # and a device that is not there, which only the process that loads the model finds out: the
    # device process (the GPU default) or, with no host processes, a pool process
    # (a failure at load time: exit code 1, for a process manager to restart it)
    cases["a GPU that is not there"] = ({"RERANK_DEVICE": "cuda:0", "CUDA_VISIBLE_DEVICES": ""}, "the device process failed to load the model", 1)
    cases["a GPU that is not there, no device process"] = (
        {"RERANK_DEVICE": "cuda:0", "CUDA_VISIBLE_DEVICES": "", "RERANK_HOST_PROCESSES": "0"}, "model failed to load in pid", 1
    )
    # When a worker is started on each (all at once)
    started = time.monotonic()
    workers = {name: start_worker(env=env, name="broken") for name, (env, _, _) in cases.items()}
    for name, (_, line, expected) in cases.items():
        worker = workers[name]
        code = worker.process.wait(timeout=90)
        # Then each stops before serving anything, with its exit code and the reason on one line
        assert code == expected, f"{name}: exit {code}\n{worker.output()[-2000:]}"
        assert line in worker.output(), f"{name}:\n{worker.output()[-2000:]}"
        assert "model loaded:" not in worker.output() and "Retrying in" not in worker.output(), name
    assert time.monotonic() - started < 90
    # and the offline worker named the setting and the stand-in, at once rather than after the hub's retries
    assert "python -m worker.synthetic stand-in" in workers["a hub id, offline"].output()


NOT_HERE = "RERANK_MODEL=BAAI/bge-reranker-v2-m3 is not in this host's model cache and cannot be downloaded here"


def offline(tmp_path: Path) -> dict[str, str]:
    """An environment whose model hub does not answer (nothing listens at its address) and whose hub cache is empty."""
    from tests.helpers import free_port

    (tmp_path / "hub-cache").mkdir(exist_ok=True)
    return {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_CACHE": str(tmp_path / "hub-cache"), "HF_HUB_OFFLINE": "0"}


def test_offline_a_cached_hub_id_loads_at_once_and_an_uncached_one_stops_rerank_run_with_exit_2(tiny_model, tmp_path):
    # Given a host whose hub does not answer, with one model in its hub cache (as a download leaves it)
    env = {**os.environ, **offline(tmp_path), "RERANK_BROKER_URL": "", "RERANK_TORCH_THREADS": "1"}
    commit = "0123456789abcdef0123456789abcdef01234567"
    cached = Path(env["HF_HUB_CACHE"]) / "models--test--tiny"
    shutil.copytree(tiny_model, cached / "snapshots" / commit)
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text(commit)
    root = Path(__file__).parents[1]
    job = ["-m", "producer.cli", "run", "--top-k-docs", "2", "examples/af_ckd_job.json"]
    # When `rerank run` runs a job in-process with the cached hub id
    started = time.monotonic()
    ran = subprocess.run([sys.executable, *job], env={**env, "RERANK_MODEL": "test/tiny"}, cwd=root, capture_output=True, text=True, timeout=120)
    # Then it loads from the cache without asking the hub again, and scores
    assert ran.returncode == 0, ran.stderr
    assert "Retrying in" not in ran.stderr and time.monotonic() - started < 60
    # When it runs with a hub id the cache lacks
    refused = subprocess.run([sys.executable, *job], env={**env, "RERANK_MODEL": "BAAI/bge-reranker-v2-m3"}, cwd=root,
                             capture_output=True, text=True, timeout=120)
    # Then it stops with exit code 2 (settings) and one line naming the setting and the stand-in
    assert refused.returncode == 2, refused.stderr
    assert NOT_HERE in refused.stderr and "python -m worker.synthetic stand-in" in refused.stderr
    assert "Retrying in" not in refused.stderr


@pytest.mark.integration
def test_plain_celery_command_starts_a_working_worker(redis_server, tiny_model, tmp_path):
    # Given a worker started with Celery's own command instead of rerank-worker
    env = {**os.environ, "RERANK_BROKER_URL": redis_server.url, "RERANK_MODEL": str(tiny_model), "RERANK_TORCH_THREADS": "1"}
    log = tmp_path / "plain.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-c", "1", "-Q", "plain", "-n", "plain@%h", "-l", "INFO"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        while "model loaded:" not in log.read_text(errors="replace"):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
        # When a job goes to its queue, Then it is served by that worker with the configured model
        client = RerankClient(Settings(broker_url=redis_server.url, queue="plain", model=str(tiny_model)))
        result = client.two_stage(QUERY, candidates(6), top_k_docs=2, timeout=60)
        assert result.documents.info.worker.startswith("plain@") and len(result.documents.items) == 2
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.integration
def test_revoking_only_stage_1_of_a_queued_job_cancels_the_job(start_worker, redis_server, tiny_model):
    from contract.errors import JobCancelled
    from producer.jobs import stage1_id
    from tests.helpers import long_papers, started, wait_for

    # Given a worker busy with a long job, and a two-stage job queued behind it
    start_worker("-Q", "revoke-stage1", "-c", "1", name="revoke").wait_until_loaded(processes=1)
    client = RerankClient(Settings(broker_url=redis_server.url, queue="revoke-stage1", model=str(tiny_model)))
    busy = client.submit_documents(QUERY, long_papers(250), top_k=2)
    wait_for(lambda: started(client, busy.id), 30, "the long job to start")
    job = client.submit(QUERY, candidates(6), top_k_docs=2)
    # When someone revokes its stage 1 alone (as Flower's revoke button on that task would)
    client.app.control.revoke(stage1_id(job.id))
    # Then the job's owner hears that it was cancelled, instead of waiting for a stage 2 that never comes
    with pytest.raises(JobCancelled):
        job.result(timeout=60)
    assert len(busy.result(timeout=60).items) == 2

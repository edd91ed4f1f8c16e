"""What the tests share: the corpus, request builders, the reference scores, real Redis and
worker processes, and the fault helpers that kill them. Fixtures live in conftest.py."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from contract.formats import chunk_passage, document_passage
from producer import RerankClient

ROOT = Path(__file__).parents[1]
DATA = Path(__file__).parent / "data"
CORPUS = (DATA / "medical_corpus.txt").read_text().splitlines()
QUERY = "apixaban in atrial fibrillation with chronic kidney disease"

# Short limits for the fault tests that need a fast redelivery: a task is stopped after 5 s and
# Redis redelivers a message nobody acknowledged after 10 s (the validator wants at least two time
# limits); kombu sweeps every visibility_timeout // 10 = 1 s. Production keeps 300 s / 900 s
# (README, Reliability). A message also waits, unacknowledged, while a replacement pool process
# loads the model (about 10 s on a busy 2-core machine), so tests that kill a pool process use
# RELAXED, or the visibility timeout would expire during the reload and deliver the task twice.
TIME_LIMIT = 5
VISIBILITY_TIMEOUT = 10
FAST = {"RERANK_TASK_TIME_LIMIT": str(TIME_LIMIT), "RERANK_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT)}
RELAXED = {"RERANK_TASK_TIME_LIMIT": "30", "RERANK_VISIBILITY_TIMEOUT": "60"}


# Requests ------------------------------------------------------------------------------------


def candidates(n: int = 30) -> list[dict]:
    """`n` papers from the corpus; odd ones bring their own chunks, even ones a `## Discussion` section."""
    papers = []
    for i in range(n):
        paper = {"id": f"p{i}", "title": CORPUS[i % len(CORPUS)], "text": " ".join(CORPUS[i : i + 6])}
        if i % 2:
            paper["chunks"] = [{"section": "Results", "text": CORPUS[(i + k) % len(CORPUS)]} for k in range(3)]
        else:
            paper["text"] += "\n\n## Discussion\n\n" + " ".join(CORPUS[i + 6 : i + 12])
        papers.append(paper)
    return papers


def short_papers(n: int, seed: int = 0, tag: str = "s") -> list[dict]:
    """`n` one-sentence papers; `seed` shifts which sentences, `tag` prefixes the ids."""
    return [
        {"id": f"{tag}{seed}-{i}", "title": CORPUS[(seed + i) % len(CORPUS)], "text": CORPUS[(seed + 3 * i) % len(CORPUS)]}
        for i in range(n)
    ]


def long_papers(n: int, tag: str = "p") -> list[dict[str, Any]]:
    """`n` distinct papers of about 400 tokens each: scoring 1,000 takes seconds on the tiny model."""
    return [
        {"id": f"{tag}{i}", "title": f"{tag}{i} {CORPUS[i % len(CORPUS)]}", "text": " ".join(CORPUS[i % 50 : i % 50 + 12]) + f" ({tag}{i})"}
        for i in range(n)
    ]


# Reference scores ----------------------------------------------------------------------------


_loaded: dict[str, Any] = {}


def reference_logits(model_dir: Path, query: str, passages: list[str], max_length: int = 512) -> list[float]:
    """Logits from the tokenizer's own pair encoding (only the passage truncated) and one forward pass each."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if str(model_dir) not in _loaded:
        _loaded[str(model_dir)] = (
            AutoTokenizer.from_pretrained(model_dir), AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        )
    tokenizer, model = _loaded[str(model_dir)]
    logits = []
    with torch.no_grad():
        for passage in passages:
            encoded = tokenizer(query, passage, truncation="only_second", max_length=max_length, return_tensors="pt")
            logits.append(model(**encoded).logits[0, 0].float().item())
    return logits


def sigmoid(values: list[float]) -> list[float]:
    """Sigmoid in fp32, as the worker computes it."""
    import torch

    return torch.sigmoid(torch.tensor(values, dtype=torch.float32)).tolist()


def check_two_stage(client: RerankClient, model_dir: Path, top_k_docs: int = 5) -> Any:
    """Run a two-stage job on `candidates()` and check both stages against the reference scores."""
    papers = candidates()
    result = client.two_stage(QUERY, papers, top_k_docs=top_k_docs, return_logits=True, timeout=60)
    parsed = client._documents_request(QUERY, papers, top_k_docs, True).candidates

    # Stage 1: the top_k_docs best papers by the reference scores, in descending order
    expected = sigmoid(reference_logits(model_dir, QUERY, [document_passage(p) for p in parsed]))
    best = sorted(range(len(parsed)), key=lambda i: -expected[i])[:top_k_docs]
    assert [item.index for item in result.documents.items] == best
    assert [item.score for item in result.documents.items] == pytest.approx([expected[i] for i in best], abs=1e-5)
    assert result.documents.scored == len(papers)

    # Stage 2: exactly the chunks of the kept papers were scored, sorted, with reference scores
    pool = client.chunk_pool(parsed)
    kept = {item.id for item in result.documents.items}
    kept_chunks = [i for i, c in enumerate(pool) if c.doc_id in kept]
    assert sorted(item.index for item in result.chunks.items) == kept_chunks
    assert {item.doc_id for item in result.chunks.items} == kept
    chunk_scores = sigmoid(reference_logits(model_dir, QUERY, [chunk_passage(pool[i]) for i in kept_chunks]))
    by_index = dict(zip(kept_chunks, chunk_scores))
    assert [item.score for item in result.chunks.items] == pytest.approx([by_index[item.index] for item in result.chunks.items], abs=1e-5)
    scores = [item.score for item in result.chunks.items]
    assert scores == sorted(scores, reverse=True)
    return result


# Services ------------------------------------------------------------------------------------


def skip_or_fail(reason: str) -> None:
    """Skip a test whose service is missing on a laptop; fail it under CI, which must run every test."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI must run every test")
    pytest.skip(reason, allow_module_level=True)


def need_binary(name: str) -> str:
    """Return the path of `name`; skip without it on a laptop, fail under CI."""
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} is not installed")
    return path


def free_port() -> int:
    """Return a TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def terminate(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM `process`, and SIGKILL it if it has not exited after `grace` seconds."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class RedisServer:
    """A redis-server process on a free port, owned by the tests."""

    def __init__(self, workdir: Path) -> None:
        self.binary = need_binary("redis-server")
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.workdir), *extra],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not listen on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


class WorkerProcess:
    """A `rerank-worker` started the way a user starts it, with its log captured."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, module: str = "worker.cli") -> None:
        self.log = log
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args], env=env, stdout=self._log_file, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until_loaded(self, processes: int, timeout: float = 90) -> None:
        """Block until `processes` pool processes have logged that their model loaded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.output()}")
            if self.output().count("model loaded:") >= processes and " ready." in self.output():
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker did not load its model in {timeout}s:\n{self.output()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            terminate(self.process, grace=30)
        self._log_file.close()


class WorkerFleet:
    """Starts workers against one Redis and one model, and stops them all at the end."""

    def __init__(self, logs: Path, model: Path, broker_url: str) -> None:
        self.logs = logs
        self.model = model
        self.broker_url = broker_url
        self.started: list[WorkerProcess] = []

    def start(self, *args: str, env: dict[str, str] | None = None, name: str = "w", app: str | None = None) -> WorkerProcess:
        """Start `rerank-worker *args`; with `app`, `celery -A app worker *args` instead (a worker built differently)."""
        environment = {
            **os.environ,
            "RERANK_BROKER_URL": self.broker_url,
            "RERANK_MODEL": str(self.model),
            "RERANK_TORCH_THREADS": "1",
            **(env or {}),
        }
        label = f"{name}{len(self.started)}"
        if app is None:
            worker = WorkerProcess(["-n", f"{label}@%h", *args], environment, self.logs / f"{label}.log")
        else:
            command = ["-A", app, "worker", "-n", f"{label}@%h", "--loglevel=INFO", *args]
            worker = WorkerProcess(command, environment, self.logs / f"{label}.log", module="celery")
        self.started.append(worker)
        return worker

    def stop_all(self) -> None:
        """Warm-stop every worker at once (SIGTERM to all, then wait for each)."""
        for worker in self.started:
            if worker.process.poll() is None:
                worker.process.terminate()
        for worker in self.started:
            worker.stop()


# Faults --------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid`, read from /proc (no psutil)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name may hold spaces or parentheses; the ppid follows the last ")".
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def is_device_process(pid: int) -> bool:
    """True when `pid` runs a worker's device process (scoring.device); False when it is gone."""
    try:
        return b"scoring.device" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Send `sig` to `pid`, ignoring a process that is already gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a worker and its pool children at once (stopped first, so it forks no new child)."""
    kill(pid, signal.SIGSTOP)
    pool = children(pid)
    for child in pool:
        kill(child)
    kill(pid)
    return pool


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def started(client: RerankClient, task_id: str) -> dict[str, Any] | None:
    """Where `task_id` runs (`hostname`, and `pid` when the state tells it) while it runs, else None."""
    meta = client.app.backend.get_task_meta(task_id, cache=False)
    info = meta["result"] if isinstance(meta["result"], dict) else {}
    if meta["status"] == "STARTED":
        return {"hostname": info["hostname"], "pid": info["pid"]}
    if meta["status"] == "PROGRESS":  # batches done of total, written while the task runs
        return {"hostname": info["worker"], "pid": None}
    return None


def kill_running_child(client: RerankClient, worker_pid: int, task_id: str) -> tuple[int, float]:
    """Wait until `task_id` runs in the worker's only pool process, SIGKILL that process; return its pid and when."""
    meta = wait_for(lambda: started(client, task_id), 30, "the task to start")
    (child,) = children(worker_pid)
    assert meta["pid"] in (child, None), "the task runs in the worker's pool process"
    kill(child)
    return child, time.monotonic()


def deliveries(logs: list[str], task_id: str) -> int:
    """How many times workers logged receiving `task_id` (redeliveries included)."""
    return sum(len(re.findall(rf"Task rerank\.\w+\[{re.escape(task_id)}\] received", log)) for log in logs)


def assert_same_ranking(result: Any, expected: list[tuple[str, float]]) -> None:
    """`result` ranks the same ids in the same order as `expected`, with scores within 1e-5."""
    assert [item.id for item in result.items] == [i for i, _ in expected]
    assert [item.score for item in result.items] == pytest.approx([score for _, score in expected], abs=1e-5)


def report(test: str, **figures: Any) -> None:
    """Print what a fault test did and saw; pytest -s (or -rP) shows it."""
    print(f"\n[fault] {test}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


# Flower ---------------------------------------------------------------------------------------


FLOWER_PASSWORD = "s3cret"
FLOWER_AUTH = f"admin:{FLOWER_PASSWORD}"
FLOWER_COMMAND = 'CELERY_BROKER_URL="$RERANK_BROKER_URL" CELERY_RESULT_BACKEND="$RERANK_BROKER_URL" FLOWER_BASIC_AUTH="admin:$FLOWER_PASSWORD" celery flower'
"""How the README and docs/ start Flower (tests/test_flower.py checks they all say this)."""


class Flower:
    """The documented FLOWER_COMMAND, run by bash against the test Redis, on a free port (FLOWER_PORT)."""

    def __init__(self, broker_url: str, log: Path) -> None:
        self.port = free_port()
        self._log = log.open("wb")
        self.log = log
        env = {
            **os.environ, "RERANK_BROKER_URL": broker_url, "FLOWER_PASSWORD": FLOWER_PASSWORD, "FLOWER_PORT": str(self.port),
            "FLOWER_ADDRESS": "127.0.0.1", "FLOWER_INSPECT_TIMEOUT": "3000",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        # One simple command: bash replaces itself with it, so the process is Flower and terminate() stops it
        self.process = subprocess.Popen(["bash", "-c", FLOWER_COMMAND], env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def get(self, path: str, auth: bool = True) -> tuple[int, bytes]:
        """GET `path`, with basic auth unless `auth` is False; the status and the body."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if auth:
            request.add_header("Authorization", "Basic " + base64.b64encode(FLOWER_AUTH.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def json(self, path: str) -> Any:
        """GET `path` and parse its JSON body; fail unless the status is 200."""
        status, body = self.get(path)
        assert status == 200, (path, status, body[:300])
        return json.loads(body)

    def wait_until_up(self, timeout: float = 30) -> None:
        """Block until Flower answers its health check."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text(errors="replace")
            try:
                if self.get("/healthcheck", auth=False)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"flower did not start:\n{self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        """Stop Flower."""
        terminate(self.process, grace=15)
        self._log.close()

"""Shared fixtures: a tiny real cross-encoder, a private Redis, and real worker processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
CORPUS = (DATA / "medical_corpus.txt").read_text().splitlines()


def free_port() -> int:
    """Return a TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need_binary(name: str) -> str:
    """Return the path of `name`; skip without it on a laptop, fail under CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed"
        if os.environ.get("CI"):
            pytest.fail(f"{message}, and CI must run every test")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight XLMRobertaForSequenceClassification (1 label) with a tokenizer trained on CORPUS."""
    from worker.synthetic import build_cross_encoder

    return build_cross_encoder(tmp_path_factory.mktemp("tiny-model"), CORPUS, vocab_size=600)


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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private Redis for the whole session."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start("--appendonly", "no")
    yield server
    server.stop()


class WorkerProcess:
    """A `rerank-worker` started the way a user starts it, with its log captured."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", *args], env=env, stdout=self._log_file, stderr=subprocess.STDOUT
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
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()


class WorkerFleet:
    """Starts workers against one Redis and one model, and stops them all at the end."""

    def __init__(self, logs: Path, model: Path, broker_url: str) -> None:
        self.logs = logs
        self.model = model
        self.broker_url = broker_url
        self.started: list[WorkerProcess] = []

    def start(self, *args: str, env: dict[str, str] | None = None, name: str = "w") -> WorkerProcess:
        environment = {
            **os.environ,
            "RERANK_BROKER_URL": self.broker_url,
            "RERANK_MODEL": str(self.model),
            "RERANK_TORCH_THREADS": "1",
            **(env or {}),
        }
        label = f"{name}{len(self.started)}"
        worker = WorkerProcess(["-n", f"{label}@%h", *args], environment, self.logs / f"{label}.log")
        self.started.append(worker)
        return worker

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()


@pytest.fixture
def start_worker(tmp_path: Path, tiny_model: Path, redis_server: RedisServer) -> Iterator:
    """Start real worker processes for one test; they are stopped after it."""
    fleet = WorkerFleet(tmp_path, tiny_model, redis_server.url)
    yield fleet.start
    fleet.stop_all()


@pytest.fixture(scope="session")
def shared_worker(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, redis_server: RedisServer) -> Iterator[WorkerProcess]:
    """One worker with two pool processes on the default queue, shared by the integration tests."""
    fleet = WorkerFleet(tmp_path_factory.mktemp("shared-worker"), tiny_model, redis_server.url)
    worker = fleet.start("-c", "2", name="shared")
    worker.wait_until_loaded(processes=2)
    yield worker
    fleet.stop_all()


@pytest.fixture
def redis_settings(redis_server: RedisServer, tiny_model: Path):
    """Settings of a producer that talks to the test Redis."""
    from producer import Settings

    return Settings(broker_url=redis_server.url, model=str(tiny_model))


@pytest.fixture
def embedded_settings(tiny_model: Path):
    """Settings of a producer with no broker: tasks run in this process."""
    from producer import Settings

    return Settings(broker_url=None, model=str(tiny_model), torch_threads=1)

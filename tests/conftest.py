"""Shared fixtures: a tiny real cross-encoder, a private Redis, and real worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import CORPUS, RedisServer, WorkerFleet, WorkerProcess


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight XLMRobertaForSequenceClassification (1 label) with a tokenizer trained on CORPUS."""
    from worker.synthetic import build_cross_encoder

    return build_cross_encoder(tmp_path_factory.mktemp("tiny-model"), CORPUS, vocab_size=600)


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tokenizer on a MiniLM-shaped network: about 0.1 s a paper on one thread, so a
    request of a few hundred papers outlasts a 5 s time limit on any CPU (the tiny model scores
    a thousand papers a second)."""
    from worker.synthetic import build_cross_encoder

    return build_cross_encoder(tmp_path_factory.mktemp("slow-model"), CORPUS, shape="minilm", vocab_size=600)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private Redis for the whole session."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start("--appendonly", "no")
    yield server
    server.stop()


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


@pytest.fixture(scope="module")
def tiny_engine(tiny_model: Path):
    """The tiny model loaded in this process."""
    from scoring.engine import CrossEncoderEngine

    return CrossEncoderEngine.load(str(tiny_model))


@pytest.fixture(scope="module")
def scorer_shapes(tiny_engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Every scorer shape over one engine: in-process, a device thread, a device process's host client (served on a thread)."""
    import secrets
    import threading

    from scoring.device import DeviceClient, DeviceServer
    from scoring.threaded import ThreadedScorer

    address = str(tmp_path_factory.mktemp("device") / "device.sock")
    key = secrets.token_bytes(16)
    server = DeviceServer(tiny_engine.runner, address, key, tiny_engine.facts)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    threaded = ThreadedScorer(tiny_engine, time_limit=30, on_stop=lambda: None)
    yield {"engine": tiny_engine, "threads": threaded, "device": DeviceClient(address, key, tiny_engine.tokenize, 30, on_lost=lambda: None)}


@pytest.fixture
def redis_settings(redis_server: RedisServer, tiny_model: Path):
    """Settings of a producer that talks to the test Redis."""
    from producer import Settings

    return Settings(broker_url=redis_server.url, model=str(tiny_model))


@pytest.fixture
def in_process_settings(tiny_model: Path):
    """Settings of a producer with no broker: tasks run in this process."""
    from producer import Settings

    return Settings(broker_url=None, model=str(tiny_model), torch_threads=1)


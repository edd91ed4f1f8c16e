"""Redis with Sentinel fails over under load: nothing lost, the fleet serving again on the new master.

Real processes: a master and a replica (`redis-server`), three sentinels (`redis-server --sentinel`),
two workers and a producer on `sentinel://` URLs. The master is SIGKILLed mid-load.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from producer import BrokerUnavailable, RerankClient, Settings
from tests.faults.storm import VARIANTS, request
from tests.helpers import (
    RELAXED,
    RedisServer,
    WorkerFleet,
    free_port,
    kill,
    need_binary,
    report,
    terminate,
    wait_for,
)

pytestmark = pytest.mark.integration

MASTER = "rerank-test"


class Sentinels:
    """A master, its replica and three sentinels on free ports, each a real `redis-server` process."""

    def __init__(self, workdir: Path) -> None:
        self.master = RedisServer(workdir / "master")
        self.replica = RedisServer(workdir / "replica")
        self.ports = [free_port() for _ in range(3)]
        self.workdir = workdir
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}/0" for port in self.ports)

    def start(self) -> None:
        for server in (self.master, self.replica):
            server.workdir.mkdir()
        self.master.start("--appendonly", "yes", "--appendfsync", "always")
        self.replica.start("--appendonly", "yes", "--appendfsync", "always", "--replicaof", "127.0.0.1", str(self.master.port))
        for port in self.ports:
            config = self.workdir / f"sentinel-{port}.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
            )
            self.processes.append(
                subprocess.Popen([need_binary("redis-server"), str(config), "--sentinel"], stdout=subprocess.DEVNULL)
            )
        wait_for(lambda: all(self._sees_replica(port) for port in self.ports), 30, "every sentinel to see the replica")

    def _sees_replica(self, port: int) -> bool:
        try:
            return len(Redis(port=port).sentinel_slaves(MASTER)) == 1
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def master_port(self) -> int:
        """The port the sentinels name as the master now."""
        return int(Redis(port=self.ports[0]).sentinel_get_master_addr_by_name(MASTER)[1])

    def stop(self) -> None:
        for process in self.processes:
            terminate(process, grace=5)
        for server in (self.master, self.replica):
            if server.process is not None and server.process.poll() is None:
                server.stop()


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[Sentinels]:
    cluster = Sentinels(tmp_path)
    cluster.start()
    yield cluster
    cluster.stop()


def test_a_master_failover_under_load_loses_no_job_and_the_fleet_serves_again(sentinels, tmp_path, tiny_model, in_process_settings):
    # Given two workers and a producer on sentinel:// URLs
    env = {**RELAXED, "RERANK_SENTINEL_MASTER": MASTER, "RERANK_WORKER_LEASE": "3"}
    fleet = WorkerFleet(tmp_path, tiny_model, sentinels.url)
    try:
        workers = [fleet.start("-c", "1", env=env, name="sentinel") for _ in range(2)]
        for worker in workers:
            worker.wait_until_loaded(processes=1)
        settings = Settings(broker_url=sentinels.url, sentinel_master=MASTER, model=str(tiny_model), task_time_limit=30, visibility_timeout=60)
        client = RerankClient(settings)
        sent: list[tuple[object, int]] = []
        refused = 0
        stop = threading.Event()

        def produce() -> None:
            nonlocal refused
            n = 0
            while not stop.is_set():
                try:
                    sent.append((client.submit_documents(*request(n), top_k=2), n % VARIANTS))
                    n += 1
                except BrokerUnavailable:
                    refused += 1
                time.sleep(0.05)

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        wait_for(lambda: len(sent) >= 40, 60, "jobs in flight before the failover")
        old_master = sentinels.master.port

        # When the master is SIGKILLed under load
        kill(sentinels.master.process.pid)
        killed_at = time.monotonic()
        wait_for(lambda: sentinels.master_port() != old_master, 60, "the sentinels to promote the replica")
        promoted_at = time.monotonic()
        before = len(sent)

        # Then jobs sent after the promotion complete within 30 s of it
        wait_for(lambda: len(sent) >= before + 20, 60, "jobs sent to the new master")
        stop.set()
        producer.join(timeout=30)
        first_after = sent[before][0]
        first_after.result(timeout=max(1.0, promoted_at + 30 - time.monotonic()))
        served_again = time.monotonic() - promoted_at

        # And every job the producer was told is queued finished with the right ranking
        reference = RerankClient(in_process_settings)
        expected = {v: [i.id for i in reference.rerank_documents(*request(v), top_k=2).items] for v in range(VARIANTS)}
        results = [(handle.result(timeout=120), variant) for handle, variant in sent]
        wrong = [r for r, variant in results if [i.id for i in r.items] != expected[variant]]
        report(
            "Sentinel failover", sent=len(sent), completed=len(results), lost=len(sent) - len(results), wrong=len(wrong),
            refused_submits=refused, promotion_s=round(promoted_at - killed_at, 1), served_again_s=round(served_again, 1),
        )
        assert not wrong
        assert served_again <= 30
        assert all(w.process.poll() is None for w in workers), "no worker had to be restarted"
    finally:
        fleet.stop_all()

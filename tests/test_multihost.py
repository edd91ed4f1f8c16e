"""A worker on "another host" needs only the broker URL: one runs in its own network namespace."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from producer import RerankClient, Settings
from tests.helpers import CORPUS, QUERY, RedisServer, need_binary, skip_or_fail


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


class Namespace:
    """A network namespace joined to this host by a veth pair, on a /30 nobody else uses."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000}{random.randrange(100):02d}"
        self.name = f"rrk{tag}"
        self.host_if, self.ns_if = f"rrkh{tag}", f"rrkn{tag}"
        in_use = ip("-o", "-4", "addr").stdout
        for _ in range(50):
            third = random.randrange(1, 255)
            if f"10.213.{third}." not in in_use:
                break
        self.host_ip, self.ns_ip = f"10.213.{third}.1", f"10.213.{third}.2"

    def create(self) -> None:
        steps = [
            ["netns", "add", self.name],
            ["link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if],
            ["link", "set", self.ns_if, "netns", self.name],
            ["addr", "add", f"{self.host_ip}/30", "dev", self.host_if],
            ["link", "set", self.host_if, "up"],
            ["-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if],
            ["-n", self.name, "link", "set", self.ns_if, "up"],
            ["-n", self.name, "link", "set", "lo", "up"],
        ]
        for step in steps:
            done = ip(*step)
            if done.returncode != 0:
                self.delete()
                raise OSError(f"ip {' '.join(step)}: {done.stderr.strip()}")

    def delete(self) -> None:
        ip("link", "del", self.host_if)  # deletes its peer too
        ip("netns", "del", self.name)


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    if shutil.which("ip") is None:
        skip_or_fail("the `ip` command (iproute2) is missing, so no network namespace can be made")
    ns = Namespace()
    try:
        ns.create()
    except OSError as e:
        skip_or_fail(f"cannot create a network namespace with a veth pair here (needs root or CAP_NET_ADMIN): {e}")
    yield ns
    ns.delete()


@pytest.mark.integration
def test_a_worker_in_another_network_namespace_serves_jobs_with_only_the_broker_url(namespace, tiny_model, tmp_path):
    # Given a Redis listening on the host's end of the veth pair (and loopback)
    need_binary("redis-server")
    redis = RedisServer(tmp_path)
    redis.start("--bind", f"127.0.0.1 {namespace.host_ip}", "--appendonly", "no", "--protected-mode", "no")
    remote_url = f"redis://{namespace.host_ip}:{redis.port}/0"
    log = tmp_path / "remote-worker.log"
    worker = None
    try:
        # And, inside the namespace, where loopback is its own and only the veth leads out,
        # a worker given nothing but that broker URL (and the model)
        probe = subprocess.run(
            ["ip", "netns", "exec", namespace.name, sys.executable, "-c",
             f"import socket; s = socket.socket(); s.settimeout(2); print(s.connect_ex(('127.0.0.1', {redis.port})))"],
            capture_output=True, text=True, timeout=30,
        )
        assert probe.stdout.strip() != "0", "the namespace must not reach the host's loopback"
        env = {**os.environ, "RERANK_BROKER_URL": remote_url, "RERANK_MODEL": str(tiny_model), "RERANK_TORCH_THREADS": "1"}
        with log.open("wb") as out:
            worker = subprocess.Popen(
                ["ip", "netns", "exec", namespace.name, sys.executable, "-m", "worker.cli", "-Q", "remote", "-n", "remote@%h"],
                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1],
            )
        # When the host's producer sends a two-stage job
        client = RerankClient(Settings(broker_url=redis.url, queue="remote", model=str(tiny_model)))
        papers = [{"id": f"n{i}", "title": CORPUS[i], "text": CORPUS[i + 2]} for i in range(6)]
        result = client.two_stage(QUERY, papers, top_k_docs=2, timeout=120)
        # Then the worker in the namespace scored both stages
        assert result.documents.info.worker.startswith("remote@") and result.chunks.info.worker.startswith("remote@")
        # And Redis saw it connect from the namespace's own address
        clients = [c["addr"] for c in Redis(port=redis.port).client_list()]
        assert any(addr.startswith(f"{namespace.ns_ip}:") for addr in clients), clients
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        redis.stop()
    assert "remote@" in log.read_text(errors="replace")

"""Prometheus metrics: a live worker's figures add up to the jobs it ran; the queue exporter sees
each queue's depth and its oldest message's age; the liveness heartbeat."""

from __future__ import annotations

import os
import resource
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import redis

from contract.names import (
    TASK_CHUNKS,
    TASK_DOCUMENTS,
    TASK_PASSAGES,
    model_slug,
    queue_name,
)
from producer import RerankClient, Settings
from producer.metrics import QueueCollector, default_queues, read_queues
from tests.helpers import (
    QUERY,
    candidates,
    free_port,
    short_papers,
    skip_or_fail,
    wait_for,
)

try:
    import prometheus_client
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    skip_or_fail("prometheus-client is not installed (pip install -e '.[worker]')")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text page, by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples
    }


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return parse(response.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when there are none)."""
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def names(samples: Samples) -> set[str]:
    return {n for n, _ in samples}


# A worker's own metrics ----------------------------------------------------------------------------


@pytest.mark.integration
def test_a_worker_serves_metrics_that_add_up_to_the_jobs_it_ran(start_worker, redis_server, tiny_model, tmp_path):
    # Given jobs queued while no worker runs: three stage-1 jobs and two two-stage jobs
    client = RerankClient(Settings(broker_url=redis_server.url, queue="metrics", model=str(tiny_model)))
    handles = [client.submit_documents(QUERY, short_papers(6 + n, n), top_k=3) for n in range(3)]
    jobs = [client.submit(QUERY, candidates(8), top_k_docs=3) for _ in range(2)]
    time.sleep(1.0)
    # When a worker with two pool processes, metrics on and a heartbeat file, comes up and runs them
    port, heartbeat = free_port(), tmp_path / "heartbeat"
    worker = start_worker(
        "-c", "2", "-Q", "metrics", name="metrics",
        env={"RERANK_METRICS_PORT": str(port), "RERANK_HEARTBEAT_FILE": str(heartbeat)},
    )
    results = [h.result(timeout=120) for h in handles]
    two_stage = [job.result(timeout=120) for job in jobs]
    stage1 = results + [r.documents for r in two_stage]
    stage2 = [r.chunks for r in two_stage]
    name = stage1[0].info.worker
    # Then the scrape adds up to the results, once every task is counted (just after its result is
    # stored) and both pool processes have loaded the model (one may serve every job before the other is up)
    def settled() -> Samples | None:
        s = scrape(port)
        done = value(s, "rerank_tasks_total", state="SUCCESS") == 7 and value(s, "rerank_model_load_seconds_count") == 2
        return s if done else None

    samples = wait_for(settled, 30, "7 tasks and 2 model loads in the metrics")
    for task, ranked in ((TASK_DOCUMENTS, stage1), (TASK_CHUNKS, stage2)):
        labels = {"worker": name, "task": task}
        assert value(samples, "rerank_tasks_total", state="SUCCESS", **labels) == len(ranked)
        assert value(samples, "rerank_documents_total", **labels) == sum(r.scored for r in ranked)
        assert value(samples, "rerank_pairs_total", **labels) == sum(r.info.pairs for r in ranked)
        assert value(samples, "rerank_tokens_total", **labels) == sum(r.info.tokens for r in ranked)
        assert value(samples, "rerank_padded_tokens_total", **labels) == sum(r.info.padded_tokens for r in ranked)
        assert value(samples, "rerank_batches_total", **labels) == sum(r.info.batches for r in ranked)
        forward = sum(r.info.forward_ms for r in ranked) / 1000
        assert value(samples, "rerank_forward_seconds_total", **labels) == pytest.approx(forward, abs=1e-5)
        tokenize = sum(r.info.tokenize_ms for r in ranked) / 1000
        assert value(samples, "rerank_tokenize_seconds_total", **labels) == pytest.approx(tokenize, abs=1e-5)
        padded = sum(r.info.padded_tokens for r in ranked)
        share = 1 - sum(r.info.tokens for r in ranked) / padded
        assert value(samples, "rerank_padded_token_share", **labels) == pytest.approx(share)
        assert value(samples, "rerank_batch_fill_ratio_count", **labels) == len(ranked)
        assert value(samples, "rerank_task_seconds_count", **labels) == len(ranked)
        assert value(samples, "rerank_queue_wait_seconds_count", **labels) == len(ranked)
    # Every stage-1 message waited at least the second before the worker was started
    assert value(samples, "rerank_queue_wait_seconds_sum", task=TASK_DOCUMENTS) >= 1.0 * len(stage1)
    # Both pool processes loaded the model once, and both count in the totals
    assert value(samples, "rerank_model_load_seconds_count", worker=name, model=str(tiny_model)) == 2
    assert value(samples, "rerank_model_load_seconds_sum", worker=name) > 0
    model = {"worker": name, "model": str(tiny_model), "slug": model_slug(str(tiny_model)), "device": "cpu", "dtype": "float32"}
    assert value(samples, "rerank_model_info", **model) == 1
    # A CPU worker has no GPU memory to report, and nothing ran out of memory
    assert not {"rerank_gpu_memory_allocated_bytes", "rerank_gpu_memory_reserved_bytes"} & names(samples)
    assert value(samples, "rerank_oom_splits_total", worker=name) == 0
    # The heartbeat is fresh while the worker runs, and gone once it stopped
    probe = [sys.executable, "-m", "worker.cli", "alive", "--max-age", "30", "--file", str(heartbeat)]
    assert subprocess.run(probe, capture_output=True, timeout=60).returncode == 0
    worker.stop()
    assert not heartbeat.exists()
    assert subprocess.run(probe, capture_output=True, timeout=60).returncode == 1


def test_a_stale_heartbeat_fails_the_liveness_probe(tmp_path, capsys):
    from worker.health import alive_main

    heartbeat = tmp_path / "heartbeat"
    heartbeat.touch()
    assert alive_main(["--file", str(heartbeat), "--max-age", "60"]) == 0
    os.utime(heartbeat, (time.time() - 300, time.time() - 300))
    assert alive_main(["--file", str(heartbeat), "--max-age", "60"]) == 1
    assert "last heartbeat 300s ago" in capsys.readouterr().err


def test_out_of_memory_splits_are_counted_from_what_results_say(in_process_settings, tmp_path, monkeypatch):
    from worker import accounting
    from worker.metrics import WorkerCollector

    # Given a real result, as if scoring it had split 3 batches after running out of memory
    scored = RerankClient(in_process_settings).rerank_passages(QUERY, [p["text"] for p in short_papers(6)])
    split = scored.model_copy(update={"info": scored.info.model_copy(update={"oom_splits": 3})}).model_dump(mode="json")
    # And a fresh pool process that writes its figures where its parent reads them
    monkeypatch.setattr(accounting, "_directory", tmp_path)
    monkeypatch.setattr(accounting, "_ledger", None)
    # When two such tasks finish
    for n in range(2):
        documents, info = accounting.read_result(split)
        task = accounting.TaskFigures(TASK_PASSAGES, f"t{n}", "SUCCESS", 0.5, 0.1, "q", "w", documents, info)
        accounting.ledger().count(task)
    accounting.ledger().write()
    # Then the worker's metrics count every split, beside the batches that include them
    registry = prometheus_client.CollectorRegistry()
    registry.register(WorkerCollector("w@host"))
    samples = parse(prometheus_client.generate_latest(registry).decode())
    assert value(samples, "rerank_oom_splits_total", worker="w@host") == 6
    assert value(samples, "rerank_batches_total", worker="w@host", task=TASK_PASSAGES) == 2 * scored.info.batches
    assert value(samples, "rerank_tasks_total", worker="w@host", task=TASK_PASSAGES, state="SUCCESS") == 2


# The queue exporter ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_the_queue_exporter_reports_each_queues_depth_and_its_oldest_messages_age(redis_server):
    # Given a model nobody serves, and `rerank metrics` watching its queues
    model = "org/exporter-test"
    settings = Settings(broker_url=redis_server.url, model=model)
    bulk = queue_name("gpu", "bulk", model=model)
    port = free_port()
    env = {**os.environ, "RERANK_BROKER_URL": redis_server.url, "RERANK_MODEL": model}
    exporter = subprocess.Popen([sys.executable, "-m", "producer.cli", "metrics", "--port", str(port)], env=env, stderr=subprocess.PIPE)
    try:
        empty = wait_for(lambda: _try_scrape(port), 30, "the exporter to serve")
        assert value(empty, "rerank_broker_up") == 1
        for queue in default_queues(settings):
            assert value(empty, "rerank_queue_messages", queue=queue) == 0
            assert value(empty, "rerank_queue_oldest_message_age_seconds", queue=queue) == 0
        # When three jobs go to the model's queue, and 1.5 s later two to its GPU bulk queue
        shared_client, bulk_client = RerankClient(settings), RerankClient(Settings(broker_url=redis_server.url, model=model, queue=bulk))
        sent = time.time()
        for n in range(3):
            shared_client.submit_documents(QUERY, short_papers(3, n), top_k=1)
        time.sleep(1.5)
        for n in range(2):
            bulk_client.submit_documents(QUERY, short_papers(3, n))
        samples = scrape(port)
        elapsed = time.time() - sent
        # Then it counts them per queue, and the oldest message's age is the time since it was sent
        assert value(samples, "rerank_queue_messages", queue=settings.queue) == 3
        assert value(samples, "rerank_queue_messages", queue=bulk) == 2
        assert 1.5 <= value(samples, "rerank_queue_oldest_message_age_seconds", queue=settings.queue) <= elapsed
        assert 0 <= value(samples, "rerank_queue_oldest_message_age_seconds", queue=bulk) <= elapsed - 1.5
        assert value(samples, "rerank_queue_messages", queue=queue_name("cpu", model=model)) == 0
    finally:
        exporter.terminate()
        exporter.wait(timeout=30)
        redis.Redis.from_url(redis_server.url).delete(*default_queues(settings))


def _try_scrape(port: int) -> Samples | None:
    try:
        return scrape(port)
    except OSError:
        return None


def test_the_exporter_says_when_it_cannot_reach_the_broker():
    # Given a broker URL nothing listens on
    app = RerankClient(Settings(broker_url=f"redis://127.0.0.1:{free_port()}/0")).app
    registry = prometheus_client.CollectorRegistry()
    registry.register(QueueCollector(app, ["q"]))
    # Then a scrape answers, with the broker down and no queue figures
    samples = parse(prometheus_client.generate_latest(registry).decode())
    assert value(samples, "rerank_broker_up") == 0 and "rerank_queue_messages" not in names(samples)


RABBITMQ_URL = os.environ.get("RERANK_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.mark.integration
def test_queue_depth_on_rabbitmq_comes_from_a_passive_declare(redis_server):
    from kombu import Connection

    try:
        Connection(RABBITMQ_URL, connect_timeout=2).ensure_connection(max_retries=1)
    except Exception:  # noqa: BLE001 - any failure to connect means no RabbitMQ here
        skip_or_fail(f"no RabbitMQ at {RABBITMQ_URL} (set RERANK_TEST_AMQP_URL)")
    # Given two jobs sent through RabbitMQ to a queue nobody consumes
    settings = Settings(broker_url=RABBITMQ_URL, result_backend=redis_server.url, model="org/amqp-depth", queue=f"depth-{time.time_ns()}")
    client = RerankClient(settings)
    for n in range(2):
        client.submit_documents(QUERY, short_papers(3, n))
    try:
        # Then the depth is 2, a queue never declared is 0, and no age is claimed (RabbitMQ cannot peek)
        depths = {d.queue: d for d in read_queues(client.app, [settings.queue, "never-declared-queue", settings.queue])}
        assert depths[settings.queue].messages == 2 and depths[settings.queue].oldest_age is None
        assert depths["never-declared-queue"].messages == 0
    finally:
        with client.app.connection_for_write() as connection:
            connection.default_channel.queue_delete(settings.queue)


def test_default_queues_cover_gpu_and_cpu_workers_of_each_model():
    settings = Settings(model="org/a")
    assert default_queues(settings) == [
        "rerank.org-a.gpu.interactive", "rerank.org-a", "rerank.org-a.gpu.bulk", "rerank.org-a.cpu.interactive", "rerank.org-a.cpu.bulk"
    ]
    both = default_queues(settings, ["org/a", "org/b"])
    assert len(both) == 10 and "rerank.org-b" in both and all(isinstance(q, str) for q in both)


# The metrics port as a door anyone on the network can knock on ------------------------------------


def _threads_and_fds(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def _get(port: int, path: str = "/metrics", token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _half_open(port: int, n: int) -> list[socket.socket]:
    """`n` connections: even ones send nothing, odd ones half a request head, and none ever finishes."""
    held = []
    for k in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if k % 2:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: worker\r\nUser-Agent: slow")
        held.append(s)
    return held


@pytest.fixture
def enough_descriptors() -> None:
    """Let this test process hold a thousand and more sockets (soft RLIMIT_NOFILE up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 2500:
        wanted = 2500 if hard == resource.RLIM_INFINITY else min(2500, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_metrics_server_answers_only_get_metrics_with_the_token_and_drops_oversized_heads():
    from producer.scrape import MetricsServer

    # Given a server of one counter on a free port, behind a token
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Counter("doors", "Doors knocked on.", registry=registry).inc(3)
    server = MetricsServer(registry, 0, "127.0.0.1", token=b"s3cret-token", timeout=1.0)
    server.start()
    try:
        # Then the page comes only with the right token, and nothing but /metrics is served
        status, body = _get(server.port, token="s3cret-token")
        assert status == 200 and value(parse(body.decode()), "doors_total") == 3
        assert _get(server.port)[0] == 401
        assert _get(server.port, token="s3cret-tokeN")[0] == 401
        assert _get(server.port, "/", token="s3cret-token")[0] == 404
        # And a request head past 8 KiB is dropped without an answer
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"a" * 20_000 + b"\r\n\r\n")
            assert s.recv(100) == b""
        # And a peer that sends nothing is dropped after the timeout
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            started = time.monotonic()
            assert s.recv(100) == b"" and 0.9 <= time.monotonic() - started < 5
    finally:
        server.stop()


def test_a_host_flooding_the_metrics_port_evicts_its_own_idle_connections_not_another_hosts():
    from producer.scrape import MetricsServer

    # Given a server of at most 8 connections, and a scraper on 127.0.0.1 that connected but has not sent its request yet
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Counter("doors", "Doors knocked on.", registry=registry).inc()
    server = MetricsServer(registry, 0, "0.0.0.0", max_connections=8, timeout=10.0)
    server.start()
    flood: list[socket.socket] = []
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as scraper:
            wait_for(lambda: len(server._open) == 1, 10, "the server to accept the scraper")
            # When another host opens 200 idle connections
            for _ in range(200):
                s = socket.socket()
                s.bind(("127.0.0.2", 0))
                s.connect(("127.0.0.1", server.port))
                flood.append(s)
            wait_for(lambda: sum(1 for host in server._open.values() if host == "127.0.0.2") == 7, 10, "the flood to be accepted")
            # Then the scraper's connection is still open, and its request is answered
            scraper.sendall(b"GET /metrics HTTP/1.1\r\nHost: worker\r\n\r\n")
            answer = b""
            while chunk := scraper.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 OK") and b"doors_total 1.0" in answer
        assert len(server._open) <= 8
    finally:
        for s in flood:
            s.close()
        server.stop()


@pytest.mark.integration
def test_a_thousand_half_open_connections_to_the_metrics_port_leave_the_worker_bounded_and_serving(
    start_worker, redis_server, tiny_model, tmp_path, enough_descriptors
):
    # Given a worker serving metrics behind a token, and the latency of small jobs through it
    port, token = free_port(), tmp_path / "metrics-token"
    token.write_text("scrape-me\n")
    worker = start_worker(
        "-Q", "doors", name="doors", env={"RERANK_METRICS_PORT": str(port), "RERANK_METRICS_TOKEN_FILE": str(token)}
    )
    worker.wait_until_loaded(processes=1)
    client = RerankClient(Settings(broker_url=redis_server.url, queue="doors", model=str(tiny_model)))

    def small_jobs(n: int, seed: int) -> list[float]:
        seconds = []
        for k in range(n):
            started = time.perf_counter()
            assert len(client.rerank_documents(QUERY, short_papers(5, seed + k), top_k=2, timeout=30).items) == 2
            seconds.append(time.perf_counter() - started)
        return seconds

    small_jobs(10, 0)  # warm-up: first connections, first batches
    threads_before, fds_before = _threads_and_fds(worker.process.pid)
    assert _get(port, token="scrape-me")[0] == 200
    # When, three times, a thousand connections are opened to its metrics port and never finish a
    # request (latency alone and beside them taken in turn, so a busy machine weighs on both alike)
    alone, beside, threads, fds = [], [], [], []
    for round_ in range(3):
        alone += small_jobs(11, 100 * round_)
        wait_for(lambda: value(parse(_get(port, token="scrape-me")[1].decode()), "rerank_tasks_total", state="SUCCESS") >= 10,
                 10, "the jobs in the metrics")  # counts reach the page within half a second of a task
        held = _half_open(port, 1000)
        try:
            for _ in range(10):
                threads.append(_threads_and_fds(worker.process.pid)[0])
                fds.append(_threads_and_fds(worker.process.pid)[1])
            # Then scrapes with the token keep answering, and without it are refused
            for _ in range(3):
                status, body = _get(port, token="scrape-me")
                assert status == 200 and value(parse(body.decode()), "rerank_tasks_total", state="SUCCESS") >= 10
            assert _get(port)[0] == 401
            # And jobs keep their latency
            beside += small_jobs(11, 100 * round_ + 50)
            threads.append(_threads_and_fds(worker.process.pid)[0])
            fds.append(_threads_and_fds(worker.process.pid)[1])
        finally:
            for s in held:
                s.close()
    before, during = statistics.median(alone), statistics.median(beside)
    report = f"threads {threads_before} -> max {max(threads)}, fds {fds_before} -> max {max(fds)}, p50 {before * 1000:.1f} -> {during * 1000:.1f} ms"
    print(f"\n[metrics] 1,000 half-open connections: {report}")
    # And the worker's threads stay as they were, its descriptors within the server's 32
    # connections (and a few evicted ones closing)
    assert max(threads) <= threads_before + 1, report
    assert max(fds) <= fds_before + 32 + 8, report
    assert during <= 2 * before, report
    assert worker.process.poll() is None


def test_gpu_memory_of_a_device_process_is_counted_once_however_many_host_processes_report_it(monkeypatch):
    # Given two host processes of one device process and a pool process holding its own model, all on cuda:0, and one that exited
    from worker import accounting
    from worker.metrics import _model_families
    from worker.report import worker_report

    def snapshot(pid, holder, allocated, alive=True):
        model = {"name": "m", "load_seconds": 1.0, "revision": None, "device": "cuda:0", "dtype": "float16", "pid": holder, "weights": {}}
        memory = {"rss_mb": 1.0, "gpu_allocated_bytes": allocated, "gpu_reserved_bytes": 2 * allocated}
        return {"pid": pid, "alive": alive, "model": model, "memory": memory, "tasks": {}, "updated": 0.0, "cuda_visible_devices": "0"}

    everyone = [snapshot(11, 99, 1000), snapshot(12, 99, 1000), snapshot(13, 13, 500), snapshot(14, 14, 700, alive=False)]
    live = everyone[:3]
    monkeypatch.setattr(accounting, "snapshots", lambda: everyone)
    # When the metrics and the report add GPU memory up
    families = {f.name: f for f in _model_families("w", everyone, live)}
    allocated = {tuple(s.labels.values()): s.value for s in families["rerank_gpu_memory_allocated_bytes"].samples}
    report = worker_report("w")
    # Then the device process's memory counts once, beside the other live holder's; the host processes name their holder
    assert allocated == {("w", "cuda:0"): 1500}
    assert report["memory"]["gpu_allocated_mb"] == round(1500 / 2**20, 2) and report["memory"]["gpu_reserved_mb"] == round(3000 / 2**20, 2)
    assert [p["device_process_pid"] for p in report["processes"]] == [99, 99, None, None]

"""The kill storm, shared by its CI-length test and its long run: producers, a fleet under SIGKILL, one Redis crash.

Producers are separate processes that submit small jobs spread evenly over the storm and write
down each job they were told is queued; a job they were refused (BrokerUnavailable) is sent again
under a new id. Meanwhile a loop SIGKILLs a random serving worker every 0.3-1 s and starts a new
one, and Redis (append-only, fsync always) is SIGKILLed once and started again on its data.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import (
    ROOT,
    RedisServer,
    WorkerFleet,
    WorkerProcess,
    children,
    is_device_process,
    kill,
    kill_tree,
    short_papers,
)

VARIANTS = 20
"""Distinct requests the jobs cycle through; each is scored once in-process as the reference."""

PRODUCER = """
import json, sys, time
from producer import BrokerUnavailable, RerankClient, Settings
from tests.faults.storm import request
url, model, jobs, tag, out, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], float(sys.argv[6])
began = time.monotonic()
client = RerankClient(Settings(broker_url=url, model=model, task_time_limit=30, visibility_timeout=60))
refused = 0
with open(out, "a") as sent:
    for n in range(jobs):
        time.sleep(max(0.0, began + n * seconds / jobs - time.monotonic()))  # spread over the storm
        query, candidates = request(n)
        while True:
            try:
                job = client.submit_documents(query, candidates, top_k=2)
            except BrokerUnavailable:
                refused += 1
                time.sleep(0.2)
                continue
            sent.write(json.dumps([job.id, n % %(variants)d]) + "\\n")
            sent.flush()
            break
print(json.dumps({"tag": tag, "refused": refused}), flush=True)
""".replace("%(variants)d", str(VARIANTS))


def request(n: int) -> tuple[str, list[dict[str, Any]]]:
    """The `n`th job's query and papers: variant n % VARIANTS."""
    variant = n % VARIANTS
    return f"apixaban and kidney function, variant {variant}", short_papers(3, seed=variant, tag=f"v{variant}-")


@dataclass
class Storm:
    """What a storm did and saw."""

    sent: list[tuple[str, int]] = field(default_factory=list)
    kills: int = 0
    workers_started: int = 0
    refused_submits: int = 0
    redis_down_s: float = 0.0
    logs: list[Path] = field(default_factory=list)

    def runs(self, outcome: str = "succeeded") -> Counter[str]:
        """How many times each task id was logged with `outcome` over every worker's log (killed ones included):
        "succeeded" (ran to success), or "Task already completed successfully" (delivered again, not run)."""
        counts: Counter[str] = Counter()
        for log in self.logs:
            counts.update(re.findall(rf"Task rerank\.\w+\[([0-9a-f-]{{36}})\] {outcome}", log.read_text(errors="replace")))
        return counts


def storm(
    redis: RedisServer, fleet: WorkerFleet, worker_args: list[str], env: dict[str, str], model: Path, workdir: Path,
    producers: int, jobs_each: int, slots: int, seconds: float, kills: int, seed: int = 0, piecemeal: bool = False,
) -> Storm:
    """Run producers, spread over `seconds`, against `slots` workers SIGKILLed until the producers are done and
    `kills` serving workers died (a worker takes seconds to start on a busy machine); return what happened.

    `piecemeal`: workers with a device process; each kill is, at random, the whole worker, its device
    process alone (the worker then exits by itself) or one of its host processes (the worker serves on)."""
    rng = random.Random(seed)
    out = workdir / "sent.jsonl"
    spawn = [
        subprocess.Popen(
            [sys.executable, "-c", PRODUCER, redis.url, str(model), str(jobs_each), f"p{i}", str(out), str(seconds)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(producers)
    ]
    seen = Storm()
    live: list[WorkerProcess] = [fleet.start(*worker_args, env=env, name="storm") for _ in range(slots)]
    seen.workers_started = slots
    restarted = False
    started_at = time.monotonic()
    while any(p.poll() is None for p in spawn) or seen.kills < kills:
        assert time.monotonic() - started_at < 4 * seconds + 120, f"only {seen.kills} kills in the storm's time"
        time.sleep(rng.uniform(0.3, 1.0))
        serving = [w for w in live if w.process.poll() is None and " ready." in w.output()]
        if serving:
            victim = rng.choice(serving)
            part = rng.choice(["worker", "device", "host"]) if piecemeal else "worker"
            pool = children(victim.process.pid)
            device = [pid for pid in pool if is_device_process(pid)]
            if part == "worker" or not device:
                kill_tree(victim.process.pid)
            elif part == "device":
                kill(device[0])
            else:
                kill(rng.choice([pid for pid in pool if pid not in device] or pool))
            seen.kills += 1
            if part != "host":
                victim.process.wait(timeout=60)
                live.remove(victim)
                live.append(fleet.start(*worker_args, env=env, name="storm"))
                seen.workers_started += 1
        if not restarted and time.monotonic() - started_at > seconds / 2:
            # Redis crashes mid-storm and comes back on its append-only file
            down = time.monotonic()
            kill(redis.process.pid)
            redis.process.wait()
            redis.start("--appendonly", "yes", "--appendfsync", "always")
            seen.redis_down_s = time.monotonic() - down
            restarted = True
    for producer in spawn:
        output = producer.communicate(timeout=60)[0]
        assert producer.returncode == 0, output
        seen.refused_submits += json.loads(output.strip().splitlines()[-1])["refused"]
    seen.sent = [tuple(json.loads(line)) for line in out.read_text().splitlines()]  # type: ignore[misc]
    seen.logs = [w.log for w in fleet.started]
    assert restarted, "the storm outlasted the Redis crash"
    return seen


def wait_all(redis_url: str, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Wait until every task in `ids` stored a final state; return each one's stored meta (fails naming the missing)."""
    from redis import Redis

    redis = Redis.from_url(redis_url)
    done: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while True:
        missing = [i for i in ids if i not in done]
        for start in range(0, len(missing), 500):
            part = missing[start : start + 500]
            for task_id, raw in zip(part, redis.mget([f"celery-task-meta-{i}" for i in part])):
                meta = json.loads(raw) if raw else None
                if meta and meta["status"] in ("SUCCESS", "FAILURE", "REVOKED"):
                    done[task_id] = meta
        if len(done) == len(ids):
            return done
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(ids) - len(done)} of {len(ids)} jobs never finished, e.g. {missing[:3]}")
        time.sleep(0.5)



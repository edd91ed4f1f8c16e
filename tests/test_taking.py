"""Taking a message is one Redis step; what a dead worker held comes back; nothing in Redis stops a take.

These drive the worker's transport directly against a real Redis (kombu's own Connection, no
worker process), so each case can look at Redis between steps. Killing real workers at random
instants is the kill storm's job (tests/faults/test_kill_storm.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Producer
from redis import Redis

from tests.helpers import ROOT, RedisServer, wait_for
from worker.taking import HELD_PREFIX, LEASES, QUARANTINE
from worker.transport import Transport

pytestmark = pytest.mark.integration

QUEUE = "taking"


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A private Redis for each test, so bookkeeping keys start empty."""
    server = RedisServer(tmp_path)
    server.start("--appendonly", "no")
    yield server.url
    server.stop()


def connect(url: str, lease: float = 10.0) -> Connection:
    """A connection through the worker's transport, as a worker makes it."""
    return Connection(url, transport=Transport, transport_options={"worker_lease": lease, "visibility_timeout": 3600})


def publish(url: str, body: Any, queue: str = QUEUE) -> None:
    """Queue `body` as kombu's producer does (the producers' path, untouched by this transport)."""
    with Connection(url) as connection:
        Producer(connection.default_channel).publish(body, routing_key=queue, exchange="", serializer="json")


def raw(url: str) -> Redis:
    return Redis.from_url(url)


def drain(connection: Connection, seconds: float, until: Any = lambda: False, step: float = 0.05) -> None:
    """Run `connection`'s consumers for `seconds`, or until `until()` is true."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not until():
        try:
            connection.drain_events(timeout=step)
        except TimeoutError:
            pass


def consume(connection: Connection, queues: list[str], into: list[Any]) -> Any:
    """A kombu consumer of `queues` that acknowledges each message and appends its body to `into`."""
    from kombu import Consumer, Queue

    return Consumer(connection, [Queue(q, routing_key=q) for q in queues], callbacks=[lambda body, m: (into.append(body), m.ack())], accept=["json"])


def test_a_take_moves_the_message_into_the_bookkeeping_in_one_step(redis_url):
    # Given a queued message
    publish(redis_url, {"n": 1})
    with connect(redis_url) as connection:
        channel = connection.default_channel
        # When a worker takes it
        message = channel.basic_get(QUEUE)
        # Then it has left the queue and is recorded under its delivery tag, held under the worker's lease
        redis = raw(redis_url)
        tag = message.delivery_tag
        assert message.decode() == {"n": 1}
        assert redis.llen(QUEUE) == 0
        entry = json.loads(redis.hget("unacked", tag))
        assert entry[1:] == ["", QUEUE], "restored to the queue it was taken from, whatever its envelope says"
        assert redis.zscore("unacked_index", tag) == pytest.approx(time.time(), abs=5)
        assert redis.sismember(HELD_PREFIX + channel.lease, tag)
        assert redis.zscore(LEASES, channel.lease) / 1000 == pytest.approx(time.time() + 10, abs=5)
        # And acknowledging it clears every trace
        message.ack()
        assert not redis.hexists("unacked", tag) and redis.zscore("unacked_index", tag) is None
        assert not redis.sismember(HELD_PREFIX + channel.lease, tag)


def test_messages_held_under_a_lapsed_lease_go_back_to_their_queue(redis_url):
    # Given a process that took two messages under a short lease, then died without a word
    publish(redis_url, {"n": 1})
    publish(redis_url, {"n": 2})
    redis = raw(redis_url)
    taker = (
        "import os, sys; from tests.test_taking import connect, QUEUE; c = connect(sys.argv[1], lease=0.5); "
        "ch = c.default_channel; tags = [ch.basic_get(QUEUE).delivery_tag for _ in range(2)]; "
        "print(ch.lease, *tags, flush=True); os._exit(0)"
    )
    out = subprocess.run([sys.executable, "-c", taker, redis_url], capture_output=True, text=True, timeout=60, cwd=ROOT, check=True)
    dead_lease, *held = out.stdout.split()
    assert redis.llen(QUEUE) == 0 and redis.hlen("unacked") == 2
    # When another worker keeps its own lease after the dead one lapsed
    with connect(redis_url) as live:
        live.default_channel.basic_get("nothing-here")  # takes nothing, but holds a lease from now on
        live.default_channel._opened_at -= 60  # a channel opened a minute ago: it sweeps (a young one waits a lease)
        time.sleep(0.6)
        live.default_channel.keep_lease()
        # Then both messages are back on their queue, marked redelivered, and the lapsed lease is gone
        assert redis.llen(QUEUE) == 2 and redis.hlen("unacked") == 0
        back = [live.default_channel.basic_get(QUEUE) for _ in range(2)]
        assert sorted(m.decode()["n"] for m in back) == [1, 2]
        assert all(m.delivery_info.get("redelivered") for m in back)
        assert redis.zscore(LEASES, dead_lease) is None
    assert set(held).isdisjoint({m.delivery_tag for m in back}), "each take records a fresh tag"


def test_a_channel_younger_than_a_lease_sweeps_nothing(redis_url):
    # Given a lease that lapsed while Redis was down (its worker is alive and about to reconnect)
    redis = raw(redis_url)
    redis.zadd(LEASES, {"reconnecting": 1})
    redis.sadd(HELD_PREFIX + "reconnecting", "tag")
    with connect(redis_url) as connection:
        channel = connection.default_channel
        channel.basic_get("nothing-here")
        # When a worker whose channel just opened keeps its lease, Then it leaves the other lease alone
        channel.keep_lease()
        assert redis.zscore(LEASES, "reconnecting") == 1 and redis.sismember(HELD_PREFIX + "reconnecting", "tag")
        # And once its channel is a lease old, it sweeps
        channel._opened_at -= 60
        channel.keep_lease()
        assert redis.zscore(LEASES, "reconnecting") is None


def test_a_clean_shutdown_puts_back_what_the_worker_still_holds(redis_url):
    # Given a worker holding a message it will not finish
    publish(redis_url, {"n": 1})
    with connect(redis_url) as connection:
        connection.default_channel.basic_get(QUEUE)
        # When it gives up its lease (worker_shutdown does this)
        connection.default_channel.release_lease()
    # Then the message is queued again at once
    assert raw(redis_url).llen(QUEUE) == 1 and raw(redis_url).hlen("unacked") == 0


def test_a_full_redis_leaves_the_message_queued(redis_url):
    # Given a queued message and a Redis that refuses every write for want of memory
    publish(redis_url, {"n": 1})
    redis = raw(redis_url)
    redis.config_set("maxmemory-policy", "noeviction")
    redis.config_set("maxmemory", 1)
    try:
        with connect(redis_url) as connection:
            # When a worker tries to take it, Then Redis refuses and the message stays in its queue
            with pytest.raises(Exception, match="maxmemory"):
                connection.default_channel.basic_get(QUEUE)
            assert redis.llen(QUEUE) == 1 and redis.hlen("unacked") == 0
    finally:
        redis.config_set("maxmemory", 0)


HOSTILE_ITEMS = {
    "not JSON": b"\x00\xffnot json",
    "invalid UTF-8": b'{"body": "\xff"}',
    "a JSON list": b"[1, 2, 3]",
    "a JSON string": b'"hello"',
    "nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
    "nested 40 deep in the headers": json.dumps({"headers": json.loads("[" * 40 + "]" * 40), "properties": {}}).encode(),
    "kombu's decimal hook": b'{"__type__": "decimal", "__value__": "not a number"}',
    "kombu's bytes hook for properties": json.dumps(
        {"body": "", "headers": {}, "properties": {"__type__": "bytes", "__value__": "eA=="}}
    ).encode(),
    "kombu's uuid hook for the delivery info": json.dumps(
        {"body": "", "properties": {"delivery_tag": "t", "delivery_info": {"__type__": "uuid", "__value__": "x"}}}
    ).encode(),
    "a priority that is not a number": json.dumps(
        {"body": "", "properties": {"delivery_tag": "t", "priority": "high", "delivery_info": {"exchange": "", "routing_key": QUEUE}}}
    ).encode(),
    "a body that is an object": json.dumps(
        {"body": {}, "properties": {"delivery_tag": "t", "delivery_info": {"exchange": "", "routing_key": QUEUE}}}
    ).encode(),
}


@pytest.mark.parametrize("kind", HOSTILE_ITEMS)
def test_a_hostile_queue_item_is_quarantined_and_the_next_message_is_taken(redis_url, kind):
    # Given a hostile item at the head of the queue, and a valid message behind it
    redis = raw(redis_url)
    redis.lpush(QUEUE, HOSTILE_ITEMS[kind])
    publish(redis_url, {"n": 1})
    with connect(redis_url) as connection:
        # When a worker takes
        message = connection.default_channel.basic_get(QUEUE)
        # Then it gets the valid message; the hostile item waits in the quarantine, with why and where from
        assert message.decode() == {"n": 1}
        assert redis.hlen("unacked") == 1, "only the valid message is recorded"
    (entry,) = [json.loads(e) for e in redis.lrange(QUARANTINE, 0, -1)]
    assert entry["queue"] == QUEUE and entry["bytes"] == len(HOSTILE_ITEMS[kind]) and entry["reason"]
    assert entry["item"][:100] == HOSTILE_ITEMS[kind][:100].decode(errors="replace")[: len(entry["item"][:100])]


def test_the_quarantine_keeps_a_bounded_prefix_of_huge_items_and_a_bounded_count(redis_url):
    redis = raw(redis_url)
    # Given 1,010 hostile items, one of them 20 MB
    redis.lpush(QUEUE, b"x" * 20_000_000)
    for _ in range(1009):
        redis.lpush(QUEUE, b"junk")
    with connect(redis_url) as connection:
        # When a worker works through them
        assert connection.default_channel.basic_get(QUEUE) is None
    # Then the quarantine holds the newest 1,000, none over 64 KiB of item
    assert redis.llen(QUARANTINE) == 1000
    assert max(len(json.loads(e)["item"]) for e in redis.lrange(QUARANTINE, 0, -1)) <= 65_536
    assert redis.memory_usage(QUARANTINE) < 5_000_000


@pytest.mark.parametrize(
    "key,kind",
    [("unacked", "list"), ("unacked_index", "string"), (LEASES, "hash"), (QUEUE, "string"), (QUEUE, "set")],
)
def test_a_bookkeeping_key_or_queue_of_the_wrong_type_is_moved_aside(redis_url, key, kind):
    # Given a key that kombu or the take script needs, holding another type
    redis = raw(redis_url)
    {"list": lambda: redis.rpush(key, "x"), "string": lambda: redis.set(key, "x"), "hash": lambda: redis.hset(key, "a", "b"),
     "set": lambda: redis.sadd(key, "x")}[kind]()
    with connect(redis_url) as connection:
        channel = connection.default_channel
        # When a worker takes (the queue is empty or unusable)
        assert channel.basic_get(QUEUE) is None
        # Then the key was renamed aside, kept for inspection, and takes work again
        aside = [k.decode() for k in redis.keys(f"{key}.misplaced.*")]
        assert len(aside) == 1 and redis.type(aside[0]).decode() == kind
        publish(redis_url, {"n": 2})
        assert channel.basic_get(QUEUE).decode() == {"n": 2}


def test_hostile_unacked_entries_are_quarantined_when_restored(redis_url):
    # Given kombu's bookkeeping filled with entries no worker wrote, all past the visibility timeout
    redis = raw(redis_url)
    entries = {
        "not-json": b"\x00garbage",
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "decimal": b'[{"__type__": "decimal", "__value__": "x"}, "", "q"]',
        "short": b"[1]",
        "bad-envelope": json.dumps([{"properties": 5}, "", QUEUE]).encode(),
        "wrong-exchange-type": json.dumps([{"properties": {}}, 5, QUEUE]).encode(),
    }
    for tag, entry in entries.items():
        redis.hset("unacked", tag, entry)
        redis.zadd("unacked_index", {tag: 1.0})
    redis.zadd("unacked_index", {"no-entry": 1.0})
    # And kombu's restore mutex left without an expiry, which would block every sweep forever
    redis.set("unacked_mutex", "forever")
    publish(redis_url, {"n": 1})
    with Connection(redis_url, transport=Transport, transport_options={"visibility_timeout": 1}) as connection:
        channel = connection.default_channel
        # When a worker sweeps for messages past the visibility timeout
        channel.qos.restore_visible(num=100, interval=1)
        # Then each entry went to the quarantine, the bookkeeping is clean, and taking still works
        wait_for(lambda: redis.llen(QUARANTINE) == len(entries), 5, "every hostile entry quarantined")
        assert redis.hlen("unacked") == 0 and redis.zcard("unacked_index") == 0
        assert channel.basic_get(QUEUE).decode() == {"n": 1}
    assert redis.keys("unacked_mutex.misplaced.*"), "the foreign mutex is kept for inspection"


def test_a_take_holds_many_messages_each_under_its_own_tag(redis_url):
    # Given 50 queued messages
    for n in range(50):
        publish(redis_url, {"n": n})
    with connect(redis_url) as connection:
        channel = connection.default_channel
        # When a worker takes them all, Then each is recorded once, under a tag of its own, in queue order
        messages = [channel.basic_get(QUEUE) for _ in range(50)]
        assert [m.decode()["n"] for m in messages] == list(range(50))
        assert len({m.delivery_tag for m in messages}) == 50
        assert raw(redis_url).scard(HELD_PREFIX + channel.lease) == 50
        assert channel.basic_get(QUEUE) is None


def test_a_lease_whose_held_set_is_not_a_set_is_dropped_without_stopping_the_sweep(redis_url):
    # Given lapsed leases written by someone else: one naming a string key, one with a giant name
    redis = raw(redis_url)
    redis.set(HELD_PREFIX + "bogus", "x")
    redis.zadd(LEASES, {"bogus": 1, "y" * 100_000: 1, "empty": 1})
    publish(redis_url, {"n": 1})
    with connect(redis_url) as connection:
        channel = connection.default_channel
        message = channel.basic_get(QUEUE)
        channel._opened_at -= 60  # a channel opened a minute ago: it sweeps
        # When the worker keeps its lease (and sweeps lapsed ones)
        channel.keep_lease()
        # Then the bogus leases are gone, its own stays, and its message is still held
        assert [m.decode() for m in redis.zrange(LEASES, 0, -1)] == [channel.lease]
        assert redis.hexists("unacked", message.delivery_tag)
        assert redis.get(HELD_PREFIX + "bogus") == b"x", "not ours to delete"


@pytest.mark.parametrize("forged_score", [1, "just lapsed"])
def test_tens_of_thousands_of_forged_leases_delay_a_dead_worker_s_messages_by_a_bounded_number_of_sweeps(redis_url, forged_score):
    # Given 50,000 forged lapsed leases that hold nothing, older than (or as old as) a real one
    redis = raw(redis_url)
    publish(redis_url, {"n": 1})
    taker = (
        "import os, sys; from tests.test_taking import connect, QUEUE; c = connect(sys.argv[1], lease=0.5); "
        "ch = c.default_channel; ch.basic_get(QUEUE); print(ch.lease, flush=True); os._exit(0)"
    )
    dead = subprocess.run([sys.executable, "-c", taker, redis_url], capture_output=True, text=True, timeout=60, cwd=ROOT, check=True).stdout.split()[0]
    score = 1 if forged_score == 1 else redis.zscore(LEASES, dead)
    for start in range(0, 50_000, 10_000):
        redis.zadd(LEASES, {f"forged-{n}": score for n in range(start, start + 10_000)})
    time.sleep(0.6)  # the dead worker's lease lapses
    with connect(redis_url) as live:
        channel = live.default_channel
        channel.basic_get("nothing-here")
        channel._opened_at -= 60  # a channel opened a minute ago: it sweeps
        # When a live worker keeps its lease, sweep after sweep
        sweeps, slowest = 0, 0.0
        while redis.llen(QUEUE) == 0:
            began = time.perf_counter()
            channel.keep_lease()
            slowest, sweeps = max(slowest, time.perf_counter() - began), sweeps + 1
            assert sweeps <= 50_000 // 1000 + 2, f"{sweeps} sweeps and the dead worker's message is not back"
    # Then the message came back within the sweeps it takes to forget the forged leases a thousand at a time, each sweep short
    assert redis.hlen("unacked") == 0 and slowest < 1.0, slowest
    assert redis.zcard(LEASES) <= 50_000 - 1000 * (sweeps - 1) + 1


@pytest.mark.parametrize("target", ["first", "second", "third"])
def test_an_idle_worker_wakes_at_once_for_a_message_on_any_of_its_queues(redis_url, target):
    # Given a consumer of three queues, idle past a wait's one-second timeout (the event-loop path: wait, then take)
    names = {"first": "q.first", "second": "q.second", "third": "q.third"}
    received: list[Any] = []
    with connect(redis_url) as connection:
        with consume(connection, list(names.values()), received):
            drain(connection, 1.5)
            # When messages arrive on one of them, three times a third of a wait's timeout apart
            latencies = []
            for n in range(3):
                time.sleep(0.35)
                sent = time.monotonic()
                publish(redis_url, {"n": n}, queue=names[target])
                drain(connection, 5, until=lambda: len(received) > n, step=0.02)
                latencies.append(time.monotonic() - sent)
    # Then each is taken at once, not at the next wait's timeout (a second): that queue's own wait woke the worker
    assert received == [{"n": 0}, {"n": 1}, {"n": 2}] and max(latencies) < 0.25, latencies


def test_a_fresh_worker_starts_and_serves_within_30_s_whatever_is_in_redis(tmp_path, redis_url, tiny_model):
    from producer import RerankClient, Settings
    from tests.helpers import WorkerFleet, short_papers

    # Given a Redis where someone wrote into every key a worker reads at start-up and while taking
    redis = raw(redis_url)
    for tag, entry in {"a": b"\x00", "b": b"[" * 100_000 + b"]" * 100_000, "c": b'[{"__type__": "decimal", "__value__": "x"}, "", "q"]', "d": b"[1]"}.items():
        redis.hset("unacked", tag, entry)
        redis.zadd("unacked_index", {tag: 1.0})
    redis.zadd("unacked_index", {"ghost": 1.0})
    redis.set("unacked_mutex", "forever")
    redis.zadd(LEASES, {"lapsed": 1, "x" * 10_000: 1})
    redis.set(HELD_PREFIX + "lapsed", "not a set")
    queue = "fresh"
    for item in (b"junk", b"[" * 100_000 + b"]" * 100_000, b'{"__type__": "uuid", "__value__": "x"}'):
        redis.lpush(queue, item)
    redis.set(f"{queue}\x06\x163", "a string where a priority list goes")
    redis.set(f"_kombu.binding.{queue}", "a string where kombu's routing table goes")
    redis.hset(f"_kombu.binding_permanent.{queue}", "a", "hash")
    # When a worker starts on it
    fleet = WorkerFleet(tmp_path, tiny_model, redis_url)
    started = time.monotonic()
    try:
        worker = fleet.start("-Q", queue, env={"RERANK_VISIBILITY_TIMEOUT": "600"}, name="fresh")
        worker.wait_until_loaded(processes=1, timeout=30)
        client = RerankClient(Settings(broker_url=redis_url, queue=queue, model=str(tiny_model)))
        # Then it serves a job within 30 s of its start, and stays up
        result = client.rerank_documents("apixaban", short_papers(3), top_k=2, timeout=max(1, 30 - (time.monotonic() - started)))
        served = time.monotonic() - started
        assert len(result.items) == 2 and served < 30 and worker.process.poll() is None
        assert "Unrecoverable error" not in worker.output()
        # And what it could not use waits in the quarantine or aside, not in its way
        wait_for(lambda: redis.llen(QUARANTINE) >= 3, 10, "the hostile queue items quarantined")
        assert redis.keys(f"{queue}\x06\x163.misplaced.*")
        assert redis.keys(f"_kombu.binding.{queue}.misplaced.*") and redis.keys(f"_kombu.binding_permanent.{queue}.misplaced.*")
    finally:
        fleet.stop_all()


def test_a_producer_refused_by_a_misplaced_queue_key_says_so_and_sends_once_a_worker_moved_it(tmp_path, redis_url, tiny_model):
    from producer import BrokerUnavailable, RerankClient, Settings
    from tests.helpers import WorkerFleet, short_papers

    # Given a string where the queue's list goes, and no worker yet
    queue = "misplaced"
    raw(redis_url).set(queue, "x")
    client = RerankClient(Settings(broker_url=redis_url, queue=queue, model=str(tiny_model)))
    # When a producer sends, Then it is told what is wrong, not that Redis is unreachable
    with pytest.raises(BrokerUnavailable, match="holds another type") as refusal:
        client.submit_documents("apixaban", short_papers(2), top_k=1)
    assert "cannot reach" not in str(refusal.value)
    # And once a worker consuming the queue started (and moved the key aside), the same send works
    fleet = WorkerFleet(tmp_path, tiny_model, redis_url)
    try:
        fleet.start("-Q", queue, name="mover").wait_until_loaded(processes=1)
        assert len(client.rerank_documents("apixaban", short_papers(2), top_k=1, timeout=30).items) == 1
    finally:
        fleet.stop_all()


def test_a_full_redis_makes_an_idle_worker_retry_each_second_not_spin(redis_url):
    # Given a consumer, a queued message and a Redis that refuses every write for want of memory
    publish(redis_url, {"n": 1})
    redis = raw(redis_url)
    redis.config_set("maxmemory-policy", "noeviction")
    received: list[Any] = []
    try:
        with connect(redis_url) as connection:
            with consume(connection, [QUEUE], received):
                redis.config_set("maxmemory", 1)
                redis.config_resetstat()
                # When a consumer runs for two seconds
                drain(connection, 2)
                # Then it tried a few times (once a second), the message still queued
                evals = int(redis.info("commandstats").get("cmdstat_eval", {}).get("calls", 0))
                assert 1 <= evals <= 6 and redis.llen(QUEUE) == 1 and not received
                # And once memory is free, it takes the message
                redis.config_set("maxmemory", 0)
                drain(connection, 5, until=lambda: bool(received))
        assert received == [{"n": 1}]
    finally:
        redis.config_set("maxmemory", 0)

"""The score cache (RERANK_SCORE_CACHE): what was scored is served again bit for bit and never scored twice, within a
TTL and a memory bound, and nothing a Redis writer plants is ever served."""

from __future__ import annotations

import json
import os
import secrets
import struct
import time
from array import array
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import redis

from contract.schemas import ScoringInfo
from producer import RerankClient, Settings
from scoring.cache import VALUE_BYTES, ScoreCache, fingerprint
from scoring.tokens import EncodedPair
from tests.helpers import CORPUS, QUERY, ROOT, WorkerFleet, free_port, wait_for
from worker.score_cache import ENTRY_BYTES, PREFIX, RedisScores

JOB = json.loads((ROOT / "examples" / "af_ckd_job.json").read_text())
SECRET = secrets.token_bytes(32)


def pairs(n: int, start: int = 0) -> list[EncodedPair]:
    return [EncodedPair(array("i", [0, 7 + k, 9, 2])) for k in range(start, start + n)]


@pytest.fixture
def scratch_redis(redis_server) -> Iterator[redis.Redis]:
    """Database 3 of the test Redis, empty (the workers use database 0)."""
    client = redis.Redis.from_url(redis_server.url.removesuffix("/0") + "/3")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


# The cache and its Redis store -------------------------------------------------------------------


def test_scores_come_back_bit_for_bit_and_a_planted_or_moved_entry_is_refused(scratch_redis):
    # Given three pairs' logits written through the cache
    cache = ScoreCache(RedisScores(scratch_redis, ttl=3600, max_entries=1000), SECRET, b"model")
    keys = cache.keys(pairs(3))
    logits = [struct.unpack("<f", struct.pack("<f", x))[0] for x in (-1.25, 0.1, 3.3)]  # fp32 values, as models return
    cache.write(keys, logits)
    # Then they read back exactly
    assert cache.read(keys) == logits and cache.counts == {"hits": 3, "misses": 0, "refused": 0}
    (generation,) = scratch_redis.keys(f"{PREFIX}*")
    # When someone without the secret plants a score at one key, and copies another key's entry onto the third
    scratch_redis.hset(generation, keys[0], struct.pack("<f", 99.0) + os.urandom(VALUE_BYTES - 4))
    scratch_redis.hset(generation, keys[2], scratch_redis.hget(generation, keys[1]))
    # Then neither is served: both read as misses, counted as refused; the untouched one still reads
    assert cache.read(keys) == [None, logits[1], None]
    assert cache.counts["refused"] == 2


def test_what_a_redis_writer_puts_at_the_keys_is_never_read_past_an_entrys_size(scratch_redis):
    store = RedisScores(scratch_redis, ttl=3600, max_entries=1000)
    cache = ScoreCache(store, SECRET, b"model")
    keys = cache.keys(pairs(2))
    cache.write(keys, [1.0, 2.0])
    generations, _ = store.live()
    # When a megabyte is written at one field and a string at an older generation's key
    scratch_redis.hset(generations[0], keys[0], b"x" * 2**20)
    scratch_redis.set(generations[1], b"not a hash")
    # Then the read script returns nothing for that field, and the rest reads
    assert store.read(keys) == [None, scratch_redis.hget(generations[0], keys[1])]
    # And a current generation of another type takes no writes, and stops no reads
    scratch_redis.delete(generations[0])
    scratch_redis.set(generations[0], b"squatter")
    cache.write(keys, [1.0, 2.0])
    assert scratch_redis.get(generations[0]) == b"squatter" and cache.read(keys) == [None, None]


def test_a_redis_that_fails_reads_and_writes_costs_the_cache_not_the_request(tiny_engine):
    from scoring.cache import CachedScorer

    # Given a cache whose Redis cannot be reached (nobody listens on its port)
    refusing = redis.Redis(port=free_port(), socket_connect_timeout=1)
    cached = CachedScorer(tiny_engine, ScoreCache(RedisScores(refusing, ttl=3600, max_entries=1000), SECRET, b"model"))
    # When it scores, twice
    first, second = cached.score(QUERY, CORPUS[:3]), cached.score(QUERY, CORPUS[:3])
    # Then both are scored by the model, as without a cache
    assert first.cached == second.cached == 0 and first.logits == pytest.approx(tiny_engine.score(QUERY, CORPUS[:3]).logits, abs=1e-6)


def test_the_bound_counts_every_live_generation_and_entries_outlive_their_ttl_by_at_most_a_quarter(scratch_redis):
    offset = [0.0]
    store = RedisScores(scratch_redis, ttl=400, max_entries=10, clock=lambda: time.time() + offset[0])
    cache = ScoreCache(store, SECRET, b"model")
    # Given 15 entries written to a cache bounded at 10
    first = cache.keys(pairs(15))
    cache.write(first, [float(n) for n in range(15)])
    # Then 10 were kept, and their generation expires one TTL after it ends
    generations, _ = store.live()
    assert scratch_redis.hlen(generations[0]) == 10
    assert 400 < scratch_redis.ttl(generations[0]) <= 400 + store.span
    # When a quarter of the TTL later (a new generation) more come, the full cache takes none of them
    offset[0] += store.span
    later = cache.keys(pairs(5, start=100))
    cache.write(later, [1.0] * 5)
    assert sum(scratch_redis.hlen(g) for g in store.live()[0] if scratch_redis.type(g) == b"hash") == 10
    assert sum(logit is not None for logit in cache.read(first)) == 10
    # And once the first generation is past its TTL and quarter, its entries are gone and new ones are taken
    offset[0] += 400 + store.span
    assert cache.read(first) == [None] * 15
    cache.write(later, [1.0] * 5)
    assert cache.read(later) == [1.0] * 5


def test_an_entry_takes_no_more_redis_memory_than_it_is_counted_at(scratch_redis):
    store = RedisScores(scratch_redis, ttl=3600, max_entries=10**6)
    store.write({os.urandom(16): os.urandom(VALUE_BYTES) for _ in range(20_000)})
    (generation, *_), _ = store.live()
    per_entry = scratch_redis.memory_usage(generation, samples=0) / 20_000
    print(f"\n[score cache] {per_entry:.1f} bytes an entry in Redis; counted at {ENTRY_BYTES}")
    assert per_entry <= ENTRY_BYTES


@pytest.mark.parametrize("shape", ["engine", "threads", "device"])
def test_every_scorer_shape_caches_alike_and_scores_only_the_misses(scorer_shapes, scratch_redis, shape):
    from scoring.cache import CachedScorer

    # Given a scorer shape behind the cache, and a request scored once
    cached = CachedScorer(scorer_shapes[shape], ScoreCache(RedisScores(scratch_redis, ttl=3600, max_entries=1000), SECRET, b"model"))
    first = cached.score(QUERY, CORPUS[:6])
    # When the request comes again with two new passages and a repeat
    again = cached.score(QUERY, CORPUS[:8] + CORPUS[:1])
    # Then the six known pairs (and the repeat) come from the cache bit for bit, only the two new ones were scored
    assert first.cached == 0 and again.cached == 7
    assert again.logits[:6] == first.logits and again.logits[8] == first.logits[0]
    assert again.logits[6:8] == pytest.approx(scorer_shapes["engine"].score(QUERY, CORPUS[6:8]).logits, abs=1e-5)
    assert again.tokens == sum(len(p.input_ids) for p in scorer_shapes["engine"].tokenize(QUERY, CORPUS[:8] + CORPUS[:1]))


def test_the_key_changes_with_anything_that_changes_a_score(tiny_engine):
    from msgspec.structs import replace

    facts = tiny_engine.facts
    keyed = lambda facts, secret=SECRET: ScoreCache(None, secret, fingerprint(facts)).keys(pairs(1))[0]
    base = keyed(facts)
    # Another dtype, attention, device kind, max length, model or revision, or another fleet's secret: another key
    for changed in (
        replace(facts, dtype="bfloat16"), replace(facts, attention="padded"), replace(facts, device="cuda:0"),
        replace(facts, max_length=256), replace(facts, name="other"), replace(facts, revision="abc"),
    ):
        assert keyed(changed) != base
    assert keyed(facts, secrets.token_bytes(32)) != base
    # Another device of the same kind, or another process: the same key
    assert keyed(replace(facts, pid=1)) == base
    # And a result with no pair from the cache says nothing of it, so producers that predate the field read it
    info = {"model": "m", "device": "cpu", "dtype": "float32", "max_length": 8, "pairs": 1, "tokens": 4, "padded_tokens": 4,
            "batches": 1, "tokenize_ms": 0.1, "forward_ms": 0.1, "pid": 1, "model_loads": 1}
    assert "cached_pairs" not in ScoringInfo(**info).model_dump() and ScoringInfo(**info, cached_pairs=1).model_dump()["cached_pairs"] == 1


# A worker with the cache on ----------------------------------------------------------------------

QUEUE = "rerank.cache-tests"


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_model, redis_server) -> Iterator[SimpleNamespace]:
    """A worker with RERANK_SCORE_CACHE on its own queue, its secret in a file, serving metrics; and a client of that queue."""
    workdir = tmp_path_factory.mktemp("cache-worker")
    key_file = workdir / "fleet-key"
    key_file.write_text(secrets.token_hex(32) + "\n")
    port = free_port()
    env = {"RERANK_SCORE_CACHE": "true", "RERANK_SCORE_CACHE_KEY_FILE": str(key_file), "RERANK_QUEUE": QUEUE,
           "RERANK_METRICS_PORT": str(port), "RERANK_METRICS_ADDRESS": "127.0.0.1"}
    fleet = WorkerFleet(workdir, tiny_model, redis_server.url)
    worker = fleet.start("-c", "1", env=env, name="cache")
    worker.wait_until_loaded(processes=1)
    client = RerankClient(Settings(broker_url=redis_server.url, model=str(tiny_model), queue=QUEUE))
    yield SimpleNamespace(worker=worker, client=client, port=port, redis=redis.Redis.from_url(redis_server.url))
    fleet.stop_all()


def empty_cache(client: redis.Redis) -> None:
    for key in client.scan_iter(f"{PREFIX}*"):
        client.delete(key)


def cache_metrics(port: int) -> dict[str, float]:
    from tests.test_metrics import scrape

    samples = scrape(port)
    return {name: sum(v for (n, _), v in samples.items() if n == f"rerank_score_cache_{name}_total") for name in ("hits", "misses", "refused")}


def logits_of(result) -> list[tuple[int, float]]:
    return [(item.index, item.logit) for item in result.items]


@pytest.mark.integration
def test_the_shipped_job_again_is_served_from_the_cache_bit_for_bit_with_no_forward_pass(cached):
    empty_cache(cached.redis)
    before = cache_metrics(cached.port)
    # Given the shipped 100-paper two-stage job, run once on an empty cache
    run = lambda: cached.client.two_stage(
        JOB["query"], JOB["candidates"], top_k_docs=JOB["top_k_docs"], top_k_chunks=JOB["top_k_chunks"], return_logits=True, timeout=120
    )
    cold = run()
    # When it runs again
    warm = run()
    # Then both stages come back with the same logits, bit for bit, every pair from the cache, and no forward pass
    for stage in ("documents", "chunks"):
        c, w = getattr(cold, stage), getattr(warm, stage)
        assert logits_of(w) == logits_of(c)
        assert c.info.cached_pairs == 0 and w.info.cached_pairs == w.info.pairs == c.info.pairs > 0
        assert w.info.batches == 0 and w.info.forward_ms * 10 <= c.info.forward_ms
    # And the worker's metrics count the hits and misses
    pairs = cold.documents.info.pairs + cold.chunks.info.pairs
    counted = wait_for(lambda: (m := cache_metrics(cached.port))["hits"] - before["hits"] >= pairs and m, 10, "the hits in the metrics")
    assert counted["hits"] - before["hits"] == pairs and counted["misses"] - before["misses"] == pairs


@pytest.mark.integration
def test_a_score_planted_in_redis_is_never_served(cached):
    passages = CORPUS[40:52]
    empty_cache(cached.redis)
    fresh = cached.client.rerank_passages(QUERY, passages, return_logits=True, timeout=60)
    refused_before = cache_metrics(cached.port)["refused"]
    # Given someone who can write to Redis but has no fleet secret replaces every cached entry with a high score
    planted = 0
    for key in cached.redis.scan_iter(f"{PREFIX}*"):
        for field in cached.redis.hkeys(key):
            cached.redis.hset(key, field, struct.pack("<f", 50.0) + os.urandom(VALUE_BYTES - 4))
            planted += 1
    assert planted >= len(passages)
    # When the same passages are scored again
    again = cached.client.rerank_passages(QUERY, passages, return_logits=True, timeout=60)
    # Then no planted score is served: every pair was scored afresh, to the same logits, and the refusals are counted
    assert logits_of(again) == logits_of(fresh) and again.info.cached_pairs == 0 and again.info.batches > 0
    wait_for(lambda: cache_metrics(cached.port)["refused"] - refused_before >= len(passages), 10, "the refusals in the metrics")
    # And the fresh scores replaced the planted ones: the next run is served from the cache again
    healed = cached.client.rerank_passages(QUERY, passages, return_logits=True, timeout=60)
    assert logits_of(healed) == logits_of(fresh) and healed.info.cached_pairs == len(passages)


@pytest.mark.integration
def test_truncation_is_part_of_the_key(cached):
    empty_cache(cached.redis)
    long = " ".join(CORPUS[:40])
    # Given a long passage scored whole (as much as fits), then cut to 30 tokens
    whole = cached.client.rerank_passages(QUERY, [long], return_logits=True, timeout=60)
    cut = cached.client.rerank_passages(QUERY, [long], max_passage_tokens=30, return_logits=True, timeout=60)
    # Then the cut one was not served the whole one's score, and each is served its own next time
    assert cut.info.cached_pairs == 0 and cut.items[0].logit != whole.items[0].logit
    assert cached.client.rerank_passages(QUERY, [long], max_passage_tokens=30, return_logits=True, timeout=60).items[0].logit == cut.items[0].logit


@pytest.mark.integration
def test_a_worker_with_the_cache_on_and_no_fleet_secret_refuses_to_start(start_worker):
    # Given RERANK_SCORE_CACHE without RERANK_SCORE_CACHE_KEY(_FILE)
    worker = start_worker("-c", "1", env={"RERANK_SCORE_CACHE": "true"})
    # Then it exits 1 before loading the model, saying what to set
    assert worker.process.wait(timeout=60) == 1
    assert "RERANK_SCORE_CACHE needs the fleet's secret" in worker.output() and "model loaded:" not in worker.output()

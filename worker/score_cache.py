"""The score cache's entries in the result backend's Redis (RERANK_SCORE_CACHE; scoring/cache.py makes and checks them).

Layout: a few hashes, one per generation of a quarter of RERANK_SCORE_CACHE_TTL
(`rerank.scores.<n>`, n = unix time // quarter). An entry is written into the current
generation, whose hash expires one TTL after the generation ends, so an entry lives between one
TTL and a quarter more; a read looks in the live generations, newest first.

The bound: before it writes, the write script counts the entries of the live generations (HLEN)
and adds only as many as RERANK_SCORE_CACHE_MAX_MB holds at ENTRY_BYTES each; a full cache takes
nothing new until its oldest generation expires. Redis's own maxmemory is never relied on: the
broker's queues share that Redis and must not be evicted.

Hostile Redis: both scripts skip a generation key of another type, and the read script returns a
field only when it holds exactly an entry's bytes, so nothing planted can make a worker read more
than VALUE_BYTES per pair. What it returns is then authenticated (scoring/cache.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from celery import bootsteps

from contract.settings import Settings
from producer.app import settings_of
from scoring.cache import (
    VALUE_BYTES,
    CachedScorer,
    ScoreCache,
    directory_digest,
    fingerprint,
)
from scoring.engine import Scorer

log = logging.getLogger(__name__)

PREFIX = "rerank.scores."
"""Each generation's hash is named this and its number."""

GENERATIONS = 4
"""Generations a TTL spans: an entry outlives its TTL by at most 1/GENERATIONS of it."""

ENTRY_BYTES = 128
"""Redis memory an entry is counted at: a 16-byte field and a 20-byte value in a hash took 96-108 bytes at 1,000-100,000
entries on Redis 7.0 (MEMORY USAGE; tests/test_score_cache.py checks it), and a hash table may grow by half at once."""

_READ = """
local hashes = {}
for _, key in ipairs(KEYS) do
  if redis.call('TYPE', key)['ok'] == 'hash' then hashes[#hashes + 1] = key end
end
local size = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
  local value = false
  for _, key in ipairs(hashes) do
    if redis.call('HSTRLEN', key, ARGV[i]) == size then
      value = redis.call('HGET', key, ARGV[i])
      break
    end
  end
  out[i - 1] = value
end
return out
"""

_WRITE = """
local held = 0
for _, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'hash' then
    held = held + redis.call('HLEN', key)
  elseif key == KEYS[1] and kind ~= 'none' then
    return 0
  end
end
local room = tonumber(ARGV[1]) - held
local added = 0
for i = 3, #ARGV - 1, 2 do
  if added >= room then break end
  added = added + redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if added > 0 then redis.call('EXPIREAT', KEYS[1], ARGV[2]) end
return added
"""


class RedisScores:
    """A `ScoreStore` in Redis: generation hashes, one script call to read a request's entries and one to write them."""

    def __init__(self, client: Any, ttl: int, max_entries: int, clock: Any = time.time) -> None:
        """Keep entries with `client` (redis-py) for `ttl` seconds, at most `max_entries` of them."""
        self.client = client
        self.ttl = ttl
        self.max_entries = max_entries
        self.span = math.ceil(ttl / GENERATIONS)
        self.clock = clock
        self._read = client.register_script(_READ)
        self._write = client.register_script(_WRITE)

    def live(self) -> tuple[list[str], int]:
        """The live generations' keys, newest first, and the expiry (unix seconds) of the newest."""
        now = int(self.clock()) // self.span
        return [f"{PREFIX}{n}" for n in range(now, now - GENERATIONS - 1, -1)], (now + 1) * self.span + self.ttl

    def read(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The entry at each key in the newest live generation that has one of the right size."""
        if not keys:
            return []
        generations, _ = self.live()
        return list(self._read(keys=generations, args=[VALUE_BYTES, *keys]))

    def write(self, entries: Mapping[bytes, bytes]) -> None:
        """Add `entries` to the current generation, as many as the bound leaves room for."""
        generations, expires = self.live()
        args: list[Any] = [self.max_entries, expires]
        for key, value in entries.items():
            args += [key, value]
        self._write(keys=generations, args=args)


def fleet_secret(settings: Settings) -> bytes:
    """The fleet's cache secret, from RERANK_SCORE_CACHE_KEY or the file RERANK_SCORE_CACHE_KEY_FILE names.

    Raises:
        ValueError: saying what to set, when there is none, it cannot be read, or it is shorter than 32 bytes.
    """
    if settings.score_cache_key is not None:
        return settings.score_cache_key.get_secret_value().encode()
    if settings.score_cache_key_file is None:
        raise ValueError(
            "RERANK_SCORE_CACHE needs the fleet's secret, which signs every entry so that nobody who can write to Redis "
            "can plant a score: set RERANK_SCORE_CACHE_KEY_FILE (or RERANK_SCORE_CACHE_KEY) to the same 32 or more "
            "random characters on every worker, e.g. from `openssl rand -hex 32`"
        )
    try:
        secret = Path(settings.score_cache_key_file).read_bytes().strip()
    except OSError as e:
        raise ValueError(f"cannot read RERANK_SCORE_CACHE_KEY_FILE: {e}; point it at a file holding the fleet's secret") from e
    if len(secret) < 32:
        raise ValueError(f"RERANK_SCORE_CACHE_KEY_FILE holds {len(secret)} bytes; the secret needs at least 32 (e.g. `openssl rand -hex 32`)")
    return secret


def redis_of(app: Any) -> Any:
    """The redis-py client of `app`'s result backend; ValueError when its results are not kept on Redis."""
    client = getattr(getattr(app, "backend", None), "client", None)
    if client is None or not hasattr(client, "register_script"):
        raise ValueError("RERANK_SCORE_CACHE keeps entries in the result backend's Redis: set RERANK_BROKER_URL (or RERANK_RESULT_BACKEND) to Redis")
    return client


def cached(scorer: Scorer, settings: Settings, app: Any, files: str | None = None) -> CachedScorer:
    """`scorer` behind the score cache that `settings` describe, in `app`'s result backend.

    `files` is the model directory's digest when the caller has it (a worker's parent computes it
    once for its pool), else it is computed here.
    """
    store = RedisScores(redis_of(app), settings.score_cache_ttl, settings.score_cache_max_mb * 2**20 // ENTRY_BYTES)
    files = files if files is not None else directory_digest(settings.model)
    return CachedScorer(scorer, ScoreCache(store, fleet_secret(settings), fingerprint(scorer.facts, files)))


class ScoreCacheStep(bootsteps.StartStopStep):
    """With RERANK_SCORE_CACHE: refuses to start (exit code 1) without the fleet's secret or a Redis result backend, before the model loads."""

    requires = {"worker.accounting:AccountingStep"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        """Check the secret and the backend, and digest a local model directory once for every pool process."""
        super().__init__(parent, **kwargs)
        settings = settings_of(parent.app)
        if not settings.score_cache:
            return
        from worker import runtime

        try:
            fleet_secret(settings)
            redis_of(parent.app)
        except ValueError as e:
            log.critical("%s", e)
            raise SystemExit(f"rerank-worker: {e}") from e
        runtime.model_files = directory_digest(settings.model)
        log.info("score cache on: entries live %ds in the result backend's Redis, at most %d MB", settings.score_cache_ttl, settings.score_cache_max_mb)

"""A job's requests travel beside its task messages: written once to Redis, compressed, read only by the stage that needs them.

A 100-paper two-stage job is about 600 KB of JSON. Inside its messages it went through Redis
several times over (the stage-1 message carried the whole chunk pool for stage 2; the take script,
the idle worker's wake-up and stage 2's message each copied it again). Here the producer writes
one hash per job, zstd-compressed (about 160 KB for that job): field `documents` holds stage 1's
request and field `<n>` the chunks of the job's n-th candidate. Stage 1 reads its field; stage 2
reads the fields of the papers stage 1 kept, and nothing else. A message carries the hash's key
and a digest of each part's bytes; small single-stage requests stay inside their message.

Reading is as hostile as any read from Redis: a part that is missing, a key of another type, bytes
whose digest differs, a frame that would inflate past the limit or that is not plain JSON, each
raises `InvalidRequest` and never stops a worker. The hash expires after RERANK_REQUEST_EXPIRES
unless the job's last stage drops it first.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import zstandard
from redis.exceptions import RedisError

from contract.errors import InvalidRequest
from contract.plain import plain_json

KEY_PREFIX = "rerank.job."
"""Every stored job's hash is named this and the job's (or the single task's) id."""

INLINE_BYTES = 16 * 1024
"""A single-stage request up to this many bytes of JSON travels inside its message; a larger one is stored."""

LEVEL = 3
"""zstd level: about 9x on a job's JSON at 300 MB/s on one core; higher levels cost more than they save."""


def key_of(job_id: str) -> str:
    """The hash that holds job `job_id`'s stored requests."""
    return f"{KEY_PREFIX}{job_id}"


def pack(encoded: bytes) -> bytes:
    """JSON bytes as they are stored: compressed."""
    return zstandard.ZstdCompressor(level=LEVEL).compress(encoded)


def digest(blob: bytes) -> str:
    """32 hex digits naming a stored part's bytes: a message carries it, the reader checks it."""
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def unpack(blob: bytes | None, expected: str, what: str, limit: int) -> Any:
    """The plain JSON data a stored part holds, checked against the `expected` digest and inflated to at most `limit` bytes.

    Raises:
        InvalidRequest: naming `what`, when the part is missing, altered, too large or not plain JSON.
    """
    if blob is None:
        raise InvalidRequest(f"{what} is not in Redis: it expired (RERANK_REQUEST_EXPIRES) or was deleted; submit the job again")
    if digest(blob) != expected:
        raise InvalidRequest(f"{what} is not what the producer stored (its digest differs): it was altered in Redis; submit the job again")
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)) as reader:
            raw = reader.read(limit + 1)  # never more: a few bytes can inflate to gigabytes
    except zstandard.ZstdError as e:
        raise InvalidRequest(f"{what} is not a zstd frame: {e}") from None
    if len(raw) > limit:
        raise InvalidRequest(f"{what} inflates past the {limit:,} bytes any request may hold (RERANK_MAX_REQUEST_BYTES)")
    return plain_json(raw, what)


class Store(Protocol):
    """Where a job's parts are kept: Redis (workers) or this process's memory (no broker)."""

    def put(self, key: str, parts: dict[str, bytes], seconds: int) -> None:
        """Keep `parts` under `key` (replacing what was there) for `seconds`."""

    def get(self, key: str, fields: Sequence[str]) -> list[bytes | None]:
        """The parts named `fields` of `key`, None for each one that is missing."""

    def drop(self, key: str) -> None:
        """Forget `key` and its parts."""


class RedisStore:
    """One hash per job in the Redis the results go to (the broker may be RabbitMQ; results are always on Redis)."""

    def __init__(self, client: Any) -> None:
        """Keep parts with `client`, a redis-py client."""
        self.client = client

    def put(self, key: str, parts: dict[str, bytes], seconds: int) -> None:
        """One transaction: a job's parts and their expiry together."""
        self.client.pipeline().delete(key).hset(key, mapping=parts).expire(key, seconds).execute()

    def get(self, key: str, fields: Sequence[str]) -> list[bytes | None]:
        """HMGET; a key of another type (anyone can write one) reads as every part missing."""
        try:
            return list(self.client.hmget(key, list(fields)))
        except RedisError as e:
            if "WRONGTYPE" not in str(e):
                raise
            return [None] * len(fields)

    def drop(self, key: str) -> None:
        """UNLINK: freed in the background, so a large job costs Redis's main thread nothing."""
        self.client.unlink(key)


class MemoryStore:
    """Parts kept in this process (no broker: the producer and the tasks share it); they do not expire."""

    def __init__(self) -> None:
        """Start empty."""
        self._parts: dict[str, dict[str, bytes]] = {}
        self._lock = threading.Lock()

    def put(self, key: str, parts: dict[str, bytes], seconds: int) -> None:
        """Keep `parts` under `key`."""
        with self._lock:
            self._parts[key] = dict(parts)

    def get(self, key: str, fields: Sequence[str]) -> list[bytes | None]:
        """The parts named `fields`."""
        with self._lock:
            held = self._parts.get(key, {})
            return [held.get(field) for field in fields]

    def drop(self, key: str) -> None:
        """Forget `key`."""
        with self._lock:
            self._parts.pop(key, None)


in_memory = MemoryStore()
"""This process's store when jobs run in it (no broker)."""


def store_for(app: Any) -> Store:
    """Where `app`'s jobs keep their parts: its Redis result backend, else this process's memory."""
    client = getattr(app.backend, "client", None)
    return RedisStore(client) if client is not None and hasattr(client, "hmget") else in_memory

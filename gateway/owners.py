"""API keys are tenants: a job is visible and cancellable only with the key that created it.

Each job the gateway creates gets a record `rerank.owner.<job id>` in the result backend's Redis,
holding a digest of its creator's key (never the key) and expiring with the job's results, so
ownership survives a restart and holds across replicas. An id without a record, or with another
key's, is answered 404 like an unknown one, before anything else is read, written or broadcast.
Anyone who can write Redis can forge a record; docs/security.md says what that gives them.
"""

from __future__ import annotations

import asyncio
import hmac

from celery import Celery
from celery.backends.redis import RedisBackend
from redis.exceptions import ResponseError

from gateway.errors import NotFound
from producer.reaching import reaching

PREFIX = "rerank.owner."
"""Key prefix of ownership records."""


class Owners:
    """Reads and writes ownership records through the result backend's Redis client (thread pool: it blocks)."""

    def __init__(self, app: Celery, expires: int) -> None:
        """Keep records in `app`'s result backend for `expires` seconds (RERANK_RESULT_EXPIRES)."""
        backend = app.backend
        if not isinstance(backend, RedisBackend):
            raise ValueError("the gateway keeps jobs' owners in Redis: set RERANK_RESULT_BACKEND to a redis:// or sentinel:// URL")
        self._backend = backend
        self._url = app.conf.result_backend
        self.expires = expires

    async def claim(self, job_id: str, tenant: str) -> None:
        """Record `tenant` as the owner of `job_id`."""
        await asyncio.to_thread(self._call, "recording who owns a job", "set", PREFIX + job_id, tenant, ex=self.expires)

    async def check(self, job_id: str, tenant: str) -> None:
        """Raise `NotFound` unless `tenant` owns `job_id`."""
        found = await asyncio.to_thread(self._read, PREFIX + job_id)
        if not isinstance(found, bytes) or not hmac.compare_digest(found, tenant.encode()):
            raise NotFound(f"no job {job_id[:80]!r} for this API key: it was never submitted with it, it expired, or it was deleted")

    async def forget(self, job_id: str) -> None:
        """Drop the record: the job answers 404 from now on."""
        await asyncio.to_thread(self._call, "forgetting a job", "delete", PREFIX + job_id)

    def _read(self, key: str) -> object:
        with reaching("reading who owns a job", self._url):
            try:
                return self._backend.client.get(key)
            except ResponseError:  # a key of another type, written by someone else: no record of ours
                return None

    def _call(self, doing: str, command: str, *args: object, **options: object) -> object:
        with reaching(doing, self._url):
            return getattr(self._backend.client, command)(*args, **options)

"""Celery's Redis result backend, retrying writes that a full Redis refuses."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from celery.backends.redis import RedisBackend as CeleryRedisBackend
from celery.backends.redis import SentinelBackend as CelerySentinelBackend
from redis.exceptions import OutOfMemoryError

from worker.transport import FULL

log = logging.getLogger(__name__)


class _RetryingFull:
    """Treats "out of memory" like a lost connection: retried with backoff (`result_backend_always_retry`), not fatal.

    Memory frees up when workers drain the queue or results expire; a task whose result still
    cannot be stored fails to be acknowledged and is delivered again after the visibility timeout.
    """

    def exception_safe_to_retry(self, exc: Exception) -> bool:
        """Connection errors, as Celery's, and Redis refusing a write for want of memory."""
        return isinstance(exc, OutOfMemoryError) or super().exception_safe_to_retry(exc)

    def on_backend_retryable_error(self, exc: Exception) -> None:
        """Say why a state write is being retried, in words an operator can act on."""
        if isinstance(exc, OutOfMemoryError):
            log.warning("%s; retrying to store a task state", FULL)


class RedisBackend(_RetryingFull, CeleryRedisBackend):
    """Celery's Redis backend, retrying writes a full Redis refuses."""


class SentinelBackend(_RetryingFull, CelerySentinelBackend):
    """Celery's Sentinel backend, retrying writes a full Redis refuses."""


def backend_url(url: str) -> str:
    """The `result_backend` setting that selects our backend for a `redis://`, `rediss://` or `sentinel://` URL."""
    backend = SentinelBackend if urlsplit(url).scheme == "sentinel" else RedisBackend
    return f"{backend.__module__}:{backend.__name__}+{url}"

"""Celery's Redis result backend: a task's state stored and announced in one round trip, writes a full Redis refuses retried."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Any
from urllib.parse import urlsplit

from celery import states
from celery.backends.redis import RedisBackend as CeleryRedisBackend
from celery.backends.redis import SentinelBackend as CelerySentinelBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str
from redis.exceptions import OutOfMemoryError

from contract import tracing
from worker.transport import FULL

log = logging.getLogger(__name__)

STORE = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' then
  local head = redis.call('GETRANGE', KEYS[1], 0, 31)
  if string.find(head, '^{"status": "SUCCESS"') then return 0 end
  if ARGV[4] == '0' and string.find(head, '^{"status": "REVOKED"') then return 0 end
elseif kind ~= 'none' then
  redis.call('RENAME', KEYS[1], KEYS[1] .. '.misplaced.' .. ARGV[3])
end
if tonumber(ARGV[2]) > 0 then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) else redis.call('SET', KEYS[1], ARGV[1]) end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""
"""KEYS: a task's result key. ARGV: its encoded meta, seconds to keep it (0: for ever), a timestamp, 1 for a final state.
Stores and announces the meta unless a success is stored already, or a cancellation and this is no final
state (a stage starting after its job was cancelled leaves it cancelled); a key of another type is renamed aside."""


class _RetryingFull:
    """Treats "out of memory" like a lost connection: retried with backoff (`result_backend_always_retry`), not fatal.

    Memory frees up when workers drain the queue or results expire; a task whose result still
    cannot be stored fails to be acknowledged and is delivered again after the visibility timeout.
    """

    def exception_safe_to_retry(self, exc: Exception) -> bool:
        """Connection errors, as Celery's, and Redis refusing a write for want of memory."""
        return isinstance(exc, OutOfMemoryError) or super().exception_safe_to_retry(exc)

    def _store_result(self, task_id: str, result: Any, state: str, traceback: Any = None, request: Any = None, **_: Any) -> Any:
        """Store and announce a task's state in one script, unless a success is stored already (or a cancellation, for STARTED and PROGRESS).

        Celery reads the stored meta back (decoding whatever anyone wrote there) before each write,
        one more round trip per state; a success is never overwritten either way.
        """
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        value = self.encode(meta)
        if len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend", state=state, task_id=task_id)
        # A final state is the task's result: traced as `rerank.store` (STARTED and PROGRESS writes are not).
        with tracing.span("rerank.store", state=state, bytes=len(value)) if state in states.READY_STATES else nullcontext():
            self.ensure(self._store, (self.get_key_for_task(task_id), value, state in states.READY_STATES))
        return result

    def _store(self, key: str, value: str | bytes, final: bool) -> None:
        self._store_script(keys=[key], args=[value, int(self.expires or 0), int(time.time() * 1000), int(final)])

    @property
    def _store_script(self) -> Any:
        script = getattr(self, "_registered_store", None)
        if script is None:
            script = self._registered_store = self.client.register_script(STORE)
        return script

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

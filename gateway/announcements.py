"""One subscriber per gateway to the result backend's announcements, so a waiting request wakes when its job finishes.

The Redis result backend publishes every state it stores on the task's key. The synchronous
client listens on one connection per wait; here one asyncio connection serves every request in
flight: each subscribes its job's channel, and `nap` returns on the first announcement or when
the `Waiter`'s pause ends (the poll stays as the safety net). Without Redis results (another
backend, a Sentinel URL) or while the connection is down, `nap` is a plain sleep.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.exceptions import RedisError

from producer.aio import Nap

log = logging.getLogger(__name__)

IDLE_CHANNEL = "rerank-gateway-idle"
"""Subscribed for the connection's lifetime: a subscriber with no channel cannot read."""


class Announcements:
    """Subscribes jobs' channels on one connection and wakes the request waiting on each."""

    def __init__(self, url: str) -> None:
        """Listen to the Redis at `url` (the result backend)."""
        self._redis = Redis.from_url(url)
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        self._waiting: dict[bytes, asyncio.Event] = {}
        self._reader: asyncio.Task[None] | None = None
        self.up = False

    @classmethod
    def for_url(cls, url: str | None) -> Announcements | None:
        """Announcements from a plain Redis result backend, else None (waits then poll)."""
        return cls(url) if url and urlsplit(url).scheme in ("redis", "rediss", "unix") else None

    async def start(self) -> None:
        """Connect and start reading; a failure leaves `nap` a sleep until the reader reconnects."""
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        """Stop reading and close the connection."""
        if self._reader is not None:
            self._reader.cancel()
            with suppress(asyncio.CancelledError):
                await self._reader
        with suppress(RedisError, OSError):
            await self._pubsub.aclose()
            await self._redis.aclose()

    @asynccontextmanager
    async def watching(self, channel: bytes) -> AsyncIterator[Nap]:
        """Subscribe `channel` (a task's result key) for the block; yield the `nap` that wakes on its announcements."""
        if not self.up:
            yield asyncio.sleep
            return
        event = asyncio.Event()
        self._waiting[channel] = event
        try:
            await self._pubsub.subscribe(channel)
        except (RedisError, OSError):
            self._waiting.pop(channel, None)
            yield asyncio.sleep
            return

        async def nap(seconds: float) -> None:
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), seconds)
            event.clear()

        try:
            yield nap
        finally:
            self._waiting.pop(channel, None)
            with suppress(RedisError, OSError):
                await self._pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        while True:
            try:
                if not self.up:
                    await self._pubsub.subscribe(IDLE_CHANNEL)
                    self.up = True
                message = await self._pubsub.get_message(timeout=1.0)
            except (RedisError, OSError) as e:
                if self.up:
                    log.warning("lost the result backend's announcements (%s); waits poll until they are back", type(e).__name__)
                self.up = False
                await asyncio.sleep(1.0)
                continue
            if message is not None:
                event = self._waiting.get(message["channel"])
                if event is not None:
                    event.set()

"""Connections under time limits and a ceiling below the descriptor limit, and a log that stays small under attack.

Anyone on the network can open connections and send nothing, or a byte a minute. uvicorn's
HTTP/1.1 protocol gives such a connection no deadline, and at the descriptor limit accept() fails
over and over, each time logging a traceback. Here:

- a connection must deliver a complete request head within RERANK_GATEWAY_HEAD_TIMEOUT, counted
  from connecting, or from the first byte of a later request on a kept-alive connection;
- at most `max_connections` are open (by default the soft descriptor limit less a reserve for
  Redis, the broker and the accept batch); one more closes the oldest connection that has no
  request in flight, or, when every one has, the newcomer. A request in flight is never cut off;
- connections are accepted in batches of ACCEPT_BATCH, so a flood cannot take the reserve, while
  the kernel still queues LISTEN_QUEUE connections waiting to be accepted;
- repeated log lines (and asyncio's accept errors, without their tracebacks) are rate-limited.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from collections import OrderedDict
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

ACCEPT_BATCH = 16
"""Connections accepted per wake-up of the listening socket (asyncio accepts up to its backlog at once)."""

LISTEN_QUEUE = 4096
"""Connections the kernel queues until they are accepted."""


def connection_limit(configured: int | None, threads: int) -> int:
    """The most connections to keep open: `configured`, else the soft descriptor limit less a reserve.

    The reserve covers the connections accepted but not yet counted (a few loop turns of accept
    batches, and evicted ones not yet closed), a Redis connection per thread, and the process's own files.
    """
    if configured is not None:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, soft - 4 * ACCEPT_BATCH - threads - 64)


class Registry:
    """The open connections, oldest first; evicts idle ones past `limit`."""

    def __init__(self, limit: int) -> None:
        """Keep at most `limit` connections open."""
        self.limit = limit
        self.open: OrderedDict[TimedH11Protocol, None] = OrderedDict()
        self.evicted = 0

    def admit(self, connection: TimedH11Protocol) -> None:
        """Count `connection` in; past the limit close the oldest idle one, or `connection` itself."""
        self.open[connection] = None
        if len(self.open) <= self.limit:
            return
        victim = next((c for c in self.open if c.idle), connection)
        self.evicted += 1
        self.close(victim)

    def close(self, connection: TimedH11Protocol) -> None:
        """Close `connection` now and stop counting it."""
        self.open.pop(connection, None)
        connection.transport.abort()


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head and a place in the `Registry`."""

    registry: Registry
    head_timeout: float

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the head deadline and count the connection in."""
        super().connection_made(transport)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._arm()
        self.registry.admit(self)

    def data_received(self, data: bytes) -> None:
        """Feed h11; the deadline runs while a head is incomplete and stops once it is whole."""
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self._head_deadline is None:
                self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the deadline and count the connection out."""
        self._disarm()
        self.registry.open.pop(self, None)
        super().connection_lost(exc)

    @property
    def idle(self) -> bool:
        """No request in flight: waiting for a head (none yet, part of one, or kept alive between requests)."""
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._head_deadline = self.loop.call_later(self.head_timeout, self._head_expired)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_expired(self) -> None:
        self._head_deadline = None
        if self.idle and self.conn.their_state is h11.IDLE:
            self.registry.close(self)


def protocol(limit: int, head_timeout: float) -> type[TimedH11Protocol]:
    """The protocol class for one server: its own registry of at most `limit` connections, heads within `head_timeout`."""
    return type("GatewayProtocol", (TimedH11Protocol,), {"registry": Registry(limit), "head_timeout": head_timeout})


class Server(uvicorn.Server):
    """uvicorn's server accepting ACCEPT_BATCH connections at a time from a queue of LISTEN_QUEUE, its loop's errors logged briefly."""

    async def startup(self, sockets: Any = None) -> None:
        """Start serving, then let the kernel queue more connections than one accept batch."""
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_brief)
        await super().startup(sockets)
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                # asyncio hands out wrappers without listen(); a duplicate descriptor reaches the same socket, and
                # Linux updates the backlog of a listening socket.
                with socket.fromfd(sock.fileno(), sock.family, sock.type) as same:
                    same.listen(LISTEN_QUEUE)


def _brief(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # asyncio's default handler logs a traceback; out of descriptors that is one per second for ever.
    error = context.get("exception")
    log.error("%s%s", context.get("message", "event loop error"), f": {type(error).__name__}: {error}" if error else "")


class BoundedLog(logging.Filter):
    """Lets through at most `burst` records of each message every `per` seconds, then says how many it held back."""

    def __init__(self, burst: int = 10, per: float = 60.0) -> None:
        """Allow `burst` records of one message (logger and format string) per `per` seconds."""
        super().__init__()
        self.burst = burst
        self.per = per
        self._seen: dict[tuple[str, str], list[float | int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether to emit `record`; the first one after a quiet spell notes how many were dropped."""
        key = (record.name, str(record.msg))
        now = time.monotonic()
        if len(self._seen) > 1000:
            self._seen.clear()
        window = self._seen.setdefault(key, [now, 0, 0])  # start, emitted, dropped
        if now - window[0] > self.per:
            dropped = int(window[2])
            window[:] = [now, 0, 0]
            if dropped:
                record.msg = f"{record.msg} ({dropped} more like this in the last {self.per:g}s were not logged)"
        if window[1] >= self.burst:
            window[2] += 1
            return False
        window[1] += 1
        return True


def bound_logs(filter_: logging.Filter | None = None) -> None:
    """Rate-limit every handler of the root and uvicorn's error loggers (the access log stays whole)."""
    filter_ = filter_ or BoundedLog()
    for name in ("", "uvicorn", "uvicorn.error"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(filter_)

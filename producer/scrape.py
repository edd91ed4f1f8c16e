"""A Prometheus endpoint that anyone on the network may connect to without hurting the process serving it.

prometheus_client's own server spends a thread and a descriptor on every connection for as long
as the peer keeps it open: a thousand half-open connections exhaust the process. This one runs
one event loop on one daemon thread and bounds everything a peer controls:

- connections: at most `max_connections` at once (descriptors: a few more, while evicted ones
  close); a new one past that closes the oldest that has not yet sent a whole request, of
  the host with the most such (a scraper sends its request at once; an idle peer waits; a host
  flooding the port evicts its own connections first);
- time: a connection gets `timeout` seconds to send its request and as long to take the answer;
- size: a request head over `max_head_bytes` is dropped;
- work: the metrics page is built at most once per `cache_seconds`, however many ask;
- access: with a token, only `Authorization: Bearer <token>` is served (compared in constant time).

Only `GET` or `HEAD` of `/metrics` is answered; every answer closes its connection.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import threading
import time
from collections import Counter
from typing import Any

log = logging.getLogger(__name__)

_HEAD_END = b"\r\n\r\n"


def read_token(path: str) -> bytes:
    """The bearer token in the file at `path`, surrounding whitespace removed; ValueError when it is empty."""
    with open(path, "rb") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"the token file {path} is empty; write the scraper's bearer token into it")
    return token


class MetricsServer:
    """Serves `/metrics` of a prometheus_client registry on one daemon thread, bounded in connections, time and size."""

    def __init__(
        self,
        registry: Any,
        port: int,
        address: str = "0.0.0.0",
        token: bytes | None = None,
        max_connections: int = 32,
        timeout: float = 5.0,
        max_head_bytes: int = 8192,
        cache_seconds: float = 1.0,
    ) -> None:
        """Bind `address`:`port` now (OSError when taken); nothing is served until `start()`."""
        self.registry = registry
        self.token = token
        self.max_connections = max_connections
        self.timeout = timeout
        self.max_head_bytes = max_head_bytes
        self.cache_seconds = cache_seconds
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((address, port))
            self.socket.listen(1024)  # a long kernel queue: during a flood a scraper waits there, not dropped
            self.socket.setblocking(False)
        except OSError:
            self.socket.close()
            raise
        self.port: int = self.socket.getsockname()[1]
        self._open: dict[_Exchange, str] = {}  # every accepted connection, oldest first, with its peer's host
        self._connecting: set[asyncio.Task[None]] = set()
        self._page: tuple[float, bytes] = (float("-inf"), b"")
        self._loop = asyncio.new_event_loop()
        self._stopped = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="rerank-metrics-http", daemon=True)

    def start(self) -> None:
        """Start serving on the daemon thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, drop every open connection and release the port."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(timeout=10)
        else:
            self.socket.close()

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        accepting = asyncio.ensure_future(self._accept())
        await self._stopped.wait()
        accepting.cancel()
        await asyncio.gather(accepting, return_exceptions=True)
        self.socket.close()
        for exchange in list(self._open):
            exchange.drop()
        await asyncio.gather(*self._connecting, return_exceptions=True)
        await asyncio.sleep(0)  # let the aborted transports close their sockets

    async def _accept(self) -> None:
        # Every connection is counted (and one evicted if need be) as it is accepted, and set up
        # before the next is taken, however fast peers connect: evicted sockets close within the
        # loop's next turns, so descriptors stay within a few of max_connections.
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, peer = await loop.sock_accept(self.socket)
            except OSError as e:  # e.g. out of descriptors: wait, rather than spin
                log.warning("metrics server cannot accept a connection: %s", e)
                await asyncio.sleep(0.5)
                continue
            if len(self._open) >= self.max_connections and not self._evict():
                connection.close()  # every slot is answering a whole request: this one is refused
                continue
            exchange = _Exchange(self, connection)
            self._open[exchange] = str(peer[0]) if isinstance(peer, tuple) and peer else ""
            connecting = loop.create_task(self._connect(exchange))
            self._connecting.add(connecting)
            connecting.add_done_callback(self._connecting.discard)
            await asyncio.sleep(0)  # sock_accept does not yield while connections queue: let this one set up

    async def _connect(self, exchange: _Exchange) -> None:
        exchange.setting_up = True
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: exchange, exchange.socket)
        except OSError:  # gone before it was set up
            self._open.pop(exchange, None)
            exchange.socket.close()

    def _evict(self) -> bool:
        """Close the oldest connection still sending its request, of the host holding the most; False when there is none."""
        waiting = {e: host for e, host in self._open.items() if not e.answered}
        if not waiting:
            return False
        crowded = Counter(waiting.values()).most_common(1)[0][0]  # a host flooding the port evicts its own
        oldest = next(e for e, host in waiting.items() if host == crowded)
        del self._open[oldest]
        oldest.drop()
        return True

    def _answer(self, head: bytes) -> bytes:
        lines = head.decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            return _response("405 Method Not Allowed", b"only GET /metrics is served\n", method)
        if path != "/metrics":
            return _response("404 Not Found", b"only /metrics is served here\n", method)
        if self.token is not None and not _bearer_matches(headers.get("authorization", ""), self.token):
            return _response("401 Unauthorized", b"send the metrics token: Authorization: Bearer <token>\n", method,
                             ("WWW-Authenticate", 'Bearer realm="metrics"'))
        try:
            body = self._metrics_page()
        except Exception:  # noqa: BLE001 - a failing collector must not end the server
            log.warning("could not collect the metrics", exc_info=True)
            return _response("500 Internal Server Error", b"collecting the metrics failed; see the worker's log\n", method)
        from prometheus_client import CONTENT_TYPE_LATEST

        return _response("200 OK", body, method, ("Content-Type", CONTENT_TYPE_LATEST))

    def _metrics_page(self) -> bytes:
        built, page = self._page
        if time.monotonic() - built >= self.cache_seconds:
            from prometheus_client import generate_latest

            page = generate_latest(self.registry)
            self._page = (time.monotonic(), page)
        return page


class _Exchange(asyncio.Protocol):
    """One connection: a request head of at most max_head_bytes within the timeout, one answer, then closed."""

    def __init__(self, server: MetricsServer, connection: socket.socket) -> None:
        self.server = server
        self.socket = connection
        self.head = b""
        self.answered = False
        self.dropped = False
        self.setting_up = False
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.deadline: asyncio.TimerHandle | None = None

    def drop(self) -> None:
        """Close the connection: now, unless its setting up has begun, then as soon as it is set up."""
        self.dropped = True
        if self.transport is not None:
            self.transport.abort()
        elif not self.setting_up:
            self.socket.close()  # _connect then finds it closed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.dropped:
            transport.abort()  # type: ignore[attr-defined]
            return
        # One deadline for the whole exchange: sending the request and taking the answer.
        self.deadline = asyncio.get_running_loop().call_later(self.server.timeout, transport.abort)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return
        self.head += data
        end = self.head.find(_HEAD_END)
        if end < 0:
            if len(self.head) > self.server.max_head_bytes:
                self.transport.abort()
            return
        if end > self.server.max_head_bytes:
            self.transport.abort()
            return
        self.answered = True
        self.transport.write(self.server._answer(self.head[: end + len(_HEAD_END)]))
        self.transport.close()  # once the answer is sent; the deadline aborts a peer that does not take it

    def connection_lost(self, exc: Exception | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.server._open.pop(self, None)


def _bearer_matches(authorization: str, token: bytes) -> bool:
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1", "replace"), token)


def _response(status: str, body: bytes, method: str, *headers: tuple[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in headers)]
    if not any(k == "Content-Type" for k, _ in headers):
        lines.append("Content-Type: text/plain; charset=utf-8")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if method == "HEAD" else body)

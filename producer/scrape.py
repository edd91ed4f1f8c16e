"""A Prometheus endpoint that anyone on the network may connect to without hurting the process serving it.

prometheus_client's own server spends a thread and a descriptor on every connection for as long
as the peer keeps it open: a thousand half-open connections exhaust the process. This one runs
one event loop on one daemon thread and bounds everything a peer controls:

- connections: at most `max_connections` at once; a new one past that closes the oldest that
  has not yet sent a whole request (a scraper sends its request at once; an idle peer waits);
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
            self.socket.listen(128)
            self.socket.setblocking(False)
        except OSError:
            self.socket.close()
            raise
        self.port: int = self.socket.getsockname()[1]
        self._waiting: dict[asyncio.StreamWriter, None] = {}  # connections yet to send a whole request, oldest first
        self._answering = 0
        self._tasks: set[asyncio.Task[None]] = set()
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
        server = await asyncio.start_server(self._connection, sock=self.socket, limit=self.max_head_bytes)
        await self._stopped.wait()
        server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._exchange(reader, writer)
        finally:
            self._tasks.discard(task)
            self._waiting.pop(writer, None)
            if writer.transport.get_write_buffer_size() or not writer.transport.is_closing():
                writer.transport.abort()  # nothing is owed to a peer once its exchange is over

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._waiting) + self._answering >= self.max_connections:
            if not self._waiting:  # every slot is answering a whole request: this one is refused
                return
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]  # now, so the next connection evicts another
            oldest.transport.abort()
        self._waiting[writer] = None
        try:
            head = await asyncio.wait_for(reader.readuntil(_HEAD_END), self.timeout)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return  # too slow, too long, gone, or evicted: nothing to answer
        finally:
            self._waiting.pop(writer, None)
        self._answering += 1
        try:
            writer.write(self._answer(head))
            await asyncio.wait_for(writer.drain(), self.timeout)
            writer.close()
        except (asyncio.TimeoutError, ConnectionError):
            pass  # the peer went away or does not read
        finally:
            self._answering -= 1

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


def _bearer_matches(authorization: str, token: bytes) -> bool:
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1", "replace"), token)


def _response(status: str, body: bytes, method: str, *headers: tuple[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in headers)]
    if not any(k == "Content-Type" for k, _ in headers):
        lines.append("Content-Type: text/plain; charset=utf-8")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if method == "HEAD" else body)

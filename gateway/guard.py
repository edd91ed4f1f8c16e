"""The gate in front of every route: API keys first, then the body's size and pace, before the body is parsed.

Anyone on the network can reach the port: a request without a valid key is refused before a
byte of its body is read, and a body larger than RERANK_GATEWAY_MAX_BODY_BYTES is refused from
its Content-Length, or, sent in chunks, as soon as the bytes read pass the limit. A body that
takes longer than RERANK_GATEWAY_BODY_TIMEOUT to arrive is refused (408), so a slow sender cannot
hold a connection. The key's digest names the request's tenant (`scope["state"]["tenant"]`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import TooLarge, Unauthorized, error_response
from gateway.settings import GatewaySettings

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/docs", "/redoc", "/openapi.json"})
"""Probes, Prometheus and the API's description: served without a key."""

ANONYMOUS = "anonymous"
"""The tenant of every request where no keys are configured (RERANK_GATEWAY_ALLOW_ANONYMOUS)."""


def load_keys(settings: GatewaySettings) -> list[bytes]:
    """The SHA-256 of every API key from RERANK_GATEWAY_API_KEYS and RERANK_GATEWAY_API_KEYS_FILE.

    Raises:
        ValueError: no key is configured and anonymous access is not allowed, or the file cannot be read.
    """
    keys = settings.api_keys.get_secret_value().split(",") if settings.api_keys else []
    if settings.api_keys_file is not None:
        try:
            lines = Path(settings.api_keys_file).read_text().splitlines()
        except OSError as e:
            raise ValueError(f"cannot read RERANK_GATEWAY_API_KEYS_FILE {settings.api_keys_file}: {e.strerror}") from e
        keys += [line.split("#", 1)[0] for line in lines]
    digests = [_digest(k.strip()) for k in keys if k.strip()]
    if not digests and not settings.allow_anonymous:
        raise ValueError(
            "no API key configured: set RERANK_GATEWAY_API_KEYS or RERANK_GATEWAY_API_KEYS_FILE, or "
            "RERANK_GATEWAY_ALLOW_ANONYMOUS=true when another gate stands in front of the gateway"
        )
    return digests


def tenant_of(header: str | None, keys: Iterable[bytes]) -> str | None:
    """The tenant (hex digest of the key) when `header` is `Bearer <one of the keys>`, else None.

    Compared in constant time: digests of equal length, against every key.
    """
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    sent = _digest(token.strip())
    found = False
    for key in keys:
        found |= hmac.compare_digest(sent, key)
    return sent.hex() if found else None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class Guard:
    """ASGI middleware: 401 without a valid key (when keys are configured), 413 past the body limit."""

    def __init__(self, app: ASGIApp, keys: list[bytes], max_body_bytes: int, body_timeout: float) -> None:
        """Guard `app`; an empty `keys` lets every request through (RERANK_GATEWAY_ALLOW_ANONYMOUS)."""
        self.app = app
        self.keys = keys
        self.limit = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse or pass the request on with a receive that counts its bytes."""
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal: Exception | None = None
        tenant = tenant_of(headers.get("authorization"), self.keys) if self.keys else ANONYMOUS
        scope.setdefault("state", {})["tenant"] = tenant
        if tenant is None:
            refusal = Unauthorized("missing or invalid API key: send `Authorization: Bearer <key>` with a key the gateway was given")
        elif not _length_fits(headers.get("content-length"), self.limit):
            refusal = TooLarge(f"the request body is over {self.limit:,} bytes (RERANK_GATEWAY_MAX_BODY_BYTES); send fewer or shorter documents")
        if refusal is not None:
            response, kind = error_response(refusal)
            scope.setdefault("state", {})["error_kind"] = kind
            return await response(scope, receive, send)
        await self.app(scope, self._counting(receive), send)

    def _counting(self, receive: Receive) -> Receive:
        seen = 0
        deadline = time.monotonic() + self.body_timeout
        complete = False

        async def counted() -> Message:
            nonlocal seen, complete
            if complete:  # past the body, receive() only reports the client leaving: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                # FastAPI re-raises an HTTPException met while reading the body; anything else would become a 400.
                raise HTTPException(
                    408, f"the request body did not arrive within {self.body_timeout:g}s (RERANK_GATEWAY_BODY_TIMEOUT); send it again, faster"
                ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.limit:
                    raise HTTPException(413, f"the request body is over {self.limit:,} bytes (RERANK_GATEWAY_MAX_BODY_BYTES); send fewer or shorter documents")
            else:
                complete = True
            return message

        return counted


def _length_fits(value: Any, limit: int) -> bool:
    if value is None:
        return True
    return value.strip().isdigit() and int(value) <= limit

"""The gate in front of every route: API keys first, then the body's size, both before the body is parsed.

Anyone on the network can reach the port: a request without a valid key is refused before a
byte of its body is read, and a body larger than RERANK_GATEWAY_MAX_BODY_BYTES is refused from
its Content-Length, or, sent in chunks, as soon as the bytes read pass the limit.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import TooLarge, Unauthorized, error_response
from gateway.settings import GatewaySettings

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/docs", "/redoc", "/openapi.json"})
"""Probes, Prometheus and the API's description: served without a key."""


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


def authorized(header: str | None, keys: Iterable[bytes]) -> bool:
    """True when `header` is `Bearer <one of the keys>`, compared in constant time (digests of equal length, every key)."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    sent = _digest(token.strip())
    found = False
    for key in keys:
        found |= hmac.compare_digest(sent, key)
    return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class Guard:
    """ASGI middleware: 401 without a valid key (when keys are configured), 413 past the body limit."""

    def __init__(self, app: ASGIApp, keys: list[bytes], max_body_bytes: int) -> None:
        """Guard `app`; an empty `keys` lets every request through (RERANK_GATEWAY_ALLOW_ANONYMOUS)."""
        self.app = app
        self.keys = keys
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse or pass the request on with a receive that counts its bytes."""
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal: Exception | None = None
        if self.keys and not authorized(headers.get("authorization"), self.keys):
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

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # FastAPI re-raises an HTTPException met while reading the body; anything else would become a 400.
                    raise HTTPException(413, f"the request body is over {self.limit:,} bytes (RERANK_GATEWAY_MAX_BODY_BYTES); send fewer or shorter documents")
            return message

        return counted


def _length_fits(value: Any, limit: int) -> bool:
    if value is None:
        return True
    return value.strip().isdigit() and int(value) <= limit

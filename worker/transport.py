"""kombu's Redis transport, hardened against what a shared Redis can throw at a worker.

kombu reads each item it pops from a Redis list as a JSON envelope (body, headers, properties)
and builds its message from it without checking; an item that is not JSON, or an envelope with a
field of the wrong type, raises inside the worker's event loop, which Celery treats as an
unrecoverable error: one `LPUSH` could stop a worker, and every worker after it. Such items are
logged and dropped here. And a Redis at its `maxmemory` refuses the writes that record a message
as delivered or acknowledged; instead of stopping, the worker logs it and the message stays in
Redis's unacknowledged set, to be delivered again after the visibility timeout. Workers on a
`redis://` or `rediss://` broker use this transport (`worker/app.py`); it changes nothing else.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any

from kombu.transport import redis, virtual
from redis.exceptions import OutOfMemoryError

log = logging.getLogger(__name__)

REFUSED_HEADER = "x-rerank-refused"
"""Set by the transport on a message it can deliver but must not be run; the consumer refuses it."""


def envelope_refusal(envelope: Any) -> str | None:
    """Why a decoded queue item cannot become a kombu message, or None when it can."""
    if not isinstance(envelope, dict):
        return f"it is a JSON {type(envelope).__name__}, not a message envelope"
    properties = envelope.get("properties")
    if not isinstance(properties, dict):
        return "it has no properties"
    if not isinstance(properties.get("delivery_tag"), str):
        return "it has no delivery tag"
    info = properties.get("delivery_info")
    if not (isinstance(info, dict) and isinstance(info.get("exchange"), str) and isinstance(info.get("routing_key"), str)):
        return "its delivery_info is not {exchange, routing_key}"
    headers = envelope.get("headers")
    if headers is not None and not isinstance(headers, dict):
        return f"its headers are a {type(headers).__name__}, not an object"
    for key in ("content-type", "content-encoding"):
        if envelope.get(key) is not None and not isinstance(envelope[key], str):
            return f"its {key} is not a string"
    body, encoding = envelope.get("body"), properties.get("body_encoding")
    if body is not None and not isinstance(body, str):
        return "its body is not a string"
    if encoding not in (None, "base64", "utf-8"):
        return f"its body encoding {str(encoding)[:40]!r} is unknown"
    if encoding == "base64" and body:
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "its body is not valid base64"
    return None


FULL = (
    "Redis is out of memory (used memory is above its maxmemory): free memory or raise maxmemory; "
    "until then workers cannot record their work"
)


class QoS(redis.QoS):
    """kombu's Redis QoS, going on when a full Redis refuses to record a delivery or an acknowledgement."""

    def append(self, message: Any, delivery_tag: str) -> None:
        """Record `message` as delivered; if Redis is full, only in this process (it is lost if this worker dies)."""
        try:
            super().append(message, delivery_tag)
        except OutOfMemoryError:
            log.warning("%s; message %s is held only by this worker until it is acknowledged", FULL, delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        """Acknowledge; if Redis is full, the message stays unacknowledged there and is delivered again later."""
        try:
            self._remove_from_indices(delivery_tag).execute()
        except OutOfMemoryError:
            log.warning("%s; message %s stays unacknowledged and is delivered again after the visibility timeout", FULL, delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """Reject as kombu does; if Redis is full, as `ack` does."""
        try:
            super().reject(delivery_tag, requeue)
        except OutOfMemoryError:
            log.warning("%s; message %s stays unacknowledged and is delivered again after the visibility timeout", FULL, delivery_tag)
            virtual.QoS.ack(self, delivery_tag)


class Channel(redis.Channel):
    """A Redis channel that drops what it pops when it is not JSON, and survives a full Redis."""

    QoS = QoS

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except ValueError as e:  # the popped item was not JSON; it is gone from the list already
            log.warning("Dropped a queue item that is not a JSON message envelope: %s", e)
            return True

    def _get(self, queue: str) -> Any:
        while True:
            try:
                return super()._get(queue)
            except ValueError as e:
                log.warning("Dropped an item of queue %r that is not a JSON message envelope: %s", queue, e)


class Transport(redis.Transport):
    """kombu's Redis transport with envelopes checked before kombu builds a message from them."""

    Channel = Channel

    def _deliver(self, message: Any, queue: str) -> None:
        reason = envelope_refusal(message)
        if reason is not None:
            log.warning("Dropped an item of queue %r: %s", queue, reason)
            return
        headers = message.get("headers") or {}
        if "compression" in headers:
            # kombu would decompress the body without bound before anyone looks at it: a few MB
            # can expand to all the memory there is. The consumer refuses it (and fails its task).
            message["headers"] = {**headers, REFUSED_HEADER: "its body is compressed, which this service never does"}
            del message["headers"]["compression"]
        super()._deliver(message, queue)

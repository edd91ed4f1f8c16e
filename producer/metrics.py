"""Queue depth and the age of each queue's oldest message, for Prometheus: what Flower's `/metrics` lacks.

`rerank metrics --port N` serves them. Depth comes from a passive queue declare, which kombu
answers on Redis with the LLEN of the queue's lists (one per priority step) and RabbitMQ with
its message count; a queue nobody has declared or sent to yet has depth 0. The age needs the
oldest message itself: on Redis it is the last item of the list (producers push on the left,
workers pop on the right), read without taking it, and its `rerank_sent_at` header (stamped when
it was published, see producer/app.py) gives its age. RabbitMQ cannot show a message without
delivering it, so there the age is not reported.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from celery import Celery
from redis.exceptions import ResponseError

from contract.errors import InvalidRequest
from contract.names import SENT_AT_HEADER, model_queue, worker_queues
from contract.plain import plain_json
from contract.settings import Settings

log = logging.getLogger(__name__)

MAX_ITEM_BYTES = 256 * 1024 * 1024
"""The largest queue item whose age is read: above the biggest message the request limits allow."""


@dataclass(frozen=True)
class QueueDepth:
    """One queue as the broker sees it now."""

    queue: str
    messages: int
    oldest_age: float | None
    """Seconds since the oldest waiting message was published; None when empty or unknown."""


def default_queues(settings: Settings, models: Iterable[str] = ()) -> list[str]:
    """Every queue a GPU or CPU worker of each model consumes by default (`settings.model` when `models` is empty)."""
    queues: list[str] = []
    for model in list(models) or [settings.model]:
        shared = settings.queue if model == settings.model else model_queue(model)
        queues += worker_queues("cuda", shared, model) + worker_queues("cpu", shared, model)
    return list(dict.fromkeys(queues))


def read_queues(app: Celery, queues: Iterable[str], now: float | None = None) -> list[QueueDepth]:
    """Read each queue's depth and, on Redis, its oldest message's age, over one broker connection.

    Raises kombu's OperationalError when the broker cannot be reached.
    """
    now = time.time() if now is None else now
    found = []
    with app.connection_for_read() as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0.5, interval_max=0.5)
        redis = connection.transport.driver_type == "redis"
        channel = connection.channel()
        try:
            for queue in queues:
                try:
                    messages = channel.queue_declare(queue=queue, passive=True).message_count
                except connection.channel_errors:
                    # Not declared yet: nothing was ever sent to it. RabbitMQ closes the channel.
                    messages = 0
                    channel.close()
                    channel = connection.channel()
                age = _oldest_age(channel, queue, now) if redis and messages else None
                found.append(QueueDepth(queue, messages, age))
        finally:
            channel.close()
    return found


def _oldest_age(channel: Any, queue: str, now: float) -> float | None:
    lists = [queue if step == 0 else f"{queue}{channel.sep}{step}" for step in channel.priority_steps]
    ages = []
    with channel.conn_or_acquire() as client:
        for name in lists:
            try:
                raw = client.lindex(name, -1)
            except ResponseError as e:  # a key of another type where a priority list belongs
                _warn_once(name, f"{name} is not a list ({e})")
                continue
            if raw is not None:
                sent = _sent_at(raw, name)
                if sent is not None:
                    ages.append(max(0.0, now - sent))
    return max(ages) if ages else None


def _sent_at(raw: bytes, name: str) -> float | None:
    """The `rerank_sent_at` stamp of a queue item; None for an item that is unstamped (an older producer) or not ours.

    Anyone who can write to Redis can put any bytes at a queue's tail, so the item is decoded as
    plain, depth-bounded JSON and whatever it holds only ever makes the age unknown.
    """
    try:
        envelope = plain_json(raw, f"the oldest item of {name}", max_bytes=MAX_ITEM_BYTES)
    except InvalidRequest as e:
        _warn_once(name, str(e))
        return None
    headers = envelope.get("headers") if isinstance(envelope, dict) else None
    sent = headers.get(SENT_AT_HEADER) if isinstance(headers, dict) else None
    if isinstance(sent, (int, float)) and not isinstance(sent, bool) and sent == sent and abs(sent) != float("inf"):
        return float(sent)
    return None


_warned: set[tuple[str, str]] = set()


def _warn_once(name: str, problem: str) -> None:
    # Every scrape reads the same tail item: say so once per queue and problem, not once a scrape.
    if (name, problem) not in _warned and len(_warned) < 10_000:
        _warned.add((name, problem))
        log.warning("%s; its age is reported as unknown until it leaves the queue (inspect it with LINDEX %s -1)", problem, name)


class QueueCollector:
    """A Prometheus collector that reads the queues at every scrape."""

    def __init__(self, app: Celery, queues: list[str]) -> None:
        """Watch `queues` on `app`'s broker."""
        self.app = app
        self.queues = queues
        self._lock = threading.Lock()  # one broker conversation at a time, however many scrapers

    def collect(self) -> Iterator[Any]:
        """Yield `rerank_queue_messages`, `rerank_queue_oldest_message_age_seconds` and `rerank_broker_up`."""
        from kombu.exceptions import OperationalError
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("rerank_broker_up", "1 when the exporter could read the queues at this scrape, else 0.")
        with self._lock:
            try:
                depths = read_queues(self.app, self.queues)
            except (OperationalError, OSError):
                depths = None
        up.add_metric([], 0 if depths is None else 1)
        yield up
        if depths is None:
            return
        messages = GaugeMetricFamily("rerank_queue_messages", "Messages waiting in the queue (not yet taken by a worker).", labels=["queue"])
        age = GaugeMetricFamily(
            "rerank_queue_oldest_message_age_seconds",
            "Seconds since the oldest waiting message was published; 0 when the queue is empty (Redis only).",
            labels=["queue"],
        )
        for depth in depths:
            messages.add_metric([depth.queue], depth.messages)
            if depth.oldest_age is not None or depth.messages == 0:
                age.add_metric([depth.queue], depth.oldest_age or 0.0)
        yield messages
        yield age


def registry_for(app: Celery, queues: list[str]) -> Any:
    """A Prometheus registry holding only the queue collector (no process metrics of the exporter itself)."""
    try:
        from prometheus_client import CollectorRegistry
    except ImportError as e:
        raise ImportError("`rerank metrics` needs prometheus-client: pip install 'bge-rerank-celery[metrics]'") from e
    registry = CollectorRegistry()
    registry.register(QueueCollector(app, queues))
    return registry

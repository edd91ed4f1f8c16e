"""kombu's Redis transport, losing nothing when a worker dies and stopping for nothing found in Redis.

Three threats, one transport:
- A worker killed at any instant must lose no message. kombu pops and records in two commands;
  here one script does both (`worker/taking.py`), under a lease the worker renews from its event
  loop. Any live worker puts back the messages of a lease that lapsed, so a killed worker's jobs
  run again within about `RERANK_WORKER_LEASE` seconds, not after the visibility timeout, which
  stays as the net for workers of earlier versions and for anything a lease does not cover.
- Anyone who can write to Redis can write any bytes into a queue or into kombu's bookkeeping
  (`unacked`, read at every worker's start-up). What we read is decoded as plain JSON without
  kombu's type hooks and with a depth bound, and checked before kombu builds a message from it;
  what fails is moved to `rerank.quarantine` (capped), logged, and never stops a worker.
- A Redis at its `maxmemory` refuses writes: a take then takes nothing (the message stays queued);
  an acknowledgement that fails leaves the message recorded, to be delivered again later.

Workers on `redis://`, `rediss://` and `sentinel://` brokers use this transport (`worker/app.py`).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable
from contextlib import suppress
from typing import Any

from kombu.transport import redis, virtual
from redis.exceptions import OutOfMemoryError, ResponseError

from contract.errors import InvalidRequest
from contract.plain import plain_json, short
from worker.taking import (
    ASIDE,
    HELD_PREFIX,
    KEEP,
    LEASES,
    QUARANTINE,
    QUARANTINE_ENTRIES,
    UNEXPIRING_ASIDE,
    parse_taken,
    quarantine_entry,
    take_call,
)

log = logging.getLogger(__name__)

REFUSED_HEADER = "x-rerank-refused"
"""Set by the transport on a message it can deliver but must not be run; the consumer refuses it."""

FULL = (
    "Redis is out of memory (used memory is above its maxmemory): free memory or raise maxmemory; "
    "until then workers cannot record their work"
)

LEASE_SECONDS = 10
"""How long a worker's lease on the messages it holds lasts unless renewed (RERANK_WORKER_LEASE)."""

RETRY_SECONDS = 1.0
"""After Redis refused a take (full, or an error), how long a worker waits before it tries again."""

MAX_ITEM_DEPTH = 32
"""How deeply a queue item or `unacked` entry may nest: a kombu envelope nests 3 deep, a task body inside it 6 more."""

LOOK_PER_SWEEP = 1000
"""Lapsed lease entries a sweep looks at: forged ones that hold nothing are forgotten, a thousand a pass per worker."""

WAIT_SECONDS = 1.0
"""An idle worker's wait on a queue returns after this long at most, and it takes again (priority sub-lists included)."""


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
    if not isinstance(properties.get("priority", 0), int):
        return "its priority is not a number"
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


def recorded_refusal(entry: Any) -> str | None:
    """Why a decoded `unacked` entry cannot be restored, or None when it can: it must be [envelope, exchange, routing key]."""
    if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[1], str) and isinstance(entry[2], str)):
        return "it is not [message, exchange, routing key]"
    return envelope_refusal(entry[0])


class _Warnings:
    """Logs each kind of trouble once a minute at most: hostile input must not flood the log."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}

    def __call__(self, kind: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self.every) >= self.every:
            self._last[kind] = now
            log.warning(message, *args)


warn_once = _Warnings()


class QoS(redis.QoS):
    """kombu's Redis QoS over messages the take script already recorded, with bookkeeping read as hostile."""

    def append(self, message: Any, delivery_tag: str) -> None:
        """Track the delivery here only: the take script recorded it in Redis already."""
        virtual.QoS.append(self, message, delivery_tag)

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None, held_key: str | None = None) -> Any:
        with self.pipe_or_acquire(pipe) as pipe:
            return (
                pipe.zrem(self.unacked_index_key, delivery_tag)
                .hdel(self.unacked_key, delivery_tag)
                .srem(held_key or self.channel.held_key, delivery_tag)
            )

    def ack(self, delivery_tag: str) -> None:
        """Acknowledge; if Redis is full, the message stays recorded and is delivered again later."""
        channel = self.channel
        try:
            with channel.conn_or_acquire() as client:
                channel.aside_and_again(client, channel._bookkeeping_types(), lambda: self._remove_from_indices(delivery_tag, client.pipeline()).execute())
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

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        """kombu's sweep of messages past the visibility timeout, after moving aside a mutex that would block it forever."""
        with self.channel.conn_or_acquire() as client:
            mutex = self.channel.global_keyprefix + self.unacked_mutex_key
            # kombu's mutex always expires; one that never does was not written by a worker.
            try:
                # Only when kombu's throttled sweep below runs this time (every `interval`th call).
                due = self._vrestore_count % (interval or 1) == 0
                if due and client.execute_command("EVAL", UNEXPIRING_ASIDE, 1, mutex, int(time.time() * 1000)):
                    warn_once("mutex", "Redis key %r had no expiry and blocked redelivery; it was moved aside", mutex)
                super().restore_visible(start, num, interval)
            except ResponseError as e:  # a full Redis refuses the mutex: the next sweep tries again
                warn_once("restore", "could not sweep for messages past the visibility timeout (%s); retrying", e)

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False, held_key: str | None = None) -> None:
        """Put a recorded message back on its queue, and out of `held_key` (default: ours), in one transaction;
        an entry that is not a message goes to the quarantine instead."""
        channel = self.channel

        def restore(pipe: Any) -> None:
            raw = pipe.hget(self.unacked_key, tag)
            entry, reason = None, None
            if raw:
                try:
                    entry = plain_json(raw, "it", max_depth=MAX_ITEM_DEPTH)
                    reason = recorded_refusal(entry)
                except InvalidRequest as e:
                    reason = str(e)
            # A key of another type would fail its write inside the transaction after the others took
            # effect (the message would leave the bookkeeping without reaching its queue): move it first.
            targets = [(channel._key(QUARANTINE), "list")]
            if reason is None and entry is not None:
                with suppress(Exception):  # no route: kombu's restore below logs it
                    queues = channel._lookup(entry[1], entry[2])
                    targets += [(channel._key(channel._q_for_pri(q, pri)), "list") for q in queues for pri in channel.priority_steps]
            channel.set_aside(pipe, channel._bookkeeping_types(held_key) + targets)
            pipe.multi()
            self._remove_from_indices(tag, pipe, held_key)
            if reason is not None:
                channel.quarantine_in(pipe, raw, None, f"unacked entry {short(tag)}: {reason}")
            elif entry is not None:
                message, exchange, routing_key = entry
                channel._do_restore_message(message, exchange, routing_key, pipe, leftmost)

        with channel.conn_or_acquire(client) as client:
            client.transaction(restore, self.unacked_key)


_lease: tuple[int, str] | None = None


def process_lease() -> str:
    """This process's lease id: host, pid and a random part, so no other process, nor a later one, shares it."""
    global _lease
    if _lease is None or _lease[0] != os.getpid():
        _lease = (os.getpid(), f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:12]}")
    return _lease[1]


def holds_lease() -> bool:
    """Whether this process has taken messages under a lease (a forked child has not)."""
    return _lease is not None and _lease[0] == os.getpid()


class TakingChannel:
    """Takes messages with one script (`worker/taking.py`) instead of BRPOP; mixed into kombu's Redis channels."""

    QoS = QoS
    worker_lease: float = LEASE_SECONDS
    _wake = True  # take at the next chance; False while idle, until a wait returns
    _retry_at: float | None = None  # after Redis refused a take: when to try again
    _take_queues: list[str] = []
    _take_tag = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Open as kombu does, noting when: a channel sweeps no lapsed lease in its first lease (see `keep_lease`)."""
        self._opened_at = time.monotonic()
        self._waiters: dict[str, Any] = {}  # queue -> a Redis client with a connection of its own
        self._waits: dict[str, float] = {}  # queue -> when its wait was sent, while it is in flight
        super().__init__(*args, **kwargs)

    @property
    def lease(self) -> str:
        """This process's lease (`process_lease()`): a channel opened after a reconnect holds under the same one."""
        return process_lease()

    @property
    def held_key(self) -> str:
        """The set of delivery tags this channel holds under its lease."""
        return HELD_PREFIX + self.lease

    def _key(self, name: str) -> str:
        return self.global_keyprefix + name

    def _bookkeeping(self) -> list[str]:
        return [self._key(k) for k in (self.unacked_key, self.unacked_index_key, LEASES, self.held_key)]

    def _lease_ms(self) -> int:
        return int(float(self.worker_lease) * 1000)

    # -- taking, driven by kombu's poller: one command in flight on the BRPOP connection ----------

    def _brpop_start(self, timeout: float | None = None) -> None:
        if not self._wake:  # idle: the waits (below) wake us when a queue gets something
            if self._retry_at is None or time.monotonic() < self._retry_at:
                return
            self._retry_at, self._wake = None, True
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        self._take_queues = [q for pri in self.priority_steps for q in queues]
        keys = [self._key(self._q_for_pri(q, pri)) for pri in self.priority_steps for q in queues]
        self._take_tag = str(uuid.uuid4())
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        command = take_call(keys, self._take_queues, self._bookkeeping(), self._take_tag, self.lease, self._lease_ms())
        self.client.connection.send_command(*command)

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "EVAL", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except ResponseError as e:  # the take changed nothing: its writes come before its pop
                if isinstance(e, OutOfMemoryError) or "maxmemory" in str(e):
                    warn_once("full", "%s; nothing is taken until it has room (the messages stay queued)", FULL)
                else:
                    warn_once("take", "Redis refused to take a message (%s); retrying", e)
                # Not a wait: a queue that holds messages would wake it at once, and it would spin.
                self._wake, self._retry_at = False, time.monotonic() + RETRY_SECONDS
                raise virtual.Empty() from None
            taken = parse_taken(reply, self._take_queues)
            for key in taken.misplaced:
                log.warning("Redis key %s had the wrong type for a queue or kombu's bookkeeping and was moved aside", key)
            if taken.queue is None:
                self._sleep(self._take_queues)
                raise virtual.Empty()
            self._queue_cycle.rotate(taken.queue)
            self._deliver_taken(taken.item, taken.queue, self._take_tag)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    # -- waiting while idle: one blocked connection per queue, moving nothing ------------------------

    def _sleep(self, queues: list[str]) -> None:
        """Stop taking until one of `queues` gets a message (or a wait times out): each gets a wait of its own."""
        self._wake = False
        if self._closing:
            # kombu's close() reads the poll it interrupts: a wait registered now would meet a closed
            # event loop, and the worker's warm shutdown would end in a traceback and exit code 1.
            return
        for queue in dict.fromkeys(queues):
            if queue not in self._waits:
                self._wait_on(queue)

    def _wait_on(self, queue: str) -> None:
        key = self._key(queue)
        client = self._waiters.get(queue)
        if client is None:
            client = self.Client(connection_pool=self.pool)
            client.connection = self.pool.get_connection()
            self._waiters[queue] = client
            self.handlers[f"WAIT {queue}"] = lambda: self._woken(queue)
        if client.connection._sock is None:
            client.connection.connect()
        # Blocks until the queue holds an item, then moves its tail to its tail: nothing taken.
        client.connection.send_command("BLMOVE", key, key, "RIGHT", "RIGHT", WAIT_SECONDS)
        self._waits[queue] = time.monotonic()
        self.connection.cycle._register(self, client, f"WAIT {queue}")

    def _woken(self, queue: str) -> None:
        """A queue's wait returned (a message arrived, or it timed out): take again."""
        self._waits.pop(queue, None)
        self._wake = True
        client = self._waiters[queue]
        try:
            client.parse_response(client.connection, "BLMOVE")
        except self.connection_errors:
            client.connection.disconnect()
            self._waiters.pop(queue, None)
        except ResponseError as e:  # another type at the queue's key: the next take moves it aside
            warn_once("wait", "Redis refused to wait on queue %r (%s)", queue, e)

    def _poll_error(self, type: str, **options: Any) -> None:
        if type.startswith("WAIT "):
            self._woken(type[len("WAIT ") :])
        else:
            super()._poll_error(type, **options)  # type: ignore[misc]

    def close(self) -> None:
        """Close the waits' connections, then the channel as kombu does."""
        for client in self._waiters.values():
            try:
                client.connection.disconnect()
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        self._waiters.clear()
        self._waits.clear()
        super().close()  # type: ignore[misc]

    def _check_waits(self) -> None:
        """Drop a wait that outlived its timeout by far (a half-open connection) and take again."""
        for queue, sent in list(self._waits.items()):
            if time.monotonic() - sent > WAIT_SECONDS + float(self.health_check_interval or 25):
                log.warning("Redis did not answer a wait on queue %r; reconnecting", queue)
                self._waits.pop(queue, None)
                client = self._waiters.pop(queue, None)
                if client is not None:
                    client.connection.disconnect()
                self._wake = True

    def _get(self, queue: str) -> Any:
        """Take one message from `queue` (kombu's `basic_get`), recorded as the event loop's takes are."""
        queues = [queue for _ in self.priority_steps]
        keys = [self._key(self._q_for_pri(queue, pri)) for pri in self.priority_steps]
        with self.conn_or_acquire() as client:
            while True:
                tag = str(uuid.uuid4())
                reply = client.execute_command(*take_call(keys, queues, self._bookkeeping(), tag, self.lease, self._lease_ms()))
                taken = parse_taken(reply, queues)
                if taken.queue is None:
                    raise virtual.Empty()
                message = self._checked(taken.item, taken.queue, tag)
                if message is not None:
                    return message

    def _size(self, queue: str) -> int:
        """Messages waiting in `queue` (kombu asks at every declare); a priority key of another type is moved aside first."""
        try:
            return super()._size(queue)  # type: ignore[misc]
        except ResponseError:
            with self.conn_or_acquire() as client:
                self.set_aside(client, [(self._key(self._q_for_pri(queue, pri)), "list") for pri in self.priority_steps])
            return super()._size(queue)  # type: ignore[misc]

    def _deliver_taken(self, item: bytes, queue: str, tag: str) -> None:
        message = self._checked(item, queue, tag)
        if message is not None:
            self.connection._deliver(message, queue)

    def _checked(self, item: bytes, queue: str, tag: str) -> dict[str, Any] | None:
        """The envelope to deliver under `tag`, or None after moving a hostile item to the quarantine."""
        try:
            envelope = plain_json(item, "it", max_depth=MAX_ITEM_DEPTH)
            if isinstance(envelope, dict) and isinstance(envelope.get("properties"), dict):
                envelope["properties"]["delivery_tag"] = tag
            reason = envelope_refusal(envelope)
        except InvalidRequest as e:
            reason = str(e)
        if reason is None:
            headers = envelope.get("headers") or {}
            if "compression" in headers:
                # kombu would decompress the body without bound before anyone looks at it: a few MB
                # can expand to all the memory there is. The consumer refuses it (and fails its task).
                envelope["headers"] = {**headers, REFUSED_HEADER: "its body is compressed, which this service never does"}
                del envelope["headers"]["compression"]
            return envelope
        warn_once(f"refused:{queue}", "Moved an item of queue %r to %s: %s", queue, QUARANTINE, reason)
        with self.conn_or_acquire() as client:
            self.aside_and_again(client, self._bookkeeping_types() + [(self._key(QUARANTINE), "list")],
                                 lambda: self.quarantine_in(self.qos._remove_from_indices(tag, client.pipeline()), item, queue, reason).execute())
        return None

    def quarantine_in(self, pipe: Any, item: Any, queue: str | None, reason: str) -> Any:
        """Add to `pipe` the commands that keep a refused item in the capped quarantine list; return `pipe`."""
        pipe.lpush(QUARANTINE, quarantine_entry(item or b"", queue, reason, time.time()))  # LPUSH is prefixed by kombu's client
        return pipe.ltrim(self._key(QUARANTINE), 0, QUARANTINE_ENTRIES - 1)

    # -- keys of the wrong type: whatever we write is moved aside if someone put another type there -------

    def _bookkeeping_types(self, held_key: str | None = None) -> list[tuple[str, str]]:
        keys = [self._key(k) for k in (self.unacked_key, self.unacked_index_key, LEASES, held_key or self.held_key)]
        return list(zip(keys, ("hash", "zset", "zset", "set")))

    def set_aside(self, client: Any, keys: list[tuple[str, str]]) -> list[str]:
        """Rename aside each of `keys` (key, Redis type) that holds another type; log and return what was moved."""
        flat = [key for key, _ in keys]
        moved = client.execute_command("EVAL", ASIDE, len(flat), *flat, int(time.time() * 1000), *(kind for _, kind in keys))
        for entry in moved or []:
            text = entry.decode(errors="replace") if isinstance(entry, bytes) else str(entry)
            warn_once(f"aside:{text.split(' ')[0]}", "Redis key %s had the wrong type for what a worker writes there; moved aside", text)
        return list(moved or [])

    def aside_and_again(self, client: Any, keys: list[tuple[str, str]], write: Any) -> Any:
        """Run `write()`; if Redis answers WRONGTYPE, move the wrong-typed of `keys` aside and run it once more."""
        try:
            return write()
        except ResponseError as e:
            if "WRONGTYPE" not in str(e) or not self.set_aside(client, keys):
                raise
            return write()

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        """Publish as kombu does (stage 2 after stage 1); a queue key of another type is moved aside first."""
        with self.conn_or_acquire() as client:
            keys = [(self._key(self._q_for_pri(queue, pri)), "list") for pri in self.priority_steps]
            self.aside_and_again(client, keys, lambda: super(TakingChannel, self)._put(queue, message, **kwargs))

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        """Bind as kombu does at every declare; routing tables of another type are moved aside first, so a worker starts."""
        with self.conn_or_acquire() as client:
            tables = [(self._key(self.keyprefix_queue % (exchange,)), "set"), (self._key(self.keyprefix_binding_permanent % (exchange,)), "set"),
                      (self._key(self.keyprefix_binding_deadlines), "zset")]
            self.aside_and_again(client, tables, lambda: super(TakingChannel, self)._queue_bind(exchange, routing_key, pattern, queue))

    # -- leases: renewed from the event loop; lapsed ones swept by any live worker --------------------

    def keep_lease(self, sweep: int = 8, per_lease: int = 100) -> None:
        """Renew this process's lease, then put back messages held under up to `sweep` lapsed leases.

        A channel younger than one lease does not sweep: after Redis restarts or fails over, every
        live worker reconnects within a lease of its new channel, and would otherwise find the
        others' leases lapsed during the outage and run their tasks a second time.
        """
        if not holds_lease():  # this process never took anything: nothing to keep
            return
        if time.monotonic() - self._opened_at < float(self.worker_lease):
            sweep = 0
        with self.conn_or_acquire() as client:
            look = LOOK_PER_SWEEP if sweep else 0
            lapsed = client.execute_command(
                "EVAL", KEEP, 1, self._key(LEASES), self.lease, self._lease_ms(), sweep, look, self._key(HELD_PREFIX)
            )
            for lease in lapsed or []:
                self._put_back(client, lease.decode(errors="replace") if isinstance(lease, bytes) else str(lease), per_lease)

    def _put_back(self, client: Any, lease: str, most: int) -> None:
        # Each message leaves the lapsed lease's held set in the transaction that requeues it: a
        # sweeper killed midway leaves the rest held there, for the next sweep.
        held = HELD_PREFIX + lease
        try:
            tags = client.execute_command("SRANDMEMBER", self._key(held), most) or []
        except ResponseError as e:
            warn_once("held", "lease %r names a held set Redis cannot read (%s); dropping the lease", short(lease), e)
            tags = []
        for tag in tags:
            self.qos.restore_by_tag(tag.decode(errors="replace") if isinstance(tag, bytes) else tag, client, held_key=held)
        if tags:
            log.info("Put back %d message(s) held by %s, whose lease lapsed", len(tags), short(lease))
        if len(tags) < most:
            client.zrem(LEASES, lease)

    def release_lease(self) -> None:
        """Put back whatever this process still holds and give up its lease: the last step of a clean shutdown."""
        if holds_lease():
            with self.conn_or_acquire() as client:
                self._put_back(client, self.lease, 1_000_000)


OPTIONS = ("worker_lease",)
"""Transport options of ours, set from RERANK_WORKER_LEASE (producer/app.py)."""


class Channel(TakingChannel, redis.Channel):
    """kombu's Redis channel, taking atomically."""

    from_transport_options = redis.Channel.from_transport_options + OPTIONS


class SentinelChannel(TakingChannel, redis.SentinelChannel):
    """kombu's Sentinel channel, taking atomically."""

    from_transport_options = redis.SentinelChannel.from_transport_options + OPTIONS


class TakingPoller(redis.MultiChannelPoller):
    """kombu's poller, also reading a queue's wait whenever it returns (kombu reads only while it may consume)."""

    def on_readable(self, fileno: int) -> Any:
        """Hand a wait's reply to its channel; anything else to kombu."""
        chan_type = self._fd_to_chan.get(fileno)
        if chan_type is not None and chan_type[1].startswith("WAIT ") and fileno not in self._paused_brpop:
            channel, kind = chan_type
            return channel.handlers[kind]()
        return super().on_readable(fileno)


def _keep_leases(channels: Iterable[Any]) -> None:
    for channel in list(channels):
        if isinstance(channel, TakingChannel) and channel.active_queues:
            try:
                channel._check_waits()
                channel.keep_lease()
            except channel.connection_errors:
                log.info("could not renew the lease (Redis unreachable); retrying", exc_info=True)
            except ResponseError as e:
                warn_once("lease", "Redis refused to renew the lease (%s); retrying", e)


class _LeaseKeeping:
    """Polls the queues' waits, and renews leases and sweeps lapsed ones from the worker's event loop (a wedged loop lets its lease lapse)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Open as kombu does, with a poller that reads the waits."""
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.cycle = TakingPoller()

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Register kombu's handlers, then the lease keeper at a fifth of the lease."""
        super().register_with_event_loop(connection, loop)  # type: ignore[misc]
        cycle = self.cycle  # type: ignore[attr-defined]
        old = getattr(cycle, "_lease_tref", None)
        if old is not None:
            old.cancel()
        lease = float(connection.client.transport_options.get("worker_lease", LEASE_SECONDS))
        cycle._lease_tref = loop.call_repeatedly(max(0.2, lease / 5), _keep_leases, cycle._channels)


class Transport(_LeaseKeeping, redis.Transport):
    """kombu's Redis transport with atomic takes, leases, and hostile input contained."""

    Channel = Channel


class SentinelTransport(_LeaseKeeping, redis.SentinelTransport):
    """The same over Redis Sentinel (`sentinel://` URLs)."""

    Channel = SentinelChannel

"""What the gateway knows of the fleet: which models are served on which queues, how deep those queues are,
and one producer client per model served.

Two loops keep this fresh in the background, so no request waits on a broadcast: the workers'
answers to Celery's inspect (`producer.fleet.inspect_workers`) every RERANK_GATEWAY_FLEET_INTERVAL,
and the queue depths (`producer.metrics.read_queues`) every RERANK_GATEWAY_DEPTH_INTERVAL.
A model counts as served when a worker that reports it consumes the queue this gateway sends it to.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from contract.errors import RerankError
from contract.names import model_queue, model_slug
from contract.settings import Settings
from gateway.errors import NotFound, NotServed, Overloaded
from gateway.settings import GatewaySettings
from producer.aio import AsyncRerankClient
from producer.fleet import WorkerInfo, inspect_workers
from producer.metrics import read_queues

log = logging.getLogger(__name__)


class Fleet:
    """The served models, their queues' depths, and a client per model; refreshed by `run()`."""

    def __init__(self, settings: Settings, gateway: GatewaySettings) -> None:
        """Know the fleet behind `settings`' broker; `settings.model` is the model of requests that name none."""
        self.settings = settings
        self.gateway = gateway
        self.clients: dict[str, AsyncRerankClient] = {settings.model: AsyncRerankClient(settings)}
        self.served: dict[str, str] = {}
        """Model slug -> the model's name as its workers report it."""
        self.depths: dict[str, int] = {}
        self.admitted: collections.Counter[str] = collections.Counter()
        """Jobs this gateway sent to each queue since its depth was last read: counted in, so a burst cannot overshoot the bound."""
        self.broker_up = False
        self.known = asyncio.Event()
        """Set once the first inspect answered (or failed): requests wait for it rather than refuse at start-up."""

    def queue_for(self, model: str) -> str:
        """The queue requests for `model` go to: RERANK_QUEUE for the default model (as the Python client), else the model's own."""
        return self.settings.queue if model_slug(model) == model_slug(self.settings.model) else model_queue(model)

    def client(self, model: str) -> AsyncRerankClient:
        """The producer client that sends `model`'s jobs to its queue."""
        if model not in self.clients:
            fields = {**self.settings.model_dump(exclude={"queue"}), "model": model, "queue": self.queue_for(model)}
            self.clients[model] = AsyncRerankClient(Settings(**fields))
        return self.clients[model]

    async def resolve(self, requested: str | None) -> str:
        """The served model a request names (by alias, name or slug; none: RERANK_MODEL).

        Raises:
            NotFound: no worker serves that model, while others are served; the message lists them.
            NotServed: no worker serves any model (or none answered yet).
        """
        await self.known.wait()
        name = requested if requested is not None else self.settings.model
        name = self.gateway.model_aliases.get(name, name)
        served = ", ".join(sorted(self.served.values()))
        if not self.served:
            raise NotServed(f"no worker serves any model on this gateway's queues yet (none answered); start workers for {self.settings.model!r}")
        model = self.served.get(_slug(name))
        if model is None:
            raise NotFound(f"no worker serves model {name[:200]!r}; models served: {served}. Send one of those, or start workers for it")
        return model

    def admit(self, model: str) -> None:
        """Raise `Overloaded` when `model`'s queue holds more waiting messages than RERANK_GATEWAY_MAX_QUEUE_DEPTH."""
        queue = self.queue_for(model)
        depth = self.depths.get(queue, 0) + self.admitted[queue]
        if depth > self.gateway.max_queue_depth:
            raise Overloaded(
                f"queue {queue!r} holds {depth} waiting jobs, over {self.gateway.max_queue_depth} "
                "(RERANK_GATEWAY_MAX_QUEUE_DEPTH); retry later",
                self.gateway.retry_after,
            )
        self.admitted[queue] += 1

    @property
    def ready(self) -> bool:
        """The broker answers and a worker serves the default model on its queue."""
        return self.broker_up and model_slug(self.settings.model) in self.served

    async def run(self) -> None:
        """Refresh the served models and the queue depths until cancelled."""
        await asyncio.gather(self._watch_workers(), self._watch_depths())

    async def _watch_workers(self) -> None:
        app = self.clients[self.settings.model].sync.app
        last: dict[str, str] = {}
        while True:
            try:
                workers = await asyncio.to_thread(inspect_workers, app, self.gateway.inspect_timeout)
                # A model stays served until two answers in a row lack it: one busy worker's late reply must not flap it.
                found = self._served_by(workers)
                self.served, last = {**last, **found}, found
            except (RerankError, OSError) as e:
                log.warning("cannot ask the workers what they serve: %s", e)
                self.broker_up = False
            self.known.set()
            await asyncio.sleep(self.gateway.fleet_interval)

    def _served_by(self, workers: list[WorkerInfo]) -> dict[str, str]:
        served = {}
        for worker in workers:
            model = (worker.report or {}).get("model")
            if isinstance(model, str) and self.queue_for(model) in worker.queues:
                served[model_slug(model)] = model
        return served

    async def _watch_depths(self) -> None:
        app = self.clients[self.settings.model].sync.app
        while True:
            queues = sorted({self.queue_for(model) for model in self.served.values()} | {self.settings.queue})
            admitted, self.admitted = self.admitted, collections.Counter()
            try:
                found = await asyncio.to_thread(read_queues, app, queues)
                self.depths = {depth.queue: depth.messages for depth in found}
                self.broker_up = True
            except Exception as e:  # noqa: BLE001 - kombu raises many kinds for an unreachable broker; the loop must go on
                self.admitted.update(admitted)  # not yet in any depth read
                if self.broker_up:
                    log.warning("cannot read the queue depths: %s", type(e).__name__)
                self.broker_up = False
            await asyncio.sleep(self.gateway.depth_interval)


def _slug(name: str) -> str | None:
    # A name that is not Unicode text (a lone surrogate) names no model; it must not become a 500.
    try:
        return model_slug(name)
    except UnicodeError:
        return None

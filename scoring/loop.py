"""The one driver of the scheduler: plan a batch, run it on the runner, hand the logits back.

The in-process engine calls `step()` from the caller's thread until its request is done; a
device thread (worker/threads pool) and the device process call `serve()`, which steps whenever
a pair waits. A batch that fails is retried request by request, so one request's failure never
fails its batch-mates; an out-of-memory batch is split by the runner, within that batch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from scoring.runner import Runner
from scoring.scheduler import Member, Request, Scheduler

log = logging.getLogger(__name__)


class DeviceLoop:
    """A scheduler and the runner its batches run on, behind one lock that any number of threads may submit through."""

    def __init__(self, runner: Runner) -> None:
        """Plan batches for `runner`'s token budget."""
        self.runner = runner
        # Looked up per call, so a runner's methods may be wrapped after the loop is made.
        self.scheduler = Scheduler(lambda *batch: self.runner.batch_tokens(*batch), runner.max_batch_tokens)
        self.changed = threading.Condition()

    def submit(self, request: Request) -> None:
        """Queue `request` (with the pairs it has; more may be added with `extend`)."""
        with self.changed:
            self.scheduler.add(request)
            self.changed.notify_all()

    def extend(self, request: Request, pairs: list, last: bool) -> None:
        """Add a slice of `request`'s pairs; `last` says none will follow."""
        with self.changed:
            request.add(pairs, last)
            self.changed.notify_all()

    def step(self) -> list[Request]:
        """Run one batch if a pair waits; return the requests it served or failed (empty when idle)."""
        with self.changed:
            try:
                batch = self.scheduler.next_batch()
            except Exception as e:  # noqa: BLE001 - which pairs were taken is unknown: fail every queued request
                log.exception("planning a batch failed; failing the %d requests waiting", len(self.scheduler.requests))
                failed = list(self.scheduler.requests)
                for request in failed:
                    request.fail(e)
                self.changed.notify_all()
                return failed
            pairs = self.scheduler.pairs_of(batch)
        if not batch:
            return []
        outcomes = self._run(batch, pairs)
        with self.changed:
            for members, (logits, padded, runs) in outcomes:
                try:
                    self.scheduler.complete(members, logits, padded, runs)
                except Exception as e:  # noqa: BLE001 - after the forward pass: its requests fail, the loop goes on
                    log.exception("a batch of %d pairs failed after its forward pass; failing its requests", len(members))
                    for request in self.scheduler.requests_of(members):
                        request.fail(e)
            self.changed.notify_all()
        return self.scheduler.requests_of(batch)

    def _run(self, batch: list[Member], pairs: list) -> list[tuple[list[Member], tuple]]:
        try:
            return [(batch, self.runner.run_batch(pairs))]
        except Exception as e:  # noqa: BLE001 - retried request by request, so a failure stays with its request
            if len(self.scheduler.requests_of(batch)) == 1:
                log.warning("a batch of %d pairs of one request failed", len(batch), exc_info=True)
                self._fail(batch[0][0], e)
                return []
            log.warning("a batch of %d pairs failed; retrying it request by request", len(batch), exc_info=True)
        outcomes = []
        for request in self.scheduler.requests_of(batch):
            mine = [(r, i) for r, i in batch if r is request]
            try:
                outcomes.append((mine, self.runner.run_batch(self.scheduler.pairs_of(mine))))
            except Exception as e:  # noqa: BLE001 - handed to the request's own waiter
                self._fail(request, e)
        return outcomes

    def _fail(self, request: Request, error: Exception) -> None:
        with self.changed:
            request.fail(error)
            self.changed.notify_all()

    def serve(self, after_step: Callable[[list[Request]], None] | None = None) -> None:
        """Step forever, waiting while nothing waits (a device thread or process); `after_step` sees each step's requests."""
        while True:
            with self.changed:
                while self.scheduler.idle:
                    self.changed.wait()
            touched = self.step()
            if after_step is not None:
                after_step(touched)

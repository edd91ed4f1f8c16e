"""Many task threads, one device thread: each thread tokenizes its own request, one thread runs every batch.

Used by a worker on Celery's threads pool (RERANK_BATCH_TASKS > 1). The Rust tokenizer releases
the GIL, so task threads tokenize while the device thread runs the scheduler's batches, which
mix the pairs of every waiting request.

The device thread is supervised: if it stops, nothing in this process can score again, so the
worker exits with code 1 at once, leaving the tasks it holds unacknowledged for Redis to deliver
again and its process manager to restart it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from contract import tracing
from contract.errors import TaskTimedOut, WorkerError
from scoring.engine import EMPTY, CrossEncoderEngine, OnProgress, Scores, tokenize_then_score
from scoring.loop import DeviceLoop
from scoring.scheduler import Request
from scoring.tokens import EncodedPair, PairTokenizer, Truncation

log = logging.getLogger(__name__)


class ThreadedScorer:
    """A `Scorer` for many threads at once over one engine; a device thread runs the forwards."""

    def __init__(self, engine: CrossEncoderEngine, time_limit: float, on_stop: Callable[[], None] | None = None) -> None:
        """Score with `engine`; a request not scored within `time_limit` seconds fails with TaskTimedOut.

        `on_stop` runs if the device thread ever stops; by default it ends the process (exit code 1).
        """
        self.engine = engine
        self.time_limit = time_limit
        self.on_stop = on_stop or exit_worker
        self.stopped = False
        self.facts = engine.facts
        self.tokenize: PairTokenizer = engine.tokenize
        self._loop = DeviceLoop(engine.runner)
        self._thread = threading.Thread(target=self._serve, name="rerank-device", daemon=True)
        self._thread.start()

    def device_memory(self) -> dict[str, Any]:
        """What this process holds on the model's GPU."""
        return self.engine.device_memory()

    def score(
        self, query: str, passages: Sequence[str], on_batch: OnProgress | None = None, truncation: Truncation | None = None
    ) -> Scores:
        """Tokenize here, then wait for the device thread; `on_batch(pairs done, pairs total)` is called from this thread."""
        return tokenize_then_score(self, query, passages, on_batch, truncation)

    def score_pairs(self, pairs: Sequence[EncodedPair], on_batch: OnProgress | None = None) -> Scores:
        """Hand pairs already tokenized to the device thread and wait; `on_batch(pairs done, pairs total)` is called from this thread."""
        if not pairs:
            return EMPTY
        request = Request(deadline=time.monotonic() + self.time_limit)
        request.add(pairs)
        waiting = time.perf_counter()
        with tracing.span("rerank.forward", where="device thread"):
            self._wait(request, on_batch)
        return Scores.of(request, request.pairs.in_input_order(), 0.0, time.perf_counter() - waiting)

    def _wait(self, request: Request, on_batch: OnProgress | None) -> None:
        """Hand `request` to the device thread and wait until it is scored, reporting progress; raise its error."""
        self._loop.submit(request)
        changed = self._loop.changed
        reported = 0
        while True:
            with changed:
                changed.wait_for(lambda: request.finished or request.done != reported or self.stopped, request.deadline - time.monotonic())
                finished, done = request.finished, request.done
                if not finished and self.stopped:
                    raise WorkerError("the device thread of this worker stopped; the worker exits and the task is delivered again")
                if not finished and time.monotonic() >= request.deadline:
                    request.fail(TaskTimedOut(
                        f"scoring waited past RERANK_TASK_TIME_LIMIT ({self.time_limit:g}s) with {len(request.pairs.unique) - done} "
                        "pairs unscored; send fewer or shorter texts per request, or raise the limit"
                    ))
                    raise request.error
            if finished:
                break
            if on_batch is not None:  # outside the lock: it writes to the result backend
                on_batch(done, request.total)
            reported = done
        if request.error is not None:
            raise request.error

    def _serve(self) -> None:
        try:
            self._loop.serve()
        except BaseException:  # noqa: BLE001 - whatever stops the thread, on_stop below must run
            log.critical("the device thread stopped", exc_info=True)
        finally:
            self.stopped = True
            with self._loop.changed:
                self._loop.changed.notify_all()
            self.on_stop()


def exit_worker() -> None:
    """End this worker process at once: with no device to score on it cannot serve, and exiting leaves its tasks to be delivered again."""
    log.critical("no device to score on: exiting with code 1 so the tasks this worker holds are delivered again")
    logging.shutdown()
    os._exit(1)

"""Many tasks, one device: tasks hand their tokenized pairs to one device thread that batches across them.

In batching mode a worker runs several tasks at once on Celery's threads pool. Each task thread
does its own CPU work (decode, validation, tokenization: the Rust tokenizer releases the GIL)
and then waits while one device thread runs forward passes. Whenever the device frees, that
thread fills the next batch up to the engine's token budget (no timer, no fixed batch size)
with whole requests, those with the fewest tokens left first, so a small request finishes in the
next batch however many large ones wait (and the oldest request leads a batch now and then, so
none starves). A task gets its own logits, progress and errors; a batch that fails is retried request by
request, so one request's failure never fails its batch-mates; an out-of-memory batch is split
by the engine, within that batch.

The device thread is supervised: a failure in one of its rounds fails the requests of that round
and is logged; if the thread stops anyway, nothing in this process can score again, so the
worker exits with code 1 at once, leaving the tasks it holds unacknowledged for Redis to deliver
again (after the visibility timeout) and its process manager to restart it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from producer.errors import TaskTimedOut, WorkerError
from worker.engine import CrossEncoderEngine, Scores, UniquePairs

log = logging.getLogger(__name__)

_PATIENCE = 8
"""Batches the oldest request may be passed over (for requests with fewer tokens left) before a pair of it leads the next."""


@dataclass(eq=False)
class _Request:
    """One task's pairs in flight: identical pairs once, logits collected batch by batch on the device."""

    deadline: float
    pairs: UniquePairs = field(default_factory=UniquePairs)
    waiting: deque[int] = field(default_factory=deque)
    left: int = 0  # tokens of the waiting pairs
    passed: int = 0  # batches formed since this request last had a pair in one
    done: int = 0
    batches: int = 0
    splits: int = 0
    padded: int = 0
    error: BaseException | None = None
    cancelled: bool = False

    @property
    def finished(self) -> bool:
        return self.error is not None or self.done == len(self.pairs.unique)


class BatchingScorer:
    """`score()` with the engine's signature, for many threads at once; one device thread runs the forwards."""

    def __init__(self, engine: CrossEncoderEngine, time_limit: float, on_stop: Callable[[], None] | None = None) -> None:
        """Score with `engine`; a request waiting longer than `time_limit` seconds fails with TaskTimedOut.

        `on_stop` runs if the device thread ever stops; by default it ends the process (exit code 1).
        """
        self.engine = engine
        self.time_limit = time_limit
        self.on_stop = on_stop or _exit_worker
        self.stopped = False
        self._requests: deque[_Request] = deque()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="rerank-device", daemon=True)
        self._thread.start()

    def __getattr__(self, name: str) -> object:
        # Everything but scoring (name, device, dtype, attention, max_length...) is the engine's.
        return getattr(self.engine, name)

    def score(self, query: str, passages: Sequence[str], on_batch: Callable[[int, int], None] | None = None) -> Scores:
        """Tokenize here, then wait for the device thread; `on_batch(pairs done, pairs total)` is called from this thread."""
        if not passages:
            return Scores([], 0, 0, 0, 0.0, 0.0)
        started = time.perf_counter()
        pairs = self.engine.tokenize(query, passages)
        request = _Request(deadline=time.monotonic() + self.time_limit)
        request.waiting.extend(request.pairs.add(pairs))
        request.left = sum(len(request.pairs.unique[i].input_ids) for i in request.waiting)
        tokenized = time.perf_counter()
        with self._changed:
            self._requests.append(request)
            self._changed.notify_all()
        reported = 0
        while True:
            with self._changed:
                self._changed.wait_for(
                    lambda: request.finished or request.done != reported or self.stopped, request.deadline - time.monotonic()
                )
                finished, done = request.finished, request.done
                if not finished and self.stopped:
                    raise WorkerError("the device thread of this worker stopped; the worker exits and the task is delivered again")
                if not finished and time.monotonic() >= request.deadline:
                    request.cancelled = True
                    raise TaskTimedOut(
                        f"scoring waited past RERANK_TASK_TIME_LIMIT ({self.time_limit:g}s) with {len(request.pairs.unique) - done} "
                        "pairs unscored; send fewer or shorter texts per request, or raise the limit"
                    )
            if finished:
                break
            if on_batch is not None:  # outside the lock: it writes to the result backend
                on_batch(done, len(request.pairs.unique))
            reported = done
        if request.error is not None:
            raise request.error
        logits = request.pairs.in_input_order()
        finished = time.perf_counter()
        return Scores(
            logits=logits,
            tokens=sum(len(p.input_ids) for p in pairs),
            padded_tokens=request.padded,
            batches=request.batches,
            tokenize_seconds=tokenized - started,
            forward_seconds=finished - tokenized,
            oom_splits=request.splits,
        )

    def _run(self) -> None:
        try:
            while True:
                with self._changed:
                    while not self._requests:
                        self._changed.wait()
                    try:
                        batch = self._next_batch()
                    except Exception as e:  # noqa: BLE001 - which pairs were taken is unknown: fail every queued request
                        log.exception("planning a batch failed; failing the %d requests waiting", len(self._requests))
                        self._fail(list(self._requests), e)
                        continue
                if batch:
                    try:
                        self._forward(batch)
                    except Exception as e:  # noqa: BLE001 - outside the forward pass: the batch's requests fail, the thread goes on
                        log.exception("a batch of %d pairs failed after its forward pass; failing its requests", len(batch))
                        with self._changed:
                            self._fail([r for r, _ in batch], e)
        except BaseException:  # noqa: BLE001 - whatever stops the thread, on_stop below must run
            log.critical("the device thread stopped", exc_info=True)
        finally:
            self.stopped = True
            with self._changed:
                self._changed.notify_all()
            self.on_stop()

    def _fail(self, requests: list[_Request], error: Exception) -> None:
        """Hand `error` to each of `requests` (the lock is held)."""
        for request in dict.fromkeys(requests):
            if not request.finished:
                request.error, request.cancelled = error, True
        self._changed.notify_all()

    def _next_batch(self) -> list[tuple[_Request, int]]:
        """Waiting pairs up to the token budget: whole requests, those with the fewest tokens left first.

        Serving the smallest requests first lets a ten-passage request finish in the next batch
        while four thousand-passage ones wait. So that a stream of small requests cannot starve a
        large one until its time limit, one pair of the oldest request leads any batch after
        _PATIENCE batches without a pair of its own.
        """
        while self._requests and (self._requests[0].cancelled or not self._requests[0].waiting):
            self._requests.popleft()
        active = [r for r in self._requests if r.waiting and not r.cancelled]
        if not active:
            return []
        # (request, pairs it may take at most): the starved oldest's one pair, then the rest by tokens left
        order = [(r, len(r.waiting)) for r in sorted(active, key=lambda r: r.left)]
        if active[0].passed >= _PATIENCE:
            order.insert(0, (active[0], 1))
        batch: list[tuple[_Request, int]] = []
        longest = total = 0
        for request, most in order:
            for _ in range(most):
                if not request.waiting:
                    break
                n = len(request.pairs.unique[request.waiting[0]].input_ids)
                if batch and self.engine.batch_tokens(max(longest, n), len(batch) + 1, total + n) > self.engine.max_batch_tokens:
                    break
                batch.append((request, request.waiting.popleft()))
                longest, total, request.left = max(longest, n), total + n, request.left - n
        served = {r for r, _ in batch}
        for request in active:
            request.passed = 0 if request in served else request.passed + 1
        return batch

    def _forward(self, batch: list[tuple[_Request, int]]) -> None:
        try:
            outcomes = [(batch, self.engine.run_batch([r.pairs.unique[i] for r, i in batch]))]
        except Exception:  # noqa: BLE001 - retried request by request, so a failure stays with its request
            log.warning("a batch of %d pairs failed; retrying it request by request", len(batch), exc_info=True)
            outcomes = []
            for request in dict.fromkeys(r for r, _ in batch):
                mine = [(r, i) for r, i in batch if r is request]
                try:
                    outcomes.append((mine, self.engine.run_batch([r.pairs.unique[i] for r, i in mine])))
                except Exception as e:  # noqa: BLE001 - handed to the request's own thread
                    with self._changed:
                        request.error, request.cancelled = e, True
                        self._changed.notify_all()
        with self._changed:
            for members, (logits, padded, runs) in outcomes:
                share = padded / len(members)
                placed: dict[_Request, tuple[list[int], list[int]]] = {}  # batch rows and unique indexes, per request
                for row, (request, index) in enumerate(members):
                    rows, indexes = placed.setdefault(request, ([], []))
                    rows.append(row)
                    indexes.append(index)
                for request, (rows, indexes) in placed.items():
                    contiguous = rows == list(range(rows[0], rows[-1] + 1))
                    request.pairs.collect(indexes, logits[rows[0] : rows[-1] + 1] if contiguous else logits[rows])
                    request.done += len(rows)
                    request.batches += runs
                    request.splits += runs - 1
                    request.padded += round(share * len(rows))
            self._changed.notify_all()


def _exit_worker() -> None:
    """End this worker process at once: with no device thread it cannot score, and exiting leaves its tasks to be delivered again."""
    log.critical("no device thread: exiting with code 1 so the tasks this worker holds are delivered again")
    logging.shutdown()
    os._exit(1)

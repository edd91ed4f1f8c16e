"""Many tasks, one device: tasks hand their tokenized pairs to one device thread that batches across them.

In batching mode a worker runs several tasks at once on Celery's threads pool. Each task thread
does its own CPU work (decode, validation, tokenization: the Rust tokenizer releases the GIL)
and then waits while one device thread runs forward passes. Whenever the device frees, that
thread fills the next batch with waiting pairs of every task in turn, up to the engine's token
budget: no timer, no fixed batch size. A task gets its own logits, progress and
errors; a batch that fails is retried request by request, so one request's failure never fails
its batch-mates; an out-of-memory batch is split by the engine, within that batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from producer.errors import TaskTimedOut
from worker.engine import CrossEncoderEngine, Scores, UniquePairs

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    """One task's pairs in flight: identical pairs once, logits collected batch by batch on the device."""

    deadline: float
    pairs: UniquePairs = field(default_factory=UniquePairs)
    waiting: deque[int] = field(default_factory=deque)
    done: int = 0
    batches: int = 0
    padded: int = 0
    error: BaseException | None = None
    cancelled: bool = False

    @property
    def finished(self) -> bool:
        return self.error is not None or self.done == len(self.pairs.unique)


class BatchingScorer:
    """`score()` with the engine's signature, for many threads at once; one device thread runs the forwards."""

    def __init__(self, engine: CrossEncoderEngine, time_limit: float) -> None:
        """Score with `engine`; a request waiting longer than `time_limit` seconds fails with TaskTimedOut."""
        self.engine = engine
        self.time_limit = time_limit
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
        tokenized = time.perf_counter()
        with self._changed:
            self._requests.append(request)
            self._changed.notify_all()
        reported = 0
        while True:
            with self._changed:
                self._changed.wait_for(lambda: request.finished or request.done != reported, request.deadline - time.monotonic())
                finished, done = request.finished, request.done
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
        )

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._requests:
                    self._changed.wait()
                batch = self._next_batch()
            if batch:
                self._forward(batch)

    def _next_batch(self) -> list[tuple[_Request, int]]:
        """Waiting pairs up to the token budget, a pair from each request in turn (each request's longest first).

        Taking requests in turn, not in order of arrival, lets a ten-passage request finish in the
        next batch or two while a thousand-passage one is still being scored.
        """
        while self._requests and (self._requests[0].cancelled or not self._requests[0].waiting):
            self._requests.popleft()
        active = [r for r in self._requests if r.waiting and not r.cancelled]
        batch: list[tuple[_Request, int]] = []
        longest = total = 0
        while active:
            for request in list(active):
                n = len(request.pairs.unique[request.waiting[0]].input_ids)
                grown = (max(longest, n), len(batch) + 1, total + n)
                if batch and self.engine.batch_tokens(*grown) > self.engine.max_batch_tokens:
                    return batch
                batch.append((request, request.waiting.popleft()))
                longest, total = grown[0], grown[2]
                if not request.waiting:
                    active.remove(request)
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
                    request.padded += round(share * len(rows))
            self._changed.notify_all()

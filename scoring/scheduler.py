"""The one batch scheduler: which waiting pairs of which requests form the next forward pass.

Every way of scoring drives it: the in-process engine (one request, the caller's thread), a
worker's device thread (many task threads) and the device process (many host processes). It
does no I/O and runs no model: a driver asks for `next_batch()`, runs it, and hands the logits
back with `complete()`.

Rules, in one place:
- a request's identical pairs are scored once (so they get identical scores: a GEMM may round a
  row differently depending on its place in the batch);
- a batch holds waiting pairs up to the runner's token budget (no timer, no fixed batch size),
  whole requests first, those with the fewest tokens left first, each request's pairs longest
  first, so a ten-passage request finishes in the next batch however many large ones wait;
- so that a stream of small requests cannot starve a large one, one pair of the oldest request
  leads any batch after PATIENCE batches without a pair of its own;
- a request past its deadline is dropped from planning and fails with TaskTimedOut;
- progress is counted in unique pairs scored of the request's total.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch

from contract.errors import TaskTimedOut
from scoring.tokens import EncodedPair

PATIENCE = 8
"""Batches the oldest request may be passed over (for requests with fewer tokens left) before a pair of it leads the next."""

BatchTokens = Callable[[int, int, int], int]
"""(longest pair, pairs, total real tokens) -> tokens the batch takes in the runner's layout."""


class UniquePairs:
    """A request's pairs with repeats kept once, and the logits of those once-pairs as their batches return them."""

    def __init__(self) -> None:
        """Start empty; `add` pairs, `collect` their logits, then read them back `in_input_order`."""
        self.unique: list[EncodedPair] = []
        self.owner: list[int] = []  # for each pair added, its index in `unique`
        self._first_of: dict[bytes, int] = {}
        self._rows: list[int] = []  # indexes in `unique`, in the order their logits were collected
        self._logits: list[tuple[torch.Tensor, list[int] | None]] = []  # device tensors, and the rows of each to keep

    def add(self, pairs: Sequence[EncodedPair]) -> list[int]:
        """Take `pairs` after those added before; return the indexes of the new unique ones, longest first."""
        start = len(self.unique)
        for pair in pairs:
            index = self._first_of.setdefault(pair.input_ids.tobytes(), len(self.unique))
            if index == len(self.unique):
                self.unique.append(pair)
            self.owner.append(index)
        return sorted(range(start, len(self.unique)), key=lambda i: len(self.unique[i].input_ids), reverse=True)

    def collect(self, indexes: Sequence[int], logits: torch.Tensor, rows: list[int] | None = None) -> None:
        """Keep the logits of the unique pairs at `indexes`: `logits` itself, or its `rows` (left on the device until read)."""
        self._rows.extend(indexes)
        self._logits.append((logits, rows))

    def unique_logits(self) -> torch.Tensor:
        """Fp32 logits of the unique pairs, in unique order (the request's one wait for the device).

        Rows are picked after the copy to the host: indexing a device tensor with a Python list
        would send the index to the device and wait there, once per batch.
        """
        by_unique = torch.empty(len(self.unique), dtype=torch.float32)
        if self._rows:
            parts = [logits.cpu() if rows is None else logits.cpu()[rows] for logits, rows in self._logits]
            by_unique[torch.tensor(self._rows)] = torch.cat(parts)
        return by_unique

    def in_input_order(self) -> list[float]:
        """Fp32 logits of every pair added, in the order added."""
        if not self.owner:
            return []
        return self.unique_logits()[torch.tensor(self.owner)].tolist()


class Request:
    """One request in flight: its pairs (added whole or slice by slice), those still waiting, and what scoring them cost."""

    def __init__(self, deadline: float = math.inf, expected: int = 0) -> None:
        """A request due by `deadline` (time.monotonic()), of about `expected` pairs (for progress before all are added)."""
        self.deadline = deadline
        self.expected = expected
        self.pairs = UniquePairs()
        self.waiting: deque[int] = deque()
        self.sealed = False  # every pair has been added
        self.left = 0  # tokens of the waiting pairs
        self.passed = 0  # batches formed since this request last had a pair in one
        self.done = 0  # unique pairs scored
        self.tokens = self.batches = self.padded = self.splits = 0
        self.error: BaseException | None = None

    def add(self, pairs: Sequence[EncodedPair], last: bool = True) -> None:
        """Queue `pairs` after those added before; `last` says no more will come."""
        fresh = self.pairs.add(pairs)
        self.waiting.extend(fresh)
        self.left += sum(len(self.pairs.unique[i].input_ids) for i in fresh)
        self.tokens += sum(len(pair.input_ids) for pair in pairs)
        self.sealed = last

    @property
    def finished(self) -> bool:
        """Failed, or every pair added and scored."""
        return self.error is not None or (self.sealed and self.done == len(self.pairs.unique))

    @property
    def total(self) -> int:
        """Unique pairs to score: known once sealed, else the larger of those added and those expected."""
        return len(self.pairs.unique) if self.sealed else max(self.expected, len(self.pairs.unique))

    def fail(self, error: BaseException) -> None:
        """End the request with `error` (kept if it already has one); its waiting pairs are dropped."""
        if self.error is None:
            self.error = error
        self.waiting.clear()
        self.left = 0


Member = tuple[Request, int]
"""A batch row: the request and the index of its unique pair."""


class Scheduler:
    """Forms batches from the waiting pairs of every request (see the module docstring for the rules)."""

    def __init__(self, batch_tokens: BatchTokens, max_batch_tokens: int, clock: Callable[[], float] = time.monotonic) -> None:
        """Plan batches of at most `max_batch_tokens`, as `batch_tokens` counts them."""
        self.batch_tokens = batch_tokens
        self.max_batch_tokens = max_batch_tokens
        self.clock = clock
        self.requests: deque[Request] = deque()

    def add(self, request: Request) -> None:
        """Start planning `request`'s waiting pairs (and any it gets later)."""
        self.requests.append(request)

    @property
    def idle(self) -> bool:
        """No request has a pair waiting."""
        return not any(r.waiting for r in self.requests)

    def next_batch(self) -> list[Member]:
        """The next batch: waiting pairs up to the token budget (empty when none wait); expired requests fail here."""
        now = self.clock()
        for request in self.requests:
            if request.waiting and now >= request.deadline:
                request.fail(TaskTimedOut(
                    f"scoring waited past its deadline with {len(request.pairs.unique) - request.done} pairs unscored; "
                    "send fewer or shorter texts per request, or raise RERANK_TASK_TIME_LIMIT"
                ))
        while self.requests and (self.requests[0].finished or (self.requests[0].sealed and not self.requests[0].waiting)):
            self.requests.popleft()
        active = [r for r in self.requests if r.waiting]
        if not active:
            return []
        order = [(r, len(r.waiting)) for r in sorted(active, key=lambda r: r.left)]
        if active[0].passed >= PATIENCE:
            order.insert(0, (active[0], 1))
        batch: list[Member] = []
        longest = total = 0
        for request, most in order:
            for _ in range(most):
                if not request.waiting:
                    break
                n = len(request.pairs.unique[request.waiting[0]].input_ids)
                if batch and self.batch_tokens(max(longest, n), len(batch) + 1, total + n) > self.max_batch_tokens:
                    break
                batch.append((request, request.waiting.popleft()))
                longest, total, request.left = max(longest, n), total + n, request.left - n
        served = {r for r, _ in batch}
        for request in active:
            request.passed = 0 if request in served else request.passed + 1
        return batch

    @staticmethod
    def pairs_of(batch: Sequence[Member]) -> list[EncodedPair]:
        """The pairs a batch runs, in row order."""
        return [request.pairs.unique[index] for request, index in batch]

    @staticmethod
    def complete(batch: Sequence[Member], logits: torch.Tensor, padded: int, runs: int) -> list[Request]:
        """Hand each request its rows of `logits` (one per batch row) and its share of the cost; return the requests served."""
        share = padded / len(batch)
        placed: dict[Request, tuple[list[int], list[int]]] = {}  # batch rows and unique indexes, per request
        for row, (request, index) in enumerate(batch):
            rows, indexes = placed.setdefault(request, ([], []))
            rows.append(row)
            indexes.append(index)
        for request, (rows, indexes) in placed.items():
            if request.error is not None:
                continue
            if rows == list(range(rows[0], rows[-1] + 1)):
                request.pairs.collect(indexes, logits[rows[0] : rows[-1] + 1])
            else:
                request.pairs.collect(indexes, logits, rows)
            request.done += len(rows)
            request.batches += runs
            request.splits += runs - 1
            request.padded += round(share * len(rows))
        return list(placed)

    @staticmethod
    def requests_of(batch: Sequence[Member]) -> list[Request]:
        """The distinct requests of a batch, in row order."""
        return list(dict.fromkeys(request for request, _ in batch))

"""Waiting for results, written once: which tasks to read next, how long to pause, when to give up.

No I/O happens here. `producer.jobs` drives a `Waiter` with direct backend reads, waiting on the
result backend's announcements (Redis pub/sub) so that a pause ends early when a state changes;
`producer.aio` drives the same `Waiter` with reads in a thread and `asyncio.sleep` pauses.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from contract.errors import RerankError, RerankTimeout

FIRST_POLL = 0.001
"""Seconds before the second read: a short request on a warm worker finishes within milliseconds."""

POLL_GROWTH = 1.25
"""Each pause is this much longer than the one before: a job is noticed at most a quarter of its
run time after it finishes, and a long one costs few reads (about 4 a second)."""

MAX_POLL = 0.25
"""The longest pause between reads where nothing announces a finished job (a backend that
announces nothing, or an asyncio caller without a subscriber): the most it waits to be noticed."""

ANNOUNCED_POLL = 2.0
"""The pause between reads while the waits end on the result backend's announcements: a safety net
only (a finished job wakes its waiter at once), so a job costs Redis a few reads, not one every
quarter second."""


class Waitable(Protocol):
    """What a `Waiter` follows: a task id, and its final meta once known."""

    id: str
    final: dict[str, Any] | None


class Waiter:
    """Follows task ids until each has a final meta, or until `timeout` seconds have passed."""

    def __init__(self, handles: Iterable[Waitable], timeout: float | None, what: str) -> None:
        """Follow `handles`; `what` names them in the timeout error (e.g. "job 1f3…")."""
        handles = list(handles)
        self.ready = [h for h in handles if h.final is not None]
        self.pending = {h.id: h for h in handles if h.final is None}
        self.timeout = timeout
        self.what = what
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._delay = FIRST_POLL
        self._found = True

    def ids(self) -> list[str]:
        """The task ids still unfinished: read these next."""
        return list(self.pending)

    def settle(self, finished: Mapping[str, dict[str, Any]]) -> list[Any]:
        """Record the final metas a read returned; return the handles that just finished."""
        done = [self.pending.pop(task_id) for task_id in list(self.pending) if task_id in finished]
        for handle in done:
            handle.final = finished[handle.id]
        self._found = bool(done)
        return done

    def pause(self, announced: bool = False) -> float:
        """Seconds to sleep before the next read: none right after progress, then growing; ANNOUNCED_POLL when `announced`.

        Raises:
            RerankTimeout: the deadline passed with tasks unfinished; they may still finish.
        """
        if self._found:
            self._delay = FIRST_POLL
            return 0.0
        remaining = None if self._deadline is None else self._deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise RerankTimeout(
                f"{self.what} gave no result within {self.timeout}s ({len(self.pending)} unfinished); it may still "
                "finish: check that workers consume the queue (`rerank workers`), or wait longer"
            )
        wanted = ANNOUNCED_POLL if announced else self._delay
        self._delay = min(self._delay * POLL_GROWTH, MAX_POLL)
        return wanted if remaining is None else min(wanted, remaining)


class Outcomes:
    """Results of a batch's jobs gathered as they finish, returned in input order."""

    def __init__(self, jobs: Iterable[Any], return_exceptions: bool) -> None:
        """Collect for `jobs` (each with an `index`); with `return_exceptions`, errors take failed jobs' places."""
        self.jobs = list(jobs)
        self.return_exceptions = return_exceptions
        self._by_index: dict[int, Any] = {}

    def add(self, job: Any) -> None:
        """Take the result of a finished job; raise its error unless `return_exceptions`."""
        try:
            self._by_index[job.index] = job.result()
        except RerankError as e:
            if not self.return_exceptions:
                raise
            self._by_index[job.index] = e

    def timed_out(self, error: RerankTimeout) -> None:
        """The wait ended early: raise `error`, or with `return_exceptions` put it in every unfinished place."""
        if not self.return_exceptions:
            raise error
        for job in self.jobs:
            self._by_index.setdefault(job.index, error)

    def in_order(self) -> list[Any]:
        """Every job's result (or error), in input order."""
        return [self._by_index[job.index] for job in self.jobs]

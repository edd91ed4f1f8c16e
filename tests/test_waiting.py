"""The waiting core on its own: when to read, how long to pause, when to give up (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from producer import RerankTimeout
from producer.waiting import FIRST_POLL, MAX_POLL, Waiter


@dataclass
class Task:
    id: str
    final: dict[str, Any] | None = None


def test_pauses_grow_to_the_ceiling_and_reset_after_progress():
    # Given three unfinished tasks and no deadline
    waiter = Waiter([Task("a"), Task("b"), Task("c")], None, "batch x")
    # When reads find nothing, Then the pauses grow from the first poll up to the ceiling
    pauses = []
    for _ in range(30):
        waiter.settle({})
        pauses.append(waiter.pause())
    assert pauses[0] == FIRST_POLL and pauses == sorted(pauses) and pauses[-1] == MAX_POLL
    # When a read finds one, Then it is handed over with its meta and the next read comes at once
    done = waiter.settle({"b": {"status": "SUCCESS", "result": 1}})
    assert [t.id for t in done] == ["b"] and done[0].final == {"status": "SUCCESS", "result": 1}
    assert waiter.ids() == ["a", "c"] and waiter.pause() == 0.0
    waiter.settle({})
    assert waiter.pause() == FIRST_POLL


def test_the_deadline_bounds_the_last_pause_and_then_raises_naming_what_is_late():
    waiter = Waiter([Task("a")], 0.05, "job a")
    waited = 0.0
    with pytest.raises(RerankTimeout, match=r"job a gave no result within 0.05s \(1 unfinished\)"):
        for _ in range(1000):
            waiter.settle({})
            pause = waiter.pause()
            assert pause <= 0.05
            waited += pause
            __import__("time").sleep(pause)
    assert waited == pytest.approx(0.05, abs=0.03)


def test_tasks_already_finished_are_ready_without_a_read():
    finished = Task("done", {"status": "SUCCESS", "result": None})
    waiter = Waiter([finished, Task("open")], 1.0, "batch")
    assert waiter.ready == [finished] and waiter.ids() == ["open"]


def test_while_announcements_wake_the_waits_reads_are_a_slow_safety_net_bounded_by_the_deadline():
    from producer.waiting import ANNOUNCED_POLL

    # Given a task whose waits end on the result backend's announcements
    waiter = Waiter([Task("a")], None, "job a")
    waiter.settle({})
    # When nothing was found, Then the next read is a safety net only, not a quarter-second poll
    assert waiter.pause(announced=True) == ANNOUNCED_POLL > 4 * MAX_POLL
    # And without announcements the pauses are the growing polls
    assert waiter.pause() <= MAX_POLL
    # And a deadline still bounds the pause
    late = Waiter([Task("b")], 0.3, "job b")
    late.settle({})
    assert late.pause(announced=True) <= 0.3

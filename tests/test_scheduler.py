"""The one batch scheduler, without a model or a thread: which pairs form each batch, and who gets which logits."""

from __future__ import annotations

import pytest
import torch

from contract.errors import TaskTimedOut
from scoring.scheduler import PATIENCE, Request, Scheduler
from scoring.tokens import EncodedPair


def pair(length: int, tag: int = 0, serial: int = 0) -> EncodedPair:
    """A pair of `length` tokens (at least 2), distinct per (length, tag, serial)."""
    return EncodedPair([tag, serial] + [length] * (length - 2), [0] * length)


def packed(longest: int, count: int, total: int) -> int:
    return total


def padded(longest: int, count: int, total: int) -> int:
    return longest * count


def request_of(lengths: list[int], tag: int, **kwargs) -> Request:
    request = Request(**kwargs)
    request.add([pair(n, tag, serial) for serial, n in enumerate(lengths)])
    return request


def run_all(scheduler: Scheduler) -> list[list[tuple[Request, int]]]:
    """Plan and complete batches until none is left; each batch's logit per row is its pair's first id * 1000 + length."""
    batches = []
    while batch := scheduler.next_batch():
        pairs = scheduler.pairs_of(batch)
        logits = torch.tensor([p.input_ids[0] * 1000.0 + len(p.input_ids) for p in pairs])
        scheduler.complete(batch, logits, padded=sum(len(p.input_ids) for p in pairs), runs=1)
        batches.append(batch)
    return batches


@pytest.mark.parametrize("layout", [packed, padded])
def test_batches_stay_within_the_budget_and_every_pair_gets_its_own_logit(layout):
    # Given three requests of mixed lengths and a 100-token budget
    scheduler = Scheduler(layout, max_batch_tokens=100)
    requests = [request_of([30, 5, 17, 30, 9], tag=1), request_of([40, 2], tag=2), request_of([12] * 7, tag=3)]
    for request in requests:
        scheduler.add(request)
    # When every batch is planned and run
    batches = run_all(scheduler)
    # Then no batch went over the budget, every request finished, and each pair got its own logit in input order
    for batch in batches:
        pairs = scheduler.pairs_of(batch)
        lengths = [len(p.input_ids) for p in pairs]
        assert layout(max(lengths), len(lengths), sum(lengths)) <= 100 or len(batch) == 1
    assert all(r.finished and r.error is None for r in requests)
    assert requests[0].pairs.in_input_order() == [1030.0, 1005.0, 1017.0, 1030.0, 1009.0]
    assert requests[0].pairs.unique[0] != requests[0].pairs.unique[3], "distinct pairs of the same length are scored apart"
    assert requests[2].pairs.in_input_order() == [3012.0] * 7


def test_repeats_are_scored_once_and_each_requests_pairs_go_longest_first():
    scheduler = Scheduler(packed, max_batch_tokens=1000)
    request = Request()
    request.add([pair(5, 4), pair(20, 4), pair(5, 4), pair(11, 4), pair(20, 4)])
    scheduler.add(request)
    (batch,) = run_all(scheduler)
    assert [len(p.input_ids) for p in scheduler.pairs_of(batch)] == [20, 11, 5]
    assert request.pairs.in_input_order() == [4005.0, 4020.0, 4005.0, 4011.0, 4020.0]


def test_a_small_request_beside_large_ones_is_scored_whole_in_the_next_batch():
    # Given four large requests waiting, then a small one
    scheduler = Scheduler(packed, max_batch_tokens=200)
    large = [request_of([50] * 40, tag=10 + n) for n in range(4)]
    small = request_of([10] * 5, tag=99)
    for request in [*large, small]:
        scheduler.add(request)
    # When the next batch is formed
    batch = scheduler.next_batch()
    # Then all of the small request is in it (fewest tokens left first), filled up with large pairs
    assert [index for r, index in batch if r is small] == list(range(5))
    assert sum(len(p.input_ids) for p in scheduler.pairs_of(batch)) <= 200


def test_the_oldest_request_leads_a_batch_after_waiting_patience_batches():
    # Given a large request that is older than a stream of small ones
    scheduler = Scheduler(packed, max_batch_tokens=60)
    old = request_of([50] * 3, tag=1)
    scheduler.add(old)
    for n in range(PATIENCE + 2):
        scheduler.add(request_of([30, 30], tag=100 + n))
    # When batches are formed
    served_at = next(n for n in range(PATIENCE + 2) if any(r is old for r, _ in scheduler.next_batch()))
    # Then the old request got a pair within PATIENCE + 1 batches, though every small one had fewer tokens left
    assert served_at == PATIENCE


def test_a_request_past_its_deadline_fails_and_leaves_planning():
    now = [0.0]
    scheduler = Scheduler(packed, max_batch_tokens=100, clock=lambda: now[0])
    late = request_of([40] * 4, tag=1, deadline=5.0)
    on_time = request_of([40] * 4, tag=2, deadline=50.0)
    scheduler.add(late)
    scheduler.add(on_time)
    scheduler.next_batch()
    now[0] = 6.0
    rest = run_all(scheduler)
    assert isinstance(late.error, TaskTimedOut) and late.finished and not late.waiting
    assert all(r is on_time for batch in rest for r, _ in batch) and on_time.finished and on_time.error is None


def test_progress_counts_unique_pairs_and_an_unsealed_request_is_not_finished():
    scheduler = Scheduler(packed, max_batch_tokens=100)
    request = Request(expected=6)
    request.add([pair(10, 1), pair(10, 1), pair(12, 1)], last=False)
    scheduler.add(request)
    run_all(scheduler)
    assert (request.done, request.total, request.finished) == (2, 6, False)
    request.add([pair(14, 1)], last=True)
    run_all(scheduler)
    assert (request.done, request.total, request.finished) == (3, 3, True)


def test_rows_of_a_request_spread_over_a_batch_reach_it_in_order():
    # Given a batch whose rows interleave two requests (as when the oldest leads a batch)
    first, second = request_of([10, 11, 12], tag=1), request_of([20, 21], tag=2)
    batch = [(first, 0), (second, 0), (first, 1), (second, 1), (first, 2)]
    for request in (first, second):
        request.waiting.clear()
    # When its logits come back, one per row
    Scheduler.complete(batch, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), padded=64, runs=1)
    # Then each request reads its own rows, in its input order
    assert first.pairs.in_input_order() == [1.0, 3.0, 5.0] and second.pairs.in_input_order() == [2.0, 4.0]
    assert first.finished and second.finished

"""The asyncio client waits without blocking the event loop and returns what the sync client does."""

from __future__ import annotations

import asyncio
import time

import pytest

from producer import (
    InvalidRequest,
    JobCancelled,
    RerankClient,
    RerankError,
    RerankTimeout,
    Settings,
)
from producer.aio import AsyncRerankClient
from tests.helpers import QUERY, candidates


async def ticking_while(awaitable):
    """Await `awaitable` while a ticker runs every 10 ms; return (outcome, ticks, longest gap between ticks)."""
    stamps: list[float] = []

    async def ticker():
        while True:
            stamps.append(time.monotonic())
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    try:
        outcome = await awaitable
    except Exception as e:  # noqa: BLE001 - returned for the test to check
        outcome = e
    finally:
        task.cancel()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return outcome, len(stamps), max(gaps)


@pytest.mark.integration
def test_waiting_on_a_queued_job_keeps_the_loop_responsive_and_times_out(redis_server, tiny_model):
    # Given a job on a queue no worker consumes, so it waits the whole timeout
    client = AsyncRerankClient(Settings(broker_url=redis_server.url, queue="nobody-async", model=str(tiny_model)))
    # When we await it with a 2 s timeout while a ticker runs
    started = time.monotonic()
    outcome, ticks, longest = asyncio.run(ticking_while(client.two_stage(QUERY, candidates(3), timeout=2.0)))
    # Then it raises RerankTimeout after about 2 s, and the loop ticked all along: a blocking
    # get() would freeze it for the whole 2 s (the margin is for CPUs shared with other tests)
    assert isinstance(outcome, RerankTimeout), outcome
    assert 1.9 <= time.monotonic() - started < 6
    assert ticks >= 50 and longest < 1.0


def test_in_process_async_runs_the_model_off_the_loop_and_matches_sync(in_process_settings):
    # Given the same job, awaited and called synchronously
    client = AsyncRerankClient(in_process_settings)
    outcome, ticks, longest = asyncio.run(ticking_while(client.two_stage(QUERY, candidates(30), top_k_docs=5)))
    expected = RerankClient(in_process_settings).two_stage(QUERY, candidates(30), top_k_docs=5)
    # Then the results agree, and the loop kept ticking while the model ran in a thread
    assert [i.id for i in outcome.chunks.items] == [i.id for i in expected.chunks.items]
    assert [i.score for i in outcome.chunks.items] == pytest.approx([i.score for i in expected.chunks.items], abs=1e-6)
    assert ticks >= 3 and longest < 1.0


@pytest.mark.integration
def test_async_batch_through_redis_in_order_and_as_completed(shared_worker, redis_settings):
    client = AsyncRerankClient(redis_settings)
    sizes = [6, 2, 4]

    async def scenario():
        batch = await client.submit_many([{"query": QUERY, "candidates": candidates(n), "top_k_docs": 2} for n in sizes])
        seen = [job.index async for job in batch.as_completed(timeout=120)]
        return seen, await batch.results(timeout=60), await batch.jobs[0].status()

    # When a batch is awaited both ways
    seen, results, status = asyncio.run(scenario())
    # Then every job completes once, results come in input order, and statuses read SUCCESS
    assert sorted(seen) == [0, 1, 2]
    assert [r.documents.scored for r in results] == sizes
    assert status == "SUCCESS"


@pytest.mark.integration
def test_async_failure_and_cancellation_raise_the_same_typed_errors_as_sync(shared_worker, redis_settings, redis_server, tiny_model):
    client = AsyncRerankClient(redis_settings)
    # Given a message the worker refuses (an unknown field), sent straight to the queue
    bad = client.sync.app.send_task("rerank.documents", args=({"query": QUERY, "candidates": candidates(2), "colour": "red"},))
    # And a job on a queue nobody consumes, cancelled before it runs
    idle = AsyncRerankClient(Settings(broker_url=redis_server.url, queue="nobody-async-cancel", model=str(tiny_model)))

    async def scenario():
        outcomes = []
        try:
            await client.job(bad.id).result(timeout=30)
        except RerankError as e:
            outcomes.append(e)
        job = await idle.submit(QUERY, candidates(3))
        assert await job.cancel() is True
        try:
            await job.result(timeout=5)
        except RerankError as e:
            outcomes.append(e)
        return outcomes

    failed, cancelled = asyncio.run(scenario())
    # Then the worker's refusal arrives as InvalidRequest with its reason, and the cancel as JobCancelled,
    # exactly as the synchronous client reports them
    assert isinstance(failed, InvalidRequest) and "colour: Extra inputs are not permitted" in str(failed)
    assert isinstance(cancelled, JobCancelled)
    with pytest.raises(InvalidRequest, match="colour: Extra inputs are not permitted"):
        client.sync.job(bad.id).result(timeout=5)

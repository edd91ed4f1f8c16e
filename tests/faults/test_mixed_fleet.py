"""A rolling upgrade: workers of the previous version (kombu's own transport) and of this one share a Redis.

Each kind puts back what the other held when it died, through kombu's visibility-timeout sweep:
the old workers read the new records (queue as routing key), the new workers read kombu's.
"""

from __future__ import annotations

import time

import pytest

from contract.names import model_queue
from producer import RerankClient
from tests.helpers import (
    FAST,
    QUERY,
    VISIBILITY_TIMEOUT,
    assert_same_ranking,
    kill_tree,
    long_papers,
    started,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("dies", ["old", "new"])
def test_a_message_held_by_either_kind_of_worker_comes_back_when_it_dies(dies, fleet, fault_settings, reference):
    # Given a worker of the previous version and one of this version on the same Redis
    queue = model_queue(fault_settings.model)
    old = fleet.start("-c", "1", f"--queues={queue}", env=FAST, name="old", app="tests.faults.kombu_transport_app")
    new = fleet.start("-c", "1", env=FAST, name="new")
    old.wait_until_loaded(processes=1)
    new.wait_until_loaded(processes=1)
    client = RerankClient(fault_settings)
    candidates = long_papers(150)
    # When the kind under test runs a job and is SIGKILLed mid-task
    busy = old if dies == "old" else new
    while True:
        handle = client.submit_documents(QUERY, candidates, top_k=10)
        meta = wait_for(lambda: started(client, handle.id), 30, "the job to start")
        if meta["hostname"].startswith(busy.log.stem + "@"):
            break
        handle.result(timeout=60)  # the other kind took it: send again until the one under test does
    killed_at = time.monotonic()
    kill_tree(busy.process.pid)
    # Then the other kind puts it back and runs it, with the right ranking
    result = handle.result(timeout=VISIBILITY_TIMEOUT + 60)
    assert_same_ranking(result, reference(QUERY, candidates, 10))
    assert not result.info.worker.startswith(busy.log.stem + "@")
    assert time.monotonic() - killed_at < VISIBILITY_TIMEOUT + 40

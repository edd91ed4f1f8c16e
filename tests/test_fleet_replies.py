"""What workers answer a broadcast is read as hostile: anyone who can write to the broker can forge a reply."""

from __future__ import annotations

from typing import Any

import pytest

from producer.fleet import merge_replies

REAL = {
    "queues": {"gpu0@h": [{"name": "rerank.m"}]},
    "stats": {"gpu0@h": {"pool": {"max-concurrency": 1}, "pid": 7, "uptime": 3, "total": {"rerank.documents": 2}}},
    "registered": {"gpu0@h": ["rerank.documents"]},
    "reports": {},
}

FORGED: dict[str, dict[str, Any]] = {
    "queues are a string": {"queues": {"evil@h": "rerank.m"}},
    "a queue without a name": {"queues": {"evil@h": [{"nom": "x"}]}},
    "a queue that is a number": {"queues": {"evil@h": [5]}},
    "stats are a list": {"stats": {"evil@h": [1, 2]}},
    "pool is a string": {"stats": {"evil@h": {"pool": "prefork"}}},
    "totals are a list": {"stats": {"evil@h": {"total": [1, 2]}}},
    "totals are strings": {"stats": {"evil@h": {"total": {"a": "many"}}}},
    "pid is a dict": {"stats": {"evil@h": {"pid": {"x": 1}}}},
    "registered is a number": {"registered": {"evil@h": 12}},
    "registered holds objects": {"registered": {"evil@h": [{"a": 1}]}},
    "a report that is a list": {"queues": {"evil@h": []}, "reports": {"evil@h": [1]}},
    "the whole reply is a list": {"stats": [1, 2, 3]},
}


@pytest.mark.parametrize("case", FORGED)
def test_a_forged_reply_is_left_out_and_the_real_workers_are_listed(case):
    # Given the replies of a real worker, and a forged one beside it
    replies = {key: dict(value) if isinstance(value, dict) else value for key, value in REAL.items()}
    for key, value in FORGED[case].items():
        replies[key] = {**replies[key], **value} if isinstance(value, dict) else value
    # When they are merged, Then the real worker is listed as it answered, and nothing raised
    workers = merge_replies(replies["queues"], replies["stats"], replies["registered"], replies["reports"])
    real = [w for w in workers if w.name == "gpu0@h"]
    if case != "the whole reply is a list":
        assert real and real[0].queues == ["rerank.m"] and real[0].processes == 1 and real[0].tasks_done == 2
    assert all(w.name in ("gpu0@h", "evil@h") for w in workers)

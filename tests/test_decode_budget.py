"""What decoding untrusted bytes may cost: `contract.plain.cost` measures a value before anything is built.

No Redis here: the bytes are what anyone who writes Redis could store at a result key.
"""

from __future__ import annotations

import json

import pytest

import contract.plain as plain
from contract.errors import InvalidRequest
from contract.plain import Budget, cost, plain_json

BUDGET = Budget(values=200, string=1000)


def result(ids: list[str]) -> bytes:
    """A stored success as a worker writes it (kombu's JSON: ASCII, non-ASCII escaped)."""
    items = [{"index": n, "id": i, "score": 0.5, "logit": None, "doc_id": None} for n, i in enumerate(ids)]
    meta = {"status": "SUCCESS", "result": {"stage": "chunks", "query": "q", "items": items, "scored": len(ids)}, "traceback": None}
    return json.dumps(meta).encode()


@pytest.mark.parametrize(
    "ids",
    [
        ["p1", "p2", "p3"],
        ["😀" * 80] * 10,  # astral ids, escaped to 12 bytes a character: they shrink when decoded
        ["a,b:c{d}[e]" * 9] * 10,  # ids full of the characters that separate values elsewhere
        ['quote " and backslash \\ and \\"'] * 10,
    ],
    ids=["plain", "astral", "separators-in-ids", "escapes"],
)
def test_results_a_worker_writes_pass(ids):
    # Given a result of ten items as a worker stores it, When it is measured, Then it passes and decodes
    raw = result(ids)
    assert cost(raw, BUDGET) is None
    assert plain_json(raw, "it", budget=BUDGET)["result"]["items"][0]["id"] == ids[0]


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"[" + b"{}," * 300 + b"{}]", "more than 200 values"),
        (b'[{"":0},' * 100 + b"0" + b"]" * 100, "more than 200 values"),
        (b"[" + b"0," * 250 + b"0]", "more than 200 values"),
        (b'["' + b"a" * 1001 + b'"]', "a string of"),
        (b'["' + b"a" * 999 + b'\\"' + b"a" * 50 + b'"]', "a string of"),  # an escaped quote does not end it
        (b'"' + b"\\\\" * 600 + b'"', "a string of"),
        (b"[" + (b'"\\ud83d\\ude00' + b"a" * 900 + b'", ') * 20 + b'"x"]', "would take"),  # one astral character widens 900 ASCII ones
        (b"[" + ("é".encode() + b"\xf0\x9f\x98\x80" + b"a" * 900).join([b'"', b'", "']) + b'"]', "would take"),  # raw UTF-8, not escaped
    ],
    ids=["empty-objects", "nested", "numbers", "long-string", "escaped-quote", "backslashes", "escaped-astral", "raw-astral"],
)
def test_values_that_would_cost_more_than_a_result_can_are_refused_unbuilt(raw, problem):
    # Given bytes whose decoding would build more than any result within the budget
    # When they are decoded with that budget, Then they are refused, naming why, before anything is built
    assert problem in (cost(raw, BUDGET) or "")
    with pytest.raises(InvalidRequest, match=problem):
        plain_json(raw, "the stored value", budget=BUDGET)


def test_the_whole_is_measured_in_steps_and_a_mark_across_a_step_still_counts(monkeypatch):
    # Given steps of 7 bytes, and one escaped astral character among ASCII strings
    monkeypatch.setattr(plain, "STEP", 7)
    wide = b"[" + (b'"\\ud83d\\ude00' + b"a" * 900 + b'", ') * 20 + b'"x"]'
    # Then the escapes are found across step boundaries and the widening refused, as with one step
    assert "would take" in cost(wide, BUDGET)
    assert cost(result(["p1", "😀"]), BUDGET) is None


def test_without_a_budget_nothing_is_measured():
    # Given a value far over any budget, decoded without one (queue items, bookkeeping), Then it decodes as before
    assert len(plain_json(b"[" + b"0," * 999 + b"0]", "it")) == 1000

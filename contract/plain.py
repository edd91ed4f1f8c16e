"""Reading untrusted bytes: one bounded plain-JSON decoder, and one short repr for naming what was read.

Anyone who can write to Redis writes queue items, kombu's bookkeeping, results and
announcements; every reader of them decodes here. Plain means: JSON as it is written, not
NaN or Infinity, no lone surrogates, no deeper than a bound, and no object that kombu's decoder
would turn into bytes, a datetime, a UUID or a decimal (`{"__type__": ..., "__value__": ...}`).

Decoding costs memory: a JSON value of a few bytes (`{},`) becomes a Python object of 64, and a
string holding one astral character takes 4 bytes for each of its characters. With a `Budget`
the bytes are measured before anything is built (`cost`), and refused when they hold more values
than that or strings that would take more than WIDENING times the size of the whole; what passes
costs at most about WIDENING times its size plus VALUE_COST bytes per value. The measuring runs
in steps of a few megabytes, so a thread doing it lets the others (an event loop) run between.
"""

from __future__ import annotations

import math
import re
import reprlib
from typing import Any, NamedTuple

from pydantic_core import from_json

from contract.errors import InvalidRequest

MAX_DEPTH = 64
"""How deeply anything read back from Redis may nest by default: our own values nest at most 8 deep."""

VALUE_COST = 96
"""Bytes of Python objects the decoder builds per JSON value at most, strings' characters aside (`[{"":{}}]`: 73)."""

WIDENING = 1.5
"""How many times the size of the bytes their strings may take once decoded (escaped astral characters: 1/3)."""

STEP = 4 << 20
"""Bytes measured per call into C: a few milliseconds each."""


class Budget(NamedTuple):
    """What decoding one value may build: at most `values` JSON values, no string longer than `string` bytes."""

    values: int
    string: int


def plain_json(
    raw: bytes | bytearray | memoryview | str, what: str, *, max_bytes: int | None = None, max_depth: int = MAX_DEPTH, budget: Budget | None = None
) -> Any:
    """Decode `raw` as plain JSON data, at most `max_depth` deep and `max_bytes` long, within `budget` (bytes only).

    Raises:
        InvalidRequest: (a ValueError) naming `what`: not JSON, not UTF-8, too large, too costly, too deep, or not plain.
    """
    if max_bytes is not None and len(raw) > max_bytes:
        raise InvalidRequest(f"{what} is {len(raw):,} bytes, over the {max_bytes:,} it can be")
    if budget is not None and not isinstance(raw, str):
        problem = cost(raw, budget)
        if problem is not None:
            raise InvalidRequest(f"{what} {problem}")
    try:
        data = from_json(raw, allow_inf_nan=False)
    except ValueError as e:  # pydantic_core's parser has its own recursion bound, far below the interpreter's
        raise InvalidRequest(f"{what} is not JSON: {str(e)[:200]}") from None
    problem = impurity(data, max_depth)
    if problem is not None:
        raise InvalidRequest(f"{what} {problem}")
    return data


def cost(raw: bytes | bytearray | memoryview, budget: Budget) -> str | None:
    """Why decoding `raw` could overrun `budget` or build strings over WIDENING times its size, or None.

    Counts bytes only, building nothing: over the whole first (a few C-speed counts), and string
    by string when that cannot tell (ids full of commas, an astral character among ASCII strings)
    or when `raw` is longer than the longest string allowed.
    """
    data = bytes(raw) if isinstance(raw, memoryview) else raw
    size = len(data)
    values = 1 + sum(_count(data, mark) for mark in (b"{", b"[", b",", b":"))
    escapes = _count(data, b"\\u")
    characters = size - 5 * max(0, escapes - _count(data, b"\\\\"))
    plain = escapes == 0 and all(data[n : n + STEP].isascii() for n in range(0, size, STEP))
    if size <= budget.string and values <= budget.values and (plain or 4 * characters <= WIDENING * size):
        return None
    values, strings, longest = _walk(data, budget)
    if values > budget.values:
        return f"holds more than {budget.values:,} values, more than any value written within the limits"
    if longest > budget.string:
        return f"holds a string of {longest:,} bytes, longer than any written within the limits ({budget.string:,})"
    if strings > WIDENING * size:
        return f"holds strings that would take {strings:,} bytes decoded, over {WIDENING:g} times its size"
    return None


def _count(data: bytes | bytearray, mark: bytes, start: int = 0, end: int | None = None) -> int:
    """`data.count(mark, start, end)` in steps of STEP bytes; a 2-byte mark across a step's end counts too."""
    end = len(data) if end is None else end
    found = 0
    for low in range(start, end, STEP):
        high = min(low + STEP, end)
        found += data.count(mark, low, high)
        if len(mark) == 2 and high < end and data[high - 1 : high + 1] == mark:
            found += 1
    return found


def _walk(data: bytes | bytearray, budget: Budget) -> tuple[int, int, int]:
    """The values outside strings (counted to just past the budget), the bytes the strings decode to at most, the longest string."""
    values, strings, longest, position, size = 1, 0, 0, 0, len(data)
    while position < size and values <= budget.values and longest <= budget.string:
        opening = data.find(b'"', position, position + STEP)
        gap_end = min(size, position + STEP) if opening < 0 else opening
        values += sum(data.count(mark, position, gap_end) for mark in (b"{", b"[", b",", b":"))
        if opening < 0:
            position = gap_end
            continue
        closing = _closing_quote(data, opening, budget.string)
        if closing < 0:  # longer than allowed, or unterminated (the decoder stops there)
            longest = max(longest, min(size, opening + budget.string + 2) - opening - 1)
            break
        length = closing - opening - 1
        longest = max(longest, length)
        escapes = data.count(b"\\u", opening, closing)
        if escapes or _NOT_ASCII.search(data, opening, closing):
            # At most 4 bytes a character (an astral one widens the whole string); each \uXXXX is 6 bytes for 1.
            strings += 4 * max(1, length - 5 * max(0, escapes - data.count(b"\\\\", opening, closing)))
        else:
            strings += length
        position = closing + 1
    return values, strings, longest


def _closing_quote(data: bytes | bytearray, opening: int, most: int) -> int:
    """The index of the quote that ends the string opening at `opening`, or -1 if not within `most` bytes."""
    start, limit = opening + 1, opening + most + 2
    while True:
        quote = data.find(b'"', start, limit)
        if quote < 0:
            return -1
        if _backslashes_before(data, start, quote) % 2 == 0:  # not escaped by an odd run of backslashes
            return quote
        start = quote + 1


def _backslashes_before(data: bytes | bytearray, start: int, end: int) -> int:
    """How many backslashes end `data[start:end]`, copying little more than them."""
    window = 64
    while True:
        low = max(start, end - window)
        tail = data[low:end]
        run = len(tail) - len(tail.rstrip(b"\\"))
        if run < len(tail) or low == start:
            return run
        window *= 4


_NOT_ASCII = re.compile(rb"[\x80-\xff]")


def impurity(data: Any, max_depth: int = MAX_DEPTH) -> str | None:
    """Why decoded `data` is not plain JSON data at most `max_depth` deep (a clause starting with "is" or "nests"), or None."""
    level, frontier = 0, [data]
    while frontier:  # iterative on purpose: a recursive walk would itself overflow on hostile input
        level += 1
        if level > max_depth:
            return f"nests deeper than {max_depth} levels"
        children: list[Any] = []
        for value in frontier:
            if isinstance(value, dict):
                if "__type__" in value and "__value__" in value:
                    return "holds a kombu-typed object (`__type__`/`__value__`), which this service never writes"
                if not all(isinstance(key, str) for key in value):
                    return "has an object key that is not a string"
                children.extend(value.values())
            elif isinstance(value, (list, tuple)):
                children.extend(value)
            elif isinstance(value, float) and not math.isfinite(value):
                return f"holds {value}, which JSON has no number for"
            elif not isinstance(value, (str, int, float, bool, type(None))):
                return f"holds a {type(value).__name__}, which plain JSON cannot"
        frontier = children
    return None


_BOUNDED = reprlib.Repr()  # keyword arguments only from Python 3.12
_BOUNDED.maxlevel, _BOUNDED.maxstring, _BOUNDED.maxlong, _BOUNDED.maxother = 3, 120, 120, 120


def short(value: Any, most: int = 80) -> str:
    """`repr(value)` cut to `most` characters with an ellipsis, never building more of it: for naming untrusted values."""
    text = _BOUNDED.repr(value)
    return text if len(text) <= most else f"{text[:most]}…"

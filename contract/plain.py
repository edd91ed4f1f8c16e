"""Reading untrusted bytes: one bounded plain-JSON decoder, and one short repr for naming what was read.

Anyone who can write to Redis writes queue items, kombu's bookkeeping, results and
announcements; every reader of them decodes here. Plain means: JSON as it is written, not
NaN or Infinity, no lone surrogates, no deeper than a bound, and no object that kombu's decoder
would turn into bytes, a datetime, a UUID or a decimal (`{"__type__": ..., "__value__": ...}`).
"""

from __future__ import annotations

import reprlib
from typing import Any

from pydantic_core import from_json

from contract.errors import InvalidRequest

MAX_DEPTH = 64
"""How deeply anything read back from Redis may nest by default: our own values nest at most 8 deep."""


def plain_json(raw: bytes | bytearray | memoryview | str, what: str, *, max_bytes: int | None = None, max_depth: int = MAX_DEPTH) -> Any:
    """Decode `raw` as plain JSON data, at most `max_depth` deep and `max_bytes` long.

    Raises:
        InvalidRequest: (a ValueError) naming `what`: not JSON, not UTF-8, too large, too deep, or not plain.
    """
    if max_bytes is not None and len(raw) > max_bytes:
        raise InvalidRequest(f"{what} is {len(raw):,} bytes, over the {max_bytes:,} it can be")
    try:
        data = from_json(raw, allow_inf_nan=False)
    except ValueError as e:  # pydantic_core's parser has its own recursion bound, far below the interpreter's
        raise InvalidRequest(f"{what} is not JSON: {str(e)[:200]}") from None
    problem = impurity(data, max_depth)
    if problem is not None:
        raise InvalidRequest(f"{what} {problem}")
    return data


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

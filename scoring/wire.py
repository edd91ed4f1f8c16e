"""The device channel's messages: one type per op, framed as a JSON header, a NUL byte, then a binary payload.

Host processes send `Buffer` (once per shared buffer, its descriptor following over the socket),
`Score` (a request whose token ids wait in that buffer) and `Cancel`. The device process sends
`Hello` (its model's facts) once, then `Progress`, `Done` (logits as float32 in the payload) or
`Failed` per request. A header is decoded into its type or refused: a field of the wrong type,
a number out of range, an unknown op or a header past `HEADER_LIMIT` raises `ValueError`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from scoring.facts import ModelFacts

HEADER_LIMIT = 4096
"""Largest header a message may carry before its payload."""

MAX_BUFFER_BYTES = 1 << 34
"""Largest shared buffer a host process may hand over (16 GiB: more ids than any request holds)."""

Ident = Annotated[int, Meta(ge=1, le=2**62)]
Count = Annotated[int, Meta(ge=0, le=2**40)]


class Buffer(msgspec.Struct, frozen=True, tag="buffer"):
    """Host to device: the memory file whose descriptor follows holds this host's token ids from now on."""

    size: Annotated[int, Meta(ge=1, le=MAX_BUFFER_BYTES)]


class Score(msgspec.Struct, frozen=True, tag="score"):
    """Host to device: score `count` pairs whose `tokens` ids (and type ids, with `types`) are in the buffer; due in `seconds`."""

    id: Ident
    count: Annotated[int, Meta(ge=1, le=2**31)]
    tokens: Annotated[int, Meta(ge=1, le=2**40)]
    types: bool
    seconds: Annotated[float, Meta(gt=0, le=10**7)]


class Cancel(msgspec.Struct, frozen=True, tag="cancel"):
    """Host to device: the host stopped waiting for request `id`."""

    id: Ident


class Hello(msgspec.Struct, frozen=True, tag="hello"):
    """Device to host, once per connection: the model it serves."""

    facts: ModelFacts


class Progress(msgspec.Struct, frozen=True, tag="progress"):
    """Device to host: `done` of `total` unique pairs of request `id` are scored."""

    id: Ident
    done: Count
    total: Count


class Done(msgspec.Struct, frozen=True, tag="done"):
    """Device to host: request `id` is scored; its unique pairs' logits (float32) are the payload."""

    id: Ident
    padded: Count
    batches: Count
    splits: Count
    memory: dict[str, int | str] = {}
    """What PyTorch holds on the GPU now (scoring.runner.device_memory); empty on a CPU."""


class Failed(msgspec.Struct, frozen=True, tag="failed"):
    """Device to host: request `id` failed; `timeout` when it ran past its deadline or was cancelled."""

    id: Ident
    kind: Literal["timeout", "error"]
    message: str


ToDevice = Buffer | Score | Cancel
FromDevice = Hello | Progress | Done | Failed

_encoder = msgspec.json.Encoder()
_to_device = msgspec.json.Decoder(ToDevice)
_from_device = msgspec.json.Decoder(FromDevice)


def frame(message: ToDevice | FromDevice, payload: bytes = b"") -> bytes:
    """One message as it crosses the socket: its JSON header, a NUL byte, its payload."""
    return _encoder.encode(message) + b"\0" + payload


def to_device(raw: bytes) -> tuple[ToDevice, memoryview]:
    """Read a host's message; `ValueError` when it is not one of `ToDevice`, well typed and in range."""
    return _read(raw, _to_device)


def from_device(raw: bytes) -> tuple[FromDevice, memoryview]:
    """Read the device process's message; `ValueError` when it is not one of `FromDevice`."""
    return _read(raw, _from_device)


def _read(raw: bytes, decoder: msgspec.json.Decoder) -> tuple[ToDevice | FromDevice, memoryview]:
    cut = raw.find(b"\0", 0, HEADER_LIMIT)
    if cut < 0:
        raise ValueError(f"a message without a header of at most {HEADER_LIMIT} bytes")
    try:
        message = decoder.decode(raw[:cut])
    except msgspec.DecodeError as e:  # a ValidationError is a DecodeError
        raise ValueError(f"an unreadable header: {e}") from None
    return message, memoryview(raw)[cut + 1 :]

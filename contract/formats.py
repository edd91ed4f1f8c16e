"""What the cross-encoder reads, and what travels to the workers: the passage formats, the
stage-1 window, the chunk pool of a two-stage job, and the stage-1 and stage-2 messages.

Producers cut texts with these and workers format them with these, so the two cannot drift.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from contract.chunking import DEFAULT_MAX_CHARS, chunk_text
from contract.schemas import (
    Candidate,
    Chunk,
    ChunksRequest,
    DocumentsRequest,
    PassagesRequest,
)

WINDOW_CHARS = 1500
"""Characters of a paper's text that stage 1 reads per window (the first window is the abstract)."""

WINDOW_OVERLAP = 200
"""Characters each further stage-1 window shares with the one before it."""


def document_passage(paper: Candidate) -> str:
    """Stage 1: the title, a blank line, and the first window of the text."""
    return f"Title: {paper.title}\n\n{paper.text[:WINDOW_CHARS]}"


def chunk_passage(chunk: Chunk) -> str:
    """Stage 2: title, section (or N/A), a blank line, and the chunk's text."""
    return f"Title: {chunk.title}\nSection: {chunk.section or 'N/A'}\n\n{chunk.text}"


def text_windows(text: str, windows: int) -> list[str]:
    """Return up to `windows` slices of `text`, WINDOW_CHARS long, each overlapping the previous by WINDOW_OVERLAP.

    The first window is always ``text[:WINDOW_CHARS]``, so ``windows=1`` scores the abstract
    alone; a window is only added while it reaches text the previous one did not cover.
    """
    stride = WINDOW_CHARS - WINDOW_OVERLAP
    starts = [0] + [k * stride for k in range(1, windows) if k * stride + WINDOW_OVERLAP < len(text)]
    return [text[start : start + WINDOW_CHARS] for start in starts]


def windows_extent(windows: int) -> int:
    """How many leading characters of a text `text_windows(text, windows)` can read at most."""
    return (windows - 1) * (WINDOW_CHARS - WINDOW_OVERLAP) + WINDOW_CHARS


def chunk_pool(candidates: Iterable[Candidate], chunk_chars: int = DEFAULT_MAX_CHARS) -> list[Chunk]:
    """Every candidate's chunks in order, splitting a text that came without chunks; stage 2 scores these."""
    pool: list[Chunk] = []
    for paper in candidates:
        if paper.chunks:
            pieces = [(c.id, c.section, c.text) for c in paper.chunks]
        else:
            pieces = [(None, c.section, c.text) for c in chunk_text(paper.text, chunk_chars)]
        for n, (chunk_id, section, text) in enumerate(pieces):
            pool.append(Chunk(id=chunk_id or f"{paper.id}#{n}", doc_id=paper.id, title=paper.title, section=section, text=text))
    return pool


def chunk_digest(chunk: Chunk, position: int) -> str:
    """16 hex digits naming `chunk` at `position` of a pool: its place, id, paper, title, section and text.

    A two-stage job sends one per chunk (`ChunksRequest.digests`), so stage 2 can check that
    the chunk it scores for a place is the one the producer put there.
    """
    digest = hashlib.blake2b(digest_size=8)
    for field in (str(position), chunk.id, chunk.doc_id, chunk.title, chunk.section, chunk.text):
        # Each field after its length, so no two chunks' fields run together into the same bytes.
        encoded = b"\xff" if field is None else field.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "big"))
        digest.update(encoded)
    return digest.hexdigest()


def stage1_message(request: DocumentsRequest) -> dict[str, Any]:
    """The stage-1 task's argument: only what stage 1 reads (no chunks or metadata, texts cut to their windows)."""
    exclude: dict[str, Any] = {"candidates": {"__all__": {"chunks", "metadata"}}}
    # Unset fields left out, so workers that predate a field (the truncation controls) still read it.
    message = request.model_dump(mode="json", exclude=exclude, exclude_none=True)
    extent = windows_extent(request.windows)
    for candidate in message["candidates"]:
        candidate["text"] = candidate["text"][:extent]
    return message


def stage2_message(request: ChunksRequest) -> dict[str, Any]:
    """The stage-2 task's request: unset fields left out, so workers that predate a field still read it."""
    return request.model_dump(mode="json", exclude_none=True)


def passages_message(request: PassagesRequest) -> dict[str, Any]:
    """The plain-passages task's request: unset fields left out, as in `stage2_message`."""
    return request.model_dump(mode="json", exclude_none=True)

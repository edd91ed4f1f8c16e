"""Default chunker: split a paper's text into section-aware passages for stage 2."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_MAX_CHARS = 1200

# Markdown headings ("## Methods") and structured-abstract labels ("RESULTS:" on its own or
# leading a paragraph), the two ways papers in our pipeline mark their sections.
_MARKDOWN_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(?P<name>.+?)\s*#*\s*$")
_LABEL = re.compile(r"^\s*(?P<name>[A-Z][A-Z /&-]{2,40}):\s*(?P<rest>.*)$", re.DOTALL)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


@dataclass(frozen=True)
class TextChunk:
    """A passage of a paper and the section it belongs to (None when the text has none)."""

    section: str | None
    text: str


def chunk_text(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[TextChunk]:
    """Pack paragraphs (or sentences of long paragraphs) into chunks of at most `max_chars`.

    Chunks never span two sections; a single sentence longer than `max_chars` is split
    on whitespace.
    """
    if max_chars < 50:
        raise ValueError(f"max_chars={max_chars} is too small to hold a sentence; use 50 or more")
    chunks: list[TextChunk] = []
    for section, paragraphs in _sections(text):
        pieces = [p for para in paragraphs for p in _fit(para, max_chars)]
        chunks.extend(TextChunk(section, body) for body in _pack(pieces, max_chars))
    return chunks


def _sections(text: str) -> list[tuple[str | None, list[str]]]:
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip().splitlines()
        if not lines:
            continue
        heading = _MARKDOWN_HEADING.match(lines[0])
        label = _LABEL.match(block.strip())
        if heading:
            sections.append((heading.group("name"), []))
            block = "\n".join(lines[1:])
        elif label:
            sections.append((label.group("name").strip().title(), []))
            block = label.group("rest")
        paragraph = " ".join(block.split())
        if paragraph:
            sections[-1][1].append(paragraph)
    return [(name, paras) for name, paras in sections if paras]


def _fit(paragraph: str, max_chars: int) -> list[str]:
    if len(paragraph) <= max_chars:
        return [paragraph]
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(paragraph):
        while len(sentence) > max_chars:
            cut = sentence.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            pieces.append(sentence)
    return pieces


def _pack(pieces: list[str], max_chars: int) -> list[str]:
    packed: list[str] = []
    for piece in pieces:
        if packed and len(packed[-1]) + 1 + len(piece) <= max_chars:
            packed[-1] = f"{packed[-1]} {piece}"
        else:
            packed.append(piece)
    return packed

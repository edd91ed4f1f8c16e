"""How papers and chunks become the passage text the cross-encoder reads (the seed's formats)."""

from producer.schemas import Candidate, Chunk

ABSTRACT_CHARS = 1500


def document_passage(paper: Candidate) -> str:
    """Stage 1: the title and the first 1500 characters of the abstract."""
    return f"Title: {paper.title}\n\n{paper.text[:ABSTRACT_CHARS]}"


def chunk_passage(chunk: Chunk) -> str:
    """Stage 2: title, section (or N/A) and the chunk's text."""
    return f"Title: {chunk.title}\nSection: {chunk.section or 'N/A'}\n\n{chunk.text}"

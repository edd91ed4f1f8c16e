"""The default chunker used for papers that arrive without chunks."""

from contract.chunking import chunk_text

SECTIONED = """BACKGROUND: Chronic kidney disease raises bleeding risk. It also raises stroke risk.

## Methods

We searched three databases. Two reviewers screened records.

## Results

Twelve trials met the criteria."""


def test_sections_are_detected_and_never_mixed():
    chunks = chunk_text(SECTIONED, max_chars=1000)
    assert [c.section for c in chunks] == ["Background", "Methods", "Results"]
    assert chunks[1].text == "We searched three databases. Two reviewers screened records."


def test_long_paragraphs_split_at_sentences_within_the_limit():
    text = " ".join(f"Sentence number {i} reports a hazard ratio of 0.{i:02d}." for i in range(60))
    chunks = chunk_text(text, max_chars=300)
    assert all(len(c.text) <= 300 for c in chunks)
    assert all(c.text.endswith(".") for c in chunks)
    assert " ".join(c.text for c in chunks) == text


def test_text_without_sections_gives_section_none():
    assert [c.section for c in chunk_text("Plain text.\n\nMore text.")] == [None]


def test_a_sentence_longer_than_the_limit_is_cut_on_whitespace():
    chunks = chunk_text("word " * 200, max_chars=100)
    assert all(len(c.text) <= 100 for c in chunks) and len(chunks) >= 10

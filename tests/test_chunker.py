"""Layer 1: the speakable-chunk splitter, pure, table-driven."""

from __future__ import annotations

import pytest

from s2s.pipeline.chunker import ChunkerOptions, SpeakableChunker, split_text

WHOLE_TEXT_CASES = [
    # (name, text, expected chunks)
    ("two sentences", "Hello there. How are you?", ["Hello there.", "How are you?"]),
    ("title abbreviation", "Dr. Smith is in. Call him.", ["Dr. Smith is in.", "Call him."]),
    (
        "latin abbreviation",
        "Take one, e.g. an apple, i.e. a fruit. Then eat.",
        ["Take one, e.g. an apple,", "i.e. a fruit.", "Then eat."],
    ),
    ("decimal number", "Pi is about 3.14 today. Yes.", ["Pi is about 3.14 today.", "Yes."]),
    (
        "thousands separator",
        "It costs 1,000,000 dollars now. Wow.",
        ["It costs 1,000,000 dollars now.", "Wow."],
    ),
    (
        "url",
        "See https://example.com/a.b?x=1 for more. Thanks.",
        ["See https://example.com/a.b?x=1 for more.", "Thanks."],
    ),
    ("closing quote", 'He said "stop." Then he left.', ['He said "stop."', "Then he left."]),
    ("ellipsis", "Well... I think so. Maybe.", ["Well...", "I think so.", "Maybe."]),
    ("initials", "J. K. Rowling wrote it. True.", ["J. K. Rowling wrote it.", "True."]),
    ("remainder flushed", "No final punctuation", ["No final punctuation"]),
    ("newline", "First line\nSecond line", ["First line", "Second line"]),
    (
        "first chunk at clause",
        "The capital of France, as you know, is Paris. It is big.",
        ["The capital of France,", "as you know, is Paris.", "It is big."],
    ),
    ("short clause not cut", "Yes, it is Paris. Good.", ["Yes, it is Paris.", "Good."]),
    ("empty", "", []),
    ("whitespace only", "   \n  ", []),
]


@pytest.mark.parametrize(
    ("name", "text", "expected"), WHOLE_TEXT_CASES, ids=[case[0] for case in WHOLE_TEXT_CASES]
)
def test_split_whole_text(name: str, text: str, expected: list[str]) -> None:
    """Each table row: the text splits into exactly the expected chunks."""
    assert split_text(text) == expected


@pytest.mark.parametrize(
    ("name", "text", "expected"), WHOLE_TEXT_CASES, ids=[case[0] for case in WHOLE_TEXT_CASES]
)
def test_streaming_one_character_at_a_time_matches_whole_text(
    name: str, text: str, expected: list[str]
) -> None:
    """Deltas of any size give the same chunks as the whole text at once."""
    chunker = SpeakableChunker()
    chunks = [chunk for char in text for chunk in chunker.push(char)] + chunker.finish()
    assert chunks == expected


def test_first_chunk_is_emitted_before_the_sentence_ends() -> None:
    """A clause boundary releases the first chunk while the sentence is still streaming."""
    chunker = SpeakableChunker()
    assert chunker.push("Sure thing, my friend") == []
    assert chunker.push(", the answer") == ["Sure thing, my friend,"]
    assert chunker.push(" is 42") == []  # later chunks wait for a sentence end
    assert chunker.finish() == ["the answer is 42"]


def test_decimal_waits_for_lookahead() -> None:
    """'3.' at the end of a delta is not cut until the next character shows it is '3.5'."""
    chunker = SpeakableChunker()
    assert chunker.push("It weighs 3.") == []
    assert chunker.push("5 kilograms. Next") == ["It weighs 3.5 kilograms."]


def test_long_first_sentence_is_cut_at_a_word_boundary() -> None:
    """With no boundary in sight, the first chunk is cut after first_chunk_max_words words."""
    chunker = SpeakableChunker(ChunkerOptions(first_chunk_max_words=4))
    assert chunker.push("one two three fou") == []
    assert chunker.push("r fi") == ["one two three four"]


def test_only_the_first_chunk_is_cut_at_clauses() -> None:
    """After the first chunk, commas do not cut; sentence ends do."""
    assert split_text("Hi there, friend of mine. One, two, three and four. End.") == [
        "Hi there, friend of mine.",
        "One, two, three and four.",
        "End.",
    ]

"""Speakable chunks from a stream of LLM text deltas (pure: no threads, no I/O).

TTS wants whole clauses: speaking word by word sounds broken, waiting for the whole reply
wastes seconds. So text is cut at sentence ends, and the *first* chunk of a reply may be cut
earlier, at a clause boundary (a comma, a semicolon, a colon or a dash) once it has a few words,
because the first chunk is what the user waits for.

A boundary counts only when the character after it is whitespace, which is why "3.5",
"1,000,000", "example.com/a.b" and "e.g.," never split: the decision waits for one character of
lookahead, and ``finish()`` flushes whatever remains.
"""

from __future__ import annotations

from dataclasses import dataclass

SENTENCE_ENDS = frozenset(".!?…")
CLAUSE_ENDS = frozenset(",;:—")
CLOSERS = frozenset("\"')]}»”’")
"""Characters that may follow a boundary and still belong to the chunk before it."""

ABBREVIATIONS = frozenset(
    {
        "dr",
        "mr",
        "mrs",
        "ms",
        "prof",
        "sr",
        "jr",
        "st",
        "mt",
        "vs",
        "etc",
        "e.g",
        "i.e",
        "a.m",
        "p.m",
        "u.s",
        "u.k",
        "no",
        "fig",
        "approx",
        "inc",
        "ltd",
        "co",
        "dept",
        "ca",
    }
)
"""Words that end with a period without ending a sentence (lower case, final period removed)."""


@dataclass(frozen=True, slots=True)
class ChunkerOptions:
    first_chunk_min_words: int = 3
    """A clause boundary ends the first chunk only once it holds at least this many words."""
    first_chunk_max_words: int = 7
    """Past this many words with no boundary, the first chunk is cut at the last whole word,
    so a long opening sentence does not hold back the first audio."""


class SpeakableChunker:
    """Feed deltas with ``push``; collect chunks from ``push`` and ``finish``.

    One instance per reply. Not thread-safe (one LLM stream drives it).
    """

    def __init__(self, options: ChunkerOptions | None = None) -> None:
        self._options = options if options is not None else ChunkerOptions()
        self._buffer = ""
        self._chunks_emitted = 0

    def push(self, delta: str) -> list[str]:
        """Add text; return the chunks it completed (often none)."""
        self._buffer += delta
        chunks: list[str] = []
        while (cut := self._next_cut()) is not None:
            chunk, self._buffer = self._buffer[:cut].strip(), self._buffer[cut:]
            if chunk:
                chunks.append(chunk)
                self._chunks_emitted += 1
        return chunks

    def finish(self) -> list[str]:
        """Flush the remainder at the end of the reply."""
        rest, self._buffer = self._buffer.strip(), ""
        if not rest:
            return []
        self._chunks_emitted += 1
        return [rest]

    # --- boundary search ------------------------------------------------------------------

    def _next_cut(self) -> int | None:
        text = self._buffer
        first = self._chunks_emitted == 0
        for index, char in enumerate(text):
            if char == "\n" and text[:index].strip():
                return index + 1
            is_sentence_end = char in SENTENCE_ENDS
            if not is_sentence_end and not (first and char in CLAUSE_ENDS):
                continue
            end = self._boundary_end(text, index)
            if end is None:
                continue
            if is_sentence_end and char == "." and self._is_abbreviation(text, index):
                continue
            if (
                not is_sentence_end
                and _word_count(text[:index]) < self._options.first_chunk_min_words
            ):
                continue
            return end
        if first:
            return self._forced_first_cut(text)
        return None

    @staticmethod
    def _boundary_end(text: str, index: int) -> int | None:
        """Index just past the boundary at ``index`` if whitespace follows it, else None."""
        end = index + 1
        while end < len(text) and (text[end] in SENTENCE_ENDS or text[end] in CLOSERS):
            end += 1
        if end >= len(text):
            return None  # no lookahead yet: "3." may become "3.5"
        return end if text[end].isspace() else None

    @staticmethod
    def _is_abbreviation(text: str, index: int) -> bool:
        start = index
        while start > 0 and not text[start - 1].isspace():
            start -= 1
        word = text[start:index].lower().lstrip("\"'([{«“‘")
        if word in ABBREVIATIONS:
            return True
        # A single letter ("J. K. Rowling") is an initial, not a sentence.
        return len(word) == 1 and word.isalpha() and word != "i"

    def _forced_first_cut(self, text: str) -> int | None:
        words = text.split()
        # More words than the limit means the limit's last word is followed by space: whole.
        if len(words) <= self._options.first_chunk_max_words:
            return None
        cut = 0
        for _ in range(self._options.first_chunk_max_words):
            while text[cut].isspace():
                cut += 1
            while cut < len(text) and not text[cut].isspace():
                cut += 1
        return cut


def _word_count(text: str) -> int:
    return len(text.split())


def split_text(text: str, options: ChunkerOptions | None = None) -> list[str]:
    """Chunk a whole text at once (the same rules as streaming it)."""
    chunker = SpeakableChunker(options)
    return chunker.push(text) + chunker.finish()

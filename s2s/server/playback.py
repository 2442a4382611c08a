"""What of each reply was sent, chunk by chunk, so that a playback report ("the user heard
X ms of turn N") turns into the words the user heard. Pure; one per session."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

TURNS_KEPT = 4


@dataclass
class _Reply:
    sample_rate_hz: int
    chunks: dict[int, tuple[str, int]] = field(default_factory=dict)  # index -> (text, samples)


class ReplyLedger:
    def __init__(self) -> None:
        self._replies: OrderedDict[int, _Reply] = OrderedDict()

    def sent(self, turn_id: int, chunk_index: int, text: str, samples: int, rate_hz: int) -> None:
        reply = self._replies.setdefault(turn_id, _Reply(rate_hz))
        self._replies.move_to_end(turn_id)
        previous = reply.chunks.get(chunk_index, (text, 0))[1]
        reply.chunks[chunk_index] = (text, previous + samples)
        while len(self._replies) > TURNS_KEPT:
            self._replies.popitem(last=False)

    def heard_text(self, turn_id: int, played_ms: float) -> str | None:
        """The reply's words up to ``played_ms`` of its audio (a chunk partly played counts
        the same share of its words); None for a turn this ledger never sent."""
        reply = self._replies.get(turn_id)
        if reply is None:
            return None
        remaining = played_ms * reply.sample_rate_hz / 1000.0
        words: list[str] = []
        for index in sorted(reply.chunks):
            text, samples = reply.chunks[index]
            chunk_words = text.split()
            if remaining >= samples:
                words += chunk_words
                remaining -= samples
                continue
            words += chunk_words[: int(len(chunk_words) * remaining / max(samples, 1))]
            break
        return " ".join(words)

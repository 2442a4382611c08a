"""Pure bookkeeping of the conversation on the client: which audio was sent when, and what
each turn said and cost. No sockets, no threads (callers serialise access)."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

SENT_FRAMES_KEPT = 20_000
"""Send times remembered (about ten minutes of 32 ms frames) to place the end of speech."""
SERVER_STAGE_FIELDS = (
    "end_of_turn_ms",
    "stt_ms",
    "llm_first_token_ms",
    "llm_first_chunk_ms",
    "tts_first_audio_ms",
    "server_voice_to_voice_ms",
)
SPECULATION_FIELDS = ("speculation", "speculation_saved_ms")
"""Whether the reply was speculated during the end-of-turn wait, and what that saved."""


@dataclass
class Turn:
    turn_id: int
    speech_ended_at: float | None = None
    user_text: str = ""
    reply_chunks: list[str] = field(default_factory=list)
    first_audio_at: float | None = None
    server: dict[str, float | None] = field(default_factory=dict)

    def summary(self, interrupted: bool) -> dict[str, Any]:
        latency = None
        if self.speech_ended_at is not None and self.first_audio_at is not None:
            latency = round((self.first_audio_at - self.speech_ended_at) * 1000.0, 1)
        return {
            "type": "turn",
            "turn_id": self.turn_id,
            "user_text": self.user_text,
            "assistant_text": " ".join(c for c in self.reply_chunks if c),
            "voice_to_voice_ms": latency,
            "interrupted": interrupted,
            "server": self.server,
        }


class TurnTracker:
    """Thread-safe: the sender records send times, the receiver feeds events and audio."""

    def __init__(self, input_rate_hz: int) -> None:
        self._rate = input_rate_hz
        self._lock = threading.Lock()  # guards everything below
        self._sent: deque[tuple[int, int, float]] = deque(maxlen=SENT_FRAMES_KEPT)
        self.turns: dict[int, Turn] = {}
        self._open: set[int] = set()
        self._speaking_turn: int | None = None
        self._finished = 0

    def sent(self, first_sample: int, count: int, at: float) -> None:
        with self._lock:
            self._sent.append((first_sample, count, at))

    def audio_received(self, at: float) -> None:
        with self._lock:
            if self._speaking_turn is not None:
                turn = self.turns[self._speaking_turn]
                if turn.first_audio_at is None:
                    turn.first_audio_at = at

    def assistant_speaking(self, pending_s: float) -> bool:
        with self._lock:
            return self._speaking_turn is not None or pending_s > 0.0

    def all_answered(self) -> bool:
        with self._lock:
            return self._finished > 0 and not self._open

    def on_event(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Account for one server event; return the turns it completed."""
        kind = event.get("type")
        turn_id = event.get("turn_id")
        with self._lock:
            if kind == "interrupted":
                target = turn_id if isinstance(turn_id, int) and turn_id >= 0 else None
                target = target if target is not None else self._speaking_turn
                if target is None or target not in self.turns or target not in self._open:
                    return []
                return [self._close(target, interrupted=True)]
            if not isinstance(turn_id, int):
                return []
            turn = self.turns.setdefault(turn_id, Turn(turn_id))
            if kind == "speech_started":
                self._open.add(turn_id)
            elif kind == "speech_stopped":
                turn.speech_ended_at = self._sent_at(int(event["sample_index"]))
            elif kind == "transcript":
                turn.user_text = str(event.get("text", ""))
            elif kind == "reply_text":
                turn.reply_chunks.append(str(event.get("text", "")))
            elif kind == "metrics":
                fields = (*SERVER_STAGE_FIELDS, *SPECULATION_FIELDS)
                turn.server = {name: event.get(name) for name in fields}
            elif kind == "reply_audio_start":
                self._speaking_turn = turn_id
            elif kind == "reply_audio_end":
                return [self._close(turn_id, interrupted=False)]
            return []

    def _close(self, turn_id: int, interrupted: bool) -> dict[str, Any]:
        self._open.discard(turn_id)
        if self._speaking_turn == turn_id:
            self._speaking_turn = None
        self._finished += 1
        return self.turns[turn_id].summary(interrupted)

    def _sent_at(self, sample_index: int) -> float | None:
        """When the given input sample was captured: its frame's send time, less the audio
        after it in that frame."""
        for first, count, at in reversed(self._sent):
            if first <= sample_index < first + count:
                return at - (first + count - sample_index) / self._rate
            if first + count <= sample_index:
                return at
        return None

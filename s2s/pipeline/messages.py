"""Every item that travels between stages, grouped by queue edge.

One frozen dataclass per edge, plus the events that leave the pipeline sideways (to the
session's client) and the poison pill. Turn id, generation and timestamps travel on the
message itself, never in globals.

All timestamps are ``time.monotonic()`` seconds on the server. ``TurnClock`` carries the
ones a turn accumulates as it moves down the chain, so the last stage can account for the
latency of every stage before it without looking anything up.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Final, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

Samples: TypeAlias = npt.NDArray[np.float32]
"""Mono audio, float32 in [-1, 1]."""


class Pill(enum.Enum):
    """The end-of-stream marker: a type of its own, never audio, never text.

    A one-member enum is a true singleton (it survives copying and pickling) and lets a type
    checker see it in every queue's item type: ``Queue[Transcript | Pill]``.
    """

    PILL = "pill"


PILL: Final = Pill.PILL


@dataclass(frozen=True, slots=True)
class TurnClock:
    """Monotonic timestamps of one turn, filled in stage by stage (None: not reached yet)."""

    speech_started_at: float | None = None
    speech_ended_at: float | None = None
    """When the user's speech ended, on the server's clock: the origin of voice-to-voice."""
    end_of_turn_at: float | None = None
    """When the VAD decided the turn was over (after the trailing silence)."""
    transcribed_at: float | None = None
    first_token_at: float | None = None
    first_text_chunk_at: float | None = None
    first_audio_at: float | None = None

    def stamp(self, **moments: float) -> TurnClock:
        """Return a copy with the given moments set, keeping any that were already set."""
        kept = {name: value for name, value in moments.items() if getattr(self, name) is None}
        return replace(self, **kept) if kept else self


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """What every message carries: whose it is, which turn, and which generation.

    ``generation`` is the value of the session's ``TurnCancellation`` when the item was made;
    once the session moves past it, the item is stale and every stage drops it.
    """

    session_id: str
    turn_id: int
    generation: int


# --- edge: client -> VAD ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class AudioChunk(Message):
    """A piece of the user's microphone stream, already at the pipeline's input rate."""

    samples: Samples
    sample_rate_hz: int
    first_sample_index: int
    """Position of ``samples[0]`` in the session's input stream."""
    received_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class InputCommand(Message):
    """The client's say over its own turn, in order with its audio: ``commit`` ends the
    speech under way now (without waiting for the silence), ``clear`` drops it unheard."""

    action: Literal["commit", "clear"]


# --- edge: VAD -> STT ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeechSegment(Message):
    """One utterance, from speech onset (with padding) to its end."""

    samples: Samples
    sample_rate_hz: int
    start_sample_index: int
    end_sample_index: int
    """The exact input-stream sample where speech ended (before end-of-turn silence)."""
    clock: TurnClock
    provisional: bool = False
    """Sent while the end-of-turn silence is still being waited for, so STT can start early;
    the final segment (same audio) follows if the silence lasts."""


# --- edge: STT -> LLM ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Transcript(Message):
    text: str
    clock: TurnClock
    speculative: bool = False
    """Made from a provisional segment (the user paused; the turn may not be over): its
    reply is made but held back until ``SpeculationSettled`` says the turn ended so."""


# --- edge: LLM -> TTS ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyText(Message):
    """A speakable chunk of the reply (a clause or sentence), in order within the turn."""

    text: str
    chunk_index: int
    is_last: bool
    clock: TurnClock


# --- edge: TTS -> sink --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyAudio(Message):
    samples: Samples
    sample_rate_hz: int
    text: str
    """The text this audio speaks (the chunk it came from), for transcripts and history."""
    chunk_index: int
    is_last: bool
    """True on the turn's final audio item (it may be empty)."""
    clock: TurnClock


# --- events: out of the pipeline, to the session --------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeechStarted(Message):
    sample_index: int
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeechStopped(Message):
    sample_index: int
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeechResumed(Message):
    """The user spoke again after a pause: a reply speculated at that pause is moot."""

    sample_index: int
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeculationSettled(Message):
    """The turn ended: the reply speculated at its pause (``generation``) is kept (``hit``:
    the final transcript is the same) or thrown away (``discarded``: it differs, and the
    reply is made again from the final text under a new generation)."""

    outcome: Literal["hit", "discarded"]
    end_of_turn_at: float | None
    speech_ended_at: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class NoWords(Message):
    """The turn's speech held no words (noise that looked like speech): no reply follows,
    so there is nothing for the user's next speech to interrupt."""


@dataclass(frozen=True, slots=True, kw_only=True)
class InputCommandDone(Message):
    """An ``InputCommand`` was carried out; ``applied`` is False when there was no speech
    under way to commit or clear."""

    action: Literal["commit", "clear"]
    applied: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnInterrupted(Message):
    """The turn's in-flight work was abandoned; ``generation`` is the new generation."""

    reason: str
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class StageError(Message):
    """A stage's handler raised; the stage carries on with the next item."""

    stage: str
    error_type: str
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnMetrics(Message):
    """The server's time in each stage for one turn, in milliseconds (None: not reached)."""

    end_of_turn_ms: float | None
    stt_ms: float | None
    llm_first_token_ms: float | None
    llm_first_chunk_ms: float | None
    tts_first_audio_ms: float | None
    server_voice_to_voice_ms: float | None
    extra: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_clock(cls, origin: Message, clock: TurnClock) -> TurnMetrics:
        """Turn the timestamps of a finished turn into per-stage durations."""

        def span(start: float | None, end: float | None) -> float | None:
            if start is None or end is None:
                return None
            return round((end - start) * 1000.0, 1)

        return cls(
            session_id=origin.session_id,
            turn_id=origin.turn_id,
            generation=origin.generation,
            end_of_turn_ms=span(clock.speech_ended_at, clock.end_of_turn_at),
            stt_ms=span(clock.end_of_turn_at, clock.transcribed_at),
            llm_first_token_ms=span(clock.transcribed_at, clock.first_token_at),
            llm_first_chunk_ms=span(clock.transcribed_at, clock.first_text_chunk_at),
            tts_first_audio_ms=span(clock.first_text_chunk_at, clock.first_audio_at),
            server_voice_to_voice_ms=span(clock.speech_ended_at, clock.first_audio_at),
        )


Event: TypeAlias = (
    SpeechStarted
    | SpeechStopped
    | SpeechResumed
    | SpeculationSettled
    | NoWords
    | InputCommandDone
    | Transcript
    | ReplyText
    | TurnInterrupted
    | StageError
    | TurnMetrics
)
"""What leaves the pipeline sideways. ``Transcript`` and ``ReplyText`` are also emitted as
events when the LLM stage takes or makes them, so a client sees the conversation as it streams."""

"""Wire formats: how one session's core (``session.py``) talks to its client.

The core knows sessions, pipelines, pacing, barge-in, holding back speculation, and history;
a wire format knows only how messages look on the socket. It turns what the client sends into
``Command`` values the core carries out, and what the core has to say into frames. Protocol v1
(``V1Wire``, ``PROTOCOL.md``) and the OpenAI Realtime protocol (``realtime.RealtimeWire``) are
two wire formats over the same core.

The core calls the outgoing methods while holding its send lock, so frames leave in the order
they were made; a wire format with state of its own guards it with its own lock, since the
core calls it from several threads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from s2s.pipeline.messages import (
    Event,
    ReplyText,
    SpeechStarted,
    SpeechStopped,
    StageError,
    Transcript,
    TurnInterrupted,
    TurnMetrics,
)
from s2s.pipeline.segmenter import VAD_SAMPLE_RATE_HZ
from s2s.server import protocol
from s2s.server.protocol import ErrorCodes, ProtocolError

Frame = str | bytes
"""One WebSocket message: text (JSON) or binary."""


@dataclass(frozen=True, slots=True)
class SessionSetup:
    """What the core needs to build a session's pipeline."""

    input_sample_rate_hz: int
    output_sample_rate_hz: int
    pipeline: str = "streaming"
    """One of ``protocol.PIPELINES``."""
    vad_overrides: Mapping[str, float] = field(default_factory=dict)
    """``VadOptions`` fields to set for this session (turn detection the client asked for)."""
    echo_cancelled: bool = False
    """The client cancels its own echo: no echo gate for this session."""

    @property
    def baseline(self) -> bool:
        return self.pipeline == "baseline"

    @property
    def speculate(self) -> bool:
        return self.pipeline == "streaming"


# --- commands: what the client asks of the core -------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """Build the pipeline and start serving (after protocol v1's ``hello``)."""

    setup: SessionSetup


@dataclass(frozen=True, slots=True)
class Audio:
    """Microphone audio: PCM16 mono at the setup's input rate, already checked."""

    pcm: bytes


@dataclass(frozen=True, slots=True)
class InterruptReply:
    """Stop the current reply now."""


@dataclass(frozen=True, slots=True)
class Heard:
    """The client played only ``played_ms`` of turn ``turn_id``'s reply."""

    turn_id: int
    played_ms: float


@dataclass(frozen=True, slots=True)
class Finish:
    """Finish the current reply, then close."""


@dataclass(frozen=True, slots=True)
class EndTurn:
    """``commit``: the user's turn ends now; ``clear``: the speech under way is dropped."""

    action: Literal["commit", "clear"]


@dataclass(frozen=True, slots=True)
class Instruct:
    """A new system prompt, from the next reply on."""

    system_prompt: str


@dataclass(frozen=True, slots=True)
class Reply:
    """Frames the wire format answers with itself (an error, an acknowledgement)."""

    frames: tuple[Frame, ...]
    error_code: str | None = None
    """Set when the frames are an error (counted in the server's metrics)."""


@dataclass(frozen=True, slots=True)
class Refuse:
    """The handshake failed: say why, then close (1002)."""

    frames: tuple[Frame, ...]
    reason: str
    error_code: str | None = None


Command = Start | Audio | InterruptReply | Heard | Finish | EndTurn | Instruct | Reply | Refuse


class WireFormat(Protocol):
    protocol_name: str
    """For logs and metrics: ``v1`` or ``realtime``."""
    hello_first: bool
    """True: nothing is served before a ``Start`` (within the handshake timeout)."""

    def opening(self) -> list[Frame]:
        """Frames sent as soon as the connection is open."""
        ...

    def receive(self, message: Frame, started: bool) -> list[Command]:
        """One client message as commands; ``started``: the pipeline runs."""
        ...

    def handshake_timed_out(self) -> Refuse: ...

    def started(self, session_id: str, setup: SessionSetup) -> list[Frame]: ...

    def event(self, event: Event, metrics: Mapping[str, object]) -> list[Frame]:
        """A pipeline event as frames; ``metrics``: a ``TurnMetrics`` event's fields."""
        ...

    def audio_start(self, turn_id: int) -> list[Frame]: ...

    def audio(self, turn_id: int, pcm: bytes) -> list[Frame]: ...

    def audio_end(self, turn_id: int) -> list[Frame]: ...

    def error(self, code: str, message: str) -> list[Frame]: ...

    def bye(self, reason: str) -> list[Frame]: ...


class V1Wire:
    """Protocol v1 (``PROTOCOL.md``): binary audio frames, JSON events, ``hello`` first."""

    protocol_name = "v1"
    hello_first = True

    def __init__(self, models_info: Mapping[str, str]) -> None:
        self._models_info = dict(models_info)
        self._input_rate_hz = protocol.DEFAULT_INPUT_RATE_HZ

    def opening(self) -> list[Frame]:
        return []

    def receive(self, message: Frame, started: bool) -> list[Command]:
        if not started:
            return [self._hello(message)]
        if isinstance(message, bytes):
            try:
                protocol.check_audio_frame(message, self._input_rate_hz)
            except ProtocolError as exc:
                return [Reply(tuple(self.error(exc.code, str(exc))), exc.code)]
            return [Audio(message)]
        try:
            parsed = protocol.parse_client_text(message)
        except ProtocolError as exc:
            return [Reply(tuple(self.error(exc.code, str(exc))), exc.code)]
        if isinstance(parsed, protocol.Interrupt):
            return [InterruptReply()]
        if isinstance(parsed, protocol.Playback):
            return [Heard(parsed.turn_id, parsed.played_ms)]
        if isinstance(parsed, protocol.End):
            return [Finish()]
        error = self.error(ErrorCodes.BAD_MESSAGE, "hello was already received")
        return [Reply(tuple(error), ErrorCodes.BAD_MESSAGE)]

    def _hello(self, message: Frame) -> Command:
        if isinstance(message, bytes):
            return self._refusal(ErrorCodes.NOT_READY, "audio before hello: send hello first")
        try:
            parsed = protocol.parse_client_text(message)
        except ProtocolError as exc:
            return self._refusal(exc.code, str(exc))
        if not isinstance(parsed, protocol.Hello):
            return self._refusal(ErrorCodes.NOT_READY, "the first message must be hello")
        self._input_rate_hz = parsed.input_sample_rate_hz
        return Start(
            SessionSetup(
                parsed.input_sample_rate_hz,
                parsed.output_sample_rate_hz,
                parsed.pipeline,
                echo_cancelled=parsed.echo_cancelled,
            )
        )

    def _refusal(self, code: str, message: str) -> Refuse:
        return Refuse(tuple(self.error(code, message)), message, code)

    def handshake_timed_out(self) -> Refuse:
        return self._refusal(ErrorCodes.NOT_READY, "no hello within the handshake timeout")

    def started(self, session_id: str, setup: SessionSetup) -> list[Frame]:
        return [
            protocol.event(
                "ready",
                protocol=protocol.PROTOCOL_VERSION,
                session_id=session_id,
                input_sample_rate=setup.input_sample_rate_hz,
                output_sample_rate=setup.output_sample_rate_hz,
                options={"pipeline": setup.pipeline, "echo_cancelled": setup.echo_cancelled},
                models=self._models_info,
            )
        ]

    def event(self, event: Event, metrics: Mapping[str, object]) -> list[Frame]:
        if isinstance(event, SpeechStarted | SpeechStopped):
            kind = "speech_started" if isinstance(event, SpeechStarted) else "speech_stopped"
            index = round(event.sample_index * self._input_rate_hz / VAD_SAMPLE_RATE_HZ)
            return [protocol.event(kind, turn_id=event.turn_id, sample_index=index)]
        if isinstance(event, Transcript):
            return [protocol.event("transcript", turn_id=event.turn_id, text=event.text)]
        if isinstance(event, ReplyText):
            return [
                protocol.event(
                    "reply_text",
                    turn_id=event.turn_id,
                    chunk_index=event.chunk_index,
                    text=event.text,
                    is_last=event.is_last,
                )
            ]
        if isinstance(event, TurnInterrupted):
            return [protocol.event("interrupted", turn_id=event.turn_id, reason=event.reason)]
        if isinstance(event, StageError):
            return [
                protocol.event(
                    "error",
                    code=ErrorCodes.STAGE_FAILED,
                    turn_id=event.turn_id,
                    message=f"{event.stage} failed: {event.error_type}: {event.detail}",
                )
            ]
        if isinstance(event, TurnMetrics):
            return [protocol.event("metrics", turn_id=event.turn_id, **metrics)]
        return []  # speculation bookkeeping, and input commands (v1 has none)

    def audio_start(self, turn_id: int) -> list[Frame]:
        return [protocol.event("reply_audio_start", turn_id=turn_id)]

    def audio(self, turn_id: int, pcm: bytes) -> list[Frame]:
        return [pcm]

    def audio_end(self, turn_id: int) -> list[Frame]:
        return [protocol.event("reply_audio_end", turn_id=turn_id)]

    def error(self, code: str, message: str) -> list[Frame]:
        return [protocol.event("error", code=code, message=message)]

    def bye(self, reason: str) -> list[Frame]:
        return [protocol.event("bye", reason=reason)]

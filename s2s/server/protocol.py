"""The s2s wire protocol, version 1: one WebSocket, binary frames for audio, text frames for
JSON events. Pure: parsing and building messages, no sockets. See PROTOCOL.md beside this file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

PROTOCOL_VERSION: Final = 1
SUPPORTED_SAMPLE_RATES_HZ: Final = frozenset({8_000, 16_000, 22_050, 24_000, 44_100, 48_000})
DEFAULT_INPUT_RATE_HZ: Final = 16_000
DEFAULT_OUTPUT_RATE_HZ: Final = 24_000
FRAME_MS_RANGE: Final = (10, 100)
"""How long an audio frame is (at the agreed input rate)."""
MAX_FRAME_BYTES: Final = 256 * 1024
"""Largest frame the server accepts: ~2.7 s of 48 kHz PCM16; clients send 10-100 ms frames."""


class CloseCodes:
    """WebSocket close codes the server uses, with the reason always set."""

    NORMAL: Final = 1000
    GOING_AWAY: Final = 1001  # server shutting down
    PROTOCOL_ERROR: Final = 1002  # audio before hello, bad handshake
    POLICY_VIOLATION: Final = 1008  # idle timeout
    MESSAGE_TOO_BIG: Final = 1009
    TRY_AGAIN_LATER: Final = 1013  # --max-sessions reached


class ErrorCodes:
    """``code`` values of ``error`` events."""

    BAD_JSON: Final = "bad_json"
    UNKNOWN_TYPE: Final = "unknown_type"
    BAD_MESSAGE: Final = "bad_message"
    NOT_READY: Final = "not_ready"
    BAD_AUDIO: Final = "bad_audio"
    UNSUPPORTED_RATE: Final = "unsupported_sample_rate"
    UNSUPPORTED_VERSION: Final = "unsupported_protocol"
    STAGE_FAILED: Final = "stage_failed"


class ProtocolError(ValueError):
    """A client message the server cannot accept; ``code`` is one of ``ErrorCodes``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


PIPELINES = ("streaming", "no-speculation", "baseline")
"""``streaming`` (the default): every overlap, the reply speculated during the end-of-turn
wait; ``no-speculation``: streaming, but the reply starts only once the turn is over;
``baseline``: no overlaps at all (whole transcript, whole reply, whole synthesis)."""


@dataclass(frozen=True, slots=True)
class Hello:
    """The client's first message."""

    protocol: int
    input_sample_rate_hz: int
    output_sample_rate_hz: int
    pipeline: str = "streaming"
    """``options.pipeline``: one of PIPELINES (the session takes it as ``SessionSetup``)."""
    echo_cancelled: bool = False
    """``options.echo_cancelled``: the client removes its speaker's echo from the microphone,
    so the server needs no echo gate: speech is the user's."""


@dataclass(frozen=True, slots=True)
class Interrupt:
    """Stop the current reply now."""


@dataclass(frozen=True, slots=True)
class End:
    """Finish the current reply, then close."""


@dataclass(frozen=True, slots=True)
class Playback:
    """How much of a reply the client played before it stopped (after ``interrupted``)."""

    turn_id: int
    played_ms: float


ClientMessage = Hello | Interrupt | End | Playback


def loads(text: str) -> Any:
    """Strict JSON: no NaN or Infinity (not JSON, and they pass numeric checks). Raises
    ValueError for bad JSON, numbers over Python's 4,300-digit limit, and nesting deeper
    than the interpreter's recursion limit."""
    try:
        return json.loads(text, parse_constant=_not_json)
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def parse_client_text(text: str) -> ClientMessage:
    """One client text frame to a message, or ``ProtocolError`` saying what is wrong."""
    try:
        data = loads(text)
    except ValueError as exc:
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise ProtocolError(ErrorCodes.BAD_JSON, f"text frames must be JSON: {message}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ProtocolError(ErrorCodes.BAD_MESSAGE, 'a message is a JSON object with a "type"')
    kind = data["type"]
    if kind == "hello":
        return _parse_hello(data)
    if kind == "interrupt":
        return Interrupt()
    if kind == "end":
        return End()
    if kind == "playback":
        turn_id, played_ms = data.get("turn_id"), data.get("played_ms")
        numbers = not isinstance(turn_id, bool) and not isinstance(played_ms, bool)
        if (
            not numbers
            or not isinstance(turn_id, int)
            or not isinstance(played_ms, int | float)
            or played_ms < 0
        ):
            raise ProtocolError(
                ErrorCodes.BAD_MESSAGE, "playback needs an integer turn_id and played_ms >= 0"
            )
        return Playback(turn_id, float(played_ms))
    raise ProtocolError(
        ErrorCodes.UNKNOWN_TYPE,
        f"unknown message type {kind!r}; expected hello, interrupt, playback or end",
    )


def _parse_hello(data: dict[str, Any]) -> Hello:
    version = data.get("protocol", PROTOCOL_VERSION)
    if isinstance(version, bool) or version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCodes.UNSUPPORTED_VERSION,
            f"protocol {version!r} is not supported; this server speaks {PROTOCOL_VERSION}",
        )
    rates = []
    for field in ("input_sample_rate", "output_sample_rate"):
        default = DEFAULT_INPUT_RATE_HZ if field.startswith("input") else DEFAULT_OUTPUT_RATE_HZ
        rate = data.get(field, default)
        if (
            not isinstance(rate, int)
            or isinstance(rate, bool)
            or rate not in SUPPORTED_SAMPLE_RATES_HZ
        ):
            supported = ", ".join(str(r) for r in sorted(SUPPORTED_SAMPLE_RATES_HZ))
            raise ProtocolError(
                ErrorCodes.UNSUPPORTED_RATE,
                f"{field} {rate!r} is not supported; use one of {supported}",
            )
        rates.append(rate)
    options = data.get("options", {})
    pipeline = options.get("pipeline", "streaming") if isinstance(options, dict) else None
    if pipeline not in PIPELINES:
        raise ProtocolError(
            ErrorCodes.BAD_MESSAGE,
            'hello "options" is an object; its "pipeline" is one of ' + ", ".join(PIPELINES),
        )
    echo_cancelled = options.get("echo_cancelled", False)
    if not isinstance(echo_cancelled, bool):
        raise ProtocolError(
            ErrorCodes.BAD_MESSAGE, 'hello "options": "echo_cancelled" is true or false'
        )
    return Hello(
        PROTOCOL_VERSION, rates[0], rates[1], pipeline=str(pipeline), echo_cancelled=echo_cancelled
    )


def check_audio_frame(data: bytes, rate_hz: int | None = None) -> None:
    """PCM16 mono: an even number of bytes, at least one sample; with ``rate_hz``, a frame
    of FRAME_MS_RANGE (the pacing, rate limits and latency figures assume it)."""
    if len(data) == 0 or len(data) % 2:
        raise ProtocolError(
            ErrorCodes.BAD_AUDIO,
            f"audio frames are 16-bit PCM: an even, non-zero byte count (got {len(data)})",
        )
    if rate_hz is None:
        return
    duration_ms = len(data) / 2 / rate_hz * 1000
    shortest, longest = FRAME_MS_RANGE
    if not shortest <= duration_ms <= longest:
        raise ProtocolError(
            ErrorCodes.BAD_AUDIO,
            f"audio frames are {shortest}-{longest} ms long; this one is {duration_ms:.1f} ms "
            f"({len(data)} bytes at {rate_hz} Hz): split it, or send bigger frames",
        )


def event(kind: str, **fields: Any) -> str:
    """A server event as a text frame."""
    return json.dumps({"type": kind, **fields}, separators=(",", ":"))


def playback(turn_id: int, played_ms: float) -> str:
    """The client's playback report as a text frame."""
    return json.dumps({"type": "playback", "turn_id": turn_id, "played_ms": round(played_ms, 1)})


def hello(
    input_rate_hz: int,
    output_rate_hz: int,
    pipeline: str = "streaming",
    echo_cancelled: bool = False,
) -> str:
    """The client's hello as a text frame."""
    return json.dumps(
        {
            "type": "hello",
            "protocol": PROTOCOL_VERSION,
            "input_sample_rate": input_rate_hz,
            "output_sample_rate": output_rate_hz,
            "options": {"pipeline": pipeline, "echo_cancelled": echo_cancelled},
        }
    )

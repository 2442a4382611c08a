"""The OpenAI Realtime protocol (GA event names) as a wire format over the session core.

``ws://HOST:PORT/v1/realtime``: a client of OpenAI's Realtime API (its Python SDK, browser
demos, agent frameworks) talks to s2s by changing its base URL. Everything that decides what
happens (turns, speculation, barge-in, pacing, history) is the same core as protocol v1's;
this module only translates: client events into ``Command`` values, pipeline events into
Realtime server events. See the "OpenAI Realtime" part of PROTOCOL.md for the subset.

Audio is PCM16 mono at 24 kHz both ways (``audio/pcm``), base64 in JSON, as the API has it.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from s2s.pipeline.messages import (
    Event,
    InputCommandDone,
    NoWords,
    ReplyText,
    SpeechStarted,
    SpeechStopped,
    StageError,
    Transcript,
    TurnInterrupted,
)
from s2s.pipeline.segmenter import VAD_SAMPLE_RATE_HZ, VadOptions
from s2s.server import protocol
from s2s.server.wire import (
    Audio,
    Command,
    EndTurn,
    Frame,
    Heard,
    Instruct,
    InterruptReply,
    Refuse,
    Reply,
    SessionSetup,
    Start,
)

PATH = "/v1/realtime"
RATE_HZ = 24_000
"""The API's ``audio/pcm`` rate, in and out."""
SUPPORTED_EVENTS = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "response.create",
    "response.cancel",
    "conversation.item.truncate",
)
IGNORED_SESSION_FIELDS = frozenset(
    {
        "type",
        "model",
        "voice",
        "max_output_tokens",
        "max_response_output_tokens",
        "temperature",
        "tool_choice",
        "tracing",
        "include",
        "prompt",
        "truncation",
        "input_audio_transcription",
        "input_audio_noise_reduction",
        "speed",
        "modalities",
        "output_modalities",
        "tools",
        "instructions",
        "audio",
        "input_audio_format",
        "output_audio_format",
        "turn_detection",
    }
)
"""Top-level ``session`` fields accepted; those not checked below are taken and ignored (the
voice is the server's, tools are not offered)."""


class RealtimeError(ValueError):
    """A client event s2s cannot carry out: an ``error`` event, and the session goes on."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


@dataclass(frozen=True, slots=True)
class RealtimeDefaults:
    """What a Realtime session starts with: the server's own settings."""

    vad: VadOptions = field(default_factory=VadOptions)
    system_prompt: str = ""
    models: Mapping[str, str] = field(default_factory=dict)


@dataclass
class _Response:
    """The reply being streamed for one turn."""

    response_id: str
    item_id: str
    turn_id: int
    transcript: list[str] = field(default_factory=list)


class RealtimeWire:
    """One Realtime connection's translation state (thread-safe: its own lock)."""

    protocol_name = "realtime"
    hello_first = False

    def __init__(
        self, session_id: str, defaults: RealtimeDefaults, model: str | None = None
    ) -> None:
        self._session_id = session_id
        self._defaults = defaults
        self._model = model or "s2s"
        self._lock = threading.Lock()  # guards everything below
        self._ids = itertools.count(1)
        self._instructions = defaults.system_prompt
        self._vad_overrides: dict[str, float] = {}
        self._user_items: dict[int, str] = {}  # turn -> the user's item
        self._assistant_items: dict[str, int] = {}  # item -> turn (for truncation)
        self._last_item: str | None = None
        self._response: _Response | None = None

    # --- client -> core -------------------------------------------------------------------

    def opening(self) -> list[Frame]:
        with self._lock:
            return [self._event("session.created", session=self._session())]

    def receive(self, message: Frame, started: bool) -> list[Command]:
        client_event_id: str | None = None
        try:
            if isinstance(message, bytes):
                raise RealtimeError(
                    "invalid_request_error",
                    "binary frames are not part of this protocol: send audio as "
                    "input_audio_buffer.append with base64 PCM16",
                )
            data = _json_object(message)
            given_id = data.get("event_id")
            client_event_id = given_id if isinstance(given_id, str) else None
            kind = data.get("type")
            if not isinstance(kind, str):
                raise RealtimeError(
                    "invalid_request_error", 'an event needs a string "type"', "type"
                )
            with self._lock:
                return self._client_event(kind, data, started)
        except RealtimeError as exc:
            with self._lock:
                frames = self._error_frames(exc.code, str(exc), exc.param, client_event_id)
            return [Reply(tuple(frames), exc.code)]

    def _client_event(self, kind: str, data: dict[str, Any], started: bool) -> list[Command]:
        if kind == "input_audio_buffer.append":
            pcm = _pcm(data.get("audio"))
            # The core carries out each message's commands before the next is read, so after
            # the first append ``started`` is true.
            return [Audio(pcm)] if started else [Start(self._setup()), Audio(pcm)]
        if kind == "session.update":
            return self._session_update(data.get("session"), started)
        if kind == "input_audio_buffer.commit":
            if not started:
                raise RealtimeError(
                    "input_audio_buffer_commit_empty", "the input audio buffer holds no speech"
                )
            return [EndTurn("commit")]
        if kind == "input_audio_buffer.clear":
            if not started:
                return [Reply((self._event("input_audio_buffer.cleared"),))]
            return [EndTurn("clear")]
        if kind == "response.cancel":
            if self._response is None:
                raise RealtimeError(
                    "response_cancel_not_active", "there is no response in progress to cancel"
                )
            return [InterruptReply()]
        if kind == "response.create":
            if self._response is not None:
                raise RealtimeError(
                    "conversation_already_has_active_response",
                    f"response {self._response.response_id} is still in progress",
                )
            raise RealtimeError(
                "invalid_request_error",
                "s2s answers each user turn by itself (server_vad with create_response): "
                "speak, or commit the input audio buffer, and the response follows",
            )
        if kind == "conversation.item.truncate":
            return self._truncate(data)
        raise RealtimeError(
            "unsupported_event",
            f"s2s does not support the client event {kind!r}; it supports "
            + ", ".join(SUPPORTED_EVENTS),
            "type",
        )

    def _session_update(self, session: object, started: bool) -> list[Command]:
        if not isinstance(session, dict):
            raise RealtimeError("invalid_request_error", '"session" must be an object', "session")
        for name in session:
            if name not in IGNORED_SESSION_FIELDS:
                raise RealtimeError(
                    "unsupported_parameter", f"session.{name} is not supported", f"session.{name}"
                )
        if session.get("type", "realtime") != "realtime":
            raise RealtimeError(
                "unsupported_parameter",
                "only realtime (conversation) sessions are served",
                "session.type",
            )
        modalities = session.get("output_modalities", session.get("modalities"))
        if modalities is not None and not (isinstance(modalities, list) and "audio" in modalities):
            raise RealtimeError(
                "unsupported_parameter",
                "s2s always answers in speech: output_modalities must include audio",
                "session.output_modalities",
            )
        if session.get("tools"):
            raise RealtimeError(
                "unsupported_parameter", "function tools are not supported", "session.tools"
            )
        audio = _object(session, "audio", "session.audio")
        audio_in = _object(audio, "input", "session.audio.input")
        audio_out = _object(audio, "output", "session.audio.output")
        for param, value in (
            ("session.audio.input.format", audio_in.get("format")),
            ("session.audio.output.format", audio_out.get("format")),
            ("session.input_audio_format", session.get("input_audio_format")),
            ("session.output_audio_format", session.get("output_audio_format")),
        ):
            _check_format(param, value)
        overrides = self._vad_overrides
        for holder in (audio_in, session):  # the GA place first, then the beta one
            if "turn_detection" in holder:
                overrides = _turn_detection(holder["turn_detection"])
                if started and overrides != self._vad_overrides:
                    raise RealtimeError(
                        "unsupported_parameter",
                        "turn_detection can be changed only before the first input audio",
                        "session.audio.input.turn_detection",
                    )
                break
        instructions = session.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise RealtimeError(
                "invalid_request_error", "instructions must be a string", "session.instructions"
            )
        # Checked in full: now take it.
        self._vad_overrides = overrides
        commands: list[Command] = []
        if instructions is not None:
            self._instructions = instructions
            commands.append(Instruct(instructions))
        commands.append(Reply((self._event("session.updated", session=self._session()),)))
        return commands

    def _truncate(self, data: dict[str, Any]) -> list[Command]:
        item_id, audio_end_ms = data.get("item_id"), data.get("audio_end_ms")
        turn_id = self._assistant_items.get(item_id) if isinstance(item_id, str) else None
        if turn_id is None:
            raise RealtimeError(
                "item_truncate_invalid_item_id",
                f"no assistant audio item {item_id!r} in this conversation",
                "item_id",
            )
        if not isinstance(audio_end_ms, int) or isinstance(audio_end_ms, bool) or audio_end_ms < 0:
            raise RealtimeError(
                "invalid_request_error",
                "audio_end_ms must be a whole number of milliseconds, 0 or more",
                "audio_end_ms",
            )
        truncated = self._event(
            "conversation.item.truncated",
            item_id=item_id,
            content_index=data.get("content_index", 0),
            audio_end_ms=audio_end_ms,
        )
        return [Heard(turn_id, float(audio_end_ms)), Reply((truncated,))]

    def handshake_timed_out(self) -> Refuse:  # never asked: there is no hello to wait for
        return Refuse((), "no session")

    # --- core -> client -------------------------------------------------------------------

    def started(self, session_id: str, setup: SessionSetup) -> list[Frame]:
        return []  # session.created went out at the opening

    def event(self, event: Event, metrics: Mapping[str, object]) -> list[Frame]:
        with self._lock:
            return self._server_events(event)

    def _server_events(self, event: Event) -> list[Frame]:
        if isinstance(event, SpeechStarted):
            item_id = self._user_items[event.turn_id] = self._new_id("item")
            return [
                self._event(
                    "input_audio_buffer.speech_started",
                    audio_start_ms=_ms(event.sample_index),
                    item_id=item_id,
                )
            ]
        if isinstance(event, SpeechStopped):
            item_id = self._user_items.setdefault(event.turn_id, self._new_id("item"))
            previous, self._last_item = self._last_item, item_id
            return [
                self._event(
                    "input_audio_buffer.speech_stopped",
                    audio_end_ms=_ms(event.sample_index),
                    item_id=item_id,
                ),
                self._event(
                    "input_audio_buffer.committed", item_id=item_id, previous_item_id=previous
                ),
                self._event(
                    "conversation.item.added",
                    previous_item_id=previous,
                    item=_user_item(item_id, None),
                ),
            ]
        if isinstance(event, Transcript):
            return self._transcribed(event)
        if isinstance(event, NoWords):
            return self._user_item_done(event.turn_id, "")  # no response follows
        if isinstance(event, ReplyText):
            return self._reply_text(event)
        if isinstance(event, TurnInterrupted):
            reason = "client_cancelled" if event.reason == "client interrupt" else "turn_detected"
            return self._finish_response("cancelled", {"type": "cancelled", "reason": reason})
        if isinstance(event, StageError):
            message = f"{event.stage} failed: {event.error_type}: {event.detail}"
            frames = self._error_frames("stage_failed", message, None, None, "server_error")
            return frames + self._finish_response(
                "failed",
                {"type": "failed", "error": {"type": "server_error", "code": "stage_failed"}},
            )
        if isinstance(event, InputCommandDone):
            if event.action == "clear":
                return [self._event("input_audio_buffer.cleared")]
            if not event.applied:
                return self._error_frames(
                    "input_audio_buffer_commit_empty",
                    "the input audio buffer holds no speech to commit",
                    None,
                    None,
                )
        return []

    def _user_item_done(self, turn_id: int, text: str) -> list[Frame]:
        item_id = self._user_items.pop(turn_id, None) or self._new_id("item")
        return [
            self._event(
                "conversation.item.input_audio_transcription.completed",
                item_id=item_id,
                content_index=0,
                transcript=text,
                usage={"type": "duration", "seconds": 0},
            ),
            self._event("conversation.item.done", item=_user_item(item_id, text)),
        ]

    def _transcribed(self, event: Transcript) -> list[Frame]:
        frames = self._user_item_done(event.turn_id, event.text)
        response = _Response(self._new_id("resp"), self._new_id("item"), event.turn_id)
        self._response = response
        self._assistant_items[response.item_id] = event.turn_id
        previous, self._last_item = self._last_item, response.item_id
        where = {"response_id": response.response_id, "item_id": response.item_id}
        frames += [
            self._event("response.created", response=self._response_body(response, "in_progress")),
            self._event(
                "response.output_item.added",
                response_id=response.response_id,
                output_index=0,
                item=_assistant_item(response, "in_progress"),
            ),
            self._event(
                "conversation.item.added",
                previous_item_id=previous,
                item=_assistant_item(response, "in_progress"),
            ),
            self._event(
                "response.content_part.added",
                **where,
                output_index=0,
                content_index=0,
                part={"type": "audio", "transcript": ""},
            ),
        ]
        return frames

    def _reply_text(self, event: ReplyText) -> list[Frame]:
        response = self._response
        if response is None or response.turn_id != event.turn_id or not event.text:
            return []
        delta = (" " if response.transcript else "") + event.text
        response.transcript.append(event.text)
        return [
            self._event(
                "response.output_audio_transcript.delta",
                response_id=response.response_id,
                item_id=response.item_id,
                output_index=0,
                content_index=0,
                delta=delta,
            )
        ]

    def audio_start(self, turn_id: int) -> list[Frame]:
        return []

    def audio(self, turn_id: int, pcm: bytes) -> list[Frame]:
        with self._lock:
            response = self._response
            if response is None or response.turn_id != turn_id:
                return []
            return [
                self._event(
                    "response.output_audio.delta",
                    response_id=response.response_id,
                    item_id=response.item_id,
                    output_index=0,
                    content_index=0,
                    delta=base64.b64encode(pcm).decode("ascii"),
                )
            ]

    def audio_end(self, turn_id: int) -> list[Frame]:
        with self._lock:
            if self._response is None or self._response.turn_id != turn_id:
                return []
            return self._finish_response("completed", None)

    def _finish_response(self, status: str, details: dict[str, object] | None) -> list[Frame]:
        response, self._response = self._response, None
        if response is None:
            return []
        where = {
            "response_id": response.response_id,
            "item_id": response.item_id,
            "output_index": 0,
            "content_index": 0,
        }
        transcript = " ".join(response.transcript)
        item_status = "completed" if status == "completed" else "incomplete"
        item = _assistant_item(response, item_status)
        return [
            self._event("response.output_audio.done", **where),
            self._event("response.output_audio_transcript.done", **where, transcript=transcript),
            self._event(
                "response.content_part.done",
                **where,
                part={"type": "audio", "transcript": transcript},
            ),
            self._event(
                "response.output_item.done",
                response_id=response.response_id,
                output_index=0,
                item=item,
            ),
            self._event("conversation.item.done", item=item),
            self._event(
                "response.done",
                response=self._response_body(response, status, details, [item]),
            ),
        ]

    def error(self, code: str, message: str) -> list[Frame]:
        with self._lock:
            return self._error_frames(code, message, None, None)

    def bye(self, reason: str) -> list[Frame]:
        return []  # the close frame (1001) carries the reason

    # --- shapes ---------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> str:
        return json.dumps(
            {"type": kind, "event_id": self._new_id("event"), **fields}, separators=(",", ":")
        )

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}_{self._session_id}_{next(self._ids)}"

    def _error_frames(
        self,
        code: str,
        message: str,
        param: str | None,
        client_event_id: str | None,
        error_type: str = "invalid_request_error",
    ) -> list[Frame]:
        return [
            self._event(
                "error",
                error={
                    "type": error_type,
                    "code": code,
                    "message": message,
                    "param": param,
                    "event_id": client_event_id,
                },
            )
        ]

    def _setup(self) -> SessionSetup:
        return SessionSetup(RATE_HZ, RATE_HZ, "streaming", dict(self._vad_overrides))

    def _session(self) -> dict[str, Any]:
        vad = self._defaults.vad
        settings = {
            "threshold": self._vad_overrides.get("threshold", vad.threshold),
            "silence_duration_ms": self._vad_overrides.get("min_silence_ms", vad.min_silence_ms),
            "prefix_padding_ms": self._vad_overrides.get("speech_pad_ms", vad.speech_pad_ms),
        }
        pcm = {"type": "audio/pcm", "rate": RATE_HZ}
        models = self._defaults.models
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": f"sess_{self._session_id}",
            "model": self._model,
            "output_modalities": ["audio"],
            "instructions": self._instructions,
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
            "audio": {
                "input": {
                    "format": pcm,
                    "transcription": {"model": models.get("stt", "")},
                    "noise_reduction": None,
                    "turn_detection": {
                        "type": "server_vad",
                        **settings,
                        "create_response": True,
                        "interrupt_response": True,
                        "idle_timeout_ms": None,
                    },
                },
                "output": {"format": pcm, "voice": models.get("tts", ""), "speed": 1.0},
            },
        }

    def _response_body(
        self,
        response: _Response,
        status: str,
        details: dict[str, object] | None = None,
        output: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        return {
            "id": response.response_id,
            "object": "realtime.response",
            "status": status,
            "status_details": details,
            "output": output or [],
            "conversation_id": f"conv_{self._session_id}",
            "output_modalities": ["audio"],
            "audio": {"output": {"format": {"type": "audio/pcm", "rate": RATE_HZ}}},
            "max_output_tokens": "inf",
            "metadata": None,
            "usage": None,
        }


# --- pure helpers -------------------------------------------------------------------------


def _json_object(text: str) -> dict[str, Any]:
    try:
        data = protocol.loads(text)
    except ValueError as exc:
        raise RealtimeError("invalid_request_error", f"events are JSON objects: {exc}") from exc
    if not isinstance(data, dict):
        raise RealtimeError("invalid_request_error", "an event is a JSON object")
    return data


def _object(holder: dict[str, Any], name: str, param: str) -> dict[str, Any]:
    value = holder.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RealtimeError("invalid_request_error", f"{param} must be an object", param)
    return value


def _pcm(audio: object) -> bytes:
    if not isinstance(audio, str):
        raise RealtimeError(
            "invalid_request_error", "audio must be a base64 string of PCM16 samples", "audio"
        )
    try:
        pcm = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError) as exc:
        message = f"audio is not base64: {exc}"
        raise RealtimeError("invalid_request_error", message, "audio") from exc
    if not pcm or len(pcm) % 2:
        raise RealtimeError(
            "invalid_request_error",
            f"audio is 16-bit PCM: an even, non-zero byte count (got {len(pcm)})",
            "audio",
        )
    return pcm


def _check_format(param: str, value: object) -> None:
    """PCM16 at 24 kHz, in the GA shape (``{"type": "audio/pcm", "rate": 24000}``) or the
    beta one (``"pcm16"``)."""
    if value is None or value == "pcm16":
        return
    if (
        isinstance(value, dict)
        and value.get("type") == "audio/pcm"
        and value.get("rate", RATE_HZ) == RATE_HZ
    ):
        return
    raise RealtimeError(
        "unsupported_parameter",
        f"{param} {value!r} is not supported: s2s takes and sends audio/pcm at {RATE_HZ} Hz",
        param,
    )


def _turn_detection(detection: object) -> dict[str, float]:
    """``server_vad`` settings as ``VadOptions`` fields."""
    if not isinstance(detection, dict) or detection.get("type") != "server_vad":
        raise RealtimeError(
            "unsupported_parameter",
            "s2s detects turns on the server: turn_detection must be of type server_vad",
            "session.audio.input.turn_detection",
        )
    for flag in ("create_response", "interrupt_response"):
        if detection.get(flag) is False:
            raise RealtimeError(
                "unsupported_parameter",
                f"turn_detection.{flag} false is not supported: s2s always answers each turn "
                "and stops its reply when the user speaks",
                f"session.audio.input.turn_detection.{flag}",
            )
    overrides: dict[str, float] = {}
    for name, field_name, low, high in (
        ("threshold", "threshold", 0.0, 1.0),
        ("silence_duration_ms", "min_silence_ms", 100, 10_000),
        ("prefix_padding_ms", "speech_pad_ms", 0, 2_000),
    ):
        value = detection.get(name)
        if value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not low <= value <= high:
            raise RealtimeError(
                "invalid_request_error",
                f"turn_detection.{name} must be a number from {low} to {high}",
                f"session.audio.input.turn_detection.{name}",
            )
        overrides[field_name] = int(value) if field_name != "threshold" else float(value)
    return overrides


def _ms(vad_index: int) -> int:
    return round(vad_index * 1000 / VAD_SAMPLE_RATE_HZ)


def _user_item(item_id: str, transcript: str | None) -> dict[str, Any]:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "role": "user",
        "status": "completed",
        "content": [{"type": "input_audio", "transcript": transcript}],
    }


def _assistant_item(response: _Response, status: str) -> dict[str, Any]:
    return {
        "id": response.item_id,
        "object": "realtime.item",
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [{"type": "output_audio", "transcript": " ".join(response.transcript)}],
    }

"""One client connection: handshake, a pipeline of its own, audio in, events and audio out.

Runs on the connection's handler thread. Everything it blocks on can be woken: ``recv`` by
closing the connection (``shutdown()`` from any thread does that), the pipeline by its pill.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection

from models.audio import StreamResampler, from_pcm16, to_pcm16
from pipeline.messages import (
    AudioChunk,
    Event,
    Message,
    ReplyAudio,
    ReplyText,
    SpeechStarted,
    SpeechStopped,
    StageError,
    Transcript,
    TurnInterrupted,
    TurnMetrics,
)
from pipeline.pipeline import Pipeline
from pipeline.segmenter import VAD_SAMPLE_RATE_HZ
from server import protocol
from server.protocol import CloseCodes, End, ErrorCodes, Hello, Interrupt, ProtocolError

log = logging.getLogger(__name__)

PipelineFactory = Callable[..., Pipeline]
OUTPUT_FRAME_MS = 100
"""Reply audio goes out in frames of at most this much: far below the frame-size limit, and
small enough that an interrupted reply leaves little audio in flight."""


@dataclass(frozen=True, slots=True)
class SessionLimits:
    handshake_timeout_s: float = 5.0
    idle_timeout_s: float = 300.0
    """A connection that sends nothing for this long is closed (audio streams never idle)."""
    cancel_timeout_s: float = 1.0
    end_timeout_s: float = 60.0
    """After the client's ``end``: how long the current reply may take to finish."""


class Session:
    """Serves one connection until it closes. ``run()`` returns when everything it started
    has stopped; ``shutdown()`` may be called from any thread, any number of times."""

    def __init__(
        self,
        connection: ServerConnection,
        session_id: str,
        build_pipeline: PipelineFactory,
        limits: SessionLimits,
        models_info: dict[str, str],
    ) -> None:
        self.session_id = session_id
        self._connection = connection
        self._build_pipeline = build_pipeline
        self._limits = limits
        self._models_info = models_info
        self._pipeline: Pipeline | None = None
        self._hello: Hello | None = None
        self._resampler: StreamResampler | None = None
        self._samples_received = 0
        self._send_lock = threading.Lock()  # keeps an event and its audio frames in order
        self._replies_started: set[tuple[int, int]] = set()
        self._closing = threading.Event()

    # --- lifecycle ------------------------------------------------------------------------

    def run(self) -> None:
        try:
            hello = self._handshake()
            if hello is None:
                return
            self._serve(hello)
        except ConnectionClosed:
            pass
        finally:
            self._teardown()

    def shutdown(self, code: int, reason: str) -> None:
        """Tell the client why, and close: wakes ``run()`` wherever it is blocked."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._send(protocol.event("bye", reason=reason))
        self._close(code, reason)

    # --- phases ---------------------------------------------------------------------------

    def _handshake(self) -> Hello | None:
        try:
            first = self._connection.recv(timeout=self._limits.handshake_timeout_s)
        except TimeoutError:
            self._refuse(ErrorCodes.NOT_READY, "no hello within the handshake timeout")
            return None
        if isinstance(first, bytes):
            self._refuse(ErrorCodes.NOT_READY, "audio before hello: send hello first")
            return None
        try:
            message = protocol.parse_client_text(first)
        except ProtocolError as exc:
            self._refuse(exc.code, str(exc))
            return None
        if not isinstance(message, Hello):
            self._refuse(ErrorCodes.NOT_READY, "the first message must be hello")
            return None
        self._hello = message
        self._resampler = StreamResampler(message.input_sample_rate_hz, VAD_SAMPLE_RATE_HZ)
        self._pipeline = self._build_pipeline(
            session_id=self.session_id,
            output_rate_hz=message.output_sample_rate_hz,
            baseline=message.baseline,
            deliver=self._deliver,
            on_event=self._on_event,
        )
        self._pipeline.start()
        self._send(
            protocol.event(
                "ready",
                protocol=protocol.PROTOCOL_VERSION,
                session_id=self.session_id,
                input_sample_rate=message.input_sample_rate_hz,
                output_sample_rate=message.output_sample_rate_hz,
                options={"pipeline": "baseline" if message.baseline else "streaming"},
                models=self._models_info,
            )
        )
        return message

    def _serve(self, hello: Hello) -> None:
        while True:
            try:
                message = self._connection.recv(timeout=self._limits.idle_timeout_s)
            except TimeoutError:
                reason = f"idle for {self._limits.idle_timeout_s:g} s"
                self._close(CloseCodes.POLICY_VIOLATION, reason)
                return
            if isinstance(message, bytes):
                self._on_audio(message, hello)
                continue
            try:
                parsed = protocol.parse_client_text(message)
            except ProtocolError as exc:
                self._error(exc.code, str(exc))
                continue
            if isinstance(parsed, Interrupt):
                assert self._pipeline is not None
                self._pipeline.cancel_turn("client interrupt")
            elif isinstance(parsed, End):
                self._finish_and_close()
                return
            else:
                self._error(ErrorCodes.BAD_MESSAGE, "hello was already received")

    def _on_audio(self, data: bytes, hello: Hello) -> None:
        try:
            protocol.check_audio_frame(data)
        except ProtocolError as exc:
            self._error(exc.code, str(exc))
            return
        assert self._pipeline is not None and self._resampler is not None
        samples = self._resampler.push(from_pcm16(data))
        if len(samples):
            self._pipeline.feed(
                AudioChunk(
                    session_id=self.session_id,
                    turn_id=0,
                    generation=self._pipeline.cancellation.generation,
                    samples=samples,
                    sample_rate_hz=VAD_SAMPLE_RATE_HZ,
                    first_sample_index=self._samples_received,
                    received_at=time.monotonic(),
                )
            )
            self._samples_received += len(samples)

    def _finish_and_close(self) -> None:
        assert self._pipeline is not None
        report = self._pipeline.stop(self._limits.end_timeout_s)
        if not report.clean:
            log.warning("session %s: end did not finish cleanly: %s", self.session_id, report)
        self._close(CloseCodes.NORMAL, "end")

    def _teardown(self) -> None:
        if self._pipeline is not None:
            report = self._pipeline.cancel(self._limits.cancel_timeout_s)
            if report.stuck_threads:
                log.error("session %s: threads left: %s", self.session_id, report.stuck_threads)
        self._close(CloseCodes.NORMAL, "")

    # --- outgoing -------------------------------------------------------------------------

    def _deliver(self, item: Message) -> None:
        if not isinstance(item, ReplyAudio):
            return
        key = (item.turn_id, item.generation)
        with self._send_lock:
            if key not in self._replies_started:
                self._replies_started.add(key)
                self._send_locked(protocol.event("reply_audio_start", turn_id=item.turn_id))
            frame = max(1, item.sample_rate_hz * OUTPUT_FRAME_MS // 1000)
            for start in range(0, len(item.samples), frame):
                self._send_locked(to_pcm16(item.samples[start : start + frame]))
            if item.is_last:
                self._replies_started.discard(key)
                self._send_locked(protocol.event("reply_audio_end", turn_id=item.turn_id))

    def _on_event(self, event: Event) -> None:
        text = self._event_text(event)
        if text is not None:
            self._send(text)

    def _event_text(self, event: Event) -> str | None:
        if isinstance(event, SpeechStarted | SpeechStopped):
            kind = "speech_started" if isinstance(event, SpeechStarted) else "speech_stopped"
            return protocol.event(
                kind, turn_id=event.turn_id, sample_index=self._input_index(event.sample_index)
            )
        if isinstance(event, Transcript):
            return protocol.event("transcript", turn_id=event.turn_id, text=event.text)
        if isinstance(event, ReplyText):
            return protocol.event(
                "reply_text",
                turn_id=event.turn_id,
                chunk_index=event.chunk_index,
                text=event.text,
                is_last=event.is_last,
            )
        if isinstance(event, TurnInterrupted):
            return protocol.event("interrupted", reason=event.reason)
        if isinstance(event, StageError):
            return protocol.event(
                "error",
                code=ErrorCodes.STAGE_FAILED,
                turn_id=event.turn_id,
                message=f"{event.stage} failed: {event.error_type}: {event.detail}",
            )
        if isinstance(event, TurnMetrics):
            return protocol.event(
                "metrics",
                turn_id=event.turn_id,
                end_of_turn_ms=event.end_of_turn_ms,
                stt_ms=event.stt_ms,
                llm_first_token_ms=event.llm_first_token_ms,
                llm_first_chunk_ms=event.llm_first_chunk_ms,
                tts_first_audio_ms=event.tts_first_audio_ms,
                server_voice_to_voice_ms=event.server_voice_to_voice_ms,
            )
        return None

    def _input_index(self, vad_index: int) -> int:
        """A VAD sample index (16 kHz) in the client's own input rate."""
        assert self._hello is not None
        return round(vad_index * self._hello.input_sample_rate_hz / VAD_SAMPLE_RATE_HZ)

    def _error(self, code: str, message: str) -> None:
        self._send(protocol.event("error", code=code, message=message))

    def _refuse(self, code: str, message: str) -> None:
        self._error(code, message)
        self._close(CloseCodes.PROTOCOL_ERROR, message)

    def _send(self, message: str | bytes) -> None:
        with self._send_lock:
            self._send_locked(message)

    def _send_locked(self, message: str | bytes) -> None:
        # On a closed connection the receive loop sees the closure and tears the session down.
        with contextlib.suppress(ConnectionClosed):
            self._connection.send(message)

    def _close(self, code: int, reason: str) -> None:
        # WebSocket close reasons are limited to 123 bytes.
        self._connection.close(code, reason.encode()[:123].decode(errors="ignore"))

"""Every error code and close code of PROTOCOL.md, and the session's promises about turns,
barge-in and pacing, over real loopback sockets against an in-process server whose models are
instant fakes (``tests/fake_models.py``): the claims here are about the protocol, not the
models. Each test sends the cause and asserts the exact code."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection

from s2s.models.audio import resample, to_pcm16
from s2s.models.echo_cancel import EchoCancelOptions
from s2s.pipeline.messages import Samples
from s2s.server.assembly import build_session_pipeline
from s2s.server.protocol import MAX_FRAME_BYTES, CloseCodes
from s2s.server.session import ECHO_CANCELLED_VAD_THRESHOLD, SessionLimits
from tests.fake_models import RATE_HZ, GatedTranscriber, fake_models, spoken
from tests.servers import Running, settle
from tests.ws import RECV_BOUND_S, close_received, hello, next_event, raw

FRAME_S = 0.04


@pytest.fixture
def transcriber() -> GatedTranscriber:
    return GatedTranscriber()


@pytest.fixture
def server(transcriber: GatedTranscriber) -> Iterator[Running]:
    baseline = threading.active_count()
    running = Running(fake_models(transcriber), max_sessions=4)
    yield running
    transcriber.hold.set()
    running.stop()
    assert settle(lambda: threading.active_count() <= baseline), "threads left behind"


def session(server: Running, **fields: Any) -> ClientConnection:
    connection = raw(server.url)
    assert hello(connection, **fields)["type"] == "ready"
    return connection


def send_audio(
    connection: ClientConnection, samples: Samples, rate_hz: int = RATE_HZ, real_time: bool = True
) -> None:
    """Send 40 ms frames, paced as a microphone would (or at once: within the 2 s burst)."""
    frame = round(FRAME_S * rate_hz)
    began = time.monotonic()
    for k, start in enumerate(range(0, len(samples), frame)):
        if real_time:
            wait = began + k * FRAME_S - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        connection.send(to_pcm16(samples[start : start + frame]))


class Listener:
    """Reads every frame of a connection on a thread, in order, with arrival times."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.frames: list[tuple[float, str | bytes]] = []
        self.close: Any = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, name="listener", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                message = self.connection.recv()
                with self._changed:
                    self.frames.append((time.monotonic(), message))
                    self._changed.notify_all()
        except ConnectionClosed as closed:
            with self._changed:
                self.close = closed.rcvd
                self._changed.notify_all()

    def events(self) -> list[dict[str, Any]]:
        with self._changed:
            return [json.loads(m) for _, m in self.frames if isinstance(m, str)]

    def wait_for(self, kind: str, turn_id: int | None = None) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for event in self.events():
                if event["type"] == kind and turn_id in (None, event.get("turn_id")):
                    return event
            return None

        deadline = time.monotonic() + RECV_BOUND_S
        with self._changed:
            while (event := found()) is None:
                left = deadline - time.monotonic()
                assert left > 0 and self.close is None, (kind, turn_id, self.events())
                self._changed.wait(left)
        return event

    def wait_closed(self) -> Any:
        self._thread.join(RECV_BOUND_S)
        assert not self._thread.is_alive()
        return self.close


def is_alive(connection: ClientConnection) -> bool:
    """The session still answers: an ``interrupt`` gets ``interrupted``."""
    connection.send(json.dumps({"type": "interrupt"}))
    return bool(next_event(connection, "interrupted")["reason"] == "client interrupt")


# --- error events: the session goes on ------------------------------------------------------

TEN_MS = 160 * 2  # bytes of 10 ms at 16 kHz


@pytest.mark.parametrize(
    ("send", "code"),
    [
        ("not json at all", "bad_json"),
        ('{"type": "interrupt", "x": NaN}', "bad_json"),
        ('{"type": "interrupt", "x": Infinity}', "bad_json"),
        ("[" * 30_000 + "]" * 30_000, "bad_json"),
        ('{"type": "playback", "turn_id": 1' + "0" * 5000 + ', "played_ms": 1}', "bad_json"),
        ('{"type": "dance"}', "unknown_type"),
        ('["no", "type"]', "bad_message"),
        ('{"type": "hello", "protocol": 1}', "bad_message"),
        ('{"type": "playback", "turn_id": 0, "played_ms": true}', "bad_message"),
        ('{"type": "playback", "turn_id": "0", "played_ms": 1}', "bad_message"),
        ('{"type": "playback", "turn_id": 0, "played_ms": -1}', "bad_message"),
        (b"", "bad_audio"),
        (b"\x01\x02\x03", "bad_audio"),
        (b"\x00" * (TEN_MS // 2), "bad_audio"),
        (b"\x00" * (TEN_MS * 11), "bad_audio"),
    ],
    ids=[
        "not-json",
        "nan",
        "infinity",
        "deep-nesting",
        "huge-integer",
        "unknown-type",
        "no-type",
        "second-hello",
        "boolean-for-a-number",
        "string-for-a-number",
        "negative-time",
        "empty-frame",
        "odd-byte-count",
        "frame-of-5-ms",
        "frame-of-110-ms",
    ],
)
def test_a_bad_message_gets_its_error_code_and_the_session_goes_on(
    server: Running, send: str | bytes, code: str
) -> None:
    connection = session(server)
    connection.send(send)
    error = next_event(connection, "error")
    assert error["code"] == code and error["message"], error
    assert is_alive(connection)
    connection.close()


def test_frames_of_10_and_100_ms_are_audio(server: Running) -> None:
    """The range's two ends are accepted: no error comes before the interrupt's answer."""
    connection = session(server)
    connection.send(b"\x00" * TEN_MS)
    connection.send(b"\x00" * (TEN_MS * 10))
    connection.send(json.dumps({"type": "interrupt"}))
    first = json.loads(connection.recv(timeout=RECV_BOUND_S))
    assert first["type"] == "interrupted", first
    connection.close()


# --- refused handshakes: an error, then close 1002 ---------------------------------------------


@pytest.mark.parametrize(
    ("first", "code"),
    [
        ({"protocol": 2}, "unsupported_protocol"),
        ({"protocol": True}, "unsupported_protocol"),
        ({"input_sample_rate": 12345}, "unsupported_sample_rate"),
        ({"options": {"pipeline": "warp"}}, "bad_message"),
        ({"options": "fast"}, "bad_message"),
        ({"options": {"echo_cancelled": "yes"}}, "bad_message"),
        ({"type": "interrupt"}, "not_ready"),
    ],
    ids=[
        "protocol-2",
        "protocol-true",
        "rate",
        "unknown-pipeline",
        "options-not-an-object",
        "echo-cancelled-not-a-boolean",
        "message-before-hello",
    ],
)
def test_a_bad_hello_gets_its_code_then_close_1002(
    server: Running, first: dict[str, Any], code: str
) -> None:
    connection = raw(server.url)
    message = {
        "type": "hello",
        "protocol": 1,
        "input_sample_rate": 16000,
        "output_sample_rate": 16000,
    }
    connection.send(json.dumps({**message, **first}))
    assert json.loads(connection.recv(timeout=RECV_BOUND_S))["code"] == code
    close = close_received(connection)
    assert close.code == CloseCodes.PROTOCOL_ERROR and close.reason


def test_audio_before_hello_is_not_ready_then_1002(server: Running) -> None:
    connection = raw(server.url)
    connection.send(b"\x00" * TEN_MS * 4)
    assert json.loads(connection.recv(timeout=RECV_BOUND_S))["code"] == "not_ready"
    close = close_received(connection)
    assert close.code == CloseCodes.PROTOCOL_ERROR and "hello" in close.reason


def test_no_hello_within_the_handshake_timeout_is_not_ready_then_1002(server: Running) -> None:
    """The test server's handshake timeout is 2 s."""
    connection = raw(server.url)
    assert json.loads(connection.recv(timeout=RECV_BOUND_S))["code"] == "not_ready"
    close = close_received(connection)
    assert close.code == CloseCodes.PROTOCOL_ERROR and "handshake timeout" in close.reason


# --- turns over the wire --------------------------------------------------------------------


def test_a_failing_model_is_stage_failed_and_the_next_turn_works(
    server: Running, transcriber: GatedTranscriber
) -> None:
    connection = session(server)
    listener = Listener(connection)
    transcriber.failures = 2  # at the pause, then again at the end of the turn
    send_audio(connection, spoken())
    error = listener.wait_for("error")
    assert error["code"] == "stage_failed" and error["turn_id"] == 0
    assert "stt" in error["message"] and "failed on purpose" in error["message"]
    send_audio(connection, spoken())
    assert listener.wait_for("transcript", 1)["text"] == "a question"
    listener.wait_for("reply_audio_end", 1)
    kinds_of_turn_0 = [e["type"] for e in listener.events() if e.get("turn_id") == 0]
    assert "transcript" not in kinds_of_turn_0 and "reply_audio_start" not in kinds_of_turn_0
    connection.close()


def test_end_lets_the_reply_finish_then_closes_1000(server: Running) -> None:
    connection = session(server)
    listener = Listener(connection)
    send_audio(connection, spoken())
    listener.wait_for("reply_audio_start", 0)
    connection.send(json.dumps({"type": "end"}))
    close = listener.wait_closed()
    assert close is not None and close.code == CloseCodes.NORMAL
    kinds = [e["type"] for e in listener.events()]
    assert "reply_audio_end" in kinds and "interrupted" not in kinds


def test_server_shutdown_says_bye_then_closes_1001(transcriber: GatedTranscriber) -> None:
    running = Running(fake_models(transcriber))
    try:
        connection = session(running)
        listener = Listener(connection)
    finally:
        running.stop()
    close = listener.wait_closed()
    assert close is not None and close.code == CloseCodes.GOING_AWAY
    assert [e["type"] for e in listener.events()][-1:] == ["bye"]


def test_an_idle_connection_is_closed_1008(transcriber: GatedTranscriber) -> None:
    running = Running(
        fake_models(transcriber), limits=SessionLimits(handshake_timeout_s=2.0, idle_timeout_s=0.5)
    )
    try:
        close = close_received(session(running))
    finally:
        running.stop()
    assert close.code == CloseCodes.POLICY_VIOLATION and "idle" in close.reason


def test_frames_up_to_256_kib_are_read_and_one_byte_more_closes_1009(
    transcriber: GatedTranscriber,
) -> None:
    """At the documented default limit: 256 KiB is a (too long) audio frame, answered with
    bad_audio; 256 KiB + 1 byte closes the session with 1009."""
    running = Running(fake_models(transcriber), max_frame_bytes=MAX_FRAME_BYTES)
    try:
        assert MAX_FRAME_BYTES == 256 * 1024
        connection = session(running)
        connection.send(b"\x00" * MAX_FRAME_BYTES)
        assert next_event(connection, "error")["code"] == "bad_audio"
        connection.send(b"\x00" * (MAX_FRAME_BYTES + 1))
        close = close_received(connection)
    finally:
        running.stop()
    assert close.code == CloseCodes.MESSAGE_TOO_BIG


def test_a_client_interrupt_during_a_reply_stops_its_audio(server: Running) -> None:
    """``interrupt`` while reply audio streams: ``interrupted`` (client interrupt), and no
    audio frame of that reply after it; the next turn is answered."""
    connection = session(server)
    listener = Listener(connection)
    send_audio(connection, spoken())
    listener.wait_for("reply_audio_start", 0)
    connection.send(json.dumps({"type": "interrupt"}))
    assert listener.wait_for("interrupted", 0)["reason"] == "client interrupt"
    send_audio(connection, spoken())
    listener.wait_for("reply_audio_end", 1)
    after = _after(listener, "interrupted", 0)
    before_next = after[: _index_of(after, "reply_audio_start", 1)]
    assert not any(isinstance(m, bytes) for m in before_next)
    assert not any(_is(m, "reply_audio_end", 0) or _is(m, "reply_text", 0) for m in after)
    connection.close()


def test_an_interrupt_with_no_reply_playing_loses_no_turn(server: Running) -> None:
    """``interrupt`` while the user is still speaking (nothing to stop): it is answered with
    ``interrupted``, and the turn being spoken is still transcribed and answered."""
    connection = session(server)
    listener = Listener(connection)
    send_audio(connection, spoken(seconds=0.5, silence_s=0.0))
    listener.wait_for("speech_started", 0)
    connection.send(json.dumps({"type": "interrupt"}))
    listener.wait_for("interrupted")
    send_audio(connection, spoken(seconds=0.3, silence_s=0.8))
    assert listener.wait_for("transcript", 0)["text"] == "a question"
    listener.wait_for("reply_audio_end", 0)
    connection.close()


def test_reply_audio_is_paced_at_most_300_ms_ahead(server: Running) -> None:
    """The fake reply is 2.6 s of audio made at once: it arrives over about 2.3 s, never more
    than 300 ms (plus one 100 ms frame and scheduling) ahead of real time."""
    connection = session(server)
    listener = Listener(connection)
    send_audio(connection, spoken())
    listener.wait_for("reply_audio_end", 0)
    audio = [(at, m) for at, m in listener.frames if isinstance(m, bytes)]
    first_at = audio[0][0]
    received_s, leads = 0.0, []
    for at, pcm in audio:
        received_s += len(pcm) / 2 / RATE_HZ
        leads.append(received_s - (at - first_at))
    assert received_s > 2.0
    assert max(leads) <= 0.3 + 0.1 + 0.15, max(leads)
    connection.close()


# --- barge-in ---------------------------------------------------------------------------------


def test_speech_while_the_turn_is_transcribed_interrupts_its_reply(
    server: Running, transcriber: GatedTranscriber
) -> None:
    """The turn has ended and STT is still on it when the user speaks again: that turn's reply
    is abandoned (``interrupted``, barge-in) before it starts, and the new speech is the
    next turn."""
    connection = session(server)
    listener = Listener(connection)
    transcriber.hold.clear()
    send_audio(connection, spoken())
    listener.wait_for("speech_stopped", 0)
    assert transcriber.entered.wait(RECV_BOUND_S)
    send_audio(connection, spoken(silence_s=0.0))
    assert listener.wait_for("interrupted", 0)["reason"] == "barge-in"
    transcriber.hold.set()
    send_audio(connection, spoken(seconds=0.0))  # the silence that ends turn 1
    listener.wait_for("reply_audio_end", 1)
    assert not any(e.get("turn_id") == 0 and e["type"] == "transcript" for e in listener.events())
    assert not any(_is(m, "reply_audio_start", 0) for _, m in listener.frames)
    connection.close()


def test_noise_without_words_leaves_nothing_to_interrupt(server: Running) -> None:
    """A turn of noise that transcribes to nothing has no reply: the user's next speech is
    just the next turn (no ``interrupted``)."""
    connection = session(server)
    listener = Listener(connection)
    send_audio(connection, spoken(level=0.05))  # speech to the VAD, no words to the STT
    listener.wait_for("speech_stopped", 0)
    send_audio(connection, spoken())
    listener.wait_for("reply_audio_end", 1)
    assert "interrupted" not in [e["type"] for e in listener.events()]
    connection.close()


def echo_of_the_reply(server: Running, **hello_fields: Any) -> Listener:
    """A turn, then, while its 2.6 s reply plays, 0.8 s of speech at -10 dB under the reply's
    level (what a laptop's microphone hears of its speaker)."""
    connection = session(server, **hello_fields)
    listener = Listener(connection)
    send_audio(connection, spoken())
    listener.wait_for("reply_audio_start", 0)
    time.sleep(0.3)  # a little of the reply has played
    send_audio(connection, spoken(seconds=0.8, level=0.045, silence_s=0.6))
    return listener


def test_the_replys_echo_does_not_interrupt_it(server: Running) -> None:
    listener = echo_of_the_reply(server)
    listener.wait_for("reply_audio_end", 0)
    assert "interrupted" not in [e["type"] for e in listener.events()]
    listener.connection.close()


def test_with_the_echo_test_off_echo_level_speech_interrupts(
    transcriber: GatedTranscriber,
) -> None:
    """``--echo-ratio 0`` (``echo=None``, for headsets): the same quiet speech is a barge-in."""
    running = Running(fake_models(transcriber), echo=None)
    try:
        listener = echo_of_the_reply(running)
        assert listener.wait_for("interrupted", 0)["reason"] == "barge-in"
        listener.connection.close()
    finally:
        running.stop()


def test_a_client_that_cancels_its_echo_has_no_echo_gate(server: Running) -> None:
    """``options.echo_cancelled``: ``ready`` echoes it, and the quiet speech that the gate
    takes for echo above is the user's: it interrupts the reply."""
    connection = raw(server.url)
    ready = hello(connection, options={"echo_cancelled": True})
    assert ready["options"] == {"pipeline": "streaming", "echo_cancelled": True}
    connection.close()
    listener = echo_of_the_reply(server, options={"echo_cancelled": True})
    assert listener.wait_for("interrupted", 0)["reason"] == "barge-in"
    listener.connection.close()


def test_an_echo_cancelled_session_listens_with_a_lower_vad_threshold(
    transcriber: GatedTranscriber,
) -> None:
    """An echo canceller turns the user down during double talk: sessions whose echo is
    cancelled, by the client or by the server (``--server-aec on``, the default), get the VAD
    threshold ECHO_CANCELLED_VAD_THRESHOLD; with ``--server-aec off`` the others keep the
    profile's. The level estimate decides by its frequency bands too only where it stands
    alone: beside the server's canceller, by the whole band's power."""
    models = fake_models(transcriber)
    asked: list[Any] = []
    bands: list[bool | None] = []  # per session: its echo gate's ``bands``, None: no gate

    def build(**kwargs: Any) -> Any:
        asked.append(kwargs.get("vad_overrides"))
        gate = kwargs.get("echo_gate")
        bands.append(None if gate is None else gate.options.bands)
        return build_session_pipeline(models, **kwargs)

    cancelled_by_server: dict[str, Any] = {"echo_cancel": EchoCancelOptions()}
    for changes in (cancelled_by_server, {"echo_cancel": None}):
        running = Running(models, build=build, **changes)
        try:
            for cancelled in (True, False):
                connection = raw(running.url)
                assert hello(connection, options={"echo_cancelled": cancelled})["type"] == "ready"
                connection.close()
        finally:
            running.stop()
    lower = {"threshold": ECHO_CANCELLED_VAD_THRESHOLD}
    assert asked == [lower, lower, lower, {}]
    assert bands == [None, False, None, True]


# --- rates and HTTP -------------------------------------------------------------------------


def test_48_khz_input_reaches_the_vad_resampled(server: Running) -> None:
    """The client's own rate throughout: the onset's sample index counts 48 kHz samples."""
    connection = session(server, input_sample_rate=48000)
    listener = Listener(connection)
    lead_s = 0.48
    audio = np.concatenate([np.zeros(round(lead_s * RATE_HZ), dtype=np.float32), spoken()])
    send_audio(connection, resample(audio, RATE_HZ, 48000), rate_hz=48000)
    started = listener.wait_for("speech_started", 0)
    assert abs(started["sample_index"] - lead_s * 48000) <= 512 * 3  # one 16 kHz VAD window
    assert listener.wait_for("transcript", 0)["text"] == "a question"
    connection.close()


def test_healthz_needs_no_token_but_metrics_does(transcriber: GatedTranscriber) -> None:
    """Docker's health check has no token: /healthz answers it; /metrics wants the token."""
    running = Running(fake_models(transcriber), token="secret")
    base = running.url.replace("ws://", "http://")
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=5) as response:
            assert response.status == 200
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "/metrics", timeout=5)
        assert refused.value.code == 401
        request = urllib.request.Request(
            base + "/metrics", headers={"Authorization": "Bearer secret"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert b"s2s_sessions_active" in response.read()
    finally:
        running.stop()


# --- helpers --------------------------------------------------------------------------------


def _is(message: str | bytes, kind: str, turn_id: int) -> bool:
    if isinstance(message, bytes):
        return False
    event = json.loads(message)
    return bool(event["type"] == kind and event.get("turn_id") == turn_id)


def _index_of(messages: list[str | bytes], kind: str, turn_id: int) -> int:
    return next(k for k, m in enumerate(messages) if _is(m, kind, turn_id))


def _after(listener: Listener, kind: str, turn_id: int) -> list[str | bytes]:
    messages = [m for _, m in listener.frames]
    return messages[_index_of(messages, kind, turn_id) + 1 :]


def test_connections_that_never_finish_opening_are_capped(transcriber: GatedTranscriber) -> None:
    """Silent TCP connections beyond --max-opening get 503 at once (no thread each); when
    the silent ones time out, a normal session opens."""
    running = Running(fake_models(transcriber), max_opening=4)
    host, port = "127.0.0.1", int(running.url.rsplit(":", 1)[1])
    silent = [socket.create_connection((host, port), timeout=5) for _ in range(4)]
    try:
        assert settle(lambda: len(running.server._ws.handler_threads) == 4)  # type: ignore[union-attr]
        with pytest.raises(InvalidStatus) as refused:
            raw(running.url)
        assert refused.value.response.status_code == 503
        assert b"too many connections opening" in refused.value.response.body
        # The refused one's thread ends as soon as it has answered: four remain.
        assert settle(lambda: len(running.server._ws.handler_threads) == 4)  # type: ignore[union-attr]
        for sock in silent:  # the handshake timeout (2 s here) drops each silent one
            assert sock.recv(1024) == b""
        assert is_alive(session(running))
    finally:
        for sock in silent:
            sock.close()
        running.stop()


# --- the Realtime wire format: the codes it shares with v1 ------------------------------------


def realtime_audio(connection: ClientConnection, samples: Samples) -> None:
    """Append 40 ms events of 24 kHz PCM16, paced as a microphone would."""
    audio = resample(samples, RATE_HZ, 24000)
    frame = round(FRAME_S * 24000)
    began = time.monotonic()
    for k, start in enumerate(range(0, len(audio), frame)):
        wait = began + k * FRAME_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        pcm = base64.b64encode(to_pcm16(audio[start : start + frame])).decode()
        connection.send(json.dumps({"type": "input_audio_buffer.append", "audio": pcm}))


def realtime_event(listener: Listener, kind: str) -> dict[str, Any]:
    return listener.wait_for(kind)


def test_realtime_a_failing_model_is_a_server_error_and_the_next_turn_works(
    server: Running, transcriber: GatedTranscriber
) -> None:
    connection = raw(server.url + "/v1/realtime")
    listener = Listener(connection)
    listener.wait_for("session.created")
    transcriber.failures = 2  # at the pause, then again at the end of the turn
    realtime_audio(connection, spoken())
    error = listener.wait_for("error")["error"]
    assert (error["type"], error["code"]) == ("server_error", "stage_failed")
    realtime_audio(connection, spoken())
    done = listener.wait_for("conversation.item.input_audio_transcription.completed")
    assert done["transcript"] == "a question"
    assert listener.wait_for("response.done")["response"]["status"] == "completed"
    connection.close()


def test_realtime_server_shutdown_closes_1001_with_the_reason(
    transcriber: GatedTranscriber,
) -> None:
    running = Running(fake_models(transcriber))
    try:
        connection = raw(running.url + "/v1/realtime")
        listener = Listener(connection)
        listener.wait_for("session.created")
    finally:
        running.stop()
    close = listener.wait_closed()
    assert close is not None and close.code == CloseCodes.GOING_AWAY
    assert "shutting down" in close.reason

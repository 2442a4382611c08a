"""The OpenAI Realtime endpoint, ``/v1/realtime``.

Two layers: the translation alone (``RealtimeWire``, no sockets), and the official ``openai``
Python SDK as the client of a real ``s2s-server`` process with the CPU defaults, as a user
who points an existing Realtime client at s2s would run it.
"""

from __future__ import annotations

import base64
import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from openai import OpenAI
from websockets.exceptions import InvalidStatus

from s2s.models.audio import resample, to_pcm16
from s2s.models.profiles import LoadedModels
from s2s.pipeline.messages import (
    InputCommandDone,
    ReplyText,
    SpeechStarted,
    SpeechStopped,
    Transcript,
    TurnClock,
    TurnInterrupted,
)
from s2s.pipeline.segmenter import VadOptions
from s2s.server.realtime import RATE_HZ, RealtimeDefaults, RealtimeWire
from s2s.server.wire import Audio, EndTurn, Heard, Instruct, InterruptReply, Reply, Start
from tests.conftest import spoken_wav
from tests.processes import Process, start_server

TOKEN = "realtime-secret"
EVENT_BOUND_S = 60.0
"""Generous: how long a test waits for an event before it calls the server stuck."""
FRAME_S = 0.1


# --- the translation alone ------------------------------------------------------------------


def wire() -> RealtimeWire:
    return RealtimeWire("s1", RealtimeDefaults(VadOptions(), "Be brief.", {"stt": "tiny.en"}))


def events(frames: list[str | bytes]) -> list[dict[str, Any]]:
    return [json.loads(frame) for frame in frames]


def replied(commands: list[Any]) -> list[dict[str, Any]]:
    frames = [
        frame for command in commands if isinstance(command, Reply) for frame in command.frames
    ]
    return events(list(frames))


def test_session_update_sets_instructions_and_server_vad_before_the_first_audio() -> None:
    translation = wire()
    created = events(translation.opening())[0]
    assert created["type"] == "session.created"
    assert created["session"]["instructions"] == "Be brief."
    update = {
        "type": "session.update",
        "session": {
            "type": "realtime",
            "instructions": "Answer like a pirate.",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "turn_detection": {
                        "type": "server_vad",
                        "threshold": 0.6,
                        "silence_duration_ms": 700,
                        "prefix_padding_ms": 200,
                    },
                }
            },
        },
    }
    commands = translation.receive(json.dumps(update), started=False)
    assert Instruct("Answer like a pirate.") in commands
    [updated] = replied(commands)
    detection = updated["session"]["audio"]["input"]["turn_detection"]
    assert updated["type"] == "session.updated"
    assert (detection["threshold"], detection["silence_duration_ms"]) == (0.6, 700)
    pcm = to_pcm16(np.zeros(240, dtype=np.float32))
    append = {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}
    start, audio = translation.receive(json.dumps(append), started=False)
    assert isinstance(start, Start) and isinstance(audio, Audio) and audio.pcm == pcm
    assert start.setup.input_sample_rate_hz == start.setup.output_sample_rate_hz == RATE_HZ
    assert dict(start.setup.vad_overrides) == {
        "threshold": 0.6,
        "min_silence_ms": 700,
        "speech_pad_ms": 200,
    }
    # Once audio flows, turn detection stays; instructions may still change.
    late = {"type": "session.update", "session": {"turn_detection": {"type": "server_vad"}}}
    [error] = replied(translation.receive(json.dumps(late), started=True))
    assert error["type"] == "error" and "before the first input audio" in error["error"]["message"]


@pytest.mark.parametrize(
    ("event", "code"),
    [
        ({"type": "conversation.item.create", "item": {}}, "unsupported_event"),
        ({"type": "input_audio_buffer.append", "audio": "not base64!"}, "invalid_request_error"),
        ({"type": "input_audio_buffer.append", "audio": "AA=="}, "invalid_request_error"),
        ({"type": "response.cancel"}, "response_cancel_not_active"),
        ({"type": "conversation.item.truncate", "item_id": "x", "audio_end_ms": 5}, None),
        ({"type": "session.update", "session": {"turn_detection": None}}, None),
        ({"type": "session.update", "session": {"tools": [{"type": "function"}]}}, None),
        (
            {"type": "session.update", "session": {"input_audio_format": "g711_ulaw"}},
            "unsupported_parameter",
        ),
        ([1, 2], "invalid_request_error"),
    ],
)
def test_an_event_outside_the_subset_gets_an_error_that_names_it(
    event: Any, code: str | None
) -> None:
    translation = wire()
    message = {**event, "event_id": "e7"} if isinstance(event, dict) else event
    commands = translation.receive(json.dumps(message), started=True)
    [error] = replied(commands)
    assert error["type"] == "error"
    assert set(error["error"]) >= {"type", "code", "message", "param", "event_id"}
    if code is not None:
        assert error["error"]["code"] == code
    if isinstance(event, dict):
        assert error["error"]["event_id"] == "e7"
        if event["type"] == "conversation.item.create":
            assert "conversation.item.create" in error["error"]["message"]
    assert not [c for c in commands if not isinstance(c, Reply)]  # nothing else happens


def test_a_turn_becomes_items_a_response_and_its_deltas() -> None:
    translation = wire()
    clock = TurnClock()
    common: dict[str, Any] = {"session_id": "s1", "turn_id": 0, "generation": 0}
    frames: list[str | bytes] = []
    frames += translation.event(SpeechStarted(**common, sample_index=8000, at=0.0), {})
    frames += translation.event(SpeechStopped(**common, sample_index=24000, at=1.0), {})
    frames += translation.event(Transcript(**common, text="Hi there.", clock=clock), {})
    for index, text in enumerate(["Hello!", "How are you?", ""]):
        reply = ReplyText(**common, text=text, chunk_index=index, is_last=not text, clock=clock)
        frames += translation.event(reply, {})
    frames += translation.audio_start(0)
    frames += translation.audio(0, b"\x01\x00\x02\x00")
    frames += translation.audio_end(0)
    kinds = [e["type"] for e in events(frames)]
    assert kinds[:3] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
    ]
    assert kinds.index("conversation.item.input_audio_transcription.completed") < kinds.index(
        "response.created"
    )
    assert kinds[-1] == "response.done"
    by_kind = {e["type"]: e for e in events(frames)}
    assert by_kind["input_audio_buffer.speech_started"]["audio_start_ms"] == 500
    assert by_kind["input_audio_buffer.speech_stopped"]["audio_end_ms"] == 1500
    deltas = [e["delta"] for e in events(frames) if e["type"].endswith("transcript.delta")]
    assert "".join(deltas) == "Hello! How are you?"
    assert base64.b64decode(by_kind["response.output_audio.delta"]["delta"]) == b"\x01\x00\x02\x00"
    done = by_kind["response.done"]["response"]
    assert done["status"] == "completed"
    assert done["output"][0]["content"][0]["transcript"] == "Hello! How are you?"
    # The assistant's item can then be truncated: that is the v1 playback report.
    item_id = done["output"][0]["id"]
    truncate = {"type": "conversation.item.truncate", "item_id": item_id, "audio_end_ms": 800}
    commands = translation.receive(json.dumps(truncate), started=True)
    assert Heard(0, 800.0) in commands
    assert replied(commands)[0]["type"] == "conversation.item.truncated"


def test_cancel_barge_in_commit_and_clear_map_onto_the_core() -> None:
    translation = wire()
    common: dict[str, Any] = {"session_id": "s1", "turn_id": 0, "generation": 0}
    translation.event(Transcript(**common, text="Hi.", clock=TurnClock()), {})
    cancel = translation.receive(json.dumps({"type": "response.cancel"}), started=True)
    assert cancel == [InterruptReply()]
    again = translation.receive(json.dumps({"type": "response.create"}), started=True)
    assert replied(again)[0]["error"]["code"] == "conversation_already_has_active_response"
    cancelled = events(
        translation.event(TurnInterrupted(**common, reason="client interrupt", at=0.0), {})
    )
    done = cancelled[-1]["response"]
    assert (done["status"], done["status_details"]["reason"]) == ("cancelled", "client_cancelled")
    assert translation.audio(0, b"\x00\x00") == []  # nothing of it after response.done
    for action in ("commit", "clear"):
        command = translation.receive(
            json.dumps({"type": f"input_audio_buffer.{action}"}), started=True
        )
        assert command == [EndTurn(action)]
    empty = events(
        translation.event(InputCommandDone(**common, action="commit", applied=False), {})
    )
    assert empty[0]["error"]["code"] == "input_audio_buffer_commit_empty"
    cleared = events(
        translation.event(InputCommandDone(**common, action="clear", applied=True), {})
    )
    assert cleared[0]["type"] == "input_audio_buffer.cleared"


# --- the openai SDK against a real server ------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[Process, int]]:
    process, url = start_server("--token", TOKEN)
    try:
        yield process, int(url.rsplit(":", 1)[1])
    finally:
        process.kill()


def pcm_24k(path: Path, silence_s: float = 2.0) -> bytes:
    audio, rate = soundfile.read(str(path), dtype="float32")
    mono = audio[:, 0] if audio.ndim == 2 else audio
    speech = resample(mono, rate, RATE_HZ)
    tail = np.zeros(int(silence_s * RATE_HZ), dtype=np.float32)
    return to_pcm16(np.concatenate([speech, tail]).astype(np.float32))


class Listener:
    """Every server event of one SDK connection, read on a thread, with a bounded wait."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self.events: queue.Queue[Any] = queue.Queue()
        self.seen: list[Any] = []
        self._thread = threading.Thread(target=self._read, name="sdk-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._connection:
                self.events.put(event)
        except Exception as exc:  # the connection closed under the test: report it
            self.events.put(exc)

    def until(self, kind: str, bound_s: float = EVENT_BOUND_S) -> Any:
        deadline = time.monotonic() + bound_s
        while True:
            try:
                event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                seen = [e.type for e in self.seen]
                raise AssertionError(f"no {kind} within {bound_s} s; saw {seen}") from None
            if isinstance(event, Exception):
                raise AssertionError(f"connection ended waiting for {kind}: {event!r}")
            self.seen.append(event)
            if event.type == kind:
                return event

    def drain(self, seconds: float) -> None:
        time.sleep(seconds)
        while not self.events.empty():
            event = self.events.get()
            if not isinstance(event, Exception):
                self.seen.append(event)


def stream(connection: Any, pcm: bytes, stop: threading.Event) -> None:
    """The microphone: 100 ms of audio every 100 ms, then silence until told to stop."""
    frame = int(FRAME_S * RATE_HZ) * 2
    chunks = [pcm[i : i + frame] for i in range(0, len(pcm), frame)]
    silence = bytes(frame)
    started = time.monotonic()
    sent = 0
    while not stop.is_set():
        chunk = chunks[sent] if sent < len(chunks) else silence
        connection.input_audio_buffer.append(audio=base64.b64encode(chunk).decode())
        sent += 1
        time.sleep(max(0.0, started + sent * FRAME_S - time.monotonic()))


def sdk(port: int, token: str = TOKEN) -> OpenAI:
    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token)


@pytest.fixture(scope="module")
def question(cpu_models: LoadedModels, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    folder = tmp_path_factory.mktemp("realtime")
    return pcm_24k(spoken_wav(cpu_models, "What is the capital of France?", folder))


@pytest.fixture(scope="module")
def long_question(cpu_models: LoadedModels, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    folder = tmp_path_factory.mktemp("realtime-long")
    return pcm_24k(spoken_wav(cpu_models, "Tell me a long story about a dragon.", folder))


def test_the_sdk_hears_a_spoken_question_answered(
    server: tuple[Process, int], question: bytes
) -> None:
    """A spoken question streamed in real time yields the transcription, the reply's
    transcript and audio deltas, and ``response.done``."""
    _, port = server
    with sdk(port).realtime.connect(model="s2s-test") as connection:
        listener = Listener(connection)
        created = listener.until("session.created")
        assert created.session.model == "s2s-test"
        connection.session.update(
            session={"type": "realtime", "instructions": "Answer in one short sentence."}
        )
        assert listener.until("session.updated").session.instructions.startswith("Answer in one")
        stop = threading.Event()
        mic = threading.Thread(target=stream, args=(connection, question, stop), daemon=True)
        mic.start()
        try:
            listener.until("input_audio_buffer.speech_started")
            listener.until("input_audio_buffer.speech_stopped")
            heard = listener.until("conversation.item.input_audio_transcription.completed")
            created_response = listener.until("response.created")
            done = listener.until("response.done")
        finally:
            stop.set()
            mic.join(5.0)
    assert "capital" in heard.transcript.lower() and "france" in heard.transcript.lower()
    response_id = created_response.response.id
    kinds = [e.type for e in listener.seen]
    deltas = [e for e in listener.seen if e.type == "response.output_audio_transcript.delta"]
    audio = [e for e in listener.seen if e.type == "response.output_audio.delta"]
    assert deltas and all(e.response_id == response_id for e in deltas)
    assert audio and all(e.response_id == response_id for e in audio)
    samples = sum(len(base64.b64decode(e.delta)) // 2 for e in audio)
    assert samples > RATE_HZ // 2  # at least half a second of speech
    assert done.response.status == "completed" and done.response.id == response_id
    transcript = "".join(e.delta for e in deltas)
    assert transcript.strip()
    assert done.response.output[0].content[0].transcript == transcript
    assert kinds.index("input_audio_buffer.committed") < kinds.index("response.created")


def test_response_cancel_stops_the_reply_and_nothing_of_it_follows(
    server: tuple[Process, int], long_question: bytes
) -> None:
    _, port = server
    with sdk(port).realtime.connect(model="s2s") as connection:
        listener = Listener(connection)
        listener.until("session.created")
        connection.session.update(
            session={
                "type": "realtime",
                "instructions": "Tell long, detailed stories of at least five sentences.",
            }
        )
        listener.until("session.updated")
        stop = threading.Event()
        mic = threading.Thread(target=stream, args=(connection, long_question, stop), daemon=True)
        mic.start()
        try:
            first_audio = listener.until("response.output_audio.delta")
            connection.response.cancel()
            done = listener.until("response.done")
            listener.drain(1.5)  # anything of the cancelled reply would arrive by now
            item_id = done.response.output[0].id
            connection.conversation.item.truncate(
                item_id=item_id, content_index=0, audio_end_ms=300
            )
            truncated = listener.until("conversation.item.truncated")
        finally:
            stop.set()
            mic.join(5.0)
    assert done.response.id == first_audio.response_id
    assert done.response.status == "cancelled"
    assert done.response.status_details.reason == "client_cancelled"
    after = listener.seen[listener.seen.index(done) + 1 :]
    late = [e for e in after if getattr(e, "response_id", None) == done.response.id]
    assert late == []
    assert truncated.item_id == item_id and truncated.audio_end_ms == 300


def test_a_wrong_token_is_refused(server: tuple[Process, int]) -> None:
    _, port = server
    with pytest.raises(InvalidStatus) as refused:
        sdk(port, token="not-the-token").realtime.connect(model="s2s").enter()
    assert refused.value.response.status_code == 401


def test_an_unsupported_event_gets_an_error_and_the_session_goes_on(
    server: tuple[Process, int],
) -> None:
    _, port = server
    with sdk(port).realtime.connect(model="s2s") as connection:
        listener = Listener(connection)
        listener.until("session.created")
        connection.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Hello"}],
            }
        )
        error = listener.until("error")
        connection.session.update(session={"type": "realtime", "instructions": "Be kind."})
        updated = listener.until("session.updated")
    assert error.error.code == "unsupported_event"
    assert "conversation.item.create" in error.error.message
    assert updated.session.instructions == "Be kind."


def test_commit_ends_the_turn_before_a_long_server_vad_silence(
    server: tuple[Process, int], question: bytes
) -> None:
    """With ``silence_duration_ms`` set to 8 s, the turn would end 8 s after the question;
    the client's commit ends it at once, and the answer follows."""
    _, port = server
    with sdk(port).realtime.connect(model="s2s") as connection:
        listener = Listener(connection)
        listener.until("session.created")
        connection.session.update(
            session={
                "type": "realtime",
                "audio": {
                    "input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 8000}}
                },
            }
        )
        updated = listener.until("session.updated")
        stop = threading.Event()
        mic = threading.Thread(target=stream, args=(connection, question, stop), daemon=True)
        mic.start()
        try:
            listener.until("input_audio_buffer.speech_started")
            time.sleep(len(question) / 2 / RATE_HZ - 1.5)  # the question's end
            committed_at = time.monotonic()
            connection.input_audio_buffer.commit()
            listener.until("input_audio_buffer.committed")
            took_s = time.monotonic() - committed_at
            heard = listener.until("conversation.item.input_audio_transcription.completed")
            done = listener.until("response.done")
        finally:
            stop.set()
            mic.join(5.0)
    assert updated.session.audio.input.turn_detection.silence_duration_ms == 8000
    assert took_s < 4.0, "the turn waited for the silence instead of the commit"
    assert "capital" in heard.transcript.lower()
    assert done.response.status == "completed"

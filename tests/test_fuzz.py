"""Property-based fuzzing of what clients send (hypothesis): every frame, however malformed,
ends in commands or an ``error`` with a code; nothing raises. First the two wire formats
alone, then frames over a real socket to a server with an instant fake pipeline."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from s2s.pipeline.messages import AudioChunk
from s2s.pipeline.pipeline import Pipeline
from s2s.pipeline.stage import Stage, StageContext
from s2s.server.app import S2SServer, ServerConfig
from s2s.server.realtime import RealtimeDefaults, RealtimeWire
from s2s.server.wire import Reply, V1Wire

DOCUMENTED_CLOSES = {1000, 1001, 1002, 1008, 1009, 1013}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)
message_types = st.sampled_from(
    [
        "hello", "interrupt", "end", "playback", "session.update",
        "input_audio_buffer.append", "input_audio_buffer.commit", "response.cancel",
        "conversation.item.truncate", "nonsense",
    ]
)  # fmt: skip
messages = st.builds(
    lambda kind, fields: json.dumps({"type": kind, **fields}, allow_nan=True),
    message_types,
    st.dictionaries(
        st.sampled_from(
            [
                "protocol",
                "turn_id",
                "played_ms",
                "options",
                "input_sample_rate",
                "session",
                "audio",
                "item_id",
                "audio_end_ms",
                "event_id",
            ]
        ),
        json_values,
    ),
)
frames = messages | st.text(max_size=200) | st.binary(max_size=4000)


def assert_answered(commands: list[Any]) -> None:
    for command in commands:
        if isinstance(command, Reply) and command.error_code is not None:
            [frame] = command.frames
            event = json.loads(frame)
            assert event["type"] == "error"


@settings(max_examples=400, deadline=None)
@given(frames, st.booleans())
def test_v1_answers_every_frame(frame: str | bytes, started: bool) -> None:
    assert_answered(V1Wire({}).receive(frame, started=started))


@settings(max_examples=400, deadline=None)
@given(frames, st.booleans())
def test_realtime_answers_every_frame(frame: str | bytes, started: bool) -> None:
    assert_answered(RealtimeWire("s1", RealtimeDefaults()).receive(frame, started=started))


class Instant(Stage[AudioChunk, AudioChunk]):
    name = "instant"

    def handle(self, item: AudioChunk, ctx: StageContext) -> Iterator[AudioChunk]:
        return iter(())


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    def build(**kwargs: Any) -> Pipeline:
        return Pipeline(
            [Instant()],
            deliver=kwargs["deliver"],
            on_event=kwargs["on_event"],
            session_id=kwargs["session_id"],
        )

    running = S2SServer(ServerConfig(port=0, max_sessions=64), build, {"device": "cpu"})
    running.start()
    thread = threading.Thread(target=running.serve_forever, name="fuzz-server")
    thread.start()
    yield f"ws://127.0.0.1:{running.port}"
    assert running.shutdown(2.0) == []
    thread.join(5.0)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(frames, min_size=1, max_size=4), st.booleans())
def test_over_a_socket_every_frame_gets_an_error_or_a_documented_close(
    server: str, caplog: pytest.LogCaptureFixture, sent: list[str | bytes], realtime: bool
) -> None:
    caplog.set_level(logging.ERROR)
    url = f"{server}/v1/realtime" if realtime else server
    with connect(url, open_timeout=5, close_timeout=1) as client:
        if not realtime:
            client.send(json.dumps({"type": "hello", "protocol": 1}))
        client.recv(timeout=5)  # ready, or session.created
        try:
            for frame in sent:
                client.send(frame)
            client.send(json.dumps({"type": "response.cancel" if realtime else "interrupt"}))
            while True:  # drain until quiet: whatever comes is JSON with a type
                message = client.recv(timeout=0.3)
                if isinstance(message, str):
                    assert isinstance(json.loads(message).get("type"), str)
        except TimeoutError:
            pass  # the session is still open and answering nothing more
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code in DOCUMENTED_CLOSES
            assert closed.rcvd.reason
    assert not [r for r in caplog.records if r.exc_info], "a traceback in the server log"

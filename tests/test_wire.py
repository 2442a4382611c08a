"""Layer 1: protocol v1's wire format alone (no sockets): every malformed client message is
an ``error`` event with a code, and the session goes on."""

from __future__ import annotations

import json

import pytest

from s2s.server.protocol import ErrorCodes
from s2s.server.wire import Audio, Finish, Heard, InterruptReply, Refuse, Reply, Start, V1Wire

HELLO = json.dumps({"type": "hello", "protocol": 1, "input_sample_rate": 16000})


def wire() -> V1Wire:
    return V1Wire({"device": "cpu"})


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("[" * 100_000 + "]" * 100_000, ErrorCodes.BAD_JSON),  # deeper than the stack
        ('{"type": "playback", "turn_id": ' + "9" * 5000 + ', "played_ms": 1}', "bad_json"),
        ('{"type": "playback", "turn_id": 0, "played_ms": NaN}', ErrorCodes.BAD_JSON),
        ('{"type": "playback", "turn_id": 0, "played_ms": Infinity}', ErrorCodes.BAD_JSON),
        ('{"type": "playback", "turn_id": true, "played_ms": 5}', ErrorCodes.BAD_MESSAGE),
        ('{"type": "playback", "turn_id": 0, "played_ms": false}', ErrorCodes.BAD_MESSAGE),
        ('{"type": "playback", "turn_id": 0, "played_ms": -1}', ErrorCodes.BAD_MESSAGE),
        ('{"type": "playback", "turn_id": "0", "played_ms": 1}', ErrorCodes.BAD_MESSAGE),
        ('{"type": "' + "x" * 100_000 + '"}', ErrorCodes.UNKNOWN_TYPE),
        ('{"type": 7}', ErrorCodes.BAD_MESSAGE),
        ("[]", ErrorCodes.BAD_MESSAGE),
        ("not json", ErrorCodes.BAD_JSON),
        (HELLO, ErrorCodes.BAD_MESSAGE),  # a second hello
    ],
)
def test_a_malformed_message_during_a_session_is_an_error_event(text: str, code: str) -> None:
    [reply] = wire().receive(text, started=True)
    assert isinstance(reply, Reply) and reply.error_code == code
    [frame] = reply.frames
    assert isinstance(frame, str)
    event = json.loads(frame)
    assert (event["type"], event["code"]) == ("error", code) and event["message"]


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (b"\x00\x00", ErrorCodes.NOT_READY),
        ('{"type": "interrupt"}', ErrorCodes.NOT_READY),
        ('{"type": "hello", "protocol": true}', ErrorCodes.UNSUPPORTED_VERSION),
        ('{"type": "hello", "protocol": 2}', ErrorCodes.UNSUPPORTED_VERSION),
        ('{"type": "hello", "input_sample_rate": 16000.0}', ErrorCodes.UNSUPPORTED_RATE),
        ('{"type": "hello", "input_sample_rate": true}', ErrorCodes.UNSUPPORTED_RATE),
        ('{"type": "hello", "options": {"pipeline": ["x"]}}', ErrorCodes.BAD_MESSAGE),
        ('{"type": "hello", "options": []}', ErrorCodes.BAD_MESSAGE),
    ],
)
def test_a_bad_handshake_is_refused_with_the_code(message: str | bytes, code: str) -> None:
    [refusal] = wire().receive(message, started=False)
    assert isinstance(refusal, Refuse) and refusal.error_code == code and refusal.reason


def test_good_messages_become_commands() -> None:
    translation = wire()
    [start] = translation.receive(HELLO, started=False)
    assert isinstance(start, Start) and start.setup.input_sample_rate_hz == 16000
    frame = bytes(640)  # 20 ms at 16 kHz
    assert translation.receive(frame, started=True) == [Audio(frame)]
    assert translation.receive('{"type": "interrupt"}', started=True) == [InterruptReply()]
    playback = '{"type": "playback", "turn_id": 2, "played_ms": 1250}'
    assert translation.receive(playback, started=True) == [Heard(2, 1250.0)]
    assert translation.receive('{"type": "end"}', started=True) == [Finish()]
    for bad in (b"\x01", bytes(2), bytes(318), bytes(3202)):  # odd; 1 sample; 9.9, 100.1 ms
        [refused] = translation.receive(bad, started=True)
        assert isinstance(refused, Reply) and refused.error_code == ErrorCodes.BAD_AUDIO
    assert translation.receive(bytes(320), started=True) == [Audio(bytes(320))]  # 10 ms
    assert translation.receive(bytes(3200), started=True) == [Audio(bytes(3200))]  # 100 ms

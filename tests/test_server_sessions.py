"""Sessions over real loopback sockets against an in-process server on the real CPU models:
separate histories, the session limit, the token, and every kind of bad input."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from s2s.client.app import ClientConfig, VoiceClient
from s2s.client.audio import FileSource, NullSink
from s2s.models.audio import to_pcm16
from s2s.models.profiles import LoadedModels
from s2s.pipeline.stages import LlmStage
from s2s.server.protocol import CloseCodes
from tests.conftest import spoken_wav
from tests.servers import Running, settle
from tests.ws import hello, next_event
from tests.ws import raw as raw_any

pytestmark = pytest.mark.models

TOKEN = "let-me-in"


@pytest.fixture
def running(cpu_models: LoadedModels) -> Iterator[Running]:
    baseline = threading.active_count()
    server = Running(cpu_models, max_sessions=2, token=TOKEN)
    yield server
    server.stop()
    assert settle(lambda: threading.active_count() <= baseline), "threads left behind"


def raw(url: str, token: str | None = TOKEN) -> ClientConnection:
    return raw_any(url, token)


def converse(url: str, wav: Path) -> list[dict[str, Any]]:
    """One headless client session with a file; returns its events."""
    events: list[dict[str, Any]] = []
    client = VoiceClient(
        ClientConfig(url=url, token=TOKEN, exit_after_reply=True),
        FileSource(wav, 16_000),
        NullSink(16_000),
        events.append,
    )
    try:
        outcome = client.run()
    finally:
        assert client.close() == []
    assert outcome.exit_code == 0, outcome.message
    return events


def test_two_sessions_at_once_keep_separate_histories(
    running: Running, cpu_models: LoadedModels, question_wav: Path, tmp_path: Path
) -> None:
    """Two clients talk at the same time; each session's history holds only its own turn."""
    other_wav = spoken_wav(cpu_models, "What color is the sky?", tmp_path)
    results: dict[str, list[dict[str, Any]]] = {}
    threads = [
        threading.Thread(
            target=lambda n=name, w=wav: results.__setitem__(n, converse(running.url, w))
        )
        for name, wav in (("france", question_wav), ("sky", other_wav))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert set(results) == {"france", "sky"}
    heard_by_client = {
        name: [e["text"] for e in events if e["type"] == "transcript"]
        for name, events in results.items()
    }
    assert all(len(texts) == 1 for texts in heard_by_client.values()), heard_by_client
    assert heard_by_client["france"] != heard_by_client["sky"]
    assert len(running.pipelines) == 2
    # The LLM stage records an exchange just after its last chunk: give it that moment.
    assert settle(lambda: all(len(p.stage(LlmStage).history) == 1 for p in running.pipelines))
    user_turns = [
        [m["content"] for m in pipeline.stage(LlmStage).history.prompt("next")[1:-1:2]]
        for pipeline in running.pipelines
    ]
    # Each session remembers exactly its own question, and nothing of the other's.
    assert sorted(user_turns) == sorted(heard_by_client.values()), (user_turns, heard_by_client)


def test_a_session_beyond_max_sessions_is_refused_with_a_reason(running: Running) -> None:
    """With two sessions open, a third is closed with 1013 and says why."""
    first, second = raw(running.url), raw(running.url)
    hello(first)
    hello(second)
    third = raw(running.url)
    with pytest.raises(ConnectionClosed) as closed:
        third.recv(timeout=5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == CloseCodes.TRY_AGAIN_LATER
    assert "2 sessions at most" in closed.value.rcvd.reason
    first.close()
    second.close()


def test_a_slot_is_free_as_soon_as_its_connection_ends(running: Running) -> None:
    """At --max-sessions, a client that hangs up and reconnects at once gets in every time
    (the old session's teardown may still be running)."""
    keeper = raw(running.url)
    hello(keeper)  # one of the two slots stays taken
    for _ in range(5):
        client = raw(running.url)
        assert hello(client)["type"] == "ready"
        client.close()
    keeper.close()


def test_a_wrong_token_is_refused_in_the_handshake(running: Running) -> None:
    """HTTP 401 before any WebSocket exists."""
    with pytest.raises(InvalidStatus) as refused:
        raw(running.url, token="wrong")
    assert refused.value.response.status_code == 401


def test_a_browser_passes_the_token_as_a_query_parameter(running: Running) -> None:
    """Browsers cannot set Authorization on a WebSocket: ``?token=`` works, a wrong one is
    refused with 401 like a wrong header."""
    with connect(f"{running.url}/?token={TOKEN}", open_timeout=5) as accepted:
        assert hello(accepted)["type"] == "ready"
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{running.url}/?token=wrong", open_timeout=5)
    assert refused.value.response.status_code == 401


def test_two_authorization_headers_are_a_bad_request(running: Running) -> None:
    """Duplicate credentials get HTTP 400 with a reason, not a server error."""
    headers = [("Authorization", f"Bearer {TOKEN}"), ("Authorization", "Bearer other")]
    with pytest.raises(InvalidStatus) as refused:
        connect(running.url, additional_headers=headers, open_timeout=5)
    assert refused.value.response.status_code == 400
    assert b"one Authorization header" in refused.value.response.body


def test_a_token_with_non_ascii_characters_is_refused_not_crashed(running: Running) -> None:
    """A token the constant-time comparison cannot take as ASCII is simply wrong: 401."""
    with pytest.raises(InvalidStatus) as refused:
        raw(running.url, token="wrong-tökén")
    assert refused.value.response.status_code == 401


@pytest.mark.parametrize(
    ("send", "code"),
    [
        ("not json at all", "bad_json"),
        (json.dumps({"type": "dance"}), "unknown_type"),
        (json.dumps(["no", "type"]), "bad_message"),
        (b"\x01\x02\x03", "bad_audio"),
    ],
    ids=["non-json", "unknown-type", "no-type", "odd-length-audio"],
)
def test_bad_messages_get_an_error_event_and_the_session_goes_on(
    running: Running, send: str | bytes, code: str
) -> None:
    """The error event names the problem; the same session then still accepts audio."""
    connection = raw(running.url)
    assert hello(connection)["type"] == "ready"
    connection.send(send)
    error = next_event(connection, "error")
    assert error["code"] == code and error["message"]
    connection.send(to_pcm16(np.zeros(512, dtype=np.float32)))
    connection.send(json.dumps({"type": "interrupt"}))
    assert next_event(connection, "interrupted")["reason"] == "client interrupt"
    connection.close()


def test_audio_before_hello_is_refused(running: Running) -> None:
    """An error event, then close 1002 with the reason."""
    connection = raw(running.url)
    connection.send(to_pcm16(np.zeros(512, dtype=np.float32)))
    assert json.loads(connection.recv(timeout=5))["code"] == "not_ready"
    with pytest.raises(ConnectionClosed) as closed:
        connection.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == CloseCodes.PROTOCOL_ERROR
    assert "hello" in closed.value.rcvd.reason


def test_an_unsupported_sample_rate_is_refused(running: Running) -> None:
    """hello with 12345 Hz: an error listing the supported rates, then close 1002."""
    connection = raw(running.url)
    answer = hello(connection, input_sample_rate=12345)
    assert answer["code"] == "unsupported_sample_rate" and "16000" in answer["message"]
    with pytest.raises(ConnectionClosed):
        connection.recv(timeout=5)


def test_an_oversized_frame_closes_only_that_session(running: Running) -> None:
    """A frame over the size limit closes the session with 1009; another session is unharmed."""
    bystander = raw(running.url)
    hello(bystander)
    connection = raw(running.url)
    hello(connection)
    connection.send(b"\x00" * (128 * 1024))
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            connection.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == CloseCodes.MESSAGE_TOO_BIG
    bystander.send(json.dumps({"type": "interrupt"}))
    assert next_event(bystander, "interrupted")
    bystander.close()


def test_after_every_bad_input_a_normal_turn_works_and_nothing_is_left(
    cpu_models: LoadedModels, question_wav: Path
) -> None:
    """All the bad inputs in a row, then a normal turn; threads and sessions back to baseline."""
    baseline = threading.active_count()
    server = Running(cpu_models, max_sessions=2, token=TOKEN)
    try:
        for bad in ("not json", json.dumps({"type": "dance"}), b"\x01"):
            connection = raw(server.url)
            hello(connection)
            connection.send(bad)
            next_event(connection, "error")
            connection.close()
        early = raw(server.url)
        early.send(b"\x00\x00")
        with pytest.raises(ConnectionClosed):
            while True:
                early.recv(timeout=5)
        with pytest.raises(InvalidStatus):
            raw(server.url, token=None)
        big = raw(server.url)
        hello(big)
        big.send(b"\x00" * (128 * 1024))
        with pytest.raises(ConnectionClosed):
            while True:
                big.recv(timeout=5)
        assert settle(lambda: server.server.session_count == 0)
        events = converse(server.url, question_wav)
        [turn] = [e for e in events if e["type"] == "turn"]
        assert "paris" in turn["assistant_text"].lower()
    finally:
        server.stop()
    assert settle(lambda: threading.active_count() <= baseline), [
        t.name for t in threading.enumerate()
    ]

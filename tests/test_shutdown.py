"""SIGTERM ends the server within 2 s whatever its clients are doing: real server processes,
real sockets, real signals. Exit status 0 when every thread was joined."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from websockets.sync.client import ClientConnection, connect

from s2s.models.audio import resample, to_pcm16
from s2s.pipeline.pipeline import Pipeline
from s2s.server.app import S2SServer, ServerConfig
from tests.fakes import Wedged
from tests.processes import SERVER_EXIT_BOUND_S, Process, start_server
from tests.ws import mute_session

pytestmark = pytest.mark.models


def hello(url: str, **fields: Any) -> ClientConnection:
    connection = connect(url, open_timeout=5, close_timeout=0.5, legacy=True)
    connection.send(json.dumps({"type": "hello", "protocol": 1, **fields}))
    assert json.loads(connection.recv(timeout=5))["type"] == "ready"
    return connection


def sigterm(server: Process) -> tuple[int, float]:
    status, took = server.signal_and_time(signal.SIGTERM)
    print(f"exit {status} after {took * 1000:.0f} ms")
    return status, took


@pytest.fixture
def server() -> Iterator[tuple[Process, str]]:
    process, url = start_server()
    yield process, url
    process.kill()


def test_sigterm_during_the_handshake(server: tuple[Process, str]) -> None:
    """Three clients at three points of the handshake: one sent half an HTTP request, one
    sent nothing at all (both would hold their threads until the 5 s handshake timeout), one
    has its WebSocket but sent no hello yet. Exit 0 (every thread joined) in time."""
    process, url = server
    host, port = url.removeprefix("ws://").split(":")
    half = socket.create_connection((host, int(port)), timeout=5)
    half.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
    silent = socket.create_connection((host, int(port)), timeout=5)
    waiting = connect(url, open_timeout=5, close_timeout=0.5, legacy=True)
    try:
        status, took = sigterm(process)
    finally:
        waiting.close()
        half.close()
        silent.close()
    assert status == 0 and took < SERVER_EXIT_BOUND_S, process.stderr()
    assert "threads still alive" not in process.stderr()


def test_sigterm_while_an_end_is_drained(question_wav: Path) -> None:
    """The client said `end` right after its question: the server is finishing a long reply
    (paced to real time, so the drain would take as long as the reply plays) when the
    signal comes."""
    process, url = start_server(
        "--system-prompt", "You tell long stories of many sentences.", "--max-new-tokens", "200"
    )
    try:
        client = hello(url)
        audio, rate = soundfile.read(str(question_wav), dtype="float32", always_2d=True)
        speech = resample(audio.mean(axis=1).astype(np.float32), rate, 16_000)
        pcm = to_pcm16(np.concatenate([speech, np.zeros(16_000, dtype=np.float32)]))
        began = time.monotonic()
        for index, start in enumerate(range(0, len(pcm), 3200)):
            time.sleep(max(0.0, began + index * 0.1 - time.monotonic()))
            client.send(pcm[start : start + 3200])
        client.send(json.dumps({"type": "end"}))
        wait_for(client, lambda event: event["type"] == "reply_audio_start")
        status, took = sigterm(process)
        client.close()
    finally:
        process.kill()
    assert status == 0 and took < SERVER_EXIT_BOUND_S, process.stderr()


def test_sigterm_with_four_clients_that_never_answer_the_close(
    server: tuple[Process, str],
) -> None:
    """Four sessions whose clients stop reading: no closing handshake ever comes back."""
    process, url = server
    clients = [mute_session(url) for _ in range(4)]  # never read from again
    status, took = sigterm(process)
    for client in clients:
        client.close()
    assert status == 0 and took < SERVER_EXIT_BOUND_S, process.stderr()


def wait_for(connection: ClientConnection, wanted: Callable[[dict[str, Any]], bool]) -> None:
    while True:
        message = connection.recv(timeout=60)
        if isinstance(message, str) and wanted(json.loads(message)):
            return


def test_shutdown_with_a_stage_stuck_in_a_model_call_keeps_its_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server's shutdown returns within its deadline instead of waiting for the stuck
    call, and the log names the thread left behind (a daemon: it cannot hold the process)."""
    stage = Wedged()

    def build(**kwargs: Any) -> Pipeline:
        return Pipeline(
            [stage],
            deliver=kwargs["deliver"],
            on_event=kwargs["on_event"],
            session_id=kwargs["session_id"],
        )

    server = S2SServer(ServerConfig(port=0), build, {"device": "cpu"})
    server.start()
    serving = threading.Thread(target=server.serve_forever, name="test-server")
    serving.start()
    try:
        client = hello(f"ws://127.0.0.1:{server.port}")
        client.send(bytes(3200))
        assert stage.entered.wait(5.0)
        began = time.monotonic()
        left = server.shutdown(1.5)
        took = time.monotonic() - began
        client.close()
    finally:
        stage.release.set()
        serving.join(5.0)
    print(f"shutdown took {took * 1000:.0f} ms; left: {left}")
    assert took < SERVER_EXIT_BOUND_S and left == []
    assert any("threads left" in r.message and "wedged" in r.message for r in caplog.records)

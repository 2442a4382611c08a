"""Ctrl+C on the client at every moment of a session, against real processes and sockets.

Each test prints how long the client took to exit; the promise is 0.5 s, the tests allow a
generous 2 s so that a loaded CI machine never turns a hang-free exit into a failure.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import HANG_BOUND_S, Process, start_client, start_server

pytestmark = pytest.mark.models

STARTED_BOUND_S = 30.0
"""For the client to start (imports) and reach the fake server: a hang bound only."""


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    server, url = start_server()
    yield url
    server.signal_and_time(signal.SIGTERM)


def assert_interrupted_quickly(client: Process, moment: str) -> None:
    status, took = client.signal_and_time(signal.SIGINT)
    print(f"Ctrl+C {moment}: exit {status} after {took * 1000:.0f} ms")
    assert status == 130, client.stderr()
    assert took < HANG_BOUND_S
    assert "Traceback" not in client.stderr()


@pytest.mark.parametrize("fake_server", ["silent-tcp"], indirect=True)
def test_ctrl_c_before_the_connection_is_up(
    fake_server: tuple[Process, str], question_wav: Path
) -> None:
    """Server accepts TCP but never answers the WebSocket handshake."""
    fake, url = fake_server
    client = start_client(url, "--file", str(question_wav))
    fake.wait_for(lambda line: "accepted" in line, STARTED_BOUND_S)
    assert client.proc.poll() is None
    assert_interrupted_quickly(client, "during the handshake")


@pytest.mark.parametrize("fake_server", ["silent-ws"], indirect=True)
def test_ctrl_c_when_the_server_accepts_and_never_sends(
    fake_server: tuple[Process, str], question_wav: Path
) -> None:
    """The peer's bug: a connected server that never sends anything must not hold the client."""
    fake, url = fake_server
    client = start_client(url, "--file", str(question_wav))
    fake.wait_for(lambda line: "connected" in line, STARTED_BOUND_S)
    assert client.proc.poll() is None
    assert_interrupted_quickly(client, "with a silent server")


def test_ctrl_c_while_streaming(server_url: str, question_wav: Path) -> None:
    """In the middle of sending the question."""
    client = start_client(server_url, "--file", str(question_wav))
    client.wait_for_event("ready", 10.0)
    time.sleep(0.5)
    assert_interrupted_quickly(client, "while streaming")


def test_ctrl_c_while_waiting_for_the_reply(server_url: str, question_wav: Path) -> None:
    """After the server heard the end of the question, before the reply."""
    client = start_client(server_url, "--file", str(question_wav))
    client.wait_for_event("speech_stopped", 30.0)
    assert_interrupted_quickly(client, "while waiting for the reply")


def test_ctrl_c_while_the_reply_arrives(server_url: str, question_wav: Path) -> None:
    """While reply audio is being received."""
    client = start_client(server_url, "--file", str(question_wav))
    client.wait_for_event("reply_audio_start", 60.0)
    assert_interrupted_quickly(client, "while the reply arrives")


@pytest.mark.parametrize("fake_server", ["ready-then-hang"], indirect=True)
def test_ctrl_c_after_the_server_died_silently(
    fake_server: tuple[Process, str], question_wav: Path
) -> None:
    """The server froze (no close, no FIN: a machine gone): Ctrl+C still ends the client."""
    fake, url = fake_server
    client = start_client(url, "--file", str(question_wav))
    client.wait_for_event("ready", 10.0)
    fake.proc.send_signal(signal.SIGSTOP)
    time.sleep(0.5)
    assert_interrupted_quickly(client, "after the server froze")


@pytest.mark.parametrize("fake_server", ["ready-then-hang"], indirect=True)
def test_a_server_that_dies_ends_the_client_with_a_clear_message(
    fake_server: tuple[Process, str], question_wav: Path
) -> None:
    """The server process is killed: the client exits by itself, status 1, one clear line."""
    fake, url = fake_server
    client = start_client(url, "--file", str(question_wav))
    client.wait_for_event("ready", 10.0)
    began = time.monotonic()
    fake.kill()
    status = client.proc.wait(timeout=10.0)
    took = time.monotonic() - began
    stderr = client.stderr()
    print(f"server killed: client exit {status} after {took * 1000:.0f} ms: {stderr.strip()}")
    assert status == 1
    assert took < HANG_BOUND_S
    assert "the server closed the connection" in stderr
    assert "Traceback" not in stderr

"""The client against servers that misbehave or vanish, over TLS, and Ctrl+C during a DNS
lookup: real client processes and real sockets, except where a lookup must be made slow."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.server import ServerConnection, serve

from s2s.client.app import ClientConfig, VoiceClient
from s2s.client.audio import FileSource, NullSink
from tests.processes import Process, free_port, start_client

VANISHED_BOUND_S = 20.0
"""The promise is about 10 s (ping every 5 s, answered within 5 s); twice that for a hang."""


@pytest.mark.parametrize("fake_server", ["malformed"], indirect=True)
def test_malformed_server_events_are_skipped_not_fatal(
    fake_server: tuple[Process, str], question_wav: Path
) -> None:
    _, url = fake_server
    client = start_client(url, "--file", str(question_wav))
    status = client.proc.wait(timeout=30)
    stderr = client.stderr()
    assert status == 0, stderr  # the server said bye: an orderly end
    assert "Traceback" not in stderr
    assert "skipped" in stderr


@pytest.mark.parametrize("fake_server", ["ready-then-hang"], indirect=True)
def test_a_server_that_vanishes_is_noticed_within_seconds(
    fake_server: tuple[Process, str], question_wav: Path
) -> None:
    """The server process is frozen (SIGSTOP: no FIN, no answer to pings, a socket that
    fills up): the client says so in one line and exits 1."""
    fake, url = fake_server
    client = start_client(url, "--file", str(question_wav))
    client.wait_for_event("ready", 30.0)
    fake.proc.send_signal(signal.SIGSTOP)
    began = time.monotonic()
    status = client.proc.wait(timeout=VANISHED_BOUND_S + 10)
    took = time.monotonic() - began
    stderr = client.stderr()
    print(f"vanished server noticed after {took:.1f} s: {stderr.strip()}")
    assert status == 1 and took < VANISHED_BOUND_S
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1


def test_wss_with_a_self_signed_certificate_and_ca_file(tmp_path: Path, question_wav: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    def ready_then_bye(connection: ServerConnection) -> None:
        connection.recv()
        connection.send(json.dumps({"type": "ready", "protocol": 1, "session_id": "tls"}))
        connection.send(json.dumps({"type": "bye", "reason": "tls works"}))
        connection.close(1001, "tls works")

    port = free_port()
    with serve(ready_then_bye, "127.0.0.1", port, ssl=context) as server:
        threading.Thread(target=server.serve_forever, name="tls-server", daemon=True).start()
        url = f"wss://localhost:{port}"
        trusted = start_client(url, "--file", str(question_wav), "--ca-file", str(cert))
        assert trusted.proc.wait(timeout=30) == 0, trusted.stderr()
        assert [e["type"] for e in trusted.events()][:1] == ["ready"]
        untrusted = start_client(url, "--file", str(question_wav))
        assert untrusted.proc.wait(timeout=30) == 1
        assert "--ca-file" in untrusted.stderr()
        server.shutdown()


def test_ctrl_c_during_a_slow_dns_lookup_exits_at_once(
    monkeypatch: pytest.MonkeyPatch, question_wav: Path
) -> None:
    """A lookup that would take 30 s: Ctrl+C (SIGINT to this process) still ends the
    connect within a moment."""
    released = threading.Event()

    def slow_lookup(*args: Any, **kwargs: Any) -> Any:
        released.wait(30.0)
        raise socket.gaierror("released")

    monkeypatch.setattr(socket, "getaddrinfo", slow_lookup)
    client = VoiceClient(
        ClientConfig(url="ws://slow-dns.invalid:8765"),
        FileSource(question_wav, 16_000),
        NullSink(16_000),
        lambda event: None,
    )
    # As s2s-client's main() does: a process started in the background by a shell inherits
    # SIGINT ignored, and Python then leaves it ignored (the suite may run that way).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    began = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            client.run()
    finally:
        signal.signal(signal.SIGINT, previous)
        released.set()
        client.close()
    assert time.monotonic() - began < 2.0


def test_json_events_from_two_threads_are_one_line_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sender thread reports ``reply_played`` while the receiver prints ``turn``: each
    event is a line of its own (a script reading --json must never get two on one line;
    the loaded suite once did)."""
    from s2s.client.cli import Printer

    class Terminal:
        """A stdout that lets the other thread run in the middle of every write, as a pipe
        to a busy reader does."""

        def __init__(self) -> None:
            self.text: list[str] = []

        def write(self, text: str) -> int:
            time.sleep(0.0001)
            self.text.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    out = Terminal()
    monkeypatch.setattr("sys.stdout", out)
    printer = Printer(as_json=True, from_microphone=False)

    def report(kind: str) -> None:
        for k in range(300):
            printer({"type": kind, "turn_id": k})

    threads = [threading.Thread(target=report, args=(kind,)) for kind in ("turn", "reply_played")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = "".join(out.text).splitlines()
    assert len(lines) == 600
    assert all(json.loads(line)["turn_id"] >= 0 for line in lines)

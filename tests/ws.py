"""A raw protocol-v1 client for socket tests: connect, hello, wait for an event, and the
close a server sent."""

from __future__ import annotations

import base64
import json
import os
import socket
import urllib.parse
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.frames import Close
from websockets.sync.client import ClientConnection, connect

RECV_BOUND_S = 10.0
"""Generous: only a hang should reach it."""


def raw(url: str, token: str | None = None) -> ClientConnection:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    # legacy=True: websockets' documented way to hold a connection outside a with-block.
    return connect(url, additional_headers=headers, close_timeout=1, open_timeout=5, legacy=True)


def hello(connection: ClientConnection, **fields: Any) -> dict[str, Any]:
    connection.send(
        json.dumps(
            {
                "type": "hello",
                "protocol": 1,
                "input_sample_rate": 16000,
                "output_sample_rate": 16000,
                **fields,
            }
        )
    )
    answer: dict[str, Any] = json.loads(connection.recv(timeout=5))
    return answer


def next_event(connection: ClientConnection, kind: str) -> dict[str, Any]:
    while True:
        message = connection.recv(timeout=RECV_BOUND_S)
        if isinstance(message, str):
            event: dict[str, Any] = json.loads(message)
            if event["type"] == kind:
                return event


def close_received(connection: ClientConnection) -> Close:
    """Read (and drop) whatever comes until the server's close; return that close."""
    try:
        while True:
            connection.recv(timeout=RECV_BOUND_S)
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, f"no close frame: {closed!r}"
        return closed.rcvd


def mute_session(url: str, token: str | None = None) -> socket.socket:
    """A v1 session opened by hand over a bare socket, which then never reads again: unlike a
    websockets client (whose background thread answers a close by itself), it never answers
    the server's closing handshake. Returned open; close it when done."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    sock = socket.create_connection((host, port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    sock.sendall(
        (
            f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"{auth}\r\n"
        ).encode()
    )
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        assert chunk, f"the server closed during the handshake: {answer!r}"
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 101"), answer
    sock.sendall(_masked_text_frame(json.dumps({"type": "hello", "protocol": 1})))
    ready = answer.split(b"\r\n\r\n", 1)[1]
    while b'"ready"' not in ready:
        chunk = sock.recv(4096)
        assert chunk, "the server closed instead of answering hello"
        ready += chunk
    return sock


def _masked_text_frame(text: str) -> bytes:
    payload = text.encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked

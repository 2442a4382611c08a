"""A raw protocol-v1 client for socket tests: connect, hello, wait for an event, and the
close a server sent."""

from __future__ import annotations

import json
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

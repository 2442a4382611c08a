"""Misbehaving servers for the client's signal tests, run as their own process:

    python -m tests.fake_servers silent-tcp|silent-ws|ready-then-hang PORT

silent-tcp:       accepts TCP connections and never answers (no WebSocket handshake)
silent-ws:        completes the WebSocket handshake, then never sends anything (the peer's bug)
ready-then-hang:  answers hello with ready, then reads and ignores everything
malformed:        answers hello with ready, sends malformed events and frames, then bye
"""

from __future__ import annotations

import json
import socket
import sys
import threading

from websockets.sync.server import ServerConnection, serve

NEVER = threading.Event()


def silent_tcp(port: int) -> None:
    listener = socket.create_server(("127.0.0.1", port))
    print("listening", flush=True)
    held = []
    while True:
        connection, _ = listener.accept()
        print("accepted", flush=True)  # the test's cue: the client is in its handshake
        held.append(connection)  # keep it open, say nothing


def silent_ws(connection: ServerConnection) -> None:
    print("connected", flush=True)  # the test's cue: the client waits for an answer
    NEVER.wait()


def ready_then_hang(connection: ServerConnection) -> None:
    connection.recv()
    connection.send(json.dumps({"type": "ready", "protocol": 1, "session_id": "fake"}))
    for _ in connection:
        pass


MALFORMED: list[str | bytes] = [
    "not json",
    "[1, 2]",
    '{"type": 5}',
    '{"no": "type"}',
    '{"type": "transcript"}',
    '{"type": "reply_text", "turn_id": "x", "chunk_index": null}',
    '{"type": "interrupted", "turn_id": {"a": 1}}',
    '{"type": "speech_stopped", "turn_id": 0, "sample_index": "late"}',
    '{"type": "something_new", "turn_id": 0}',
    b"\x01\x02\x03",
]


def malformed(connection: ServerConnection) -> None:
    connection.recv()
    connection.send(json.dumps({"type": "ready", "protocol": 1, "session_id": "fake"}))
    for message in MALFORMED:
        connection.send(message)
    connection.send(json.dumps({"type": "bye", "reason": "done testing"}))
    connection.close(1001, "done testing")


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    if mode == "silent-tcp":
        silent_tcp(port)
        return
    handler = {"silent-ws": silent_ws, "malformed": malformed}.get(mode, ready_then_hang)
    with serve(handler, "127.0.0.1", port, ping_interval=None) as server:
        print("listening", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()

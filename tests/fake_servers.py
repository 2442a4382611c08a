"""Misbehaving servers for the client's signal tests, run as their own process:

    python -m tests.fake_servers silent-tcp|silent-ws|ready-then-hang PORT

silent-tcp:       accepts TCP connections and never answers (no WebSocket handshake)
silent-ws:        completes the WebSocket handshake, then never sends anything (the peer's bug)
ready-then-hang:  answers hello with ready, then reads and ignores everything
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
        held.append(connection)  # keep it open, say nothing


def silent_ws(connection: ServerConnection) -> None:
    NEVER.wait()


def ready_then_hang(connection: ServerConnection) -> None:
    connection.recv()
    connection.send(json.dumps({"type": "ready", "protocol": 1, "session_id": "fake"}))
    for _ in connection:
        pass


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    if mode == "silent-tcp":
        silent_tcp(port)
        return
    handler = silent_ws if mode == "silent-ws" else ready_then_hang
    with serve(handler, "127.0.0.1", port, ping_interval=None) as server:
        print("listening", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()

"""One session's writer: the only thread that sends on its socket.

Everything a session says (events, audio, the close) goes into one bounded queue; this
thread drains it. So no stage thread, model turn or pacing wait ever blocks on a client's
socket. A client that stops reading is cut off, not waited for: a send that makes no progress
for ``send_timeout_s`` fails (the socket's own send timeout, ``SO_SNDTIMEO``), and a queue
over its bound means the client is far behind; either way the TCP connection is shut down,
which wakes every thread of that session, and no other session notices.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection

log = logging.getLogger(__name__)

Frame = str | bytes


@dataclass(frozen=True, slots=True)
class _Close:
    code: int
    reason: str


class SessionWriter:
    def __init__(
        self,
        connection: ServerConnection,
        send_timeout_s: float,
        max_queued_frames: int,
        name: str,
        on_cut_off: Callable[[str], None],
    ) -> None:
        self._connection = connection
        self._send_timeout_s = send_timeout_s
        self._max_queued_frames = max_queued_frames
        self._on_cut_off = on_cut_off
        self._queue: queue.Queue[Frame | _Close] = queue.Queue()
        self._closed = threading.Event()  # a close was queued: nothing more is taken
        self._cut = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        _set_send_timeout(self._connection.socket, self._send_timeout_s)
        self._thread.start()

    def send(self, frames: Sequence[Frame]) -> None:
        """Queue frames in order; never blocks. Dropped once the session is closing."""
        if self._closed.is_set() or not frames:
            return
        if self._queue.qsize() + len(frames) > self._max_queued_frames:
            self.cut_off(f"{self._queue.qsize()} frames queued: the client is not reading")
            return
        for frame in frames:
            self._queue.put(frame)

    def close(self, code: int, reason: str) -> None:
        """Queue the close after everything already queued. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._queue.put(_Close(code, reason.encode()[:123].decode(errors="ignore")))

    def cut_off(self, why: str) -> None:
        """Drop the TCP connection now: blocked sends and receives return at once."""
        if self._cut.is_set():
            return
        self._cut.set()
        self._closed.set()
        log.warning("cutting off %s: %s", self._thread.name, why)
        with contextlib.suppress(OSError):
            self._connection.socket.shutdown(socket.SHUT_RDWR)
        self._queue.put(_Close(1006, why))  # wakes the writer if it waits for frames
        self._on_cut_off(why)

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the queued frames and the close to go out (without
        cutting off). True when the writer has stopped."""
        if self._thread.ident is not None:
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def join(self, timeout_s: float) -> bool:
        """Wait for the queued frames and the close to go out; cut off if they do not in
        time. True when the writer has stopped."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.cut_off(f"the close did not go out within {timeout_s:g} s")
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if self._cut.is_set():
                return
            try:
                if isinstance(item, _Close):
                    self._connection.close(item.code, item.reason)
                    return
                self._connection.send(item)
            except ConnectionClosed as exc:
                # websockets closes the connection when a send fails: the send timeout (the
                # client stopped reading) or a reset. The receive side then ends the session.
                if isinstance(exc.__cause__, OSError):
                    self.cut_off(f"a send made no progress: {exc.__cause__!r}")
                return
            except OSError as exc:
                self.cut_off(f"send failed: {exc!r}")
                return


SEND_BUFFER_BYTES = 256 * 1024
"""The kernel's send buffer per session: 1.3 s of 48 kHz audio, 2.5 MB/s at 100 ms RTT (audio
needs 0.1 MB/s). Fixed, so a client that stops reading fills it in seconds, not after the
megabytes autotuning would grow it to."""


def _set_send_timeout(sock: socket.socket, seconds: float) -> None:
    """``SO_SNDTIMEO``: a blocking send gives up after ``seconds`` without progress, while
    receives stay blocking (websockets reads on a thread of its own)."""
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)

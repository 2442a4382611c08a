"""The s2s client: streams a source to the server, plays the replies, reports each turn.

Threads: the caller's (``run``: connect, handshake, then wait), a sender (source -> socket)
and a receiver (socket -> sink and reports), plus websockets' own reader. ``close()`` wakes
all of them: it shuts the socket down (wakes the reader and the receiver), closes the source
(wakes the sender) and stops the audio streams, then joins every thread under one deadline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from s2s.client.audio import Sink, Source
from s2s.client.turns import TurnTracker
from s2s.models.audio import from_pcm16, to_pcm16
from s2s.pipeline.deadline import Deadline
from s2s.server import protocol

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 0.3
JOIN_TIMEOUT_S = 0.3
"""All of close() fits in the 0.5 s a Ctrl+C is allowed."""
FILE_REPLY_TIMEOUT_S = 60.0
"""With --file: how long after the file ends to wait for speech to be answered."""


class ClientError(RuntimeError):
    """A failure to report to the user in one line (no traceback)."""


@dataclass(frozen=True, slots=True)
class ClientConfig:
    url: str = "ws://127.0.0.1:8765"
    token: str | None = None
    half_duplex: bool = False
    exit_after_reply: bool = False
    """Headless file mode: exit once the speech in the file has been answered."""
    pipeline: str = "streaming"
    """The server pipeline to ask for: streaming (default), no-speculation or baseline (the
    benchmark's comparisons; see PROTOCOL.md)."""


@dataclass
class ClientOutcome:
    exit_code: int
    message: str = ""
    turns: list[dict[str, Any]] = field(default_factory=list)


class VoiceClient:
    def __init__(
        self,
        config: ClientConfig,
        source: Source,
        sink: Sink,
        report: Callable[[dict[str, Any]], None],
    ) -> None:
        self.config = config
        self._source = source
        self._sink = sink
        self._report = report
        self._tracker = TurnTracker(source.sample_rate_hz)
        self._socket: socket.socket | None = None
        self._connection: ClientConnection | None = None
        self._exit_stack = contextlib.ExitStack()  # holds the connection's context
        self._threads: list[threading.Thread] = []
        self._finished = threading.Event()
        self._outcome = ClientOutcome(0)
        self._close_lock = threading.Lock()  # guards _closed
        self._closed = False
        self._server_said_bye = False
        self._reply_started_at_sample = 0

    # --- running --------------------------------------------------------------------------

    def run(self) -> ClientOutcome:
        """Connect and converse until the end (file answered, server gone, or ``close()``)."""
        self._connect()
        self._sink.start()
        self._source.start()
        self._spawn(self._receive, "client-receiver")
        self._spawn(self._send_audio, "client-sender")
        self._finished.wait()
        return self._outcome

    def close(self) -> list[str]:
        """Stop everything now; return the names of threads still alive after the deadline.
        Idempotent, safe from any thread and from a signal handler's caller."""
        with self._close_lock:
            first = not self._closed
            self._closed = True
        deadline = Deadline(JOIN_TIMEOUT_S)
        if first:
            self._finished.set()
            self._source.close()
            if self._socket is not None:
                # Wakes websockets' reader and our receiver at once; a polite close
                # handshake would wait on a server that may never answer.
                with contextlib.suppress(OSError):
                    self._socket.shutdown(socket.SHUT_RDWR)
            if self._connection is not None:
                self._connection.close_timeout = 0
            self._exit_stack.close()
            self._sink.close()
        me = threading.current_thread()
        for thread in self._threads:
            if thread is not me:
                thread.join(deadline.remaining_s())
        return [t.name for t in self._threads if t.is_alive() and t is not me]

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        # Daemon: close() joins these with a deadline; daemon only matters if one is stuck
        # past it, and then it must not hold the process open after Ctrl+C.
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _finish(self, exit_code: int, message: str = "") -> None:
        if not self._finished.is_set():
            self._outcome.exit_code = exit_code
            self._outcome.message = message
            self._finished.set()

    # --- connecting -----------------------------------------------------------------------

    def _connect(self) -> None:
        parsed = urlparse(self.config.url)
        if parsed.scheme not in ("ws", "wss") or not parsed.hostname:
            raise ClientError(f"--url must look like ws://HOST:PORT, got {self.config.url!r}")
        port = parsed.port or (443 if parsed.scheme == "wss" else 80)
        try:
            # Our own socket, so close() can shut it down even in the middle of the handshake.
            self._socket = socket.create_connection(
                (parsed.hostname, port), timeout=CONNECT_TIMEOUT_S
            )
        except OSError as exc:
            raise ClientError(
                f"cannot connect to {self.config.url}: {exc.strerror or exc}"
            ) from exc
        headers = {"Authorization": f"Bearer {self.config.token}"} if self.config.token else None
        try:
            self._connection = self._exit_stack.enter_context(
                connect(
                    self.config.url,
                    sock=self._socket,
                    additional_headers=headers,
                    open_timeout=CONNECT_TIMEOUT_S,
                    close_timeout=CLOSE_TIMEOUT_S,
                    compression=None,
                    max_size=protocol.MAX_FRAME_BYTES,
                )
            )
            self._connection.send(
                protocol.hello(
                    self._source.sample_rate_hz, self._sink.sample_rate_hz, self.config.pipeline
                )
            )
            ready = json.loads(self._connection.recv(timeout=CONNECT_TIMEOUT_S))
        except InvalidStatus as exc:
            status = exc.response.status_code
            hint = " (wrong or missing --token)" if status == 401 else ""
            raise ClientError(f"the server refused the connection: HTTP {status}{hint}") from exc
        except ConnectionClosed as exc:
            raise ClientError(f"the server closed the connection: {_close_text(exc)}") from exc
        except TimeoutError as exc:
            raise ClientError(
                f"no answer from {self.config.url} within {CONNECT_TIMEOUT_S:g} s"
            ) from exc
        except OSError as exc:
            raise ClientError(f"connection to {self.config.url} failed: {exc}") from exc
        if ready.get("type") != "ready":
            raise ClientError(
                f"the server did not accept the session: {ready.get('message', ready)}"
            )
        self._report(ready)

    # --- threads --------------------------------------------------------------------------

    def _send_audio(self) -> None:
        assert self._connection is not None
        sent = 0
        file_done_at: float | None = None
        while not self._finished.is_set():
            frame = self._source.read()
            if frame is None:
                return
            if self.config.half_duplex and self._tracker.assistant_speaking(self._sink.pending_s()):
                frame = frame * 0.0  # muted while the reply plays, for speakers without AEC
            self._tracker.sent(sent, len(frame), time.monotonic())
            sent += len(frame)
            try:
                self._connection.send(to_pcm16(frame))
            except ConnectionClosed:
                return
            if self.config.exit_after_reply:
                if file_done_at is None and self._source.exhausted():
                    file_done_at = time.monotonic()
                if file_done_at is not None:
                    self._check_file_answered(file_done_at)

    def _check_file_answered(self, file_done_at: float) -> None:
        if self._tracker.all_answered() and self._sink.pending_s() == 0.0:
            self._finish(0)
        elif time.monotonic() - file_done_at > FILE_REPLY_TIMEOUT_S:
            reason = (
                "no speech was detected in the file" if not self._tracker.turns else "no reply came"
            )
            self._finish(1, f"{reason} within {FILE_REPLY_TIMEOUT_S:g} s after the file ended")

    def _receive(self) -> None:
        assert self._connection is not None
        try:
            for message in self._connection:
                if isinstance(message, bytes):
                    self._tracker.audio_received(time.monotonic())
                    self._sink.write(from_pcm16(message))
                else:
                    self._on_event(json.loads(message))
        except ConnectionClosed as exc:
            self._server_gone(_close_text(exc))
            return
        except OSError as exc:
            self._server_gone(str(exc))
            return
        self._server_gone(_close_text_of(self._connection))

    def _server_gone(self, why: str) -> None:
        # An orderly shutdown that the server announced ends the session normally; anything
        # else (refusal, crash, network loss) is a failure.
        code = 0 if self._server_said_bye else 1
        self._finish(code, f"the server closed the connection: {why}")

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "bye":
            self._server_said_bye = True
        elif kind == "reply_audio_start":
            self._reply_started_at_sample = self._sink.played_samples()
        elif kind == "interrupted":
            self._stop_playback(event.get("turn_id"))
        elif kind == "reply_audio_end":
            self._sink.end_of_reply()
        self._report(event)
        for turn in self._tracker.on_event(event):
            self._outcome.turns.append(turn)
            self._report(turn)

    def _stop_playback(self, turn_id: object) -> None:
        """Drop what is not yet played, and tell the server how much was (it keeps only the
        heard part of the reply in the conversation)."""
        self._sink.flush()
        if not isinstance(turn_id, int) or turn_id < 0 or self._connection is None:
            return
        played = self._sink.played_samples() - self._reply_started_at_sample
        played_ms = 1000.0 * played / self._sink.sample_rate_hz
        with contextlib.suppress(ConnectionClosed):
            self._connection.send(protocol.playback(turn_id, played_ms))

    def interrupt(self) -> None:
        """Stop the assistant's reply now (what the interrupt key does)."""
        if self._connection is not None:
            with contextlib.suppress(ConnectionClosed):
                self._connection.send(protocol.event("interrupt"))


def _close_text(exc: ConnectionClosed) -> str:
    close = exc.rcvd or exc.sent
    if close is None:
        return "without a close frame (the server went away)"
    return f"code {close.code}" + (f", {close.reason}" if close.reason else "")


def _close_text_of(connection: ClientConnection) -> str:
    code, reason = connection.close_code, connection.close_reason
    if code is None:
        return "without a close frame (the server went away)"
    return f"code {code}" + (f", {reason}" if reason else "")

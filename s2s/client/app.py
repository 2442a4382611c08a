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
import queue
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
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
KEEPALIVE_S = 5.0
"""A ping this often, answered within this long, or the server is gone: with the send
timeout and TCP_USER_TIMEOUT below, a server that vanishes without a FIN is noticed within
about 10 s, even while the sender is blocked on a full socket."""
SEND_TIMEOUT_S = 5.0
TCP_USER_TIMEOUT_MS = 10_000
CLOSE_TIMEOUT_S = 0.3
JOIN_TIMEOUT_S = 0.3
"""All of close() fits in the 0.5 s a Ctrl+C is allowed."""
FILE_REPLY_TIMEOUT_S = 60.0
"""With --file: how long after the file ends to wait for speech to be answered."""
SIGNAL_CHECK_S = 0.1
"""How often the waiting main thread wakes to run pending signal handlers (Ctrl+C)."""


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
    ca_file: str | None = None
    """For ``wss://`` with a certificate the system does not trust (a self-signed one)."""
    echo_cancelled: bool = False
    """The source's audio has the speaker's echo removed (told to the server in hello)."""


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
        self._played_lock = threading.Lock()  # guards _unplayed_turn
        self._unplayed_turn: int | None = None  # its audio is all here, not all played yet

    # --- running --------------------------------------------------------------------------

    def run(self) -> ClientOutcome:
        """Connect and converse until the end (file answered, server gone, or ``close()``)."""
        ready = self._connect()
        self._sink.start()
        self._source.start()
        # Reported once the microphone is live: "ready" is when the user may speak (a sound
        # device can take a moment to open, and the first words must not fall into it).
        self._report(ready)
        self._spawn(self._receive, "client-receiver")
        self._spawn(self._send_audio, "client-sender")
        # In short slices: Ctrl+C delivered to another thread (PortAudio's, websockets')
        # only flags the main thread, which runs the handler when it next runs Python code.
        while not self._finished.wait(SIGNAL_CHECK_S):
            pass
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
        # Only running threads are joined: a signal can interrupt _spawn between creating a
        # thread and starting it, and join() raises on a thread that never started.
        running = [t for t in self._threads if t is not me and t.is_alive()]
        for thread in running:
            thread.join(deadline.remaining_s())
        return [t.name for t in running if t.is_alive()]

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

    def _connect(self) -> dict[str, Any]:
        parsed = urlparse(self.config.url)
        if parsed.scheme not in ("ws", "wss") or not parsed.hostname:
            raise ClientError(f"--url must look like ws://HOST:PORT, got {self.config.url!r}")
        port = parsed.port or (443 if parsed.scheme == "wss" else 80)
        address = _resolve(parsed.hostname, port)
        try:
            # Our own socket, so close() can shut it down even in the middle of the handshake.
            self._socket = socket.create_connection(address, timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            raise ClientError(
                f"cannot connect to {self.config.url}: {exc.strerror or exc}"
            ) from exc
        _bound_sends(self._socket)
        headers = {"Authorization": f"Bearer {self.config.token}"} if self.config.token else None
        tls = None
        if parsed.scheme == "wss":
            tls = ssl.create_default_context(cafile=self.config.ca_file)
        try:
            self._connection = self._exit_stack.enter_context(
                connect(
                    self.config.url,
                    sock=self._socket,
                    ssl=tls,
                    server_hostname=parsed.hostname if tls else None,
                    additional_headers=headers,
                    open_timeout=CONNECT_TIMEOUT_S,
                    close_timeout=CLOSE_TIMEOUT_S,
                    ping_interval=KEEPALIVE_S,
                    ping_timeout=KEEPALIVE_S,
                    compression=None,
                    max_size=protocol.MAX_FRAME_BYTES,
                )
            )
            self._connection.send(
                protocol.hello(
                    self._source.sample_rate_hz,
                    self._sink.sample_rate_hz,
                    self.config.pipeline,
                    echo_cancelled=self.config.echo_cancelled,
                )
            )
            answer = _in_slices(self._connection.recv, TimeoutError)
            if answer is None:
                raise TimeoutError
            ready = json.loads(answer)
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
        except ssl.SSLError as exc:
            hint = (
                " (a self-signed certificate needs --ca-file)" if "CERTIFICATE" in str(exc) else ""
            )
            raise ClientError(f"TLS with {self.config.url} failed: {exc.reason}{hint}") from exc
        except OSError as exc:
            raise ClientError(f"connection to {self.config.url} failed: {exc}") from exc
        except ValueError as exc:
            raise ClientError(f"the server's answer is not protocol v1: {exc}") from exc
        if not isinstance(ready, dict) or ready.get("type") != "ready":
            message = ready.get("message", ready) if isinstance(ready, dict) else ready
            raise ClientError(f"the server did not accept the session: {message}")
        return ready

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
            self._report_played()
            if self.config.exit_after_reply:
                if file_done_at is None and self._source.exhausted():
                    file_done_at = time.monotonic()
                if file_done_at is not None:
                    self._check_file_answered(file_done_at)

    def _report_played(self) -> None:
        """A local event once the speaker has played a reply to its end: scripts (and the
        tests) wait on it instead of guessing how long playback takes."""
        if self._sink.pending_s() > 0.0:
            return
        with self._played_lock:
            turn_id, self._unplayed_turn = self._unplayed_turn, None
        if turn_id is not None:
            self._report({"type": "reply_played", "turn_id": turn_id})

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
                    if len(message) % 2:
                        log.warning("skipped a reply audio frame of odd length %d", len(message))
                        continue
                    self._tracker.audio_received(time.monotonic())
                    self._sink.write(from_pcm16(message))
                else:
                    self._on_text(message)
        except ConnectionClosed as exc:
            self._server_gone(_close_text(exc))
            return
        except OSError as exc:
            self._server_gone(str(exc))
            return
        self._server_gone(_close_text_of(self._connection))

    def _on_text(self, message: str) -> None:
        """A server event; one that is malformed or unexpected is logged and skipped: the
        conversation goes on (and the receiver never dies of it)."""
        try:
            event = json.loads(message)
        except ValueError:
            log.warning("skipped a server message that is not JSON: %.80r", message)
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            log.warning("skipped a server message without a type: %.80r", message)
            return
        try:
            self._on_event(event)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("skipped a malformed %s event (%r): %.80r", event["type"], exc, message)

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
            with self._played_lock:
                self._unplayed_turn = None
            self._stop_playback(event.get("turn_id"))
        elif kind == "reply_audio_end":
            self._sink.end_of_reply()
            turn_id = event.get("turn_id")
            with self._played_lock:
                self._unplayed_turn = turn_id if isinstance(turn_id, int) else None
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


T = TypeVar("T")


def _in_slices(wait: Callable[[float], T], timed_out: type[Exception]) -> T | None:
    """``wait(slice_s)`` again and again until it returns, for up to CONNECT_TIMEOUT_S (None
    then). The main thread must not block longer than a slice: a signal the kernel hands to
    another thread only flags the main thread, which acts on it between slices."""
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            return wait(min(SIGNAL_CHECK_S, max(0.0, deadline - time.monotonic())))
        except timed_out:
            if time.monotonic() >= deadline:
                return None


def _resolve(host: str, port: int) -> tuple[str, int]:
    """The host's address, looked up on a helper thread: the caller waits interruptibly, so
    Ctrl+C during a slow DNS lookup still exits at once."""
    answer: queue.Queue[tuple[str, int] | OSError] = queue.Queue()

    def lookup() -> None:
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            answer.put((str(info[0][4][0]), int(info[0][4][1])))
        except OSError as exc:
            answer.put(exc)

    threading.Thread(target=lookup, name="client-dns", daemon=True).start()
    found = _in_slices(lambda slice_s: answer.get(timeout=slice_s), queue.Empty)
    if found is None:
        raise ClientError(f"cannot look up {host} within {CONNECT_TIMEOUT_S:g} s")
    if isinstance(found, OSError):
        raise ClientError(f"cannot look up {host}: {found.strerror or found}")
    return found


def _bound_sends(sock: socket.socket) -> None:
    """A send that makes no progress fails after SEND_TIMEOUT_S (``SO_SNDTIMEO``; receives
    stay blocking), and the kernel drops a connection whose data goes unacknowledged for
    TCP_USER_TIMEOUT_MS (Linux): a vanished server cannot hold the sender forever."""
    whole = int(SEND_TIMEOUT_S)
    timeval = struct.pack("ll", whole, int((SEND_TIMEOUT_S - whole) * 1_000_000))
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)
    if user_timeout is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, user_timeout, TCP_USER_TIMEOUT_MS)


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

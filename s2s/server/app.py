"""The s2s server: a WebSocket endpoint, one session (and pipeline) per connection, models
loaded once and shared. On the same port: protocol v1 at ``/``, the OpenAI Realtime protocol
at ``/v1/realtime``, the web client (``GET /``), ``/healthz``, ``/readyz`` and ``/metrics``."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hmac
import http
import itertools
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from websockets.http11 import Request, Response
from websockets.sync.server import Server, ServerConnection, serve

from s2s.models.echo_cancel import EchoCancelOptions
from s2s.pipeline.deadline import Deadline
from s2s.pipeline.echo import EchoOptions
from s2s.pipeline.history import HistoryOptions
from s2s.pipeline.pipeline import Pipeline
from s2s.pipeline.segmenter import VadOptions
from s2s.server import realtime, web
from s2s.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from s2s.server.metrics import ServerMetrics
from s2s.server.protocol import MAX_FRAME_BYTES, CloseCodes
from s2s.server.realtime import RealtimeDefaults, RealtimeWire
from s2s.server.session import PipelineFactory, Session, SessionLimits
from s2s.server.wire import V1Wire, WireFormat

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765
GOODBYE_WAIT_S = 0.7
"""At shutdown: how long the sessions' writers get, together, to send their bye and close
(a client that answers the close takes milliseconds; one that never does, CLOSE_TIMEOUT_S)."""
OPENING_DROP_WAIT_S = 0.2
"""At shutdown: how long to wait for the listening socket to close before dropping the
connections still opening (it closes at once while ``serve_forever`` runs)."""
CLOSE_TIMEOUT_S = 0.5
"""How long a close waits for the client's closing handshake: shutdown must fit in 2 s."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    max_sessions: int = 4
    max_opening: int = 32
    """Connections still in their opening handshake (TCP accepted, no WebSocket yet) at
    once; more are answered 503 at once. Each holds a thread for up to the handshake
    timeout, so a flood of silent connections cannot take the process's threads."""
    max_frame_bytes: int = MAX_FRAME_BYTES
    limits: SessionLimits = field(default_factory=SessionLimits)
    echo: EchoOptions | None = field(default_factory=EchoOptions)
    """How the assistant's own voice in the microphone is told from the user's, for clients
    that do not cancel it; None: off (every onset during a reply interrupts it)."""
    echo_cancel: EchoCancelOptions | None = field(default_factory=EchoCancelOptions)
    """The server cancels the echo for clients that do not (with ``echo`` set: its level
    estimate decides as well while the cancellers learn, and at each reply's start until
    they settle); None: the level estimate of ``echo`` decides alone."""
    vad: VadOptions = field(default_factory=VadOptions)
    """The turn detection sessions start with (Realtime clients see it and may change it)."""
    system_prompt: str = HistoryOptions().system_prompt
    stall_timeout_s: float = 60.0
    """``/healthz`` turns unhealthy when a stage has been on one item this long without any
    output (a wedged model call): a healthy stage makes an output every step."""


def _same_secret(given: str, expected: str) -> bool:
    """Compared in constant time, so the time taken says nothing about how much matched."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())


class S2SServer:
    """``start()`` binds; ``serve_forever()`` blocks until ``shutdown()`` (from another thread)."""

    def __init__(
        self,
        config: ServerConfig,
        build_pipeline: Callable[..., Pipeline],
        models_info: Mapping[str, str] | None = None,
    ) -> None:
        """``models_info`` None: the models are still loading; ``mark_ready()`` when they
        are (until then ``/readyz`` answers 503 and sessions are refused)."""
        self.config = config
        self._build_pipeline: PipelineFactory = build_pipeline
        self._models_info = dict(models_info or {})
        self._ready = threading.Event()
        if models_info is not None:
            self._ready.set()
        self._sessions: dict[str, Session] = {}
        self._sessions_lock = threading.Lock()  # guards _sessions and _accepting
        self._accepting = True
        self._ids = itertools.count(1)
        self._ws: Server | None = None
        self._opening = threading.BoundedSemaphore(config.max_opening)
        self._in_handshake = threading.local()  # this handler thread's opening socket
        self._opening_lock = threading.Lock()  # guards _opening_sockets
        self._opening_sockets: set[socket.socket] = set()
        self._open_connection: Callable[..., None] | None = None
        self._outcomes_lock = threading.Lock()  # guards speculation_outcomes
        self.speculation_outcomes: collections.Counter[str] = collections.Counter()
        """Replies speculated at a pause, server-wide: hit, missed (the user went on) or
        discarded (the final transcript differed)."""
        self.metrics = ServerMetrics(lambda: self.session_count, self._queue_depths)
        self.metrics.ready.set(1 if self._ready.is_set() else 0)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def mark_ready(self, models_info: Mapping[str, str]) -> None:
        """The models are loaded: serve sessions."""
        self._models_info = dict(models_info)
        self._ready.set()
        self.metrics.ready.set(1)

    @property
    def port(self) -> int:
        assert self._ws is not None, "start() first"
        return int(self._ws.socket.getsockname()[1])

    def start(self) -> None:
        self._ws = serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            max_size=self.config.max_frame_bytes,
            close_timeout=CLOSE_TIMEOUT_S,
            open_timeout=self.config.limits.handshake_timeout_s,
            compression=None,  # PCM does not compress; deflate would only cost CPU
        )
        self._open_connection = self._ws.handler  # websockets' per-connection handshake + handler
        self._ws.handler = self._admit

    def serve_forever(self) -> None:
        assert self._ws is not None, "start() first"
        self._ws.serve_forever()

    def shutdown(self, timeout_s: float = 1.5) -> list[str]:
        """Stop accepting, tell every client, stop every pipeline, wait for the handlers.

        Returns the names of handler threads still alive at the deadline. Idempotent.
        """
        deadline = Deadline(timeout_s)
        with self._sessions_lock:
            self._accepting = False
            sessions = list(self._sessions.values())
        for session in sessions:
            session.shutdown(CloseCodes.GOING_AWAY, "server shutting down")
        # Each session's writer sends its bye and then its close; websockets' own shutdown
        # below closes connections directly and, on a loaded machine, could overtake a writer
        # (a 1001 with no bye). A client that does not read is not waited for past this.
        goodbye = Deadline(min(GOODBYE_WAIT_S, deadline.remaining_s()))
        for session in sessions:
            session.wait_said_goodbye(goodbye.remaining_s())
        if self._ws is None:
            return []
        closer = threading.Thread(
            target=self._ws.shutdown,
            kwargs={"code": CloseCodes.GOING_AWAY, "reason": "server shutting down"},
            name="ws-shutdown",
            # Daemon: it waits for handler threads with no timeout of its own; a stuck one is
            # reported below by the deadline instead of holding the process.
            daemon=True,
        )
        closer.start()
        # Once nothing new is accepted, connections still opening are dropped: their reads
        # would otherwise hold their threads until the handshake timeout.
        self._ws.socket_closed.wait(min(OPENING_DROP_WAIT_S, deadline.remaining_s()))
        self._drop_opening_connections()
        closer.join(deadline.remaining_s())
        with self._ws.lock:
            handlers = list(self._ws.handler_threads)
        for thread in handlers:
            thread.join(deadline.remaining_s())
        return [t.name for t in handlers if t.is_alive()] + (
            ["ws-shutdown"] if closer.is_alive() else []
        )

    # --- what sessions report (``session.SessionObserver``) ------------------------------------

    def speculation(self, outcome: str) -> None:
        with self._outcomes_lock:
            self.speculation_outcomes[outcome] += 1
        self.metrics.speculation(outcome)

    def turn(self, fields: Mapping[str, object]) -> None:
        self.metrics.turn(fields)

    def interrupted(self, reason: str) -> None:
        self.metrics.interrupted(reason)

    def error(self, code: str) -> None:
        self.metrics.error(code)

    def speculation_summary(self) -> str:
        with self._outcomes_lock:
            counts = dict(self.speculation_outcomes)
        return ", ".join(f"{k} {counts.get(k, 0)}" for k in ("hit", "missed", "discarded"))

    @property
    def session_count(self) -> int:
        with self._sessions_lock:
            return len(self._sessions)

    # --- health -------------------------------------------------------------------------

    def stalled_stages(self) -> list[str]:
        """Stages of open sessions on one item with no output for ``stall_timeout_s``."""
        now = time.monotonic()
        with self._sessions_lock:
            sessions = list(self._sessions.values())
        found = []
        for session in sessions:
            for stage, stalled_s in session.stalled(now, self.config.stall_timeout_s):
                found.append(f"{stage} of session {session.session_id} ({stalled_s:.0f} s)")
        return found

    def _queue_depths(self) -> dict[str, int]:
        with self._sessions_lock:
            sessions = list(self._sessions.values())
        total: collections.Counter[str] = collections.Counter()
        for session in sessions:
            total.update(session.queue_depths())
        return dict(total)

    # --- per connection -------------------------------------------------------------------

    def _admit(self, sock: socket.socket, address: object) -> None:
        """Runs on the connection's own thread, before anything is read from it."""
        assert self._ws is not None and self._open_connection is not None
        if not self._opening.acquire(blocking=False):
            log.warning("refused a connection: %d still opening", self.config.max_opening)
            self.metrics.session_refused("opening")
            _refuse_busy(sock)
            with self._ws.lock:  # websockets' own handler would have done this
                self._ws.handler_threads.discard(threading.current_thread())
            return
        with self._opening_lock:
            self._opening_sockets.add(sock)
        self._in_handshake.sock = sock
        try:
            self._open_connection(sock, address)
        finally:
            self._handshake_over()

    def _handshake_over(self) -> None:
        """The opening handshake ended (the WebSocket is open, or the request was answered
        or failed): its slot is free."""
        sock = getattr(self._in_handshake, "sock", None)
        if sock is not None:
            self._in_handshake.sock = None
            with self._opening_lock:
                self._opening_sockets.discard(sock)
            self._opening.release()

    def _drop_opening_connections(self) -> None:
        """Connections still in their opening handshake would hold their threads until the
        handshake timeout: shutting their sockets down ends those reads now."""
        with self._opening_lock:
            opening = list(self._opening_sockets)
        for sock in opening:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Plain HTTP on the WebSocket port; None lets a WebSocket handshake go on."""
        path = urllib.parse.urlsplit(request.path).path
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if path == "/healthz":
            stalled = self.stalled_stages()
            if stalled:
                return connection.respond(
                    http.HTTPStatus.SERVICE_UNAVAILABLE, "stalled: " + "; ".join(stalled) + "\n"
                )
            return connection.respond(http.HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if not self._ready.is_set():
                return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "loading models\n")
            return connection.respond(http.HTTPStatus.OK, "ready\n")
        if not upgrade and web.serves(path):
            return _with_body(connection, *web.page(path))
        refusal = self._authorize(connection, request)
        if refusal is not None:
            self.metrics.session_refused("unauthorized")
            return refusal
        if path == "/metrics":
            return _with_body(connection, self.metrics.exposition(), METRICS_CONTENT_TYPE)
        return None

    def _authorize(self, connection: ServerConnection, request: Request) -> Response | None:
        """The token, from ``Authorization: Bearer`` or (browsers cannot set that header on
        a WebSocket) the ``token`` query parameter; compared in constant time."""
        credentials = request.headers.get_all("Authorization")
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query)
        tokens = query.get("token", [])
        if len(credentials) > 1 or len(tokens) > 1:
            return connection.respond(
                http.HTTPStatus.BAD_REQUEST,
                "send one Authorization header or one token parameter, not several\n",
            )
        token = self.config.token
        if not token:
            return None
        if credentials:
            given, expected = credentials[0], f"Bearer {token}"
        else:
            given, expected = (tokens[0] if tokens else ""), token
        if not _same_secret(given, expected):
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")
        return None

    def _wire_for(self, connection: ServerConnection, session_id: str) -> WireFormat:
        """Protocol v1, or the OpenAI Realtime protocol at its path."""
        assert connection.request is not None
        url = urllib.parse.urlsplit(connection.request.path)
        if url.path.rstrip("/") != realtime.PATH:
            return V1Wire(self._models_info)
        model = urllib.parse.parse_qs(url.query).get("model", [None])[0]
        defaults = RealtimeDefaults(self.config.vad, self.config.system_prompt, self._models_info)
        return RealtimeWire(session_id, defaults, model)

    def _handle(self, connection: ServerConnection) -> None:
        self._handshake_over()
        session_id = f"s{next(self._ids)}"
        wire = self._wire_for(connection, session_id)
        with self._sessions_lock:
            refusal = None
            if not self._accepting:
                refusal = (CloseCodes.GOING_AWAY, "server shutting down", "shutting_down")
            elif not self._ready.is_set():
                refusal = (CloseCodes.TRY_AGAIN_LATER, "models still loading", "loading")
            elif len(self._sessions) >= self.config.max_sessions:
                refusal = (
                    CloseCodes.TRY_AGAIN_LATER,
                    f"server busy: {self.config.max_sessions} sessions at most",
                    "busy",
                )
            else:
                session = Session(
                    connection,
                    session_id,
                    self._build_pipeline,
                    self.config.limits,
                    wire,
                    self.config.echo,
                    self,
                    on_ended=lambda: self._release(session_id),
                    echo_cancel_options=self.config.echo_cancel,
                )
                self._sessions[session_id] = session
        if refusal is not None:
            log.info("refused a connection: %s", refusal[1])
            self.metrics.session_refused(refusal[2])
            connection.close(refusal[0], refusal[1])
            return
        self.metrics.session_opened(wire.protocol_name)
        log.info("session %s opened from %s", session_id, connection.remote_address)
        try:
            session.run()
        finally:
            self._release(session_id)
            log.info("session %s closed", session_id)

    def _release(self, session_id: str) -> None:
        """The connection is over: its slot is free, while its teardown may still run."""
        with self._sessions_lock:
            self._sessions.pop(session_id, None)


REFUSAL_READ_S = 0.5
REFUSAL_READ_BYTES = 16 * 1024
_BUSY_BODY = b"too many connections opening\n"
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    + f"Content-Length: {len(_BUSY_BODY)}\r\n".encode()
    + b"Retry-After: 1\r\nConnection: close\r\n\r\n"
    + _BUSY_BODY
)


def _refuse_busy(sock: socket.socket) -> None:
    """Answer 503 and close. The request is read first (briefly: a silent client gets its
    answer after REFUSAL_READ_S): closing a socket with unread data sends a reset, and the
    client's side would throw the answer away unread."""
    try:
        sock.settimeout(REFUSAL_READ_S)
        request = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in request and len(request) < REFUSAL_READ_BYTES:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                request += chunk
        sock.sendall(BUSY_RESPONSE)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.close()


def _with_body(connection: ServerConnection, body: bytes, content_type: str) -> Response:
    response = connection.respond(http.HTTPStatus.OK, "")
    # websockets' Headers keeps every value set: drop the plain-text ones first.
    for name, value in (
        ("Content-Length", str(len(body))),
        ("Content-Type", content_type),
        ("Cache-Control", "no-cache"),
    ):
        if name in response.headers:
            del response.headers[name]
        response.headers[name] = value
    return dataclasses.replace(response, body=body)

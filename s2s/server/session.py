"""One client connection: a pipeline of its own, audio in, events and audio out.

This is the session core, the one copy of the session logic: turns, pacing, barge-in,
holding back speculation, heard-only history. How messages look on the socket belongs to a
wire format (``wire.py``: protocol v1; ``realtime.py``: the OpenAI Realtime protocol).

Runs on the connection's handler thread. Everything it blocks on can be woken: ``recv`` by
closing the connection (``shutdown()`` from any thread does that), the pipeline by its pill.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection

from s2s.models.audio import StreamResampler, from_pcm16, to_pcm16
from s2s.models.echo_cancel import EchoCancelOptions
from s2s.pipeline.echo import EchoGate, EchoOptions
from s2s.pipeline.messages import (
    AudioChunk,
    Event,
    InputCommand,
    Message,
    NoWords,
    ReplyAudio,
    ReplyText,
    SpeculationSettled,
    SpeechResumed,
    SpeechStarted,
    SpeechStopped,
    StageError,
    Transcript,
    TurnInterrupted,
    TurnMetrics,
)
from s2s.pipeline.pipeline import Pipeline, PipelineClosed
from s2s.pipeline.segmenter import VAD_SAMPLE_RATE_HZ
from s2s.pipeline.stages import LlmStage
from s2s.server.admission import AudioBudget, AudioMeter
from s2s.server.playback import ReplyLedger
from s2s.server.protocol import CloseCodes
from s2s.server.reply_echo import ReplyEchoCanceller
from s2s.server.wire import (
    Audio,
    Command,
    EndTurn,
    Finish,
    Frame,
    Heard,
    Instruct,
    InterruptReply,
    Refuse,
    Reply,
    SessionSetup,
    Start,
    WireFormat,
)
from s2s.server.writer import SessionWriter

log = logging.getLogger(__name__)

PipelineFactory = Callable[..., Pipeline]
OUTPUT_FRAME_MS = 100
"""Reply audio goes out in frames of at most this much: far below the frame-size limit, and
small enough that an interrupted reply leaves little audio in flight."""
ECHO_CANCELLED_VAD_THRESHOLD = 0.4
"""The VAD's speech threshold when the echo is cancelled, by the client or by the server
(default 0.5). An echo canceller's suppressor also turns the user down while the reply plays
(double talk), and the VAD's probability with it: on a simulated room at -10 dB of echo, a
user at -30 dBFS was missed 1 time in 12 and heard up to 850 ms late at 0.5, never missed and
at most 570 ms late at 0.4; the echo, cancelled by 45-50 dB, triggered it at neither."""
PACE_AHEAD_S = 0.3
"""Reply audio is sent at most this far ahead of where the client's playback is, so what was
sent is close to what was heard, and an interruption leaves little to flush."""
PLAYBACK_SLACK_S = 0.2
"""After its last frame is due to play, a reply counts as playing this much longer (the
client's jitter buffer and the sound card)."""


@dataclass
class _Timeline:
    """The reply audio being sent: when the client started playing it, how much was sent."""

    turn_id: int
    generation: int
    started_at: float | None = None
    sent_s: float = 0.0

    def ends_at(self) -> float:
        return (self.started_at or time.monotonic()) + self.sent_s


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What became of a turn's speculative reply (for the turn's metrics)."""

    outcome: str  # "hit", "missed" (the user went on) or "discarded" (another transcript)
    generation: int = -1
    end_of_turn_at: float | None = None
    speech_ended_at: float | None = None
    settled_at: float = 0.0


RATE_LIMITED = "rate_limited"
OUTCOMES_KEPT = 8
"""Turns whose speculation outcome is remembered until their metrics pass."""


class SessionObserver(Protocol):
    """What a session reports to its server (metrics); called from the session's threads."""

    def turn(self, fields: Mapping[str, object]) -> None:
        """A turn's first audio went out; ``fields``: its ``metrics`` event's fields."""

    def interrupted(self, reason: str) -> None: ...

    def error(self, code: str) -> None: ...

    def speculation(self, outcome: str) -> None: ...


@dataclass(frozen=True, slots=True)
class SessionLimits:
    handshake_timeout_s: float = 5.0
    idle_timeout_s: float = 300.0
    """A connection that sends nothing for this long is closed (audio streams never idle)."""
    cancel_timeout_s: float = 1.0
    end_timeout_s: float = 60.0
    """After the client's ``end``: how long the current reply may take to finish."""
    send_timeout_s: float = 5.0
    """A send to the client that makes no progress this long cuts the session off (the
    client stopped reading); other sessions never wait on it."""
    max_queued_frames: int = 512
    """Frames waiting for the client (about 50 s of 100 ms audio, far beyond what pacing
    queues): over this, the session is cut off."""
    close_wait_s: float = 1.0
    """At the end: how long the queued frames and the closing handshake may take."""
    max_queued_audio: int = 250
    """Audio frames waiting for the VAD (10 s of 40 ms frames): beyond it the session's
    pipeline is not keeping up (a stalled stage), and the session is closed (1013) instead
    of holding an ever longer backlog. The audio budget keeps a healthy session far below."""
    max_session_s: float | None = None
    """A session is closed (1008) this long after it opened; None: no limit."""
    audio_budget: AudioBudget = field(default_factory=AudioBudget)
    """Audio faster than this is refused (``rate_limited``, then close 1008)."""


class Session:
    """Serves one connection until it closes. ``run()`` returns when everything it started
    has stopped; ``shutdown()`` may be called from any thread, any number of times."""

    def __init__(
        self,
        connection: ServerConnection,
        session_id: str,
        build_pipeline: PipelineFactory,
        limits: SessionLimits,
        wire: WireFormat,
        echo_options: EchoOptions | None = None,
        observer: SessionObserver | None = None,
        echo_cancel_options: EchoCancelOptions | None = None,
        on_ended: Callable[[], None] | None = None,
    ) -> None:
        """``on_ended`` is called as soon as the connection is over, before the pipeline is
        torn down, so the server can give the slot to a new connection at once.
        ``echo_options``: how the reply's echo is told from the user, for clients that do
        not cancel it (None: it is not; any speech interrupts); ``echo_cancel_options``: the
        server cancels it for them (None: the level estimate of ``echo_options`` decides)."""
        self.session_id = session_id
        self._observer = observer
        self._on_ended = on_ended
        self._connection = connection
        self._build_pipeline = build_pipeline
        self._limits = limits
        self._wire = wire
        self._pipeline: Pipeline | None = None
        self._setup: SessionSetup | None = None
        self._system_prompt: str | None = None  # the client's, once it sets one
        self._resampler: StreamResampler | None = None
        self._samples_received = 0
        self._audio_meter: AudioMeter | None = None  # from the first audio on
        self._send_lock = threading.Lock()  # keeps an event and its audio frames in order
        # Every frame goes out through the writer's queue: no thread of this session but the
        # writer ever blocks on the socket.
        self._writer = SessionWriter(
            connection,
            limits.send_timeout_s,
            limits.max_queued_frames,
            f"session-{session_id}-writer",
            self._cut_off,
        )
        self._closing = threading.Event()
        self._echo_options = echo_options
        self._echo_cancel_options = echo_cancel_options
        # Told of the reply audio as it is sent: the level gate, and the canceller with it.
        self._echo_gate: EchoGate | None = None
        self._echo_canceller: ReplyEchoCanceller | None = None
        self._ledger = ReplyLedger()
        self._pacing_wake = threading.Event()  # set to cut a pacing wait short
        self._reply_lock = threading.Lock()  # guards the three fields below
        self._active_turn: int | None = None  # a reply is being made or played for this turn
        self._playing_until: float | None = None  # when its audio ends at the client
        self._timeline: _Timeline | None = None  # the reply audio being sent
        # A reply speculated at a pause is held back until its turn is confirmed. The lock
        # also keeps events in order while held ones are released (re-entrant: an event's
        # handling may cancel a turn, which emits an event on the same thread).
        self._hold_lock = threading.RLock()
        self._hold_changed = threading.Condition(self._hold_lock)
        self._held_key: tuple[int, int] | None = None  # (turn, generation) being held
        self._held: list[Event] = []
        self._speculation: dict[int, _Outcome] = {}  # per turn, for its metrics

    # --- lifecycle ------------------------------------------------------------------------

    def run(self) -> None:
        self._writer.start()
        try:
            self._serve()
        except ConnectionClosed:
            pass
        finally:
            if self._on_ended is not None:
                self._on_ended()
            self._teardown()

    def shutdown(self, code: int, reason: str) -> None:
        """Tell the client why, and close: wakes ``run()`` wherever it is blocked."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._pacing_wake.set()
        self._wake_held_audio()
        pipeline = self._pipeline
        if pipeline is not None:
            # Work in flight is abandoned, so an ``end`` being drained (``stop()`` waiting for
            # the reply) finishes now rather than after the whole reply.
            pipeline.cancellation.close()
        self._send_frames(self._wire.bye, reason)
        self._close(code, reason)

    def wait_said_goodbye(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for what ``shutdown`` queued (``bye``, then the close)
        to go out. True when it has."""
        return self._writer.wait(timeout_s)

    # --- phases ---------------------------------------------------------------------------

    def _serve(self) -> None:
        self._send_frames(self._wire.opening)
        ends_at = (
            None
            if self._limits.max_session_s is None
            else time.monotonic() + self._limits.max_session_s
        )
        while True:
            awaiting_hello = self._pipeline is None and self._wire.hello_first
            timeout_s = (
                self._limits.handshake_timeout_s if awaiting_hello else self._limits.idle_timeout_s
            )
            left_s = None if ends_at is None else ends_at - time.monotonic()
            try:
                if left_s is not None and left_s <= 0:
                    raise TimeoutError
                wait_s = timeout_s if left_s is None else min(timeout_s, left_s)
                message = self._connection.recv(timeout=wait_s)
            except TimeoutError:
                if ends_at is not None and time.monotonic() >= ends_at:
                    limit = f"session length limit of {self._limits.max_session_s:g} s reached"
                    self._send_frames(self._wire.bye, limit)
                    self._close(CloseCodes.POLICY_VIOLATION, limit)
                elif awaiting_hello:
                    self._carry_out(self._wire.handshake_timed_out())
                else:
                    self._close(CloseCodes.POLICY_VIOLATION, f"idle for {timeout_s:g} s")
                return
            for command in self._wire.receive(message, started=self._pipeline is not None):
                if not self._carry_out(command):
                    return

    def _carry_out(self, command: Command) -> bool:
        """Do what the client asked; False: the session is over."""
        if isinstance(command, Audio):
            if not self._admit(command.pcm):
                return False
            self._on_audio(command.pcm)
        elif isinstance(command, Reply):
            self._report_error(command.error_code)
            self._send_frames(lambda: list(command.frames))
        elif isinstance(command, InterruptReply):
            if self._pipeline is not None:
                self._interrupt("client interrupt", force=True)
        elif isinstance(command, Heard):
            self._on_playback(command.turn_id, command.played_ms)
        elif isinstance(command, EndTurn):
            self._feed_command(command)
        elif isinstance(command, Instruct):
            self._system_prompt = command.system_prompt
            if self._pipeline is not None:
                self._pipeline.stage(LlmStage).history.set_system_prompt(command.system_prompt)
        elif isinstance(command, Start):
            self._start(command.setup)
        elif isinstance(command, Finish):
            if self._pipeline is not None:
                self._finish_and_close()
            else:
                self._close(CloseCodes.NORMAL, "end")
            return False
        elif isinstance(command, Refuse):
            self._report_error(command.error_code)
            self._send_frames(lambda: list(command.frames))
            self._close(CloseCodes.PROTOCOL_ERROR, command.reason)
            return False
        return True

    def _report_error(self, code: str | None) -> None:
        if code is not None and self._observer is not None:
            self._observer.error(code)

    def _start(self, setup: SessionSetup) -> None:
        self._setup = setup
        vad_overrides = dict(setup.vad_overrides)
        if not setup.echo_cancelled and self._echo_options is not None:
            # The gate alone, or (while the canceller learns the room) beside it.
            options = self._echo_options
            if self._echo_cancel_options is not None:
                options = replace(options, bands=False)
            self._echo_gate = EchoGate(options)
            if self._echo_cancel_options is not None:
                canceller = ReplyEchoCanceller(VAD_SAMPLE_RATE_HZ, self._echo_cancel_options)
                canceller.start()
                self._echo_canceller = canceller
        if setup.echo_cancelled or self._echo_canceller is not None:
            vad_overrides.setdefault("threshold", ECHO_CANCELLED_VAD_THRESHOLD)
        self._resampler = StreamResampler(setup.input_sample_rate_hz, VAD_SAMPLE_RATE_HZ)
        self._pipeline = self._build_pipeline(
            session_id=self.session_id,
            output_rate_hz=setup.output_sample_rate_hz,
            baseline=setup.baseline,
            speculate=setup.speculate,
            echo_gate=self._echo_gate,
            echo_canceller=self._echo_canceller,
            vad_overrides=vad_overrides,
            deliver=self._deliver,
            on_event=self._on_event,
        )
        if self._system_prompt is not None:
            self._pipeline.stage(LlmStage).history.set_system_prompt(self._system_prompt)
        self._pipeline.start()
        self._send_frames(self._wire.started, self.session_id, setup)

    def _admit(self, pcm: bytes) -> bool:
        """Audio within the session's budget; a flood is refused and the session closed, and
        so is a session whose pipeline has stopped taking its audio."""
        assert self._setup is not None
        pipeline = self._pipeline
        if pipeline is not None and pipeline.pending_input() >= self._limits.max_queued_audio:
            reason = "the server is not keeping up with this session's audio"
            log.warning("session %s: %s", self.session_id, reason)
            self._close(CloseCodes.TRY_AGAIN_LATER, reason)
            return False
        now = time.monotonic()
        if self._audio_meter is None:
            self._audio_meter = AudioMeter(self._limits.audio_budget, now)
        duration_s = len(pcm) / 2 / self._setup.input_sample_rate_hz
        if self._audio_meter.admit(duration_s, now):
            return True
        budget = self._limits.audio_budget
        reason = f"audio faster than {budget.rate:g}x real time (burst {budget.burst_s:g} s)"
        self._report_error(RATE_LIMITED)
        self._send_frames(self._wire.error, RATE_LIMITED, reason)
        self._close(CloseCodes.POLICY_VIOLATION, reason)
        return False

    def _on_audio(self, pcm: bytes) -> None:
        assert self._pipeline is not None and self._resampler is not None
        samples = self._resampler.push(from_pcm16(pcm))
        if len(samples):
            self._pipeline.feed(
                AudioChunk(
                    session_id=self.session_id,
                    turn_id=0,
                    generation=self._pipeline.cancellation.generation,
                    samples=samples,
                    sample_rate_hz=VAD_SAMPLE_RATE_HZ,
                    first_sample_index=self._samples_received,
                    received_at=time.monotonic(),
                )
            )
            self._samples_received += len(samples)

    def _feed_command(self, command: EndTurn) -> None:
        assert self._pipeline is not None
        with contextlib.suppress(PipelineClosed):
            self._pipeline.feed(
                InputCommand(
                    session_id=self.session_id,
                    turn_id=0,
                    generation=self._pipeline.cancellation.generation,
                    action=command.action,
                )
            )

    def _finish_and_close(self) -> None:
        assert self._pipeline is not None
        report = self._pipeline.stop(self._limits.end_timeout_s)
        if not report.clean:
            log.warning("session %s: end did not finish cleanly: %s", self.session_id, report)
        self._close(CloseCodes.NORMAL, "end")

    def _teardown(self) -> None:
        self._closing.set()
        self._pacing_wake.set()
        self._wake_held_audio()
        if self._pipeline is not None:
            report = self._pipeline.cancel(self._limits.cancel_timeout_s)
            if report.stuck_threads:
                log.error("session %s: threads left: %s", self.session_id, report.stuck_threads)
        self._close(CloseCodes.NORMAL, "")
        if not self._writer.join(self._limits.close_wait_s):
            log.error("session %s: the writer did not stop", self.session_id)

    def _cut_off(self, why: str) -> None:
        """The writer dropped the connection (the client stopped reading): stop working
        for it. The receive loop sees the closed connection and tears the session down."""
        self._report_error("client_not_reading")
        self._closing.set()
        self._pacing_wake.set()
        self._wake_held_audio()

    # --- outgoing -------------------------------------------------------------------------

    def _deliver(self, item: Message) -> None:
        """Send reply audio paced to the client's playback (runs on the pipeline's sink
        thread; a pacing wait is cut short by an interruption or a close)."""
        if not isinstance(item, ReplyAudio):
            return
        assert self._pipeline is not None
        cancellation = self._pipeline.cancellation
        with self._hold_lock:
            # A speculative reply's audio waits here until its turn is confirmed; settling,
            # abandoning, an interruption or a close wakes it.
            while self._held_key == (item.turn_id, item.generation) and not self._closing.is_set():
                self._hold_changed.wait()
        with self._send_lock:
            # Checked under the send lock, as every send of this reply is: an interruption
            # moves the generation on before its ``interrupted`` goes out under the same lock,
            # so nothing of an abandoned reply can follow it.
            if cancellation.is_stale(item.generation):
                return  # abandoned (a discarded speculation, an interruption)
            with self._reply_lock:
                timeline = self._timeline
                starts = timeline is None or (timeline.turn_id, timeline.generation) != (
                    item.turn_id,
                    item.generation,
                )
                if starts:  # a turn has one reply per generation: this is a new one
                    self._timeline = _Timeline(item.turn_id, item.generation)
                    self._playing_until = None
            if starts:
                self._pacing_wake.clear()
                self._send_locked(self._wire.audio_start(item.turn_id))
        frame = max(1, item.sample_rate_hz * OUTPUT_FRAME_MS // 1000)
        for start in range(0, len(item.samples), frame):
            samples = item.samples[start : start + frame]
            plays_at = self._pace(item.sample_rate_hz)
            with self._send_lock:
                if cancellation.is_stale(item.generation) or self._closing.is_set():
                    return
                for listener in (self._echo_gate, self._echo_canceller):
                    if listener is not None:
                        listener.played(samples, plays_at, item.sample_rate_hz)
                self._ledger.sent(
                    item.turn_id, item.chunk_index, item.text, len(samples), item.sample_rate_hz
                )
                self._send_locked(self._wire.audio(item.turn_id, to_pcm16(samples)))
            with self._reply_lock:
                if self._timeline is not None:
                    self._timeline.sent_s += len(samples) / item.sample_rate_hz
        if item.is_last:
            with self._send_lock:
                if not cancellation.is_stale(item.generation):
                    self._send_locked(self._wire.audio_end(item.turn_id))
            with self._reply_lock:
                timeline = self._timeline
                if timeline is not None and timeline.generation == item.generation:
                    self._playing_until = timeline.ends_at() + PLAYBACK_SLACK_S

    def _pace(self, rate_hz: int) -> float:
        """Wait until the next frame may be sent; return when it will start to play."""
        with self._reply_lock:
            timeline = self._timeline
            assert timeline is not None
            now = time.monotonic()
            if timeline.started_at is None or timeline.ends_at() < now:
                # First frame, or the client ran dry (synthesis slower than playback): its
                # playback resumes when this frame arrives.
                timeline.started_at = now - timeline.sent_s
            plays_at = timeline.ends_at()
        ahead = plays_at - time.monotonic() - PACE_AHEAD_S
        if ahead > 0:
            self._pacing_wake.wait(ahead)
        return plays_at

    # --- interruptions ----------------------------------------------------------------------

    def _assistant_active(self) -> bool:
        with self._reply_lock:
            if self._active_turn is None:
                return False
            return self._playing_until is None or time.monotonic() < self._playing_until

    def _interrupt(self, reason: str, force: bool = False) -> None:
        """Abandon the current reply: every stage drops it, the pacing wait ends, and the
        client is told (``interrupted``) so it flushes what it has not played."""
        if not force and not self._assistant_active():
            return
        with self._reply_lock:
            turn_id = self._active_turn if self._active_turn is not None else -1
            self._active_turn = None
            self._playing_until = None
        for listener in (self._echo_gate, self._echo_canceller):
            if listener is not None:
                listener.silence_reply()
        assert self._pipeline is not None
        self._pipeline.cancel_turn(reason, turn_id=turn_id)
        self._pacing_wake.set()
        with self._send_lock:  # the ledger is written under it
            never_sent = self._ledger.heard_text(turn_id, 0.0) is None
        if turn_id >= 0 and never_sent:
            # Cut off before any of it was sent: the user heard none of the reply.
            self._pipeline.stage(LlmStage).history.amend_heard(turn_id, "")

    def _on_playback(self, turn_id: int, played_ms: float) -> None:
        """The client says how much of an interrupted reply it played: keep only that."""
        with self._send_lock:  # the ledger is written under it
            heard = self._ledger.heard_text(turn_id, played_ms)
        if heard is None or self._pipeline is None:
            return
        self._pipeline.stage(LlmStage).history.amend_heard(turn_id, heard)

    def _on_event(self, event: Event) -> None:
        """Runs on stage threads: must not block (sends are quick, pacing never happens here)."""
        with self._hold_lock:
            if not self._held_back(event):
                self._dispatch(event)

    # --- speculation ------------------------------------------------------------------------

    def _held_back(self, event: Event) -> bool:
        """Hold, release or drop the events of a speculative reply; True: ``event`` is dealt
        with (held, or an event about speculation that the client never sees)."""
        assert self._pipeline is not None
        cancellation = self._pipeline.cancellation
        if isinstance(event, SpeculationSettled):
            if self._held_key == (event.turn_id, event.generation):
                if event.outcome == "hit":
                    self._release_held(event)
                else:
                    self._abandon_held("discarded")
            return True
        if self._held_key is not None and cancellation.is_stale(self._held_key[1]):
            self._abandon_held("missed")  # the turn was cancelled under it
        if isinstance(event, Transcript) and event.speculative:
            if cancellation.is_stale(event.generation):
                self._remember(event.turn_id, _Outcome("missed"))  # the user went on meanwhile
            else:
                self._held_key, self._held = (event.turn_id, event.generation), [event]
            return True
        if isinstance(event, SpeechResumed):
            # The user went on after a pause: a reply speculated at it (held here, or still
            # being transcribed or generated) is moot. Moving to a new generation abandons it
            # wherever it is; nothing else of this session can be in flight while the user
            # speaks (a reply still playing was interrupted when this speech started).
            if self._setup is not None and self._setup.speculate:
                cancellation.advance()
                self._abandon_held("missed")
            return True
        if self._held_key == (event.turn_id, event.generation) and isinstance(
            event, Transcript | ReplyText | TurnMetrics | StageError
        ):
            self._held.append(event)
            return True
        return False

    def _release_held(self, settled: SpeculationSettled) -> None:
        key, held = self._held_key, self._held
        assert key is not None
        self._held_key, self._held = None, []
        self._remember(
            key[0],
            _Outcome(
                "hit",
                key[1],
                settled.end_of_turn_at,
                settled.speech_ended_at,
                time.monotonic(),
            ),
        )
        self._history_settle(key, keep=True)
        for event in held:
            self._dispatch(event)
        self._hold_changed.notify_all()

    def _abandon_held(self, outcome: str) -> None:
        key = self._held_key
        if key is None:
            return
        self._held_key, self._held = None, []
        self._remember(key[0], _Outcome(outcome))
        self._history_settle(key, keep=False)
        self._hold_changed.notify_all()

    def _history_settle(self, key: tuple[int, int], keep: bool) -> None:
        assert self._pipeline is not None
        self._pipeline.stage(LlmStage).history.settle(key, keep)

    def _remember(self, turn_id: int, outcome: _Outcome) -> None:
        if self._observer is not None:
            self._observer.speculation(outcome.outcome)
        self._speculation[turn_id] = outcome
        while len(self._speculation) > OUTCOMES_KEPT:
            del self._speculation[next(iter(self._speculation))]

    def _wake_held_audio(self) -> None:
        with self._hold_lock:
            self._hold_changed.notify_all()

    def _metrics_fields(self, event: TurnMetrics) -> dict[str, object]:
        """The turn's stage times; for a speculative hit, each stage's share after the end of
        the turn (what the user waited for), and the time speculation saved."""
        fields: dict[str, object] = {
            "end_of_turn_ms": event.end_of_turn_ms,
            "stt_ms": event.stt_ms,
            "llm_first_token_ms": event.llm_first_token_ms,
            "llm_first_chunk_ms": event.llm_first_chunk_ms,
            "tts_first_audio_ms": event.tts_first_audio_ms,
            "server_voice_to_voice_ms": event.server_voice_to_voice_ms,
            "speculation": None,
            "speculation_saved_ms": None,
        }
        outcome = self._speculation.get(event.turn_id)
        if outcome is None:
            return fields
        fields["speculation"] = outcome.outcome
        if outcome.outcome != "hit" or outcome.generation != event.generation:
            return fields
        ended, eot = outcome.speech_ended_at, outcome.end_of_turn_at
        v2v, chunk_ms, tts_ms = (
            event.server_voice_to_voice_ms,
            event.llm_first_chunk_ms,
            event.tts_first_audio_ms,
        )
        if ended is None or eot is None or v2v is None or chunk_ms is None or tts_ms is None:
            return fields
        first_audio_at = ended + v2v / 1000
        chunk_at = first_audio_at - tts_ms / 1000
        transcribed_at = chunk_at - chunk_ms / 1000
        released_at = max(outcome.settled_at, first_audio_at)

        def after_end(moment: float) -> float:
            return round(max(0.0, moment - eot) * 1000, 1)

        work_s = first_audio_at - transcribed_at
        fields.update(
            end_of_turn_ms=round((eot - ended) * 1000, 1),
            stt_ms=0.0,
            llm_first_token_ms=(
                None
                if event.llm_first_token_ms is None
                else after_end(transcribed_at + event.llm_first_token_ms / 1000)
            ),
            llm_first_chunk_ms=after_end(chunk_at),
            tts_first_audio_ms=round((released_at - max(eot, chunk_at)) * 1000, 1),
            server_voice_to_voice_ms=round((released_at - ended) * 1000, 1),
            speculation_saved_ms=round(max(0.0, eot + work_s - released_at) * 1000, 1),
        )
        return fields

    def _dispatch(self, event: Event) -> None:
        assert self._pipeline is not None
        cancellation = self._pipeline.cancellation
        of_a_reply = isinstance(event, Transcript | ReplyText | TurnMetrics | StageError)
        if of_a_reply and cancellation.is_stale(event.generation):
            return  # work of an abandoned turn that was already under way
        if isinstance(event, SpeechStarted):
            # Barge-in: the VAD already required min_speech_ms of speech and turned away the
            # assistant's own echo, so this is the user speaking over the reply.
            self._interrupt("barge-in")
        elif isinstance(event, SpeechStopped | Transcript):
            # The turn is over and its reply is on the way: from here on the user's speech
            # interrupts it, while it is still being transcribed or queued for the LLM too.
            with self._reply_lock:
                self._active_turn = event.turn_id
                self._playing_until = None
        elif isinstance(event, NoWords):
            with self._reply_lock:
                if self._active_turn == event.turn_id:
                    self._active_turn = None  # no reply is coming
        metrics = self._metrics_fields(event) if isinstance(event, TurnMetrics) else {}
        with self._send_lock:
            if of_a_reply and cancellation.is_stale(event.generation):
                return  # interrupted meanwhile: ``interrupted`` has gone out, nothing follows
            self._send_locked(self._wire.event(event, metrics))
        if self._observer is not None:
            if isinstance(event, TurnMetrics):
                self._observer.turn(metrics)
            elif isinstance(event, TurnInterrupted):
                self._observer.interrupted(event.reason)
            elif isinstance(event, StageError):
                self._observer.error("stage_failed")

    # --- health ---------------------------------------------------------------------------

    def stalled(self, now: float, after_s: float) -> list[tuple[str, float]]:
        pipeline = self._pipeline
        return [] if pipeline is None else pipeline.stalled(now, after_s)

    def queue_depths(self) -> dict[str, int]:
        pipeline = self._pipeline
        return {} if pipeline is None else pipeline.queue_depths()

    def _send_frames(self, make: Callable[..., list[Frame]], *args: object) -> None:
        """Make frames and send them under the send lock: the wire format's state changes
        in the order its frames go out."""
        with self._send_lock:
            self._send_locked(make(*args))

    def _send_locked(self, frames: list[Frame]) -> None:
        self._writer.send(frames)

    def _close(self, code: int, reason: str) -> None:
        self._writer.close(code, reason)

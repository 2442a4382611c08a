"""A scripted user over a real socket: a microphone that plays a script in real time, and a
virtual speaker that plays the replies in real time and leaks into the microphone like a
laptop's speaker does. Everything is recorded on the client's clock (time.monotonic)."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from s2s.client.audio import drain_into
from s2s.client.echo_cancel import EchoCanceller
from s2s.client.room import Room, RoomOptions
from s2s.models.audio import from_pcm16, to_pcm16
from s2s.pipeline.messages import Samples
from s2s.server import protocol

RATE_HZ = 16_000
FRAME = 512
"""32 ms frames, both ways: the microphone sends one and the speaker plays one per tick."""
FRAME_S = FRAME / RATE_HZ
USER_TAIL_S = 0.3
"""After the user's speech, how long the canceller's output may still hold some of it (the
ERLE figures leave that out)."""


@dataclass
class Received:
    at: float
    event: dict[str, Any] | None = None
    audio_samples: int = 0


@dataclass
class Scheduled:
    samples: Samples
    at: float
    first_sent_at: float | None = None
    position: int = 0


@dataclass
class ScriptedUser:
    url: str
    echo_gain: float = 0.0
    """How loud the speaker comes back into the microphone (0.3 is about -10 dB)."""
    echo_delay_s: float = 0.1
    room: RoomOptions | None = None
    """Instead of ``echo_gain``: the speaker reaches the microphone through this room."""
    aec: bool = False
    """Cancel the echo in the client (as s2s-client does), and say so in hello."""
    received: list[Received] = field(default_factory=list)
    echo_power_in: list[float] = field(default_factory=list)
    """Per frame while the user is silent and a reply plays: the echo's power at the
    microphone, and what is left of it after the canceller (``echo_power_out``)."""
    echo_power_out: list[float] = field(default_factory=list)
    mic_started_at = 0.0
    """When the first frame was sent: sample i of the stream was spoken at this + i / rate."""
    interrupted_at: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._connection = connect(self.url, open_timeout=5, close_timeout=1, legacy=True)
        self._room = Room(self.room, RATE_HZ) if self.room is not None else None
        self._canceller = EchoCanceller(RATE_HZ, RATE_HZ) if self.aec else None
        if self._canceller is not None:
            self._canceller.start()
        self._connection.send(protocol.hello(RATE_HZ, RATE_HZ, echo_cancelled=self.aec))
        ready = json.loads(self._connection.recv(timeout=10))
        assert ready["type"] == "ready", ready
        self._lock = threading.Lock()  # guards the speaker buffer, the script and received
        self._arrived = threading.Condition(self._lock)
        self._speaker: deque[Samples] = deque()
        # Reply audio as it arrived (when, what): it goes to the speaker at the first tick
        # that comes after it on the sound card's clock, below.
        self._incoming: deque[tuple[float, Samples]] = deque()
        self._played_total = 0
        self._reply_start_played = 0
        self._echo: deque[Samples] = deque(
            [np.zeros(FRAME, dtype=np.float32)] * max(1, round(self.echo_delay_s / FRAME_S))
        )
        self._script: list[Scheduled] = []
        self._spoke_at = -USER_TAIL_S
        self._stopped = threading.Event()
        self._threads = [
            threading.Thread(target=self._microphone, name="scripted-mic"),
            threading.Thread(target=self._receive, name="scripted-receiver"),
        ]
        for thread in self._threads:
            thread.start()

    # --- script ---------------------------------------------------------------------------

    def say(self, samples: Samples, at: float | None = None) -> Scheduled:
        """Speak ``samples`` into the microphone from ``at`` (default: now)."""
        item = Scheduled(samples.astype(np.float32), time.monotonic() if at is None else at)
        with self._lock:
            self._script.append(item)
        return item

    def wait_for(self, kind: str, timeout_s: float, **fields: Any) -> Received:
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while True:
                for item in self.received:
                    event = item.event
                    if (
                        event
                        and event["type"] == kind
                        and all(event.get(k) == v for k, v in fields.items())
                    ):
                        return item
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no {kind} {fields} within {timeout_s} s: {self.kinds()}"
                self._arrived.wait(remaining)

    def kinds(self) -> list[str]:
        return [r.event["type"] if r.event else f"audio:{r.audio_samples}" for r in self.received]

    def events(self, kind: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.event and r.event["type"] == kind]

    def close(self) -> None:
        self._stopped.set()
        self._connection.close()
        for thread in self._threads:
            thread.join(5)

    # --- threads --------------------------------------------------------------------------

    def _microphone(self) -> None:
        next_at = self.mic_started_at = time.monotonic()
        while not self._stopped.wait(max(0.0, next_at - time.monotonic())):
            # The sound card's clock: this tick is due now, though a busy machine may run it
            # late (and catch up). Audio is played and speech heard by that clock, as a
            # device does: played by the wall clock, a reply that started on a late tick
            # would reach the microphone earlier than it could have, by as much as the tick
            # was late (up to 90 ms with three sessions on two cores), and each reply would
            # seem to play at another delay.
            now = next_at
            next_at += FRAME_S
            with self._lock:
                while self._incoming and self._incoming[0][0] <= now:
                    self._speaker.append(self._incoming.popleft()[1])
                played = self._play_one_frame()
                if self._room is not None:
                    frame = self._room.echo(played)
                else:
                    frame = self._echo.popleft() * self.echo_gain
                    self._echo.append(played)
                echo = frame.copy()
                for item in self._script:
                    if item.at <= now and item.position < len(item.samples):
                        piece = item.samples[item.position : item.position + FRAME]
                        frame[: len(piece)] += piece
                        item.position += FRAME
                        self._spoke_at = now
                        if item.first_sent_at is None:
                            item.first_sent_at = now
            if self._canceller is not None:
                self._canceller.reference(played)
                frame = self._canceller.cancel(frame)
                if now - self._spoke_at > USER_TAIL_S and np.any(echo):
                    self.echo_power_in.append(float(np.mean(np.square(echo))))
                    self.echo_power_out.append(float(np.mean(np.square(frame))))
            try:
                self._connection.send(to_pcm16(np.clip(frame, -1.0, 1.0)))
            except ConnectionClosed:
                return

    def _play_one_frame(self) -> Samples:
        out = np.zeros(FRAME, dtype=np.float32)
        self._played_total += drain_into(out, self._speaker)
        return out

    def _receive(self) -> None:
        try:
            for message in self._connection:
                now = time.monotonic()
                with self._arrived:
                    if isinstance(message, bytes):
                        samples = from_pcm16(message)
                        self._incoming.append((now, samples))
                        self.received.append(Received(now, audio_samples=len(samples)))
                    else:
                        event = json.loads(message)
                        self.received.append(Received(now, event=event))
                        self._on_event(event, now)
                    self._arrived.notify_all()
        except ConnectionClosed:
            return

    def _on_event(self, event: dict[str, Any], now: float) -> None:
        """Called with the lock held: what a client does on each event."""
        if event["type"] == "reply_audio_start":
            self._reply_start_played = self._played_total
        elif event["type"] == "interrupted":
            self._speaker.clear()  # playback stops now
            self._incoming.clear()
            self.interrupted_at.append(now)
            played_ms = 1000.0 * (self._played_total - self._reply_start_played) / RATE_HZ
            self._connection.send(protocol.playback(event.get("turn_id", -1), played_ms))


def leading_silence_s(samples: Samples) -> float:
    """Where speech starts in a clip: the first 10 ms frame above 1% of its peak."""
    frame = RATE_HZ // 100
    frames = len(samples) // frame
    levels = np.abs(samples[: frames * frame]).reshape(frames, frame).max(axis=1)
    return float(np.argmax(levels > 0.01 * levels.max())) * frame / RATE_HZ

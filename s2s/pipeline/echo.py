"""Telling the user's voice from the assistant's own voice coming back through the microphone.

A Geigel-style double-talk test: while the assistant speaks, speech counts as the user's only
once the microphone has stayed louder than ``ratio`` times the loudest reply audio played
around that time for the minimum onset. A speaker's echo reaches a microphone attenuated
(laptops: well over 6 dB), a user talking to the machine does not, so the echo never
interrupts the reply and never becomes a turn, while a user who speaks up does. Thread-safe: the
session records the reply audio as it sends it, the VAD stage asks.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from s2s.pipeline.messages import Samples

LEVELS_KEPT = 512
"""Recent reply levels kept: at one per 100 ms frame, nearly a minute."""


@dataclass(frozen=True, slots=True)
class EchoOptions:
    ratio: float = 0.5
    """An onset is the user's when its RMS exceeds this times the reply's (-6 dB, Geigel)."""
    echo_delay_s: float = 0.6
    """How long after a reply frame is due to play its echo may still arrive (network, the
    client's jitter buffer, the sound card's buffers, a loaded client that plays late). At
    0.35 s a loaded test machine let echo through as barge-in; 0.6 s did not."""


def rms(samples: Samples) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0


class EchoGate:
    def __init__(self, options: EchoOptions | None = None) -> None:
        self.options = options if options is not None else EchoOptions()
        self._levels_lock = threading.Lock()  # guards _far
        self._far: deque[tuple[float, float, float]] = deque(maxlen=LEVELS_KEPT)  # start, end, rms

    def played(self, samples: Samples, starts_at: float, sample_rate_hz: int) -> None:
        """Reply audio that will play from ``starts_at`` (monotonic seconds) on."""
        ends_at = starts_at + len(samples) / sample_rate_hz
        with self._levels_lock:
            self._far.append((starts_at, ends_at, rms(samples)))

    def silence_reply(self) -> None:
        """The reply stopped (interrupted): nothing of it plays any more."""
        with self._levels_lock:
            self._far.clear()

    def louder_than_echo(self, samples: Samples, received_at: float) -> bool:
        """Whether this microphone chunk is louder than the reply's echo could be."""
        delay = self.options.echo_delay_s
        with self._levels_lock:
            far = [
                level
                for start, end, level in self._far
                if start <= received_at and end >= received_at - delay
            ]
        return rms(samples) > self.options.ratio * max(far, default=0.0)

    def reply_playing(self, since: float, now: float) -> bool:
        """Whether reply audio was playing (or its echo could still arrive) in [since, now]."""
        delay = self.options.echo_delay_s
        with self._levels_lock:
            return any(
                level > 0.0 and start <= now and end >= since - delay
                for start, end, level in self._far
            )

"""Telling the user's voice from the assistant's own voice coming back through the microphone.

A Geigel-style double-talk test: while the assistant speaks, a speech onset counts as the
user only if the microphone's loudest frame in the onset is louder than ``ratio`` times the
loudest reply audio played around that time. A speaker's echo reaches a microphone attenuated
(laptops: well over 6 dB), a user talking to the machine does not, so the echo never
interrupts the reply and never becomes a turn, while a user who speaks up does. Speech that
starts inside the echo counts once it has stayed louder than the echo for the minimum onset.
Thread-safe: the session records the reply audio as it sends it, the VAD stage records the
microphone and asks.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from pipeline.messages import Samples

LEVELS_KEPT = 512
"""Recent levels kept per side: at one per frame (32-100 ms), ten seconds and more."""


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
        self._levels_lock = threading.Lock()  # guards both deques
        self._far: deque[tuple[float, float, float]] = deque(maxlen=LEVELS_KEPT)  # start, end, rms
        self._near: deque[tuple[float, float]] = deque(maxlen=LEVELS_KEPT)  # received_at, rms

    def played(self, samples: Samples, starts_at: float, sample_rate_hz: int) -> None:
        """Reply audio that will play from ``starts_at`` (monotonic seconds) on."""
        ends_at = starts_at + len(samples) / sample_rate_hz
        with self._levels_lock:
            self._far.append((starts_at, ends_at, rms(samples)))

    def heard(self, samples: Samples, received_at: float) -> None:
        """Microphone audio as it arrives."""
        with self._levels_lock:
            self._near.append((received_at, rms(samples)))

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

    def is_echo(self, onset_at: float, now: float) -> bool:
        """Whether the speech that began at ``onset_at`` is quieter than the reply's echo would
        be. False when no reply audio was playing around then."""
        delay = self.options.echo_delay_s
        with self._levels_lock:
            far = [
                level for start, end, level in self._far if start <= now and end >= onset_at - delay
            ]
            near = [level for at, level in self._near if onset_at <= at <= now]
        if not far or max(far) == 0.0:
            return False
        if not near:
            return True
        # Peak against peak, as Geigel's detector does: frames of either side differ in length.
        return max(near) < self.options.ratio * max(far)

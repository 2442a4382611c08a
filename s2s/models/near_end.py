"""Whether the microphone holds more than the reply's echo, judged from the microphone and the
reply alone, so that it is not misled by what the cancellers did with either.

The cancellers adapt while the user talks over the reply (double talk) and, once the user
stops, leave echo behind for a while (AEC3 for 100-200 ms in a session's first reply, speex
longer); to a test on their output that leftover looks like a voice. This model learns instead
how much of the reply's power reaches the microphone, per band and per 10 ms of delay (a
power-domain echo path spanning 400 ms), and counts the bands in which the microphone stands
clearly over the echo it expects. On a simulated room with 200 ms of reverberation, a 150 ms
cough at -20 dBFS lights 6-10 of its 10 bands and at most one from 20 ms after it ends, while
the echo alone lights at most 2 in 99% of its blocks.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np

from s2s.pipeline.messages import Samples

BAND_EDGES_HZ = (100, 300, 500, 800, 1200, 1700, 2400, 3200, 4500, 6000, 8000)
ECHO_SPAN_BLOCKS = 40
"""Blocks of reply power the echo is predicted from: a delay up to 150 ms plus 200 ms of
reverberation, as the linear canceller's filter."""
STEP = 0.05
"""The normalised LMS step of the echo path's update: small, since a block's power is a noisy
measure of the path."""
EXCESS = 10 ** (6.0 / 10)
"""A band stands over the expected echo when its power is this much larger (6 dB)."""
SILENT_BAND_POWER = 1e-11
"""A band quieter than this (about -110 dBFS) never counts: digital silence over no echo."""
LEARNED_BLOCKS = 50
"""Blocks of learning before the count is given: the path is roughly known after 0.5 s."""
STILL_LEARNING_BELOW = 3
"""Once learned, a block teaches the path only when fewer bands than this stand over the
echo (a voice the hint missed must not be learned as echo)."""


class EchoPowerModel:
    """Pure: per 10 ms block, ``step`` gives the number of bands in which the microphone
    stands EXCESS over the echo expected from the reply's recent power (None until learned)."""

    def __init__(self, rate_hz: int, block_samples: int) -> None:
        frequencies = np.fft.rfftfreq(block_samples, 1.0 / rate_hz)
        edges = [edge for edge in BAND_EDGES_HZ if edge <= rate_hz / 2]
        self._bands = np.stack(
            [(frequencies >= low) & (frequencies < high) for low, high in pairwise(edges)],
            axis=1,
        ).astype(np.float64)
        self._window = np.hanning(block_samples)
        self._scale = 1.0 / (block_samples * float(np.sum(np.square(self._window))))
        bands = self._bands.shape[1]
        self._far = np.zeros((ECHO_SPAN_BLOCKS, bands))  # the reply's band powers, newest first
        self._path = np.zeros((ECHO_SPAN_BLOCKS, bands))  # echo power per reply power, by delay
        self.learned = 0
        """Blocks the path was learned from."""

    def band_power(self, samples: Samples) -> np.ndarray:
        spectrum = np.fft.rfft(np.asarray(samples, dtype=np.float64) * self._window)
        return (np.square(np.abs(spectrum)) @ self._bands) * self._scale

    def step(self, near: Samples, far: Samples, echo_only: bool) -> int | None:
        """``near``: the microphone's block; ``far``: the reply audio played with it;
        ``echo_only``: a hint that the block holds nothing but echo (the plain AEC3 found
        nothing left in it), which the path is learned from."""
        self._far = np.roll(self._far, 1, axis=0)
        self._far[0] = self.band_power(far)
        microphone = self.band_power(near)
        expected = np.sum(self._path * self._far, axis=0)
        over = int(np.sum((microphone > EXCESS * expected) & (microphone > SILENT_BAND_POWER)))
        learned = self.learned >= LEARNED_BLOCKS
        if echo_only and (not learned or over < STILL_LEARNING_BELOW) and np.any(self._far):
            error = microphone - expected
            energy = np.sum(np.square(self._far), axis=0) + 1e-30
            self._path += STEP * error * self._far / energy
            np.maximum(self._path, 0.0, out=self._path)
            self.learned += 1
        return over if learned else None

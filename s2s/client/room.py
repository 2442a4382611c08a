"""A simulated room between a speaker and a microphone, for measuring barge-in and echo
cancellation without a sound card: what the speaker plays comes back into the microphone late,
quieter and smeared by reverberation, the way a laptop's speaker leaks into its microphone."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from s2s.pipeline.messages import Samples


@dataclass(frozen=True, slots=True)
class RoomOptions:
    delay_ms: float = 100.0
    """From the speaker to the microphone, sound card buffers included."""
    reverb_ms: float = 200.0
    """How long the echo rings on: the impulse response falls by 60 dB over this time."""
    echo_db: float = -10.0
    """The echo's level relative to what the speaker plays (energy of the impulse response)."""
    seed: int = 0


def impulse_response(options: RoomOptions, sample_rate_hz: int) -> Samples:
    """Silence for the delay, then exponentially decaying noise (a diffuse reverberant tail)
    whose energy puts the echo ``echo_db`` below the played signal."""
    delay = round(options.delay_ms * sample_rate_hz / 1000)
    tail = max(1, round(options.reverb_ms * sample_rate_hz / 1000))
    decay = np.exp(np.log(1e-3) * np.arange(tail) / tail)  # -60 dB at the end of the tail
    noise = np.random.default_rng(options.seed).standard_normal(tail)
    shape = decay * noise
    shape[0] = abs(shape[0]) + 1.0  # the direct sound
    shape *= np.sqrt(10 ** (options.echo_db / 10) / np.sum(np.square(shape)))
    return np.concatenate([np.zeros(delay), shape]).astype(np.float32)


class Room:
    """Streams what the speaker plays through the impulse response (overlap-add), one frame
    at a time: ``echo(played)`` returns the echo arriving at the microphone during that frame."""

    def __init__(self, options: RoomOptions, sample_rate_hz: int) -> None:
        self.options = options
        self._response = impulse_response(options, sample_rate_hz)
        self._pending = np.zeros(len(self._response), dtype=np.float64)

    def echo(self, played: Samples) -> Samples:
        n = len(played)
        size = 1 << int(np.ceil(np.log2(n + len(self._response))))
        spectrum = np.fft.rfft(played, size) * np.fft.rfft(self._response, size)
        convolved = np.fft.irfft(spectrum, size)[: n + len(self._response) - 1]
        total = n + len(self._response)
        acc = np.zeros(total, dtype=np.float64)
        acc[: len(self._pending)] += self._pending
        acc[: len(convolved)] += convolved
        self._pending = acc[n:]
        return acc[:n].astype(np.float32)


def db_of(samples: Samples) -> float:
    """RMS level in dBFS (-inf for silence)."""
    power = float(np.mean(np.square(samples, dtype=np.float64))) if len(samples) else 0.0
    return 10 * np.log10(power) if power > 0 else float("-inf")


def at_level(samples: Samples, dbfs: float) -> Samples:
    """Scaled so that its speech (the frames within 30 dB of its loudest) has this RMS level."""
    frame = 320
    frames = [samples[i : i + frame] for i in range(0, len(samples) - frame + 1, frame)]
    levels = np.array([db_of(f) for f in frames])
    voiced = np.concatenate(
        [f for f, lvl in zip(frames, levels, strict=True) if lvl > levels.max() - 30]
    )
    gain = 10 ** ((dbfs - db_of(voiced)) / 20)
    return (samples * gain).astype(np.float32)

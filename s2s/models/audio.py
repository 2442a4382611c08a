"""Sample-rate conversion and PCM helpers shared by the server, the client and the models."""

from __future__ import annotations

import numpy as np

from s2s.models.errors import require
from s2s.pipeline.messages import Samples

PCM16_SCALE = 32767.0


class StreamResampler:
    """Converts a stream of chunks between two rates, keeping the filter state across chunks
    (resampling chunks one by one would click at every boundary)."""

    def __init__(self, from_rate_hz: int, to_rate_hz: int) -> None:
        self.from_rate_hz = from_rate_hz
        self.to_rate_hz = to_rate_hz
        self._stream = None
        if from_rate_hz != to_rate_hz:
            soxr = require("soxr", "soxr", "Resampling audio")
            self._stream = soxr.ResampleStream(from_rate_hz, to_rate_hz, 1, dtype="float32")

    def push(self, samples: Samples, last: bool = False) -> Samples:
        samples = np.asarray(samples, dtype=np.float32)
        if self._stream is None:
            return samples
        return np.asarray(self._stream.resample_chunk(samples, last=last), dtype=np.float32)


def resample(samples: Samples, from_rate_hz: int, to_rate_hz: int) -> Samples:
    """Whole-buffer conversion."""
    return StreamResampler(from_rate_hz, to_rate_hz).push(samples, last=True)


def to_pcm16(samples: Samples) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * PCM16_SCALE).astype("<i2").tobytes()


def from_pcm16(data: bytes) -> Samples:
    return (np.frombuffer(data, dtype="<i2").astype(np.float32) / PCM16_SCALE).astype(np.float32)

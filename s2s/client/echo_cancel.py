"""Acoustic echo cancellation for the client: the reply the speaker plays is removed from the
microphone before it is sent, so the user can talk over the assistant at a normal level.

WebRTC's audio processing (AEC3, through the ``livekit`` package's prebuilt wheels) adapts a
filter from the played audio (the far end, ``reference``) to the echo it finds in the
microphone (``cancel``), and suppresses what is left of it. Both sides go through it in 10 ms
blocks at the microphone's rate: the speaker's audio is resampled to that rate first. The two
sides run on different threads (the sound card's output callback and the sender), so the played
audio waits in a short queue and is taken, sample for sample, as much as the microphone brings.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from s2s.client.audio import Source, drain_into
from s2s.models.audio import StreamResampler
from s2s.models.errors import require
from s2s.pipeline.messages import Samples

BLOCK_MS = 10
"""The block WebRTC's audio processing works in."""
APM_RATES_HZ = frozenset({8_000, 16_000, 32_000, 48_000})
MAX_REFERENCE_S = 0.2
"""Played audio kept for the microphone side: a sound card block or two. More means the
microphone started late or stalled; the oldest is dropped, because a reference that lags the
microphone would come after its own echo, which no canceller can remove."""
INT16_SCALE = 32767.0


@dataclass(frozen=True, slots=True)
class EchoCancelOptions:
    noise_suppression: bool = False
    """WebRTC's noise suppressor after the echo canceller (steady fans and hum). Off by
    default: over a simulated room it delayed barge-in and removed no echo."""
    stream_delay_ms: int = 0
    """The sound card's output plus input latency, when known: a hint for the delay search."""


class EchoCanceller:
    """Removes the played reply from the microphone. ``reference`` and ``cancel`` may be called
    from different threads; ``start`` loads the library."""

    def __init__(
        self,
        mic_rate_hz: int,
        speaker_rate_hz: int,
        options: EchoCancelOptions | None = None,
    ) -> None:
        if mic_rate_hz not in APM_RATES_HZ:
            raise ValueError(
                f"echo cancellation works at {', '.join(map(str, sorted(APM_RATES_HZ)))} Hz; "
                f"the microphone runs at {mic_rate_hz} Hz (choose --input-rate or --no-aec)"
            )
        self.mic_rate_hz = mic_rate_hz
        self.speaker_rate_hz = speaker_rate_hz
        self.options = options if options is not None else EchoCancelOptions()
        self._block = mic_rate_hz * BLOCK_MS // 1000
        self._apm: Any = None
        self._frame_type: Any = None
        self._to_mic_rate = StreamResampler(speaker_rate_hz, mic_rate_hz)
        self._reference_lock = threading.Lock()  # guards _reference, _referenced, _to_mic_rate
        self._reference: deque[Samples] = deque()
        self._referenced = 0
        self._near = np.zeros(0, dtype=np.float32)  # microphone samples not yet a whole block
        # One block of latency, so that ``cancel`` always returns as many samples as it got.
        self._cleaned: deque[Samples] = deque([np.zeros(self._block, dtype=np.float32)])
        self._cleaned_count = self._block
        self.blocks = 0

    def start(self) -> None:
        rtc = require("livekit.rtc", "livekit", "Echo cancellation (or run with --no-aec)")
        self._frame_type = rtc.AudioFrame
        self._apm = rtc.AudioProcessingModule(
            echo_cancellation=True,
            noise_suppression=self.options.noise_suppression,
            high_pass_filter=True,
            auto_gain_control=False,
        )
        if self.options.stream_delay_ms:
            self._apm.set_stream_delay_ms(self.options.stream_delay_ms)

    def reference(self, played: Samples) -> None:
        """Audio handed to the speaker (silence included), at the speaker's rate."""
        with self._reference_lock:
            samples = self._to_mic_rate.push(played)
            if len(samples):
                self._reference.append(samples)
                self._referenced += len(samples)
            excess = self._referenced - int(MAX_REFERENCE_S * self.mic_rate_hz)
            while excess > 0 and self._reference:
                head = self._reference[0]
                if len(head) <= excess:
                    self._reference.popleft()
                    self._referenced -= len(head)
                    excess -= len(head)
                else:
                    self._reference[0] = head[excess:]
                    self._referenced -= excess
                    excess = 0

    def cancel(self, mic: Samples) -> Samples:
        """The microphone frame without the echo: as many samples as given, one block later."""
        assert self._apm is not None, "start() first"
        self._near = np.concatenate([self._near, np.asarray(mic, dtype=np.float32)])
        whole = len(self._near) - len(self._near) % self._block
        for begin in range(0, whole, self._block):
            cleaned = self._process(self._near[begin : begin + self._block])
            self._cleaned.append(cleaned)
            self._cleaned_count += len(cleaned)
        self._near = self._near[whole:]
        out = np.zeros(len(mic), dtype=np.float32)
        self._cleaned_count -= drain_into(out, self._cleaned)
        return out

    def _process(self, near: Samples) -> Samples:
        far = np.zeros(self._block, dtype=np.float32)
        with self._reference_lock:
            self._referenced -= drain_into(far, self._reference)
        self._apm.process_reverse_stream(self._frame(far))
        frame = self._frame(near)
        self._apm.process_stream(frame)  # in place
        self.blocks += 1
        data = np.frombuffer(frame.data, dtype=np.int16)
        return (data.astype(np.float32) / INT16_SCALE).astype(np.float32)

    def _frame(self, samples: Samples) -> Any:
        pcm = (np.clip(samples, -1.0, 1.0) * INT16_SCALE).astype(np.int16)
        return self._frame_type(pcm.tobytes(), self.mic_rate_hz, 1, len(pcm))


class EchoCancelledSource:
    """A microphone whose frames come out with the speaker's echo removed."""

    def __init__(self, inner: Source, canceller: EchoCanceller) -> None:
        self._inner = inner
        self._canceller = canceller
        self.sample_rate_hz = inner.sample_rate_hz

    def start(self) -> None:
        self._canceller.start()
        self._inner.start()

    def read(self) -> Samples | None:
        frame = self._inner.read()
        return None if frame is None else self._canceller.cancel(frame)

    def exhausted(self) -> bool:
        return self._inner.exhausted()

    def close(self) -> None:
        self._inner.close()

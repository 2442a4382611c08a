"""Acoustic echo cancellation in the client (``s2s/models/echo_cancel.py`` has the
cancellers): the reply the speaker plays is removed from the microphone before it is sent.
The two sides run on different threads (the sound card's output callback and the sender), so
the played audio, resampled to the microphone's rate, waits in a short queue and is taken,
sample for sample, as much as the microphone brings.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

from s2s.client.audio import Source, drain_into
from s2s.models.audio import StreamResampler
from s2s.models.echo_cancel import APM_RATES_HZ, CancellerChain, EchoCancelOptions
from s2s.pipeline.messages import Samples

MAX_REFERENCE_S = 0.2
"""Played audio kept for the microphone side: a sound card block or two. More means the
microphone started late or stalled; the oldest is dropped, because a reference that lags the
microphone would come after its own echo, which no canceller can remove."""


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
        self._chain = CancellerChain(mic_rate_hz, options)
        self.options = self._chain.options
        self._block = self._chain.block_samples
        self._to_mic_rate = StreamResampler(speaker_rate_hz, mic_rate_hz)
        self._reference_lock = threading.Lock()  # guards _reference, _referenced, _to_mic_rate
        self._reference: deque[Samples] = deque()
        self._referenced = 0
        self._near = np.zeros(0, dtype=np.float32)  # microphone samples not yet a whole block
        # One block of latency, so that ``cancel`` always returns as many samples as it got.
        self._cleaned: deque[Samples] = deque([np.zeros(self._block, dtype=np.float32)])
        self._cleaned_count = self._block

    @property
    def blocks(self) -> int:
        return self._chain.blocks

    @property
    def voice_kept_blocks(self) -> int:
        """Blocks sent from speex's output, through AEC3 or not (for tests and the bench)."""
        return self._chain.voice_kept_blocks

    def start(self) -> None:
        self._chain.start("Echo cancellation (or run with --no-aec)")

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
        self._near = np.concatenate([self._near, np.asarray(mic, dtype=np.float32)])
        whole = len(self._near) - len(self._near) % self._block
        for begin in range(0, whole, self._block):
            far = np.zeros(self._block, dtype=np.float32)
            with self._reference_lock:
                self._referenced -= drain_into(far, self._reference)
            cleaned = self._chain.process(self._near[begin : begin + self._block], far)
            self._cleaned.append(cleaned)
            self._cleaned_count += len(cleaned)
        self._near = self._near[whole:]
        out = np.zeros(len(mic), dtype=np.float32)
        self._cleaned_count -= drain_into(out, self._cleaned)
        return out


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

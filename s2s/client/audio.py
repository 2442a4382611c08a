"""The client's audio ends: where frames come from (microphone or file) and where the reply
goes (speaker, recorder or nowhere). Each blocking read can be woken by ``close()``."""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from s2s.models.audio import resample
from s2s.models.errors import require
from s2s.pipeline.messages import Samples

FRAME_MS = 32
"""Audio per frame sent to the server (512 samples at 16 kHz)."""


class Source(Protocol):
    """Frames of the user's audio at ``sample_rate_hz``."""

    sample_rate_hz: int

    def start(self) -> None: ...

    def read(self) -> Samples | None:
        """Block until the next frame; None once closed or exhausted."""
        ...

    def exhausted(self) -> bool:
        """True once a finite source (a file) has handed out all of its audio."""
        ...

    def close(self) -> None:
        """Stop capturing and wake ``read()``. Idempotent."""
        ...


class Sink(Protocol):
    """Where reply audio goes, at ``sample_rate_hz``."""

    sample_rate_hz: int

    def start(self) -> None: ...

    def write(self, samples: Samples) -> None: ...

    def flush(self) -> None:
        """Drop what is buffered and not yet played (barge-in)."""
        ...

    def pending_s(self) -> float:
        """Seconds of audio written and not yet played."""
        ...

    def played_samples(self) -> int:
        """Samples played so far, all replies together."""
        ...

    def end_of_reply(self) -> None:
        """The reply is complete: play what is buffered even if the jitter buffer is not full."""
        ...

    def close(self) -> None: ...


# --- sources -------------------------------------------------------------------------------


class FileSource:
    """A sound file (any rate, any channel count), converted to mono at ``sample_rate_hz`` and
    handed out one frame at a time in real time, then silence until closed (a microphone keeps
    sending too, and the server's VAD needs the silence to hear the end of the turn)."""

    def __init__(self, path: Path, sample_rate_hz: int) -> None:
        self.path = path
        self.sample_rate_hz = sample_rate_hz
        self._frame = sample_rate_hz * FRAME_MS // 1000
        self._audio: Samples = np.zeros(0, dtype=np.float32)
        self._position = 0
        self._closed = threading.Event()
        self._next_at = 0.0
        self.file_finished = threading.Event()

    def start(self) -> None:
        soundfile = require("soundfile", "soundfile", "Reading audio files")
        try:
            data, rate = soundfile.read(str(self.path), dtype="float32", always_2d=True)
        except Exception as exc:
            raise ValueError(f"cannot read {self.path}: {exc}") from exc
        self._audio = resample(data.mean(axis=1).astype(np.float32), int(rate), self.sample_rate_hz)
        self._next_at = time.monotonic()

    def read(self) -> Samples | None:
        # Paced on one clock so frames never drift from real time.
        if self._closed.wait(max(0.0, self._next_at - time.monotonic())):
            return None
        self._next_at += FRAME_MS / 1000
        frame = self._audio[self._position : self._position + self._frame]
        self._position += self._frame
        if len(frame) < self._frame:
            self.file_finished.set()
            frame = np.concatenate([frame, np.zeros(self._frame - len(frame), dtype=np.float32)])
        return frame

    def exhausted(self) -> bool:
        return self.file_finished.is_set()

    def close(self) -> None:
        self._closed.set()


class MicrophoneSource:
    """sounddevice input stream; its callback queues frames, ``read`` takes them."""

    _CLOSED = None

    def __init__(self, sample_rate_hz: int, device: str | int | None = None) -> None:
        self.sample_rate_hz = sample_rate_hz
        self._device = device
        self._frames: queue.Queue[Samples | None] = queue.Queue()
        self._stream: Any = None
        self._closed_lock = threading.Lock()  # guards _closed against close() racing start()
        self._closed = False

    def start(self) -> None:
        sd = require("sounddevice", "sounddevice", "The microphone")

        def on_audio(indata: Any, _frames: int, _time: Any, _status: Any) -> None:
            self._frames.put(indata[:, 0].copy())

        with self._closed_lock:
            if self._closed:
                return
            self._stream = sd.InputStream(
                samplerate=self.sample_rate_hz,
                channels=1,
                dtype="float32",
                blocksize=self.sample_rate_hz * FRAME_MS // 1000,
                device=self._device,
                callback=on_audio,
            )
            self._stream.start()

    def read(self) -> Samples | None:
        return self._frames.get()

    def exhausted(self) -> bool:
        return False

    def close(self) -> None:
        with self._closed_lock:
            if self._closed:
                return
            self._closed = True
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.abort()
            stream.close()
        self._frames.put(self._CLOSED)


# --- sinks ---------------------------------------------------------------------------------


class NullSink:
    """Plays nothing (headless): everything written counts as played at once (the server
    paces replies to real time, so that is close to what a speaker would have played)."""

    def __init__(self, sample_rate_hz: int) -> None:
        self.sample_rate_hz = sample_rate_hz
        self._written = 0

    def start(self) -> None:
        pass

    def write(self, samples: Samples) -> None:
        self._written += len(samples)

    def played_samples(self) -> int:
        return self._written

    def end_of_reply(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def pending_s(self) -> float:
        return 0.0

    def close(self) -> None:
        pass


class SpeakerSink:
    """sounddevice output stream fed from a jitter buffer.

    Playback of a reply starts once ``jitter_ms`` of audio is buffered (or the reply ended), so
    network jitter does not turn into gaps; underruns play silence instead of blocking.
    """

    def __init__(
        self,
        sample_rate_hz: int,
        device: str | int | None = None,
        jitter_ms: int = 80,
        on_played: Callable[[Samples], None] | None = None,
    ) -> None:
        self.sample_rate_hz = sample_rate_hz
        self._device = device
        self._on_played = on_played
        """Gets every block handed to the sound card, silence included (the echo canceller's
        far-end reference)."""
        self._jitter = sample_rate_hz * jitter_ms // 1000
        self._buffer: deque[Samples] = deque()
        self._buffered = 0
        self._buffer_lock = threading.Lock()  # guards _buffer, _buffered, _playing
        self._playing = False
        self._stream: Any = None
        self._played = 0

    def start(self) -> None:
        sd = require("sounddevice", "sounddevice", "The speaker")
        self._stream = sd.OutputStream(
            samplerate=self.sample_rate_hz,
            channels=1,
            dtype="float32",
            device=self._device,
            callback=self._fill,
        )
        self._stream.start()

    def _fill(self, outdata: Any, frames: int, _time: Any, _status: Any) -> None:
        out = outdata[:, 0]
        out.fill(0.0)
        with self._buffer_lock:
            if self._playing:
                filled = drain_into(out, self._buffer)
                self._buffered -= filled
                self._played += filled
                if not self._buffer:
                    self._playing = False  # underrun or end: wait for the jitter buffer again
        if self._on_played is not None:
            self._on_played(out.copy())

    def write(self, samples: Samples) -> None:
        with self._buffer_lock:
            self._buffer.append(samples)
            self._buffered += len(samples)
            if self._buffered >= self._jitter:
                self._playing = True

    def end_of_reply(self) -> None:
        """Play what is buffered even if it is less than the jitter buffer."""
        with self._buffer_lock:
            if self._buffered:
                self._playing = True

    def flush(self) -> None:
        with self._buffer_lock:
            self._buffer.clear()
            self._buffered = 0
            self._playing = False

    def pending_s(self) -> float:
        with self._buffer_lock:
            return self._buffered / self.sample_rate_hz

    def played_samples(self) -> int:
        with self._buffer_lock:
            return self._played

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.abort()
            stream.close()


class RecordingSink:
    """Wraps another sink and keeps every sample written to it, for ``--save``."""

    def __init__(self, inner: Sink) -> None:
        self._inner = inner
        self.sample_rate_hz = inner.sample_rate_hz
        self._chunks: list[Samples] = []
        self._chunks_lock = threading.Lock()

    def start(self) -> None:
        self._inner.start()

    def write(self, samples: Samples) -> None:
        with self._chunks_lock:
            self._chunks.append(samples)
        self._inner.write(samples)

    def flush(self) -> None:
        self._inner.flush()

    def pending_s(self) -> float:
        return self._inner.pending_s()

    def played_samples(self) -> int:
        return self._inner.played_samples()

    def end_of_reply(self) -> None:
        self._inner.end_of_reply()

    def recorded(self) -> Samples:
        with self._chunks_lock:
            return np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.float32)

    def save(self, path: Path) -> None:
        soundfile = require("soundfile", "soundfile", "Saving audio files")
        soundfile.write(str(path), self.recorded(), self.sample_rate_hz, subtype="PCM_16")

    def close(self) -> None:
        self._inner.close()


def drain_into(out: Samples, chunks: deque[Samples]) -> int:
    """Fill ``out`` from the front of ``chunks`` (consuming them); return the samples filled.
    The rest of ``out`` is left as it was."""
    filled = 0
    while filled < len(out) and chunks:
        head = chunks[0]
        take = min(len(head), len(out) - filled)
        out[filled : filled + take] = head[:take]
        filled += take
        if take == len(head):
            chunks.popleft()
        else:
            chunks[0] = head[take:]
    return filled


def list_devices() -> str:
    sd = require("sounddevice", "sounddevice", "Listing audio devices")
    return str(sd.query_devices())

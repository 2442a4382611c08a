"""Silero VAD on 512-sample windows at 16 kHz, feeding the pure segmenter in
``pipeline.segmenter``.

The ONNX session is loaded once and shared: ``onnxruntime.InferenceSession.run`` is
thread-safe, and the recurrent state lives in each session's ``StreamingVad``, not in the model.
The ``silero_vad`` package is never imported: its import sets ``torch.set_num_threads(1)``
for the whole process, which would halve the LLM's speed on two cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from s2s.models.errors import packaged_path, require
from s2s.pipeline.messages import Samples
from s2s.pipeline.segmenter import VAD_SAMPLE_RATE_HZ, VadEvent, VadOptions, VadSegmenter

WINDOW_SAMPLES = 512
"""Silero's window at 16 kHz: 32 ms."""
CONTEXT_SAMPLES = 64
"""Silero v5+ expects the last 64 samples of the previous window in front of each window."""
STATE_SHAPE = (2, 1, 128)


class SileroVad:
    """The shared model: probability of speech for one window, given and returning state."""

    def __init__(self, session: object) -> None:
        self._session = session

    @classmethod
    def load(cls, model_path: str | None = None) -> SileroVad:
        ort = require("onnxruntime", "onnxruntime", "Silero VAD")
        path = Path(model_path) if model_path else _packaged_model_path()
        options = ort.SessionOptions()
        # One thread: a window costs well under a millisecond, and the other core is the LLM's.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        return cls(session)

    def new_state(self) -> np.ndarray:
        return np.zeros(STATE_SHAPE, dtype=np.float32)

    def probability(
        self, window_with_context: Samples, state: np.ndarray
    ) -> tuple[float, np.ndarray]:
        out, new_state = self._session.run(  # type: ignore[attr-defined]
            None,
            {
                "input": window_with_context[np.newaxis, :],
                "state": state,
                "sr": np.array(VAD_SAMPLE_RATE_HZ, dtype=np.int64),
            },
        )
        return float(out[0][0]), new_state


def _packaged_model_path() -> Path:
    return packaged_path("silero_vad", "silero-vad", "Silero VAD", "data", "silero_vad.onnx")


class StreamingVad:
    """One session's VAD: any-length 16 kHz audio in, events out. Not thread-safe."""

    def __init__(self, model: SileroVad, options: VadOptions) -> None:
        self._model = model
        self._segmenter = VadSegmenter(options)
        self._state = model.new_state()
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)
        self._next_window_start = 0

    @property
    def in_speech(self) -> bool:
        return self._segmenter.in_speech

    def restart(self, speech_start: int) -> None:
        self._segmenter.restart(speech_start)

    def forget(self, until: int) -> None:
        self._segmenter.forget(until)

    def commit(self) -> list[VadEvent]:
        return self._segmenter.commit()

    def clear(self) -> list[VadEvent]:
        return self._segmenter.clear()

    def push(self, samples: Samples) -> list[VadEvent]:
        self._pending = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])
        events: list[VadEvent] = []
        while len(self._pending) >= WINDOW_SAMPLES:
            window, self._pending = self._pending[:WINDOW_SAMPLES], self._pending[WINDOW_SAMPLES:]
            probability, self._state = self._model.probability(
                np.concatenate([self._context, window]), self._state
            )
            self._context = window[-CONTEXT_SAMPLES:]
            events += self._segmenter.push(window, self._next_window_start, probability)
            self._next_window_start += WINDOW_SAMPLES
        return events

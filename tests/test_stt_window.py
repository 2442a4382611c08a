"""The fitted encoder window: which window a clip gets, and when the full window runs instead."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from s2s.models.stt import (
    COMPRESSION_RATIO_LIMIT,
    STT_SAMPLE_RATE_HZ,
    SttOptions,
    WhisperTranscriber,
    compression_ratio,
    fitted_window_s,
)
from s2s.pipeline.messages import Samples


def seconds(duration_s: float) -> int:
    return round(duration_s * STT_SAMPLE_RATE_HZ)


class FullWindowModel:
    """Stands in for faster-whisper's model: counts the full-window transcriptions."""

    def __init__(self) -> None:
        self.calls = 0

    def transcribe(self, samples: Samples, **_options: object) -> tuple[list[object], None]:
        self.calls += 1
        return [SimpleNamespace(text=" full window ")], None


class ScriptedWindow:
    """Stands in for the fitted decoder: answers with a fixed result and records the windows."""

    def __init__(self, answer: str | None) -> None:
        self.answer = answer
        self.windows: list[int] = []

    def decode(self, samples: Samples, window_s: int) -> str | None:
        self.windows.append(window_s)
        return self.answer


def transcriber(fitted: ScriptedWindow | None) -> tuple[WhisperTranscriber, FullWindowModel]:
    model = FullWindowModel()
    return WhisperTranscriber(model, SttOptions(), 0.0, fitted), model  # type: ignore[arg-type]


def test_a_clip_gets_the_smallest_5_s_step_from_10_s_that_leaves_2_s_of_silence() -> None:
    """1 s and 8 s: 10 s; 8.1 s: 15 s; 23 s: 25 s; 23.1 s: none fits below 30 s."""
    assert fitted_window_s(seconds(1.0)) == 10
    assert fitted_window_s(seconds(8.0)) == 10
    assert fitted_window_s(seconds(8.1)) == 15
    assert fitted_window_s(seconds(13.0)) == 15
    assert fitted_window_s(seconds(23.0)) == 25
    assert fitted_window_s(seconds(23.1)) is None
    assert fitted_window_s(seconds(40.0)) is None


def test_a_repetition_loop_compresses_past_the_limit_and_a_sentence_does_not() -> None:
    """The check that sends a looping decode to the full window tells the two apart."""
    assert compression_ratio("the the the the the the the the the the the the the the") > (
        COMPRESSION_RATIO_LIMIT
    )
    assert compression_ratio("What is the tallest mountain in the world, and where is it?") < (
        COMPRESSION_RATIO_LIMIT
    )
    assert compression_ratio("") == 0.0


def test_a_short_clip_is_decoded_in_its_fitted_window_only() -> None:
    """A 2 s clip: the fitted decoder's text, in a 10 s window; the full window never runs."""
    window = ScriptedWindow("fitted text")
    stt, model = transcriber(window)
    assert stt.transcribe(np.zeros(seconds(2.0), dtype=np.float32)) == "fitted text"
    assert window.windows == [10]
    assert model.calls == 0


def test_silence_found_in_the_fitted_window_is_final() -> None:
    """An empty text (no speech) is an answer, not a reason to run the full window."""
    window = ScriptedWindow("")
    stt, model = transcriber(window)
    assert stt.transcribe(np.zeros(seconds(1.0), dtype=np.float32)) == ""
    assert model.calls == 0


def test_an_unreliable_fitted_decode_falls_back_to_the_full_window() -> None:
    """The fitted decoder declines (a loop, a low log probability): the full window answers."""
    window = ScriptedWindow(None)
    stt, model = transcriber(window)
    assert stt.transcribe(np.zeros(seconds(2.0), dtype=np.float32)) == "full window"
    assert window.windows == [10]
    assert model.calls == 1


def test_a_clip_too_long_for_a_fitted_window_goes_to_the_full_window() -> None:
    """25 s of audio: the fitted decoder is never asked."""
    window = ScriptedWindow("fitted text")
    stt, model = transcriber(window)
    assert stt.transcribe(np.zeros(seconds(25.0), dtype=np.float32)) == "full window"
    assert window.windows == []
    assert model.calls == 1


def test_without_a_fitted_decoder_every_clip_goes_to_the_full_window() -> None:
    """``fitted_window=False`` (or a GPU, or no fixed language): faster-whisper's own path."""
    stt, model = transcriber(None)
    assert stt.transcribe(np.zeros(seconds(2.0), dtype=np.float32)) == "full window"
    assert model.calls == 1

"""Parler-TTS's code path on a tiny random model built in the test (no hub)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from s2s.models.audio import StreamResampler
from s2s.models.tts import ParlerSynthesizer, TtsOptions
from s2s.pipeline.messages import ReplyAudio, ReplyText, Samples, TurnClock
from s2s.pipeline.stages import TtsStage
from tests.harness import run_stage
from tests.tiny_parler import SAMPLE_RATE_HZ, build_tiny_parler

REQUESTED_RATE_HZ = 24_000


class Recording:
    """Passes a synthesizer through, counting the samples it produced at its own rate."""

    def __init__(self, inner: ParlerSynthesizer) -> None:
        self._inner = inner
        self.sample_rate_hz = inner.sample_rate_hz
        self.samples = 0

    def stream(self, text: str, should_stop: Callable[[], bool]) -> Iterator[Samples]:
        for chunk in self._inner.stream(text, should_stop):
            self.samples += len(chunk)
            yield chunk


@pytest.fixture(scope="module")
def parler() -> ParlerSynthesizer:
    model, tokenizer = build_tiny_parler()
    return ParlerSynthesizer(model, tokenizer, TtsOptions(model="tiny-in-test"))


def test_streams_several_chunks_at_44k(parler: ParlerSynthesizer) -> None:
    """The model speaks at 44.1 kHz and the audio arrives in several chunks, not one."""
    chunks = list(parler.stream("Hello there, how are you today?", lambda: False))
    assert parler.sample_rate_hz == SAMPLE_RATE_HZ
    assert len(chunks) >= 3
    assert all(chunk.dtype.name == "float32" for chunk in chunks)


def test_tts_stage_resamples_to_the_requested_rate(parler: ParlerSynthesizer) -> None:
    """Through the TTS stage, audio comes out at the session's rate with the right length."""
    item = ReplyText(
        session_id="t",
        turn_id=0,
        generation=0,
        text="Hello there.",
        chunk_index=0,
        is_last=True,
        clock=TurnClock(),
    )
    recorder = Recording(parler)
    run = run_stage(TtsStage(recorder, REQUESTED_RATE_HZ, StreamResampler), [item])
    audio = [out for out in run.outputs if isinstance(out, ReplyAudio)]
    assert run.ended_with_pill and run.thread_joined
    assert len(audio) >= 3 and audio[-1].is_last
    assert {a.sample_rate_hz for a in audio} == {REQUESTED_RATE_HZ}
    total = sum(len(a.samples) for a in audio)
    assert total == pytest.approx(recorder.samples * REQUESTED_RATE_HZ / SAMPLE_RATE_HZ, abs=64)


def test_stops_within_one_step_on_cancel(parler: ParlerSynthesizer) -> None:
    """After cancellation is seen, generation ends within one decoder step, thread joined."""
    cancelled = threading.Event()
    seen_at: list[int] = []  # the step count when generation first saw the cancel

    def should_stop() -> bool:
        if not cancelled.is_set():
            return False
        if not seen_at:
            seen_at.append(parler.steps_generated)
        return True

    for _ in parler.stream("Hello there, how are you today?", should_stop):
        cancelled.set()
    assert seen_at and parler.steps_generated - seen_at[0] <= 1
    assert parler.steps_generated < 100
    assert not [t for t in threading.enumerate() if t.name == "parler-generate"]

"""The STT stage transcribes a provisional segment ahead and reuses it for the final one."""

from __future__ import annotations

import numpy as np

from s2s.pipeline.messages import Samples, SpeechSegment, Transcript, TurnClock
from s2s.pipeline.stages import SttStage
from tests.harness import run_stage


class CountingTranscriber:
    def __init__(self) -> None:
        self.calls = 0

    def transcribe(self, samples: Samples) -> str:
        self.calls += 1
        return f"text of {len(samples)} samples"


def segment(start: int, end: int, provisional: bool) -> SpeechSegment:
    return SpeechSegment(
        session_id="t",
        turn_id=0,
        generation=0,
        samples=np.zeros(end - start, dtype=np.float32),
        sample_rate_hz=16_000,
        start_sample_index=start,
        end_sample_index=end,
        clock=TurnClock(),
        provisional=provisional,
    )


def test_a_final_segment_reuses_the_transcription_made_ahead() -> None:
    """Provisional then final with the same span: one transcription, one transcript."""
    transcriber = CountingTranscriber()
    stage = SttStage(transcriber)
    run = run_stage(stage, [segment(0, 800, True), segment(0, 800, False)])
    assert [o.text for o in run.outputs if isinstance(o, Transcript)] == ["text of 800 samples"]
    assert transcriber.calls == 1 and stage.reused_ahead == 1


def test_speech_that_resumed_is_transcribed_again() -> None:
    """A provisional for a pause the user talked through is not reused for the longer turn."""
    transcriber = CountingTranscriber()
    stage = SttStage(transcriber)
    run = run_stage(stage, [segment(0, 800, True), segment(0, 1600, False)])
    assert [o.text for o in run.outputs if isinstance(o, Transcript)] == ["text of 1600 samples"]
    assert transcriber.calls == 2 and stage.reused_ahead == 0

"""Layer 1 for the echo gate and barge-in onset inside the VAD stage: a VAD that hears any
loud window as speech, fake arrival times, no threads. Each case is the same audio, timed the
way a network may deliver it; what counts is where the audio says the user spoke."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from s2s.models.vad import StreamingVad
from s2s.pipeline.cancellation import TurnCancellation
from s2s.pipeline.echo import EchoGate, EchoOptions
from s2s.pipeline.input_clock import InputClock
from s2s.pipeline.messages import AudioChunk, Event, Samples, SpeechSegment, SpeechStarted
from s2s.pipeline.segmenter import VadOptions
from s2s.pipeline.stage import StageContext
from s2s.pipeline.stages import VadStage
from tests.fake_models import LoudWindows

RATE = 16_000
FRAME_S = 0.04
REPLY_LEVEL = 0.2
ECHO_LEVEL = 0.06  # -10 dB under the reply: what a laptop's speaker sends back
USER_LEVEL = 0.3  # the user speaking up over the reply


def tone(level: float, seconds: float) -> Samples:
    t = np.arange(round(RATE * seconds)) / RATE
    samples: Samples = (level * np.sqrt(2) * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return samples


@dataclass
class TrustedFrom:
    """An echo canceller that hands the microphone back as it is (the echo is all gone, or
    it is all the user's) and is trusted alone from sample ``first`` on, as the server's is
    once it has learned the room."""

    first: int

    def cancel(self, samples: Samples, ends_at: float) -> Samples:
        return samples

    def trusted(self, since: int) -> bool:
        return since >= self.first


@dataclass
class Mic:
    """Feeds a VAD stage 40 ms frames, each 'arriving' when the test says."""

    gate: EchoGate | None
    canceller: TrustedFrom | None = None
    started_at: float = 100.0
    events: list[Event] = field(default_factory=list)
    segments: list[SpeechSegment] = field(default_factory=list)

    def __post_init__(self) -> None:
        options = VadOptions(min_speech_ms=300, min_silence_ms=500)
        self.stage = VadStage(
            StreamingVad(LoudWindows(), options),  # type: ignore[arg-type]
            RATE,
            self.gate,
            options.min_speech_ms,
            self.canceller,
        )
        self.ctx = StageContext("test", TurnCancellation(), self.events.append)
        self.sent = 0  # samples so far

    def speak(self, audio: Samples, arrivals: list[float] | None = None) -> None:
        """Send ``audio`` in frames; frame k arrives at ``arrivals[k]`` (default: in real time,
        as it is spoken)."""
        frame = round(FRAME_S * RATE)
        for k, start in enumerate(range(0, len(audio), frame)):
            samples = audio[start : start + frame]
            spoken_by = self.started_at + (self.sent + len(samples)) / RATE
            received_at = arrivals[k] if arrivals is not None else spoken_by
            chunk = AudioChunk(
                session_id="test",
                turn_id=0,
                generation=0,
                samples=samples,
                sample_rate_hz=RATE,
                first_sample_index=self.sent,
                received_at=received_at,
            )
            self.segments += list(self.stage.handle(chunk, self.ctx))
            self.sent += len(samples)

    def onsets(self) -> list[int]:
        return [e.sample_index for e in self.events if isinstance(e, SpeechStarted)]


def reply_playing(mic: Mic, seconds: float = 10.0) -> EchoGate:
    """The assistant's reply plays from the start of the microphone stream on."""
    assert mic.gate is not None
    frame = tone(REPLY_LEVEL, 0.1)
    for k in range(int(seconds / 0.1)):
        mic.gate.played(frame, mic.started_at + k * 0.1, RATE)
    return mic.gate


def gated_mic() -> Mic:
    mic = Mic(EchoGate(EchoOptions(ratio=0.5, echo_delay_s=0.6)))
    reply_playing(mic)
    return mic


def test_without_a_reply_speech_starts_where_it_is_loud() -> None:
    """No reply plays: the first loud sample is the onset, reported once."""
    mic = gated_mic()
    mic.gate.silence_reply()  # type: ignore[union-attr]
    mic.speak(np.concatenate([tone(0.0, 0.48), tone(USER_LEVEL, 0.8), tone(0.0, 0.8)]))
    assert mic.onsets() == [round(0.48 * RATE)]
    assert [s.provisional for s in mic.segments] == [True, False]


def test_the_replys_echo_is_not_a_turn() -> None:
    """Echo at -10 dB under the reply: speech to the VAD, but never an onset or a segment."""
    mic = gated_mic()
    mic.speak(np.concatenate([tone(ECHO_LEVEL, 2.0), tone(0.0, 0.8)]))
    assert mic.onsets() == []
    assert mic.segments == []
    assert mic.stage.echoes_ignored == 1


def test_the_user_over_the_echo_starts_a_turn_at_their_first_sample() -> None:
    """Echo, then the user louder than it for 0.6 s: one onset, at the user's first sample
    (not at the echo's), and the segment starts there."""
    mic = gated_mic()
    mic.speak(np.concatenate([tone(ECHO_LEVEL, 0.8), tone(USER_LEVEL, 0.6), tone(0.0, 0.8)]))
    user_starts = round(0.8 * RATE)
    assert mic.onsets() == [user_starts]
    final = [s for s in mic.segments if not s.provisional]
    assert len(final) == 1 and final[0].start_sample_index >= user_starts - round(0.1 * RATE)


def test_a_cough_over_the_reply_is_too_short() -> None:
    """Louder than the echo for 160 ms only: no onset."""
    mic = gated_mic()
    mic.speak(np.concatenate([tone(ECHO_LEVEL, 0.8), tone(USER_LEVEL, 0.16), tone(0.0, 0.8)]))
    assert mic.onsets() == []


def test_a_cough_then_a_stray_loud_moment_is_not_an_onset() -> None:
    """120 ms of cough, 160 ms of echo, 40 ms louder again: the span reaches the 300 ms
    minimum onset (the gap is a short dip), but most of it was not louder than the echo."""
    mic = gated_mic()
    mic.speak(
        np.concatenate(
            [
                tone(ECHO_LEVEL, 0.8),
                tone(USER_LEVEL, 0.12),
                tone(ECHO_LEVEL, 0.16),
                tone(USER_LEVEL, 0.04),
                tone(ECHO_LEVEL, 0.8),
            ]
        )
    )
    assert mic.onsets() == []


def test_words_with_pauses_between_them_are_one_onset() -> None:
    """The user over the echo in three 160 ms words with 160 ms between them (each quieter
    moment shorter than ECHO_DIP_S): one onset, at the first word."""
    mic = gated_mic()
    word, between = tone(USER_LEVEL, 0.16), tone(ECHO_LEVEL, 0.16)
    mic.speak(np.concatenate([tone(ECHO_LEVEL, 0.8), word, between, word, between, word]))
    mic.speak(tone(0.0, 0.8))
    assert mic.onsets() == [round(0.8 * RATE)]


def test_a_stalled_uplink_does_not_break_the_users_speech() -> None:
    """0.6 s of the user's speech whose frames arrive with a 400 ms stall in the middle (and
    then all at once): by the samples it is one run of 0.6 s, so it is the user's onset.
    Timed by arrival, the stall would have reset the run twice over."""
    mic = gated_mic()
    mic.speak(tone(ECHO_LEVEL, 0.8))
    t0 = mic.started_at + 0.8
    frames = 15  # 0.6 s of 40 ms frames
    arrivals = [t0 + (k + 1) * FRAME_S for k in range(5)]
    arrivals += [t0 + 5 * FRAME_S + 0.4 + 0.001 * k for k in range(frames - 5)]
    mic.speak(tone(USER_LEVEL, 0.6), arrivals)
    mic.speak(tone(0.0, 0.8))
    assert mic.onsets() == [round(0.8 * RATE)]


def test_a_burst_of_speech_counts_for_its_whole_length() -> None:
    """0.32 s of the user's speech delivered in one instant: 0.32 s of speech (an onset),
    not the few milliseconds between the frames' arrivals."""
    mic = gated_mic()
    mic.speak(tone(ECHO_LEVEL, 0.8))
    burst_at = mic.started_at + 0.8 + 0.32
    mic.speak(tone(USER_LEVEL, 0.32), [burst_at] * 8)
    assert mic.onsets() == [round(0.8 * RATE)]


def test_the_same_burst_of_echo_stays_echo() -> None:
    """Timing is not what tells them apart: the same burst at echo level is still echo."""
    mic = gated_mic()
    mic.speak(tone(ECHO_LEVEL, 0.8))
    mic.speak(tone(ECHO_LEVEL, 0.32), [mic.started_at + 1.12] * 8)
    mic.speak(tone(0.0, 0.8))
    assert mic.onsets() == []


def test_once_the_reply_has_stopped_echo_level_speech_is_the_user() -> None:
    """The reply was interrupted (silenced): quiet speech afterwards is a turn."""
    mic = gated_mic()
    mic.gate.silence_reply()  # type: ignore[union-attr]
    mic.speak(np.concatenate([tone(0.0, 0.48), tone(ECHO_LEVEL, 0.8), tone(0.0, 0.8)]))
    assert mic.onsets() == [round(0.48 * RATE)]


def test_speech_taken_for_echo_is_the_users_once_the_canceller_is_trusted() -> None:
    """The canceller is trusted from 1 s on (it learned the room by then); a voice at the
    echo's level from 0.6 s (to the gate: echo) goes on to 1.8 s. From 1 s on the VAD starts
    over on the canceller's output: one onset, where it became trusted (the window there)."""
    trusted_from = RATE
    mic = Mic(EchoGate(EchoOptions(ratio=0.5, echo_delay_s=0.6)), TrustedFrom(trusted_from))
    reply_playing(mic)
    mic.speak(np.concatenate([tone(0.0, 0.6), tone(ECHO_LEVEL, 1.2), tone(0.0, 0.8)]))
    onsets = mic.onsets()
    assert len(onsets) == 1 and trusted_from <= onsets[0] < trusted_from + round(FRAME_S * RATE)
    final = [s for s in mic.segments if not s.provisional]
    assert len(final) == 1


def test_speech_taken_for_echo_that_stops_soon_after_the_canceller_is_trusted_stays_echo() -> None:
    """The same voice stops 0.2 s after the canceller is trusted: shorter than the minimum
    onset from there, so still nothing."""
    mic = Mic(EchoGate(EchoOptions(ratio=0.5, echo_delay_s=0.6)), TrustedFrom(RATE))
    reply_playing(mic)
    mic.speak(np.concatenate([tone(0.0, 0.6), tone(ECHO_LEVEL, 0.6), tone(0.0, 0.8)]))
    assert mic.onsets() == []
    assert mic.segments == []


def test_without_an_echo_gate_every_onset_counts() -> None:
    """--echo-ratio 0 (no gate): echo-level speech during a reply is a turn at once."""
    mic = Mic(None)
    mic.speak(np.concatenate([tone(ECHO_LEVEL, 0.8), tone(0.0, 0.8)]))
    assert mic.onsets() == [0]


def test_the_input_clock_times_samples_by_position_and_least_delay() -> None:
    """A stall and a burst change no sample's time; a faster arrival lowers the offset; after
    the window an old fast arrival no longer counts (the clocks may drift)."""
    clock = InputClock(RATE, window_s=10.0)
    clock.observe(RATE, 101.05)  # 1 s of audio, 50 ms late
    assert clock.time_of(RATE) == 101.05
    clock.observe(2 * RATE, 102.45)  # a 400 ms stall
    assert clock.time_of(2 * RATE) == 102.05
    clock.observe(3 * RATE, 103.02)  # the least delay so far: 20 ms
    assert abs(clock.time_of(3 * RATE) - 103.02) < 1e-9
    clock.observe(20 * RATE, 120.04)  # 17 s on: the 20 ms arrival left the window
    assert abs(clock.time_of(20 * RATE) - 120.04) < 1e-9

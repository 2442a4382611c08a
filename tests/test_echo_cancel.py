"""Layer 2 for the client's echo canceller: WebRTC's AEC3 (the ``livekit`` wheel) on a
simulated room, no sound card. It must remove the reply's echo and keep the user's voice."""

from __future__ import annotations

import numpy as np
import pytest

from s2s.client.audio import SpeakerSink
from s2s.client.echo_cancel import MAX_REFERENCE_S, EchoCancelledSource, EchoCanceller
from s2s.client.room import Room, RoomOptions, db_of
from s2s.pipeline.messages import Samples
from tests.test_echo_estimate import speech_like

RATE = 16_000
FRAME = 512


def through_the_room(
    canceller: EchoCanceller, room: RoomOptions, reply: Samples, user: Samples | None = None
) -> tuple[Samples, Samples, Samples]:
    """Plays ``reply`` frame by frame (the reference), its echo (plus ``user``) into the
    microphone and through the canceller: the echo, the microphone, what the canceller sent."""
    simulated = Room(room, RATE)
    echoes, mics, outs = [], [], []
    for start in range(0, len(reply) - FRAME + 1, FRAME):
        played = reply[start : start + FRAME]
        canceller.reference(played)
        echo = simulated.echo(played)
        mic = echo.copy()
        if user is not None:
            mic += user[start : start + FRAME]
        out = canceller.cancel(mic)
        assert len(out) == FRAME
        echoes.append(echo)
        mics.append(mic)
        outs.append(out)
    return np.concatenate(echoes), np.concatenate(mics), np.concatenate(outs)


@pytest.mark.parametrize("echo_db", [-10, -20])
def test_the_echo_is_removed_and_the_voice_kept(echo_db: float) -> None:
    canceller = EchoCanceller(RATE, RATE)
    canceller.start()
    reply = speech_like(12.0, seed=11, dbfs=-20)
    user = np.zeros_like(reply)
    voice = speech_like(2.0, seed=12, dbfs=-26)
    user[8 * RATE : 10 * RATE] = voice
    room = RoomOptions(delay_ms=100, echo_db=echo_db)
    echo, _, out = through_the_room(canceller, room, reply, user)
    alone = slice(2 * RATE, 8 * RATE)  # after a second or two of convergence, echo only
    erle = db_of(echo[alone]) - db_of(out[alone])
    talk = slice(8 * RATE + 160, 10 * RATE + 160)  # the canceller's output lags by 10 ms
    kept = db_of(out[talk]) - db_of(voice)
    print(f"echo {echo_db} dB: ERLE {erle:.1f} dB; the user's voice {kept:+.1f} dB")
    assert erle >= 20.0
    assert kept >= -10.0


def test_without_a_reply_the_microphone_passes_unchanged_in_level() -> None:
    canceller = EchoCanceller(RATE, RATE)
    canceller.start()
    voice = speech_like(3.0, seed=13, dbfs=-26)
    _, _, out = through_the_room(canceller, RoomOptions(), np.zeros_like(voice), voice)
    assert abs(db_of(out[RATE:]) - db_of(voice[RATE:])) < 3.0


def test_a_speaker_at_another_rate_is_resampled_for_the_reference() -> None:
    """A 24 kHz speaker and a 16 kHz microphone: the reference arrives at the mic's rate."""
    canceller = EchoCanceller(RATE, 24_000)
    canceller.start()
    canceller.reference(np.zeros(2400, dtype=np.float32))  # 100 ms at 24 kHz
    canceller.reference(np.zeros(2400, dtype=np.float32))
    # 200 ms at 16 kHz, less what the resampler holds back (about 20 ms).
    assert 3200 - 400 <= canceller._referenced <= 3200


def test_the_reference_is_bounded_when_the_microphone_stalls() -> None:
    canceller = EchoCanceller(RATE, RATE)
    canceller.start()
    for _ in range(200):
        canceller.reference(np.ones(FRAME, dtype=np.float32) * 0.1)
    assert canceller._referenced <= MAX_REFERENCE_S * RATE


def test_an_unsupported_microphone_rate_is_refused_with_the_way_out() -> None:
    with pytest.raises(ValueError, match="--no-aec"):
        EchoCanceller(22_050, 24_000)


def test_the_source_hands_out_cancelled_frames() -> None:
    class Frames:
        sample_rate_hz = RATE

        def __init__(self) -> None:
            self.frames = [np.full(FRAME, 0.1, dtype=np.float32)] * 3

        def start(self) -> None:
            pass

        def read(self) -> Samples | None:
            return self.frames.pop() if self.frames else None

        def exhausted(self) -> bool:
            return not self.frames

        def close(self) -> None:
            pass

    canceller = EchoCanceller(RATE, RATE)
    source = EchoCancelledSource(Frames(), canceller)
    source.start()
    read = [source.read() for _ in range(4)]
    assert [len(f) for f in read[:3] if f is not None] == [FRAME] * 3
    assert read[3] is None
    assert canceller.blocks == 3 * FRAME // 160


def test_the_speaker_reports_every_block_it_plays_silence_included() -> None:
    """The far-end reference is what the sound card got: the reply and the silence around it."""
    played: list[Samples] = []
    sink = SpeakerSink(RATE, jitter_ms=0, on_played=played.append)
    out = np.zeros((256, 1), dtype=np.float32)
    sink._fill(out, 256, None, None)  # nothing written yet: silence
    sink.write(np.full(256, 0.5, dtype=np.float32))
    sink._fill(out, 256, None, None)
    assert [float(block.max()) for block in played] == [0.0, 0.5]

"""Layer 1 for the echo's power model (``s2s/models/near_end.py``): on a simulated room, it must
find a cough and a quiet voice over the echo, never the echo alone, and let go the block after
a cough ends (when the cancellers still leak the echo)."""

from __future__ import annotations

import numpy as np

from s2s.client.room import Room, RoomOptions
from s2s.models.echo_cancel import BURST_BANDS, QUIET_BANDS, SPEEX_VOICE_BANDS
from s2s.models.near_end import LEARNED_BLOCKS, EchoPowerModel
from s2s.pipeline.messages import Samples
from tests.test_echo_estimate import speech_like

RATE = 16_000
BLOCK = 160
LOUD_ECHO = RoomOptions(delay_ms=120, reverb_ms=200, echo_db=-10, seed=3)


def bands_over_echo(reply: Samples, user: Samples) -> list[int | None]:
    """The model's count per block, ``user`` spoken over the room's echo of ``reply``; it
    learns from the blocks where the user is silent (the hint the plain AEC3 gives)."""
    model = EchoPowerModel(RATE, BLOCK)
    room = Room(LOUD_ECHO, RATE)
    counts = []
    for begin in range(0, len(reply) - BLOCK + 1, BLOCK):
        far = reply[begin : begin + BLOCK]
        near = room.echo(far) + user[begin : begin + BLOCK]
        silent = not np.any(user[begin : begin + BLOCK])
        counts.append(model.step(near, far, echo_only=silent))
    return counts


def test_a_cough_stands_over_the_echo_and_its_end_does_not() -> None:
    reply = speech_like(8.0, seed=5, dbfs=-20)
    user = np.zeros_like(reply)
    user[5 * RATE : 5 * RATE + RATE * 15 // 100] = speech_like(0.15, seed=6, dbfs=-20)
    counts = bands_over_echo(reply, user)
    assert counts[LEARNED_BLOCKS - 2] is None
    assert counts[LEARNED_BLOCKS + 100] is not None
    echo_alone = [c for c in counts[200:500] + counts[520:] if c is not None]
    cough = counts[506:514]  # the syllable's envelope rises over its first 60 ms
    after = counts[515:545]
    print("echo alone, blocks with 3+ bands:", sum(c >= 3 for c in echo_alone), len(echo_alone))
    print("cough:", cough, "after:", after)
    assert sum(c >= SPEEX_VOICE_BANDS for c in echo_alone) <= 0.02 * len(echo_alone)
    assert all(c is not None and c >= BURST_BANDS for c in cough)
    assert all(c is not None and c < SPEEX_VOICE_BANDS for c in after)
    assert all(c is not None and c <= QUIET_BANDS for c in after[2:])


def test_a_quiet_voice_stands_over_a_loud_echo() -> None:
    """A voice at -30 dBFS over the echo of a -20 dBFS reply 10 dB down: as loud as the echo."""
    reply = speech_like(10.0, seed=7, dbfs=-20)
    voice = speech_like(2.0, seed=8, dbfs=-30)
    user = np.zeros_like(reply)
    user[6 * RATE : 8 * RATE] = voice
    counts = bands_over_echo(reply, user)
    loud = np.abs(voice[: len(voice) // BLOCK * BLOCK]).reshape(-1, BLOCK).max(axis=1) > 0.01
    during = [c for c, sounds in zip(counts[600:800], loud, strict=True) if sounds]
    share = sum(c is not None and c >= SPEEX_VOICE_BANDS for c in during) / len(during)
    print(f"voice blocks with {SPEEX_VOICE_BANDS}+ bands: {share:.0%}")
    assert share >= 0.4

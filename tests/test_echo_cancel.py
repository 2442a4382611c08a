"""Layer 2 for the client's echo canceller: WebRTC's AEC3 (the ``livekit`` wheel) and the
chain that keeps the voice (speexdsp through ``pyaec``, then AEC3) on a simulated room, no
sound card. It must remove the reply's echo and keep the user's voice."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from s2s.client.audio import SpeakerSink
from s2s.client.cli import canceller_options
from s2s.client.echo_cancel import MAX_REFERENCE_S, EchoCancelledSource, EchoCanceller
from s2s.client.room import Room, RoomOptions, db_of
from s2s.models.echo_cancel import (
    AFTER_BURST_S,
    BURST_BANDS,
    CONVERGE_S,
    NEAR_END_HOLD_S,
    QUIET_BANDS,
    SPEEX_VOICE_BANDS,
    SPEEX_VOICE_HOLD_S,
    VOICE_CONFIRM_S,
    YOUNG_S,
    EchoCancelOptions,
    Sent,
    VoiceSwitch,
    holds_voice,
    speex_holds_voice,
)
from s2s.pipeline.messages import Samples
from tests.test_echo_estimate import speech_like

RATE = 16_000
FRAME = 512


def through_the_room(
    canceller: EchoCanceller,
    room: RoomOptions,
    reply: Samples,
    user: Samples | None = None,
    chain_sent_at: list[float] | None = None,
) -> tuple[Samples, Samples, Samples]:
    """Plays ``reply`` frame by frame (the reference), its echo (plus ``user``) into the
    microphone and through the canceller: the echo, the microphone, what the canceller sent.
    ``chain_sent_at`` collects when (s) frames holding the voice-keeping chain began."""
    simulated = Room(room, RATE)
    echoes, mics, outs = [], [], []
    for start in range(0, len(reply) - FRAME + 1, FRAME):
        played = reply[start : start + FRAME]
        canceller.reference(played)
        echo = simulated.echo(played)
        mic = echo.copy()
        if user is not None:
            mic += user[start : start + FRAME]
        before = canceller.voice_kept_blocks
        out = canceller.cancel(mic)
        if chain_sent_at is not None and canceller.voice_kept_blocks > before:
            chain_sent_at.append(start / RATE)
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


BLOCKS_PER_S = 100  # the canceller's 10 ms blocks


def switched(voiced: list[bool], reply_s: float = 3.0) -> list[Sent]:
    """The switch's choice per block for ``voiced``, spoken over a reply that has played
    ``reply_s`` before it and goes on playing."""
    switch = VoiceSwitch()
    for _ in range(round(reply_s * BLOCKS_PER_S)):
        assert switch.step(reply_playing=True, voiced=False).sent is Sent.PLAIN
    return [switch.step(reply_playing=True, voiced=v).sent for v in voiced]


def test_a_cough_sends_the_chain_only_tentatively() -> None:
    """150 ms of voice: the chain for those blocks and 100 ms after, never speex alone and
    never the full hold."""
    sent = switched([True] * 15 + [False] * 100)
    assert sent == [Sent.CHAIN] * 25 + [Sent.PLAIN] * 90


def test_a_voice_that_goes_on_is_sent_from_speex_over_its_pauses() -> None:
    """A talking user's voice is found now and then (every 60 ms here): the chain until it
    has lasted VOICE_CONFIRM_S, then speex's output alone throughout, and for
    NEAR_END_HOLD_S after the last."""
    voiced = ([True] + [False] * 5) * 10 + [False] * 100
    sent = switched(voiced)
    confirmed = 6 * math.ceil(VOICE_CONFIRM_S * BLOCKS_PER_S / 6)  # the first voiced block
    # at least VOICE_CONFIRM_S after the first one
    last_voiced = 54
    hold_ends = last_voiced + 1 + round(NEAR_END_HOLD_S * BLOCKS_PER_S)
    assert sent[:confirmed] == [Sent.CHAIN] * confirmed
    assert sent[confirmed:hold_ends] == [Sent.LINEAR] * (hold_ends - confirmed)
    assert set(sent[hold_ends:]) == {Sent.PLAIN}


def test_the_switch_waits_for_the_room_to_be_learned_and_for_a_reply() -> None:
    """Before CONVERGE_S of reply audio, and with no reply audio for over half a second,
    the plain AEC3 is sent whatever it lets through."""
    assert set(switched([True] * 50, reply_s=CONVERGE_S - 0.6)) == {Sent.PLAIN}
    switch = VoiceSwitch()
    for _ in range(round(3 * BLOCKS_PER_S)):
        switch.step(reply_playing=True, voiced=False)
    for _ in range(60):
        switch.step(reply_playing=False, voiced=False)
    assert {switch.step(reply_playing=False, voiced=True).sent for _ in range(50)} == {Sent.PLAIN}


def test_a_voice_found_in_speex_output_sends_it_at_once() -> None:
    """Where the echo's power model finds the microphone over the echo and speex's output
    holds it (a quiet voice both AEC3s mute), speex's output goes out from that block on, for
    SPEEX_VOICE_HOLD_S; then, the voice gone, the plain AEC3 again."""
    switch = VoiceSwitch()
    for _ in range(3 * BLOCKS_PER_S):
        switch.step(reply_playing=True, voiced=False, bands=0)
    found = switch.step(reply_playing=True, voiced=False, bands=SPEEX_VOICE_BANDS, speex_voice=True)
    after = [switch.step(reply_playing=True, voiced=False, bands=0).sent for _ in range(30)]
    hold = round(SPEEX_VOICE_HOLD_S * BLOCKS_PER_S)
    assert found.sent is Sent.LINEAR
    assert after[: hold - 1] == [Sent.LINEAR] * (hold - 1)
    assert set(after[hold + 1 :]) == {Sent.PLAIN}


def test_after_a_cough_the_blocks_with_nothing_over_the_echo_go_out_from_the_plain_aec3() -> None:
    """A cough found in speex's output: speex's output goes out for its blocks, but of the
    hold after it (speex's, then the chain's) a block in which the echo model finds at most
    QUIET_BANDS over the echo is sent from the plain AEC3 (the cancellers' leftovers of the
    echo would stretch the cough into speech), and does not count as the voice going on
    even where AEC3 lets some of it through; one that stands over the echo keeps the hold.
    A voice confirmed as talking keeps speex's output over its pauses however quiet."""

    def after(voice_blocks: int, blocks: list[tuple[bool, int]]) -> list[Sent]:
        switch = VoiceSwitch()
        for _ in range(3 * BLOCKS_PER_S):
            switch.step(reply_playing=True, voiced=False, bands=0)
        for _ in range(voice_blocks):
            burst = switch.step(True, voiced=True, bands=BURST_BANDS, speex_voice=True)
            assert burst.sent is Sent.LINEAR
        return [switch.step(True, voiced=v, bands=b).sent for v, b in blocks]

    quiet, over = QUIET_BANDS, QUIET_BANDS + 1
    cough = after(15, [(False, b) for b in (0, quiet, 0, over, 0)])
    assert cough == [Sent.PLAIN, Sent.PLAIN, Sent.PLAIN, Sent.LINEAR, Sent.PLAIN]
    window = round(AFTER_BURST_S * BLOCKS_PER_S)
    leak = after(15, [(True, 0)] * (window - 1) + [(False, over)] * 20)
    assert set(leak) == {Sent.PLAIN}
    talking = round(VOICE_CONFIRM_S * BLOCKS_PER_S) + 5
    assert after(talking, [(False, 0)] * 6) == [Sent.LINEAR] * 6


def after_a_burst(
    reply_s: float, bands: list[int], powers_dbfs: list[float] | None = None
) -> list[bool]:
    """Whether each block is muted, with ``bands`` over the echo (and the plain AEC3's output
    at ``powers_dbfs``), after 150 ms of a loud burst (at -20 dBFS) spoken ``reply_s`` into
    the session's reply audio."""
    switch = VoiceSwitch()
    for _ in range(round(reply_s * BLOCKS_PER_S)):
        switch.step(reply_playing=True, voiced=False, bands=0)
    loud = dict.fromkeys(Sent, power(-20.0))
    for _ in range(15):
        assert not switch.step(True, voiced=True, bands=BURST_BANDS, powers=loud).muted
    levels: list[float | None] = [None] * len(bands)
    if powers_dbfs is not None:
        levels = list(powers_dbfs)
    return [
        switch.step(
            True,
            voiced=False,
            bands=b,
            powers=None if level is None else dict.fromkeys(Sent, power(level)),
        ).muted
        for b, level in zip(bands, levels, strict=True)
    ]


def test_echo_after_a_cough_is_muted_while_the_cancellers_are_young() -> None:
    """In the first YOUNG_S of reply audio, blocks with nothing over the echo are muted for
    AFTER_BURST_S after a loud burst (the cancellers leak echo after it); a block that stands
    over the echo is not, and neither is anything once the cancellers have heard YOUNG_S."""
    window = round(AFTER_BURST_S * BLOCKS_PER_S)
    young = after_a_burst(2.0, [0] * 10 + [SPEEX_VOICE_BANDS] + [0] * 40)
    assert young[:10] == [True] * 10
    assert not young[10]
    assert young[11 : window - 1] == [True] * (window - 12)
    assert not any(young[window:])
    assert not any(after_a_burst(YOUNG_S + 1.0, [0] * 40))


def test_echo_leaking_far_under_a_cough_is_muted_where_the_young_model_misses_it() -> None:
    """In the first second the echo model, too, has heard little of the room and finds the
    cancellers' leak over the echo: a block sent 20 dB and more under the burst is muted
    all the same, while a voice going on at the burst's level is not; and once the switch is
    armed, a quiet voice's blocks that far under its loudest syllable are not muted."""
    window = round(AFTER_BURST_S * BLOCKS_PER_S)
    bands = [SPEEX_VOICE_BANDS] * (window + 10)
    leak = after_a_burst(0.3, bands, [-50.0] * len(bands))
    voice = after_a_burst(0.3, bands, [-28.0] * len(bands))
    assert leak[: window - 1] == [True] * (window - 1)
    assert not any(leak[window:])
    assert not any(voice)
    assert not any(after_a_burst(CONVERGE_S + 0.5, bands, [-50.0] * len(bands)))


def power(dbfs: float) -> float:
    return float(10 ** (dbfs / 10))


def test_speex_output_is_a_voice_where_speex_removed_much_less_than_of_the_echo() -> None:
    """A young speex removes 6-8 dB of the echo: a block it removed 5 dB of is echo, while the
    same block from a speex that removes 20 dB of the echo holds a voice."""
    near, passed = power(-25.0), power(-30.0)
    assert not speex_holds_voice(SPEEX_VOICE_BANDS, near, passed, echo_removed=power(7.0))
    assert speex_holds_voice(SPEEX_VOICE_BANDS, near, passed, echo_removed=power(20.0))
    assert speex_holds_voice(SPEEX_VOICE_BANDS, near, power(-27.0), echo_removed=power(7.0))
    assert not speex_holds_voice(
        SPEEX_VOICE_BANDS - 1, near, power(-27.0), echo_removed=power(20.0)
    )
    assert not speex_holds_voice(
        SPEEX_VOICE_BANDS, power(-47.0), power(-48.0), echo_removed=power(20.0)
    )
    assert not speex_holds_voice(SPEEX_VOICE_BANDS, near, near, echo_removed=power(5.0))


def test_a_voice_is_found_in_the_plain_aec3_or_in_both_outputs() -> None:
    """Loud in the plain AEC3's output: a voice. Loud only in the chain's while the plain
    AEC3 lets a trace through (its suppressor still holds a voice as loud as the echo): a
    voice, 180 ms sooner. Loud in the chain's with the plain AEC3 at its echo floor: the
    chain's leftovers after double talk, not a voice."""
    assert holds_voice(power(-45), power(-90))
    assert holds_voice(power(-65), power(-35))
    assert not holds_voice(power(-90), power(-30))
    assert not holds_voice(power(-65), power(-50))


LOUD_ECHO = RoomOptions(delay_ms=100, reverb_ms=200, echo_db=-10)


def voice_over_loud_echo(keep_voice: bool, seed: int) -> tuple[float, float, list[float]]:
    """A voice at -30 dBFS over the reply's echo 10 dB under it (as loud as the voice), 8 s
    into the reply: the echo removed while only echo came in (dB), the voice's level in the
    output against what was spoken (dB), and when (s) each block of the chain was sent."""
    canceller = EchoCanceller(RATE, RATE, EchoCancelOptions(keep_voice=keep_voice))
    canceller.start()
    reply = speech_like(12.0, seed=seed, dbfs=-20)
    user = np.zeros_like(reply)
    voice = speech_like(2.0, seed=seed + 1, dbfs=-30)
    user[8 * RATE : 10 * RATE] = voice
    chain_sent_at: list[float] = []
    echo, _, out = through_the_room(canceller, LOUD_ECHO, reply, user, chain_sent_at)
    alone = slice(2 * RATE, 8 * RATE)
    talk = slice(8 * RATE + 160, 10 * RATE + 160)
    return db_of(echo[alone]) - db_of(out[alone]), db_of(out[talk]) - db_of(voice), chain_sent_at


def test_a_voice_as_loud_as_the_echo_is_kept_by_the_chain() -> None:
    """AEC3 alone turns such a voice down with the echo (its suppressor); the chain keeps
    more of it, from the voice's first syllable to NEAR_END_HOLD_S after its last, and only
    then. Three replies and voices; the echo is removed as well either way."""
    kept: dict[bool, list[float]] = {True: [], False: []}
    for seed in (11, 21, 31):
        for keep_voice in (False, True):
            erle, level, sent_at = voice_over_loud_echo(keep_voice, seed)
            print(
                f"seed {seed}, keep_voice {keep_voice}: ERLE {erle:.1f} dB, voice {level:+.1f} dB"
            )
            assert erle >= 30.0
            kept[keep_voice].append(level)
            if keep_voice:
                assert 8.0 <= sent_at[0] <= 8.2  # at the voice's first syllable
                assert sent_at[-1] <= 10.0 + NEAR_END_HOLD_S
            else:
                assert sent_at == []
    assert np.mean(kept[True]) >= np.mean(kept[False]) + 1.5
    assert min(kept[True]) >= -6.0


def test_the_echo_alone_never_sends_the_chain() -> None:
    """Twelve seconds of reply with nobody speaking: AEC3's output alone, always."""
    canceller = EchoCanceller(RATE, RATE)
    canceller.start()
    echo, _, out = through_the_room(canceller, LOUD_ECHO, speech_like(12.0, seed=41, dbfs=-20))
    assert canceller.voice_kept_blocks == 0
    assert db_of(echo[2 * RATE :]) - db_of(out[2 * RATE :]) >= 30.0


def test_the_chain_is_not_armed_before_the_room_is_learned() -> None:
    """A voice at the very start of the session's first reply: AEC3 still leaks echo then,
    which the switch would take for a voice, so it waits for CONVERGE_S of reply audio."""
    canceller = EchoCanceller(RATE, RATE)
    canceller.start()
    reply = speech_like(CONVERGE_S, seed=51, dbfs=-20)
    user = np.zeros_like(reply)
    quarter = len(reply) // 4
    user[quarter : 3 * quarter] = speech_like(CONVERGE_S / 2, seed=52, dbfs=-20)
    through_the_room(canceller, LOUD_ECHO, reply, user)
    assert canceller.voice_kept_blocks == 0


def test_a_voice_between_replies_does_not_send_the_chain() -> None:
    """The user asks while nothing plays: there is no echo to keep the voice from, and the
    reply that follows starts on the plain AEC3 (the chain's leftovers could sound like
    speech there)."""
    canceller = EchoCanceller(RATE, RATE)
    canceller.start()
    reply = np.concatenate(
        [speech_like(3.0, seed=61, dbfs=-20), np.zeros(3 * RATE, dtype=np.float32)]
    )
    user = np.zeros_like(reply)
    user[4 * RATE : 5 * RATE] = speech_like(1.0, seed=62, dbfs=-26)
    through_the_room(canceller, LOUD_ECHO, reply, user)
    assert canceller.voice_kept_blocks == 0


def test_without_pyaec_the_client_says_it_runs_aec3_alone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where pyaec has no wheel, the client still cancels the echo, and says what it lacks."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "pyaec" else real_find_spec(name, *args),
    )
    assert canceller_options(noise_suppression=False).keep_voice is False
    assert "pip install pyaec" in capsys.readouterr().err
    monkeypatch.undo()
    assert canceller_options(noise_suppression=False).keep_voice is True


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

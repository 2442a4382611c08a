"""Layer 2 for the server's echo canceller (``s2s/server/reply_echo.py``): the reply is told
to it by when it plays, the microphone by when it was spoken, as the session and the VAD stage
do; between them, a simulated room. It must remove the echo, keep the user's voice, and keep
the two timelines lined up."""

from __future__ import annotations

import time

import numpy as np

from s2s.client.room import Room, RoomOptions, db_of
from s2s.models.audio import resample
from s2s.models.profiles import LoadedModels
from s2s.pipeline.messages import Samples
from s2s.server.reply_echo import (
    HOLD_MAX_S,
    PATH_LEAD_S,
    REANCHOR_S,
    PlaybackAligner,
    ReplyEchoCanceller,
)
from tests.test_echo_estimate import speech_like

RATE = 16_000
LONG_REPLY = (
    "Paris has been a center of learning and art for centuries. The city grew along the "
    "river Seine, where its first settlers built a small town on an island."
)
CHUNK = 512  # the VAD stage's chunks
BLOCK = 160  # the cancellers' 10 ms
REPLY_FRAME_S = 0.1  # the session sends the reply in frames of 100 ms
SENT_AHEAD_S = 0.3
STARTS_AT = 5000.0  # the monotonic clock's reading when the microphone's first sample is spoken


def cancelled(
    canceller: ReplyEchoCanceller,
    replies: list[tuple[float, Samples]],
    mic: Samples,
    sent_rate_hz: int = RATE,
    clock_jitter_s: float = 0.0,
    trusted: list[bool] | None = None,
    behind: list[int] | None = None,
) -> Samples:
    """The session's side: each reply (due to play that many seconds after the microphone's
    first sample; at ``sent_rate_hz``) is sent in 100 ms frames, each told SENT_AHEAD_S before
    it plays. The VAD stage's side: ``mic`` through the canceller in chunks, each timed by a
    clock whose offset wanders by up to ``clock_jitter_s``. What the canceller let through;
    ``trusted`` collects whether it trusted its output alone from each chunk's start, after
    it, ``behind``
    how many samples of the microphone it had not given back yet."""
    frame = round(REPLY_FRAME_S * sent_rate_hz)
    frames = [
        (STARTS_AT + plays_from_s + start / sent_rate_hz, reply[start : start + frame])
        for plays_from_s, reply in replies
        for start in range(0, len(reply), frame)
    ]
    rng = np.random.default_rng(3)
    outs = []
    for start in range(0, len(mic) - CHUNK + 1, CHUNK):
        spoken_by = STARTS_AT + (start + CHUNK) / RATE
        while frames and frames[0][0] <= spoken_by + SENT_AHEAD_S:
            plays_at, samples = frames.pop(0)
            canceller.played(samples, plays_at, sent_rate_hz)
        jitter = rng.uniform(0, clock_jitter_s)
        outs.append(canceller.cancel(mic[start : start + CHUNK], spoken_by + jitter))
        if trusted is not None:
            trusted.append(canceller.trusted(start))
        if behind is not None:
            behind.append(start + CHUNK - sum(len(out) for out in outs))
    out = np.concatenate(outs)
    consumed = len(mic) - len(mic) % CHUNK
    assert consumed - BLOCK < len(out) <= consumed  # the stream, in whole blocks, in order
    return out


def through_the_room(
    canceller: ReplyEchoCanceller,
    room: RoomOptions,
    reply: Samples,
    user: Samples,
    reply_rate_hz: int = RATE,
    clock_jitter_s: float = 0.0,
) -> tuple[Samples, Samples]:
    """The reply plays as sent; its echo plus ``user`` is the microphone. Returns the echo
    and what the canceller let through."""
    echo = echo_through(room, resample(reply, reply_rate_hz, RATE))
    mic = echo + user[: len(echo)]
    out = cancelled(canceller, [(0.0, reply)], mic, reply_rate_hz, clock_jitter_s)
    return echo[: len(out)], out


def started() -> ReplyEchoCanceller:
    canceller = ReplyEchoCanceller(RATE)
    canceller.start()
    return canceller


def test_the_echo_is_removed_and_the_voice_kept_from_a_reply_at_another_rate() -> None:
    """A reply at 24 kHz (the client asked for it), echoed at -10 dB through 100 ms and 200 ms
    of reverberation; the user at -26 dBFS over it from 8 s to 10 s."""
    reply = resample(speech_like(12.0, seed=21, dbfs=-20), RATE, 24_000)
    user = np.zeros(12 * RATE, dtype=np.float32)
    voice = speech_like(2.0, seed=22, dbfs=-26)
    user[8 * RATE : 10 * RATE] = voice
    echo, out = through_the_room(
        started(), RoomOptions(delay_ms=100, echo_db=-10), reply, user, reply_rate_hz=24_000
    )
    alone = slice(2 * RATE, 8 * RATE)
    erle = db_of(echo[alone]) - db_of(out[alone])
    talk = slice(8 * RATE, 10 * RATE)
    kept = db_of(out[talk]) - db_of(voice)
    print(f"ERLE {erle:.1f} dB; the user's voice {kept:+.1f} dB")
    assert erle >= 20.0
    assert kept >= -10.0


def test_a_wandering_clock_does_not_move_the_reply_against_the_microphone() -> None:
    """The microphone's clock offset steps by up to 5 ms from chunk to chunk (the least
    delayed arrival leaving InputClock's window): the echo is removed as well as with a
    steady clock. Moved by each step, the reply would not line up with its echo."""
    reply = speech_like(10.0, seed=23, dbfs=-20)
    silent = np.zeros_like(reply)
    room = RoomOptions(delay_ms=80, echo_db=-10)
    alone = slice(3 * RATE, 10 * RATE - CHUNK)
    steady_echo, steady = through_the_room(started(), room, reply, silent)
    echo, wandering = through_the_room(started(), room, reply, silent, clock_jitter_s=0.005)
    steady_erle = db_of(steady_echo[alone]) - db_of(steady[alone])
    erle = db_of(echo[alone]) - db_of(wandering[alone])
    print(f"ERLE {steady_erle:.1f} dB with a steady clock, {erle:.1f} dB with a wandering one")
    assert erle >= 20.0
    assert erle >= steady_erle - 6.0


def test_a_clock_that_moves_for_good_moves_the_microphone_with_it() -> None:
    """Beyond REANCHOR_S the microphone is placed again: the reply it is compared with is
    the one playing by the new reading."""
    canceller = started()
    reply = np.ones(RATE, dtype=np.float32) * 0.1
    canceller.played(reply[: RATE // 2], STARTS_AT + 1.0, RATE)
    chunk = np.zeros(CHUNK, dtype=np.float32)
    canceller.cancel(chunk, STARTS_AT + 0.5)  # the microphone's first chunk, long before
    canceller.cancel(chunk, STARTS_AT + 0.5 + CHUNK / RATE + REANCHOR_S / 2)
    assert canceller.anchor == round((STARTS_AT + 0.5) * RATE) - CHUNK
    canceller.cancel(chunk, STARTS_AT + 0.5 + 2 * CHUNK / RATE + 2 * REANCHOR_S)
    assert canceller.anchor == round((STARTS_AT + 0.5 + 2 * REANCHOR_S) * RATE) - CHUNK


def test_an_interrupted_reply_is_forgotten_from_now_on_but_not_before() -> None:
    """``silence_reply``: what was sent to play later never plays (no echo to expect); what
    already played may still be echoing."""
    canceller = started()
    now = time.monotonic()
    canceller.played(np.full(RATE, 0.1, dtype=np.float32), now - 0.5, RATE)
    canceller.silence_reply()
    past = canceller.reply_between(now - 0.4, now - 0.1)
    future = canceller.reply_between(now + 0.1, now + 0.4)
    assert np.all(past == np.float32(0.1))
    assert not np.any(future)


def echo_through(room: RoomOptions, played: Samples) -> Samples:
    simulated = Room(room, RATE)
    return np.concatenate(
        [simulated.echo(played[start : start + CHUNK]) for start in range(0, len(played), CHUNK)]
    )


def late_by(samples: Samples, shift: int) -> Samples:
    """``samples`` played ``shift`` samples late (early when negative)."""
    moved = np.zeros_like(samples)
    if shift >= 0:
        moved[shift:] = samples[: len(samples) - shift]
    else:
        moved[:shift] = samples[-shift:]
    return moved


def test_the_aligner_finds_how_much_later_a_reply_plays_and_is_not_fooled_by_a_voice() -> None:
    """Layer 1: it learns the room's path from a reply's echo, then finds later replies
    played 37 samples late or 50 early; the user's voice alone, over a reply, moves nothing."""
    aligner = PlaybackAligner(RATE)
    reply = speech_like(8.0, seed=31, dbfs=-20)
    room = RoomOptions(delay_ms=120, echo_db=-10, seed=4)
    window, span = aligner.window, aligner.window + aligner.max_path

    def check_all(mic: Samples) -> list[tuple[bool, int]]:
        return [
            (aligner.check(mic[end - window : end], reply[end - span : end]), aligner.shift)
            for end in range(span, len(reply), RATE // 4)
        ]

    check_all(echo_through(room, reply))
    assert aligner.path_lag is not None
    for shift in (37, -50):
        found = [at for ok, at in check_all(echo_through(room, late_by(reply, shift))) if ok]
        assert len(found) >= 10
        assert set(found) == {shift}
    voice = speech_like(8.0, seed=32, dbfs=-20)
    assert not any(ok for ok, _ in check_all(voice))
    assert aligner.shift == -50


def test_the_aligner_learns_the_path_from_a_reply_heard_from_its_first_sound(
    cpu_models: LoadedModels,
) -> None:
    """Layer 2 (Piper's voice: a voiced reply, as the server sends): the canceller checks
    every 50 ms from the session's first reply on, and the first windows hold only the onset
    of its echo. In each room (50-150 ms, two phases of the checks against the reply's start)
    the path learned lies where the room's response does, from its delay on (the strongest
    moment of a reverberant tail may come some milliseconds after it). A square cut at the
    windows' common end, or an echo that starts inside a window, made a peak sharper than the
    path's, and the path was learned at a lag of 0 (4 of these 22 sessions before)."""
    voice = cpu_models.tts
    speech = np.concatenate(list(voice.stream(LONG_REPLY, lambda: False)))
    speech = resample(speech, voice.sample_rate_hz, RATE)[: 4 * RATE]
    reply = np.concatenate([np.zeros(RATE, np.float32), speech])
    learned_after_ms = []
    for k, delay_ms in enumerate(np.linspace(50, 150, 11)):
        for phase in (0, 400):
            aligner = PlaybackAligner(RATE)
            room = RoomOptions(delay_ms=float(delay_ms), echo_db=-10, seed=k)
            # As the microphone arrives: 16-bit samples.
            mic = (np.round(echo_through(room, reply) * 32767) / 32767).astype(np.float32)
            window, span = aligner.window, aligner.window + aligner.max_path
            for end in range(RATE + phase, len(reply), RATE // 20):
                padded = np.concatenate([np.zeros(span, np.float32), reply[:end]])
                aligner.check(mic[end - window : end], padded[-span:])
            assert aligner.path_lag is not None
            lag_ms = (aligner.path_lag + PATH_LEAD_S * RATE) * 1000 / RATE
            learned_after_ms.append(round(lag_ms - delay_ms, 1))
    assert all(-2 <= after <= 40 for after in learned_after_ms), learned_after_ms


def test_a_reply_that_plays_later_than_the_last_is_cancelled_from_its_start() -> None:
    """Two replies a second apart; the second plays 10 ms later against its timeline than
    the first (a client's sound card asks for audio in blocks). Its echo is found where it
    is, and removed from its first moment: the microphone waits for the path to be found. Fed
    at the old shift, the cancellers let most of its first half second through."""
    canceller = started()
    reply = speech_like(5.0, seed=33, dbfs=-20)
    gap = np.zeros(RATE, dtype=np.float32)
    played = np.concatenate([reply, gap, late_by(reply, RATE // 100), gap])
    echo = echo_through(RoomOptions(delay_ms=100, echo_db=-10), played)
    trusted: list[bool] = []
    waiting: list[int] = []
    out = cancelled(canceller, [(0.0, reply), (6.0, reply)], echo, trusted=trusted, behind=waiting)
    second = len(reply) + len(gap)
    first_half_second = slice(second, second + RATE // 2)
    erle = db_of(echo[first_half_second]) - db_of(out[first_half_second])
    print(f"second reply: found {canceller.shift} samples late; ERLE {erle:.1f} dB")
    assert canceller.shift == RATE // 100
    assert erle >= 20.0
    # Whether the VAD may trust the canceller alone: not while it learns the room (LEARNING_S
    # of reply audio), nor at the second reply's start until its path is found.
    chunk_of = [round(s * RATE) // CHUNK for s in (1.0, 4.5, 6.05, 6.6)]
    assert [trusted[k] for k in chunk_of] == [False, True, False, True]
    # The microphone waited for the path at the second reply's start, and only then.
    first_reply = slice(round(1.5 * RATE) // CHUNK, round(5.5 * RATE) // CHUNK)
    second_start = slice(round(6.0 * RATE) // CHUNK, round(6.5 * RATE) // CHUNK)
    assert max(waiting[first_reply]) < BLOCK
    assert 4 * BLOCK < max(waiting[second_start]) <= HOLD_MAX_S * RATE + CHUNK
    assert waiting[-1] < BLOCK


def test_a_reply_that_opens_with_a_silence_is_held_from_its_first_sound() -> None:
    """TTS output often opens with a silence. The second reply here opens with 350 ms of it,
    and plays 10 ms later than the first: the microphone waits for the path from where the
    reply's first sound can echo, not from where its silence began (the wait would be over
    before any echo came), and its echo is removed from that first sound on."""
    canceller = started()
    reply = speech_like(5.0, seed=34, dbfs=-20)
    opening = np.zeros(round(0.35 * RATE), dtype=np.float32)
    second_reply = np.concatenate([opening, reply])
    gap = np.zeros(RATE, dtype=np.float32)
    played = np.concatenate([reply, gap, late_by(second_reply, RATE // 100), gap])
    echo = echo_through(RoomOptions(delay_ms=100, echo_db=-10), played)
    trusted: list[bool] = []
    waiting: list[int] = []
    out = cancelled(
        canceller, [(0.0, reply), (6.0, second_reply)], echo, trusted=trusted, behind=waiting
    )
    sound = round(6.35 * RATE)
    first_half_second = slice(sound, sound + RATE // 2)
    erle = db_of(echo[first_half_second]) - db_of(out[first_half_second])
    print(f"second reply: found {canceller.shift} samples late; ERLE {erle:.1f} dB")
    assert canceller.shift == RATE // 100
    assert erle >= 30.0  # 18 dB when the wait counted from the silence
    opening_chunks = slice(round(6.1 * RATE) // CHUNK, round(6.3 * RATE) // CHUNK)
    assert max(waiting[opening_chunks]) < BLOCK  # nothing of its echo yet: nothing held
    sound_chunks = slice(round(6.4 * RATE) // CHUNK, round(6.9 * RATE) // CHUNK)
    assert max(waiting[sound_chunks]) > 4 * BLOCK
    assert not any(trusted[round(6.0 * RATE) // CHUNK : round(6.5 * RATE) // CHUNK])
    assert trusted[round(7.2 * RATE) // CHUNK]


def test_a_reply_whose_path_is_found_only_after_the_wait_is_not_trusted_for_a_while() -> None:
    """The user talks over the second reply's first 800 ms, louder than its echo: its path
    cannot be found until they stop, the wait runs out, and the cancellers take the reply at
    the old shift meanwhile. Once it is found they need RELEARN_S to settle: until then the
    VAD must not trust them alone (speech from that reply's start on is not trusted)."""
    canceller = started()
    reply = speech_like(5.0, seed=35, dbfs=-20)
    gap = np.zeros(RATE, dtype=np.float32)
    played = np.concatenate([reply, gap, late_by(reply, RATE // 100), gap])
    echo = echo_through(RoomOptions(delay_ms=100, echo_db=-10), played)
    mic = echo.copy()
    voice = speech_like(0.8, seed=36, dbfs=-16)
    mic[6 * RATE : 6 * RATE + len(voice)] += voice
    trusted: list[bool] = []
    cancelled(canceller, [(0.0, reply), (6.0, reply)], mic, trusted=trusted)
    chunk_at = [round(s * RATE) // CHUNK for s in (5.5, 6.5, 7.5, 9.0)]
    print("trusted at 5.5, 6.5, 7.5, 9.0 s:", [trusted[k] for k in chunk_at])
    assert [trusted[k] for k in chunk_at] == [True, False, False, True]
    assert canceller.shift == RATE // 100
    assert not canceller.trusted(6 * RATE)  # an onset at the reply's start, judged at the end

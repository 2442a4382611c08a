"""Layer 1: VAD segmentation and chat history, pure (no model, no threads)."""

from __future__ import annotations

import numpy as np

from s2s.pipeline.history import INTERRUPTED_MARK, ChatHistory, HistoryOptions
from s2s.pipeline.segmenter import (
    VadEnded,
    VadEvent,
    VadOptions,
    VadPaused,
    VadResumed,
    VadSegmenter,
    VadStarted,
)

WINDOW = 512  # 32 ms at 16 kHz
LOUD = 0.3


def run(
    probabilities: list[float], options: VadOptions, loud_until: int | None = None
) -> list[VadEvent]:
    """Windows with the given speech probabilities; audio is loud while p >= 0.5 (or until
    window ``loud_until``), silent otherwise."""
    segmenter = VadSegmenter(options)
    events: list[VadEvent] = []
    for index, probability in enumerate(probabilities):
        loud = index < loud_until if loud_until is not None else probability >= 0.5
        window = np.full(WINDOW, LOUD if loud else 0.0, dtype=np.float32)
        events += segmenter.push(window, index * WINDOW, probability)
    return events


def test_one_utterance_gives_start_then_end_at_the_last_loud_sample() -> None:
    """Speech for 20 windows then silence: started at its first window, ended where loud stops."""
    options = VadOptions(min_speech_ms=100, min_silence_ms=300, speech_pad_ms=0)
    events = run([0.0] * 5 + [0.9] * 20 + [0.0] * 15, options)
    assert [type(e) for e in events] == [VadStarted, VadPaused, VadEnded]
    started, _, ended = events
    assert isinstance(started, VadStarted) and isinstance(ended, VadEnded)
    assert started.sample_index == 5 * WINDOW
    assert ended.speech_end_sample_index == 25 * WINDOW
    assert ended.start_sample_index == 5 * WINDOW
    assert len(ended.samples) == 20 * WINDOW
    assert not ended.forced


def feed(segmenter: VadSegmenter, probabilities: list[float], start: int = 0) -> list[VadEvent]:
    events: list[VadEvent] = []
    for index, probability in enumerate(probabilities, start):
        window = np.full(WINDOW, LOUD if probability >= 0.5 else 0.0, dtype=np.float32)
        events += segmenter.push(window, index * WINDOW, probability)
    return events


def test_commit_ends_the_speech_under_way_at_once() -> None:
    """A client's commit mid-speech ends the turn with the audio so far; with no confirmed
    speech there is nothing to commit."""
    segmenter = VadSegmenter(VadOptions(min_speech_ms=100, min_silence_ms=300, speech_pad_ms=0))
    assert segmenter.commit() == []
    assert [type(e) for e in feed(segmenter, [0.0] * 5 + [0.9] * 10)] == [VadStarted]
    [ended] = segmenter.commit()
    assert isinstance(ended, VadEnded)
    assert (ended.start_sample_index, ended.speech_end_sample_index) == (5 * WINDOW, 15 * WINDOW)
    assert len(ended.samples) == 10 * WINDOW
    assert not segmenter.in_speech
    # The silence that follows ends nothing more; the next speech is a new turn.
    assert feed(segmenter, [0.0] * 15, start=15) == []
    assert [type(e) for e in feed(segmenter, [0.9] * 5, start=30)] == [VadStarted]


def test_clear_drops_the_speech_under_way_and_moots_a_pause() -> None:
    segmenter = VadSegmenter(VadOptions(min_speech_ms=100, min_silence_ms=500, speech_pad_ms=0))
    events = feed(segmenter, [0.0] * 5 + [0.9] * 10 + [0.0] * 5)
    assert [type(e) for e in events] == [VadStarted, VadPaused]
    [resumed] = segmenter.clear()
    assert isinstance(resumed, VadResumed)  # work started at the pause is moot
    assert not segmenter.in_speech
    assert feed(segmenter, [0.0] * 30, start=20) == []  # no end for the dropped speech
    assert segmenter.clear() == []


def test_forget_starts_the_count_again_from_a_point_mid_window() -> None:
    """Speech under way is dropped unreported; as it goes on, it is an onset again once it
    has lasted the minimum from the point given (the middle of a window, where the audio
    handed on so far ended), never before that point though the window and the audio
    before it are loud."""
    segmenter = VadSegmenter(VadOptions(min_speech_ms=100, min_silence_ms=300, speech_pad_ms=0))
    assert [type(e) for e in feed(segmenter, [0.0] * 5 + [0.9] * 10)] == [VadStarted]
    until = 15 * WINDOW + WINDOW // 2
    segmenter.forget(until)
    assert not segmenter.in_speech
    events = feed(segmenter, [0.9] * 5, start=15)
    assert [type(e) for e in events] == [VadStarted]
    assert events[0].sample_index == until  # type: ignore[union-attr]


def test_end_is_refined_to_the_audio_when_the_model_lags() -> None:
    """The model's probability trails the audio by 3 windows; the end follows the audio."""
    options = VadOptions(min_speech_ms=100, min_silence_ms=300, speech_pad_ms=0)
    events = run([0.0] * 5 + [0.9] * 23 + [0.0] * 15, options, loud_until=25)
    ended = events[-1]
    assert isinstance(ended, VadEnded)
    assert ended.speech_end_sample_index == 25 * WINDOW


def test_a_pause_carries_the_same_segment_as_the_end_that_follows() -> None:
    """VadPaused comes pause_after_ms into the silence with exactly the final segment."""
    options = VadOptions(min_speech_ms=100, min_silence_ms=500, speech_pad_ms=64, pause_after_ms=96)
    events = run([0.0] * 5 + [0.9] * 20 + [0.0] * 20, options)
    paused, ended = events[1], events[2]
    assert isinstance(paused, VadPaused) and isinstance(ended, VadEnded)
    assert paused.start_sample_index == ended.start_sample_index
    assert paused.speech_end_sample_index == ended.speech_end_sample_index
    assert np.array_equal(paused.samples, ended.samples)


def test_no_pause_events_when_turned_off() -> None:
    """pause_after_ms=None: only start and end."""
    options = VadOptions(min_speech_ms=100, min_silence_ms=300, pause_after_ms=None)
    events = run([0.9] * 10 + [0.0] * 20, options)
    assert [type(e) for e in events] == [VadStarted, VadEnded]


def test_a_blip_shorter_than_min_speech_is_ignored() -> None:
    """Two windows (64 ms) of speech-like sound with min_speech_ms=250 produce no event."""
    assert run([0.0] * 5 + [0.9] * 2 + [0.0] * 20, VadOptions(min_speech_ms=250)) == []


def test_a_dip_shorter_than_the_onset_gap_keeps_the_onset() -> None:
    """Three windows (96 ms) of low probability inside the first 300 ms of speech, as an echo
    canceller turning the voice down makes: speech counts from its first window all the same."""
    options = VadOptions(min_speech_ms=300, onset_gap_ms=100, speech_pad_ms=0)
    events = run([0.0] * 5 + [0.9] * 3 + [0.0] * 3 + [0.9] * 10 + [0.0] * 40, options)
    started = [e for e in events if isinstance(e, VadStarted)]
    assert [e.sample_index for e in started] == [5 * WINDOW]


def test_a_dip_longer_than_the_onset_gap_starts_the_count_again() -> None:
    """Four windows (128 ms) of low probability: what came before was a blip, and speech
    counts from where it came back."""
    options = VadOptions(min_speech_ms=300, onset_gap_ms=100, speech_pad_ms=0)
    events = run([0.0] * 5 + [0.9] * 3 + [0.0] * 4 + [0.9] * 12 + [0.0] * 40, options)
    started = [e for e in events if isinstance(e, VadStarted)]
    assert [e.sample_index for e in started] == [12 * WINDOW]


def test_only_a_speech_window_confirms_the_onset() -> None:
    """Nine windows (288 ms) of speech and then a dip: the dip spans past 300 ms from the
    onset but is not speech, so a cough this long never counts."""
    options = VadOptions(min_speech_ms=300, onset_gap_ms=100, speech_pad_ms=0)
    assert run([0.0] * 5 + [0.9] * 9 + [0.0] * 40, options) == []


def test_a_short_pause_does_not_end_the_turn() -> None:
    """A pause shorter than min_silence_ms keeps one segment."""
    options = VadOptions(min_speech_ms=100, min_silence_ms=500, speech_pad_ms=0)
    events = run([0.9] * 10 + [0.0] * 8 + [0.9] * 10 + [0.0] * 20, options)
    kinds = [VadStarted, VadPaused, VadResumed, VadPaused, VadEnded]
    assert [type(e) for e in events] == kinds


def test_speech_after_a_pause_is_reported_where_it_resumes() -> None:
    """A new onset follows the pause: VadResumed at the first window of the new speech, once."""
    options = VadOptions(min_speech_ms=100, min_silence_ms=500, speech_pad_ms=0)
    events = run([0.9] * 10 + [0.0] * 8 + [0.9] * 10 + [0.0] * 20, options)
    [resumed] = [e for e in events if isinstance(e, VadResumed)]
    assert resumed.sample_index == 18 * WINDOW


def test_no_resume_without_a_pause() -> None:
    """Continuous speech, or a dip too short to report a pause, never reports a resumption."""
    options = VadOptions(min_speech_ms=100, min_silence_ms=500, pause_after_ms=200)
    events = run([0.9] * 10 + [0.0] * 3 + [0.9] * 10 + [0.0] * 20, options)
    assert not [e for e in events if isinstance(e, VadResumed)]


def test_padding_is_kept_on_both_sides() -> None:
    """speech_pad_ms of audio before the onset and after the end are in the segment."""
    options = VadOptions(min_speech_ms=100, min_silence_ms=300, speech_pad_ms=64)
    ended = run([0.0] * 10 + [0.9] * 10 + [0.0] * 15, options)[-1]
    assert isinstance(ended, VadEnded)
    assert ended.start_sample_index == 10 * WINDOW - 1024
    assert len(ended.samples) == 10 * WINDOW + 2 * 1024


def test_max_speech_forces_a_cut() -> None:
    """Speech longer than max_speech_s is cut there, marked forced, and a new onset follows."""
    options = VadOptions(min_speech_ms=100, min_silence_ms=300, max_speech_s=0.64)
    events = run([0.9] * 50, options)
    ended = [e for e in events if isinstance(e, VadEnded)]
    assert ended and ended[0].forced
    assert ended[0].speech_end_sample_index == 20 * WINDOW
    after_cut = events[events.index(ended[0]) + 1 :]
    onsets = [e for e in after_cut if isinstance(e, VadStarted)]
    assert onsets and onsets[0].sample_index == 20 * WINDOW  # speech goes on: it restarts at once


def test_history_keeps_the_last_turns_within_budget() -> None:
    """Older exchanges go first, by turn count and by token budget."""
    history = ChatHistory(HistoryOptions(max_turns=2, max_history_tokens=10_000), len)
    for i in range(3):
        history.record(f"q{i}", f"a{i}")
    contents = [m["content"] for m in history.prompt("next")]
    assert contents[1:] == ["q1", "a1", "q2", "a2", "next"]
    tight = ChatHistory(HistoryOptions(max_turns=10, max_history_tokens=12), len)
    tight.record("aaaa", "bbbb")
    tight.record("cccc", "dddd")
    assert [m["content"] for m in tight.prompt("x")][1:] == ["cccc", "dddd", "x"]


def test_an_interrupted_reply_is_marked() -> None:
    """A reply cut off by the user is kept marked as unfinished."""
    history = ChatHistory(HistoryOptions(), len)
    history.record("tell me", "Once upon a", interrupted=True)
    assert history.prompt("go on")[2]["content"] == "Once upon a" + INTERRUPTED_MARK


def test_max_turns_zero_keeps_no_exchange() -> None:
    history = ChatHistory(HistoryOptions(max_turns=0), len)
    history.record("q", "a")
    assert [m["role"] for m in history.prompt("next")] == ["system", "user"]


def test_a_reply_heard_not_at_all_is_kept_as_nothing_heard() -> None:
    """Cut off before any audio: what the user heard is nothing, whatever was generated."""
    history = ChatHistory(HistoryOptions(), len)
    history.amend_heard(4, "")  # the session says so before the LLM stage records it
    history.record("tell me", "Once upon a time", interrupted=True, turn_id=4)
    assert history.prompt("go on")[2]["content"] == INTERRUPTED_MARK


def test_amendments_for_turns_never_recorded_do_not_pile_up() -> None:
    history = ChatHistory(HistoryOptions(), len)
    for turn in range(1000):
        history.amend_heard(turn, "words")
    history.record("late", "reply", turn_id=999)  # the most recent amendment still applies
    assert history.prompt("x")[2]["content"] == "words" + INTERRUPTED_MARK
    assert len(history._heard) <= 16  # bounded, whatever a long session does


def test_the_onset_is_moved_back_to_where_the_voice_began() -> None:
    """The VAD's probability rises a window after the voice began: the onset is placed where
    the sound began (within START_SEARCH_MS), and the minimum speech counts from there, so
    the speech is confirmed a window sooner. Silence before it is never taken in."""
    options = VadOptions(min_speech_ms=300, min_silence_ms=300, speech_pad_ms=100)
    segmenter = VadSegmenter(options)
    silent = np.zeros(WINDOW, dtype=np.float32)
    voiced = np.full(WINDOW, LOUD, dtype=np.float32)
    events: list[VadEvent] = []
    for index in range(5):
        events += segmenter.push(silent, index * WINDOW, 0.0)
    # The voice begins 20 ms (two 10 ms frames) before the end of window 5, which the VAD
    # still calls silence; it calls window 6 speech.
    late = np.concatenate([np.zeros(WINDOW - 320, dtype=np.float32), np.full(320, LOUD)])
    events += segmenter.push(late.astype(np.float32), 5 * WINDOW, 0.1)
    confirmed_at = None
    for index in range(6, 20):
        found = segmenter.push(voiced, index * WINDOW, 0.9)
        if found and confirmed_at is None:
            confirmed_at = (index + 1) * WINDOW
        events += found
    onset = 6 * WINDOW - 320
    assert [e.sample_index for e in events if isinstance(e, VadStarted)] == [onset]
    assert confirmed_at is not None and confirmed_at - onset >= options.samples(300)
    assert confirmed_at < 6 * WINDOW + options.samples(300)  # sooner than from window 6


def onset_after(lead_in: list[float]) -> int:
    """Silence, then 10 ms frames at these levels (relative to the voice) just before the
    window the VAD first calls speech (window 20), then the voice: where the onset lands."""
    options = VadOptions(min_speech_ms=300, min_silence_ms=300, speech_pad_ms=100)
    frame = 160
    audio = np.zeros(40 * WINDOW, dtype=np.float32)
    voice_from = 20 * WINDOW
    for k, level in enumerate(reversed(lead_in), start=1):
        audio[voice_from - k * frame : voice_from - (k - 1) * frame] = level * LOUD
    audio[voice_from:] = LOUD
    segmenter = VadSegmenter(options)
    events: list[VadEvent] = []
    for index in range(40):
        window = audio[index * WINDOW : (index + 1) * WINDOW]
        events += segmenter.push(window, index * WINDOW, 0.9 if index >= 20 else 0.1)
    starts = [e.sample_index for e in events if isinstance(e, VadStarted)]
    assert len(starts) == 1
    return voice_from - starts[0]


def test_the_onset_takes_in_frames_within_20_db_of_the_voice_and_no_more() -> None:
    """Frames 10 ms each, counted back from the VAD's first speech window: those within
    START_LEVEL_DB (-20 dB: 0.1 in amplitude) of the voice's loudest frame join the onset,
    the first one under it stops the search, and it reaches back 100 ms at most."""
    assert onset_after([0.5]) == 160
    assert onset_after([0.105, 0.5]) == 320
    assert onset_after([0.095, 0.105, 0.5]) == 320  # 0.095 is under -20 dB
    assert onset_after([0.5, 0.095, 0.5, 0.5]) == 320  # a quiet frame ends the search
    assert onset_after([0.5] * 15) == 1600  # a voice that began long before: 100 ms back
    assert onset_after([0.09] * 15) == 0  # all under -20 dB: the VAD's window stands

"""Layer 1: the core's small guarantees, one at a time (cancellation, history bookkeeping)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from s2s.pipeline.cancellation import TurnCancellation
from s2s.pipeline.chunker import ChunkerOptions, SpeakableChunker, split_text
from s2s.pipeline.history import (
    INTERRUPTED_MARK,
    SETTLED_KEYS_KEPT,
    ChatHistory,
    HistoryOptions,
)
from s2s.pipeline.segmenter import (
    NEGATIVE_THRESHOLD_MARGIN,
    VadEnded,
    VadEvent,
    VadOptions,
    VadPaused,
    VadResumed,
    VadSegmenter,
    VadStarted,
)

# --- cancellation -----------------------------------------------------------------------------


def test_a_new_session_is_at_generation_zero_and_nothing_is_stale() -> None:
    cancellation = TurnCancellation()
    assert cancellation.generation == 0
    assert cancellation.closed is False
    assert not cancellation.is_stale(0)
    assert cancellation.is_stale(1) and cancellation.is_stale(-1)


def test_advance_makes_the_old_generation_stale_and_returns_the_new_one() -> None:
    cancellation = TurnCancellation()
    assert cancellation.advance() == 1
    assert cancellation.generation == 1
    assert cancellation.is_stale(0) and not cancellation.is_stale(1)
    assert cancellation.advance() == 2
    assert cancellation.is_stale(1)


def test_close_makes_every_generation_stale_for_good() -> None:
    cancellation = TurnCancellation()
    check = cancellation.stop_check(0)
    assert not check()
    cancellation.advance()
    cancellation.advance()
    cancellation.close()
    assert cancellation.closed is True and check()
    current = cancellation.generation
    assert current == 3 and cancellation.is_stale(current)
    cancellation.close()  # idempotent, and still closed after an advance
    assert cancellation.is_stale(cancellation.advance())


def test_stop_check_follows_its_own_generation() -> None:
    cancellation = TurnCancellation()
    old = cancellation.stop_check(0)
    cancellation.advance()
    new = cancellation.stop_check(1)
    assert old() and not new()


# --- history ----------------------------------------------------------------------------------


def history(**options: int) -> ChatHistory:
    return ChatHistory(HistoryOptions(system_prompt="sys", **options), len)


def contents(chat: ChatHistory, question: str = "next") -> list[str]:
    return [m["content"] for m in chat.prompt(question)]


def test_the_prompt_is_system_then_each_exchange_then_the_question() -> None:
    chat = history()
    chat.record("  q1 ", " a1  ")
    chat.record("q2", "a2")
    messages = chat.prompt("q3")
    assert [m["role"] for m in messages] == ["system", "user", "assistant"] * 1 + [
        "user",
        "assistant",
        "user",
    ]
    assert [m["content"] for m in messages] == ["sys", "q1", "a1", "q2", "a2", "q3"]
    assert len(chat) == 2


def test_new_instructions_apply_to_the_next_prompt() -> None:
    chat = history()
    chat.set_system_prompt("be brief")
    assert contents(chat)[0] == "be brief"


def test_an_interrupted_reply_is_marked_once() -> None:
    chat = history()
    chat.record("q", "cut off", interrupted=True)
    assert contents(chat)[2] == "cut off" + INTERRUPTED_MARK


def test_a_heard_report_for_a_recorded_turn_replaces_its_reply() -> None:
    chat = history()
    chat.record("q0", "zero", turn_id=0)
    chat.record("q1", "one two three", turn_id=1)
    chat.amend_heard(1, " one ")
    chat.amend_heard(7, "never recorded")  # kept aside, changes nothing now
    assert contents(chat)[1:5] == ["q0", "zero", "q1", "one" + INTERRUPTED_MARK]


def test_a_heard_report_that_comes_first_waits_for_its_turn() -> None:
    chat = history()
    chat.amend_heard(3, "one two")
    chat.record("q", "one two three four", turn_id=3)
    chat.record("q", "untouched", turn_id=4)
    assert contents(chat)[2] == "one two" + INTERRUPTED_MARK
    assert contents(chat)[4] == "untouched"


def test_early_heard_reports_are_bounded() -> None:
    """Reports for turns that are never recorded are forgotten, oldest first."""
    chat = history()
    for turn in range(SETTLED_KEYS_KEPT + 1):
        chat.amend_heard(turn, f"heard {turn}")
    chat.record("q", "whole reply", turn_id=0)  # its report was forgotten
    chat.record("q", "whole reply", turn_id=1)  # its report is still there
    assert contents(chat)[2] == "whole reply"
    assert contents(chat)[4] == "heard 1" + INTERRUPTED_MARK


def test_a_speculative_reply_joins_only_when_kept() -> None:
    chat = history()
    chat.record_speculative((0, 1), "q", "kept")
    chat.record_speculative((1, 2), "q", "dropped")
    assert len(chat) == 0
    chat.settle((0, 1), keep=True)
    chat.settle((1, 2), keep=False)
    assert contents(chat)[1:3] == ["q", "kept"]
    assert len(chat) == 1


def test_a_settlement_that_comes_first_waits_for_its_reply() -> None:
    chat = history()
    chat.settle((0, 1), keep=True)
    chat.settle((1, 2), keep=False)
    chat.record_speculative((0, 1), "q0", "kept", interrupted=True)
    chat.record_speculative((1, 2), "q1", "dropped")
    assert contents(chat)[1:3] == ["q0", "kept" + INTERRUPTED_MARK]
    assert len(chat) == 1


def test_a_kept_speculative_reply_takes_its_heard_report() -> None:
    """The reply is recorded under its turn: a playback report for that turn amends it,
    whichever of record and settle came first."""
    for settle_first in (False, True):
        chat = history()
        if settle_first:
            chat.settle((2, 5), keep=True)
        chat.record_speculative((2, 5), "q", "one two three")
        if not settle_first:
            chat.settle((2, 5), keep=True)
        chat.amend_heard(2, "one")
        assert contents(chat)[2] == "one" + INTERRUPTED_MARK, settle_first


def test_a_kept_interrupted_speculative_reply_is_marked_once() -> None:
    chat = history()
    chat.record_speculative((0, 1), "q", "cut", interrupted=True)
    chat.settle((0, 1), keep=True)
    assert contents(chat)[2] == "cut" + INTERRUPTED_MARK


def test_early_settlements_are_bounded() -> None:
    """Outcomes for replies never recorded are forgotten, oldest first: a reply recorded for
    a forgotten outcome waits for a settle of its own."""
    chat = history()
    for turn in range(SETTLED_KEYS_KEPT + 1):
        chat.settle((turn, 0), keep=True)
    chat.record_speculative((0, 0), "forgotten", "waits")
    chat.record_speculative((1, 0), "remembered", "joins")
    assert contents(chat)[1:3] == ["remembered", "joins"]
    chat.settle((0, 0), keep=True)
    assert contents(chat)[3:5] == ["forgotten", "waits"]


def test_max_turns_keeps_the_newest_and_zero_keeps_none() -> None:
    chat = history(max_turns=2)
    for turn in range(3):
        chat.record(f"q{turn}", f"a{turn}")
    assert contents(chat)[1:5] == ["q1", "a1", "q2", "a2"]
    for turns in (0, -1):
        none = history(max_turns=turns)
        none.record("q", "a")
        assert len(none) == 0 and contents(none) == ["sys", "next"]


def test_the_token_budget_holds_exactly() -> None:
    """A history exactly at its budget is kept; one token over drops the oldest exchange."""
    chat = history(max_history_tokens=8)
    chat.record("aa", "bb")  # 4 tokens (one per character here)
    chat.record("cc", "dd")  # 8: at the budget
    assert len(chat) == 2
    chat.record("e", "")  # 9: over
    assert contents(chat)[1:5] == ["cc", "dd", "e", ""]


# --- chunker edges ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # exactly first_chunk_min_words (3) before a comma: the first chunk ends there
        ("One two three, four five six seven.", ["One two three,", "four five six seven."]),
        # an abbreviation after other words, behind a bracket or a quote, is not a sentence end
        ("We met Dr. Smith today. Then left.", ["We met Dr. Smith today.", "Then left."]),
        ('He read "Mr. Men" today. Yes.', ['He read "Mr. Men" today.', "Yes."]),
        ("(Mr. Smith) arrived late. Then.", ["(Mr. Smith) arrived late.", "Then."]),
        # "I." ends a sentence (a single letter is otherwise taken for an initial)
        ("So did I. Then we left.", ["So did I.", "Then we left."]),
        ("Plan B. Then C.", ["Plan B. Then C."]),
        # a reply that opens with a one-letter word and no boundary: cut after 7 whole words
        ("I am going to tell you about it all now", ["I am going to tell you about", "it all now"]),
        (" A b c d e f g h i", ["A b c d e f g", "h i"]),
    ],
)
def test_chunk_boundaries_at_their_edges(text: str, expected: list[str]) -> None:
    assert split_text(text) == expected


def test_the_first_chunk_waits_for_its_minimum_and_later_ones_for_a_sentence() -> None:
    chunker = SpeakableChunker(ChunkerOptions(first_chunk_min_words=3))
    assert chunker.push("One two, ") == []  # two words: a comma is not yet a boundary
    assert chunker.push("three, four.") == ["One two, three,"]
    assert chunker.push(" Five, six seven eight nine ten eleven twelve ") == ["four."]
    assert chunker.finish() == ["Five, six seven eight nine ten eleven twelve"]


def test_finish_empties_the_chunker() -> None:
    chunker = SpeakableChunker()
    assert chunker.push("No boundary yet") == []
    assert chunker.finish() == ["No boundary yet"]
    assert chunker.finish() == []
    assert chunker.push("Fresh text. More") == ["Fresh text."]


def test_a_newline_ends_a_chunk_right_after_it() -> None:
    chunker = SpeakableChunker()
    assert chunker.push("Line one\nLine") == ["Line one"]
    assert chunker.finish() == ["Line"]


# --- segmenter edges --------------------------------------------------------------------------

WINDOW = 512  # 32 ms at 16 kHz: the options below are whole windows
LOUD = 0.3


def on_frames(sample_index: int) -> int:
    """The end is refined on whole 10 ms frames from the onset: a window's end rounds down."""
    return sample_index // 160 * 160


class Segmenting:
    """Feeds a segmenter one window at a time and remembers at which window each event came."""

    def __init__(self, **options: float | int | None) -> None:
        defaults: dict[str, float | int | None] = {
            "min_speech_ms": 64,  # 2 windows
            "min_silence_ms": 96,  # 3 windows
            "speech_pad_ms": 0,
            "pause_after_ms": None,
        }
        self.segmenter = VadSegmenter(VadOptions(**{**defaults, **options}))  # type: ignore[arg-type]
        self.windows = 0
        self.events: list[tuple[int, VadEvent]] = []

    def push(self, probability: float, level: float | None = None, count: int = 1) -> None:
        for _ in range(count):
            loud = LOUD if probability >= 0.5 else 0.0
            window = np.full(WINDOW, loud if level is None else level, dtype=np.float32)
            for event in self.segmenter.push(window, self.windows * WINDOW, probability):
                self.events.append((self.windows, event))
            self.windows += 1

    def kinds(self) -> list[tuple[int, str]]:
        return [(at, type(event).__name__) for at, event in self.events]

    def only(self, kind: type[VadEvent]) -> Any:
        [event] = [event for _, event in self.events if isinstance(event, kind)]
        return event


def test_a_probability_at_the_threshold_is_speech_and_min_speech_is_inclusive() -> None:
    """Two windows at exactly 0.5 make min_speech_ms (64 ms): speech starts on the second."""
    vad = Segmenting()
    vad.push(0.5, count=2)
    assert vad.kinds() == [(1, "VadStarted")]
    assert vad.segmenter.in_speech is True


def test_between_the_thresholds_speech_goes_on() -> None:
    """Hysteresis: below the threshold but not below threshold - margin is neither speech
    nor silence (at the lower bound exactly, still not silence); an onset candidate survives
    it too."""
    options = VadOptions()
    lower = options.threshold - NEGATIVE_THRESHOLD_MARGIN
    vad = Segmenting(min_speech_ms=96)
    vad.push(0.9)
    vad.push(0.4, level=LOUD)
    vad.push(0.9)
    assert vad.only(VadStarted).sample_index == 0  # the candidate from window 0 held
    vad.push(lower, level=LOUD, count=10)
    assert [kind for _, kind in vad.kinds()] == ["VadStarted"]
    vad.push(lower - 0.01, count=3)
    assert [kind for _, kind in vad.kinds()] == ["VadStarted", "VadEnded"]


def test_silence_ends_the_turn_exactly_at_min_silence_not_forced() -> None:
    vad = Segmenting()
    vad.push(0.9, count=5)
    vad.push(0.0, count=3)  # 96 ms of silence after the last loud sample
    assert vad.kinds() == [(1, "VadStarted"), (7, "VadEnded")]
    ended = vad.only(VadEnded)
    assert ended.forced is False and ended.speech_end_sample_index == 5 * WINDOW
    assert ended.samples.dtype == np.float32
    assert len(ended.samples) == 5 * WINDOW and ended.start_sample_index == 0
    assert vad.segmenter.in_speech is False


def test_a_pause_is_reported_exactly_at_pause_after_and_once() -> None:
    vad = Segmenting(pause_after_ms=64, min_silence_ms=320)
    vad.push(0.9, count=5)  # ends on a whole 10 ms frame: 2560 samples
    vad.push(0.0, count=4)  # 1024 samples (64 ms) of silence at window 6
    assert vad.kinds() == [(1, "VadStarted"), (6, "VadPaused")]
    paused = vad.only(VadPaused)
    assert paused.speech_end_sample_index == 5 * WINDOW
    assert paused.samples.dtype == np.float32


def test_max_speech_counts_from_the_onset_not_from_the_stream_start() -> None:
    """Speech from window 10 with max_speech_s 0.64 (20 windows): cut at window 30."""
    vad = Segmenting(max_speech_s=0.64)
    vad.push(0.0, count=10)
    vad.push(0.9, count=25)
    assert vad.kinds()[:2] == [(11, "VadStarted"), (29, "VadEnded")]
    ended = vad.only(VadEnded)
    assert ended.forced is True and ended.speech_end_sample_index == 30 * WINDOW


def test_commit_needs_confirmed_speech_and_is_forced() -> None:
    vad = Segmenting(min_speech_ms=96)
    vad.push(0.9)  # a candidate onset, not yet speech
    assert vad.segmenter.commit() == []
    vad.push(0.9, count=3)
    [ended] = vad.segmenter.commit()
    assert isinstance(ended, VadEnded) and ended.forced is True
    assert ended.speech_end_sample_index == 4 * WINDOW
    assert vad.segmenter.in_speech is False


def test_clear_reports_a_resume_only_after_a_pause_at_the_stream_end() -> None:
    vad = Segmenting(pause_after_ms=64, min_silence_ms=320)
    vad.push(0.9, count=4)
    assert vad.segmenter.clear() == []  # speech, no pause reported: nothing moot
    vad.push(0.9, count=4)
    vad.push(0.0, count=2)
    assert isinstance(vad.events[-1][1], VadPaused)
    assert vad.segmenter.clear() == [VadResumed(10 * WINDOW)]
    assert vad.segmenter.in_speech is False


def test_restart_during_a_silence_starts_the_speech_over() -> None:
    """The onset moves to the restart point; the silence so far no longer counts (the user
    spoke over the echo), and the turn then ends normally."""
    vad = Segmenting(pause_after_ms=64, min_silence_ms=160)
    vad.push(0.9, count=6)
    vad.push(0.0, count=2)
    vad.segmenter.restart(3 * WINDOW)
    vad.segmenter.restart(1 * WINDOW)  # never earlier than the current onset
    vad.push(0.0, count=5)
    ended = vad.only(VadEnded)
    assert ended.start_sample_index == 3 * WINDOW
    assert len([e for _, e in vad.events if isinstance(e, VadPaused)]) == 2


def test_restart_outside_speech_does_nothing() -> None:
    vad = Segmenting()
    vad.segmenter.restart(0)
    vad.push(0.0, count=3)
    assert vad.events == [] and vad.segmenter.in_speech is False


def test_the_end_is_refined_to_the_last_frame_within_26_db_of_the_speech() -> None:
    """The model's probability trails the audio: the end is the last 10 ms frame within
    -26 dB of the loud frames. A tail at -25 dB is still speech, one at -26.5 dB is not."""
    for tail_db, counted in ((-25.0, True), (-26.5, False)):
        vad = Segmenting()
        vad.push(0.9, count=10)
        vad.push(0.9, level=LOUD * 10 ** (tail_db / 20), count=2)  # probability lags
        vad.push(0.0, count=4)
        ended = vad.only(VadEnded)
        expected = 12 if counted else 10
        assert ended.speech_end_sample_index == on_frames(expected * WINDOW), tail_db


def test_an_end_with_nothing_loud_near_it_is_the_search_windows_start() -> None:
    """The last 250 ms before the first silent window are all quiet: the end is placed where
    that search began (25 frames of 10 ms before)."""
    vad = Segmenting()
    vad.push(0.9, count=30)
    vad.push(0.9, level=0.0001, count=10)  # 320 ms of near silence the model still calls speech
    vad.push(0.0, count=4)
    ended = vad.only(VadEnded)
    frame = 160
    assert ended.speech_end_sample_index == 40 * WINDOW - 25 * frame


def test_restart_never_moves_the_onset_into_the_padding() -> None:
    """Speech from the first sample, 100 ms of padding: a restart at 0 puts the onset past
    the padding (1600), which is where the max-speech cut then counts from."""
    vad = Segmenting(speech_pad_ms=100, max_speech_s=0.64)
    vad.push(0.9, count=3)
    vad.segmenter.restart(0)
    vad.push(0.9, count=30)
    ended = vad.only(VadEnded)
    assert ended.forced is True
    assert ended.speech_end_sample_index == 24 * WINDOW  # 1600 + 10240 reached in window 23


def test_speech_the_model_hears_in_digital_silence_ends_where_the_model_says() -> None:
    """Nothing loud at all to refine the end with: the end is the first silent window."""
    vad = Segmenting()
    vad.push(0.9, level=0.0, count=10)
    vad.push(0.0, count=4)
    assert vad.only(VadEnded).speech_end_sample_index == 10 * WINDOW

"""VAD segmentation (pure): per-window speech probabilities in, speech events out.

Speech must last ``min_speech_ms`` before it counts; it ends after ``min_silence_ms`` below a
lower threshold (hysteresis). The end reported is where the speech stopped, not where the
silence wait ran out: that is the origin of the voice-to-voice latency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from s2s.pipeline.messages import Samples

VAD_SAMPLE_RATE_HZ = 16_000
NEGATIVE_THRESHOLD_MARGIN = 0.15
"""Speech ends below ``threshold - margin`` (hysteresis, as Silero's own iterator does)."""
END_SEARCH_MS = 250
"""Silero's probability trails the audio by two or three windows (~100 ms): the reported end
is refined by energy within this much audio before the first silent window."""
START_SEARCH_MS = 100
"""Silero's probability rises a window or two after the speech began: the reported onset is
moved back by energy within this much audio before the first speech window, so the minimum
speech is counted from where the user started (a barge-in is heard that much sooner)."""
START_LEVEL_DB = -20.0
"""A frame before the first speech window is speech while its RMS is within this of the
loudest frame of that window."""
END_FRAME_MS = 10
END_LEVEL_DB = -26.0
"""A frame is still speech while its RMS is within this of the segment's loud frames."""


@dataclass(frozen=True, slots=True)
class VadOptions:
    threshold: float = 0.5
    min_speech_ms: int = 300
    """Speech must last this long before it counts (and ``speech started`` is reported):
    it is also the shortest speech that interrupts a reply, so coughs and blips do not."""
    onset_gap_ms: int = 100
    """Before speech counts, a dip of the probability shorter than this does not start the
    count again: a stop consonant, or an echo canceller turning the voice down for a moment
    while the reply plays (Silero's own iterator lets 100 ms of silence pass within speech).
    The count is still confirmed only by a speech window."""
    min_silence_ms: int = 500
    """Silence after speech that ends the turn."""
    speech_pad_ms: int = 100
    """Audio kept on each side of a segment."""
    max_speech_s: float = 30.0
    """A segment is cut here even without silence (Whisper's window is 30 s)."""
    pause_after_ms: int | None = 100
    """Report a ``VadPaused`` this long into a silence (at least ``speech_pad_ms``), so the
    segment can be transcribed while the end-of-turn silence is still being waited for.
    None: never."""

    def samples(self, ms: float) -> int:
        return int(ms * VAD_SAMPLE_RATE_HZ / 1000)


@dataclass(frozen=True, slots=True)
class VadStarted:
    sample_index: int
    """First sample of the speech (before padding)."""


@dataclass(frozen=True, slots=True)
class VadEnded:
    samples: Samples
    start_sample_index: int
    """First sample in ``samples`` (speech start minus padding)."""
    speech_end_sample_index: int
    """Where the speech itself ended, before the end-of-turn silence."""
    forced: bool = False
    """True when cut by ``max_speech_s`` rather than by silence."""


@dataclass(frozen=True, slots=True)
class VadPaused:
    """The speech may have ended: the segment as ``VadEnded`` will carry it if the silence
    lasts, so work on it can start early. Discarded if speech resumes."""

    samples: Samples
    start_sample_index: int
    speech_end_sample_index: int


@dataclass(frozen=True, slots=True)
class VadResumed:
    """Speech came back after a ``VadPaused``: the pause was not the end of the turn, and
    any work started on the paused segment is moot."""

    sample_index: int


VadEvent = VadStarted | VadPaused | VadResumed | VadEnded


class VadSegmenter:
    """Pure: window probabilities in, speech events out. One per session."""

    def __init__(self, options: VadOptions) -> None:
        self._options = options
        self._negative_threshold = max(0.0, options.threshold - NEGATIVE_THRESHOLD_MARGIN)
        self._pad = options.samples(options.speech_pad_ms)
        self._min_speech = options.samples(options.min_speech_ms)
        self._onset_gap = options.samples(options.onset_gap_ms)
        self._min_silence = options.samples(options.min_silence_ms)
        self._max_speech = int(options.max_speech_s * VAD_SAMPLE_RATE_HZ)
        self._audio = np.zeros(0, dtype=np.float32)
        self._audio_start = 0  # stream index of self._audio[0]
        self._speech_start: int | None = None  # a candidate or confirmed onset
        self._gap_start: int | None = None  # where a dip within a candidate onset began
        self._confirmed = False
        self._speech_end: int | None = None  # set while silence follows confirmed speech
        self._paused_at: int | None = None  # the speech end a VadPaused was sent for
        self._onsets_from = 0  # an onset is never moved back before the last segment's end
        self._pause_after = (
            None
            if options.pause_after_ms is None
            else max(self._pad, options.samples(options.pause_after_ms))
        )

    @property
    def in_speech(self) -> bool:
        return self._confirmed

    def push(self, window: Samples, window_start: int, probability: float) -> list[VadEvent]:
        """Account for one window of audio that starts at stream index ``window_start``."""
        self._audio = np.concatenate([self._audio, window])
        window_end = window_start + len(window)
        events: list[VadEvent] = []
        if probability >= self._options.threshold:
            self._speech_end = None
            self._gap_start = None
            if self._confirmed and self._paused_at is not None:
                self._paused_at = None
                events.append(VadResumed(window_start))
            if self._speech_start is None:
                refined = self._refine_start(window_start, window_end)
                self._speech_start = max(refined, self._onsets_from)
            if not self._confirmed and window_end - self._speech_start >= self._min_speech:
                self._confirmed = True
                events.append(VadStarted(self._speech_start))
        elif probability < self._negative_threshold and self._speech_start is not None:
            if not self._confirmed:
                if self._gap_start is None:
                    self._gap_start = window_start
                if window_end - self._gap_start > self._onset_gap:
                    self._speech_start = None  # a blip shorter than min_speech_ms
                    self._gap_start = None
            elif self._speech_end is None:
                # Silence is counted from where the speech really stopped, not from where the
                # model's probability fell (two or three windows later).
                self._speech_end = self._refine_end(window_start)
        if self._confirmed and self._speech_start is not None:
            silence = None if self._speech_end is None else window_end - self._speech_end
            if silence is not None and silence >= self._min_silence:
                events.append(self._end(forced=False))
            elif window_end - self._speech_start >= self._max_speech:
                self._speech_end = window_end
                events.append(self._end(forced=True))
            elif (
                silence is not None
                and self._pause_after is not None
                and self._paused_at != self._speech_end
                and silence >= self._pause_after
            ):
                self._paused_at = self._speech_end
                events.append(VadPaused(*self._cut()))
        self._trim(window_end)
        return events

    def restart(self, speech_start: int) -> None:
        """The speech under way counts from ``speech_start`` on (what came before it was not
        the user's: the assistant's echo). No-op outside confirmed speech."""
        if self._confirmed and self._speech_start is not None:
            self._speech_start = max(
                self._speech_start, self._audio_start + self._pad, speech_start
            )
            self._speech_end = None
            self._paused_at = None

    def commit(self) -> list[VadEvent]:
        """End the speech under way now, as if its silence had lasted (the client says the
        turn is over). Nothing when no speech is confirmed."""
        if not self._confirmed or self._speech_start is None:
            return []
        if self._speech_end is None:
            self._speech_end = self._audio_start + len(self._audio)
        return [self._end(forced=True)]

    def clear(self) -> list[VadEvent]:
        """Drop the speech under way unheard. A ``VadResumed`` when a pause was reported
        for it: work started at that pause is moot."""
        if self._speech_start is None:
            return []
        paused = self._paused_at is not None
        self._speech_start = None
        self._confirmed = False
        self._speech_end = None
        self._paused_at = None
        return [VadResumed(self._audio_start + len(self._audio))] if paused else []

    def forget(self, until: int) -> None:
        """Drop the speech under way unreported, and place no onset before stream index
        ``until``: what came before was the assistant's echo, and speech that goes on from
        there must count its minimum again."""
        self._speech_start = None
        self._gap_start = None
        self._confirmed = False
        self._speech_end = None
        self._paused_at = None
        self._onsets_from = max(self._onsets_from, until)

    def _end(self, forced: bool) -> VadEnded:
        ended = VadEnded(*self._cut(), forced)
        self._onsets_from = ended.speech_end_sample_index  # that speech is this segment's
        self._speech_start = None
        self._confirmed = False
        self._speech_end = None
        self._paused_at = None
        return ended

    def _cut(self) -> tuple[Samples, int, int]:
        """The segment's audio, its first sample, and where its speech ended."""
        assert self._speech_start is not None and self._speech_end is not None
        speech_end = self._speech_end
        start = max(self._audio_start, self._speech_start - self._pad)
        stop = speech_end + self._pad
        return (
            self._audio[start - self._audio_start : stop - self._audio_start].copy(),
            start,
            speech_end,
        )

    def _refine_start(self, window_start: int, window_end: int) -> int:
        """The first frame, shortly before ``window_start``, of the speech that the window
        holds: frames back to there are all within START_LEVEL_DB of its loudest frame."""
        frame = self._options.samples(END_FRAME_MS)
        begin = max(
            self._audio_start,
            self._onsets_from,
            window_start - self._options.samples(START_SEARCH_MS),
        )
        begin = min(begin, window_start)  # no onset before _onsets_from: see push
        begin = window_start - (window_start - begin) // frame * frame
        audio = self._audio[begin - self._audio_start : window_end - self._audio_start]
        frames = len(audio) // frame
        rms = np.sqrt((audio[: frames * frame].reshape(frames, frame) ** 2).mean(axis=1))
        before = (window_start - begin) // frame
        loud = float(rms[before:].max()) if frames > before else 0.0
        if loud <= 0.0:
            return window_start
        floor = loud * 10 ** (START_LEVEL_DB / 20)
        first = before
        while first > 0 and rms[first - 1] > floor:
            first -= 1
        return window_start - (before - first) * frame

    def _refine_end(self, vad_end: int) -> int:
        """The last frame, shortly before ``vad_end``, loud enough to be speech."""
        assert self._speech_start is not None
        frame = self._options.samples(END_FRAME_MS)
        speech = self._audio[self._speech_start - self._audio_start : vad_end - self._audio_start]
        frames = len(speech) // frame
        if frames == 0:
            return vad_end
        rms = np.sqrt((speech[: frames * frame].reshape(frames, frame) ** 2).mean(axis=1))
        loud = float(np.percentile(rms, 90))
        if loud <= 0.0:
            return vad_end
        floor = loud * 10 ** (END_LEVEL_DB / 20)
        search_from = max(0, frames - self._options.samples(END_SEARCH_MS) // frame)
        above = np.nonzero(rms[search_from:] > floor)[0]
        if len(above) == 0:
            return self._speech_start + search_from * frame
        return self._speech_start + (search_from + int(above[-1]) + 1) * frame

    def _trim(self, stream_end: int) -> None:
        """Keep only what a segment may still need: the padding before any onset."""
        keep_from = stream_end - self._pad
        if self._speech_start is not None:
            keep_from = min(keep_from, self._speech_start - self._pad)
        drop = keep_from - self._audio_start
        if drop > 0:
            self._audio = self._audio[drop:]
            self._audio_start += drop

"""The reply's echo cancelled on the server, for clients that do not cancel it themselves.

The server knows what the client plays and when: each frame of reply audio is sent with the
moment it will start to play on the pacing timeline, and each microphone sample's moment is
known from ``InputClock``. So the microphone can go through the same cancellers as the
client's (``s2s/models/echo_cancel.py``), each 10 ms block with the reply audio due to play
over the same 10 ms, before the VAD hears it. What is left between the two timelines (the
client's jitter buffer, its sound card, the room, a network delay that differs from the least
one seen) is a delay like a room's, which the cancellers learn with the rest of the echo path.
But it differs a little from one reply to the next (each starts to play when the client's
sound card next asks for audio), and a canceller takes a path that moved for a new one: so
``PlaybackAligner`` finds where each reply's echo lies, and the reply is read at that shift;
at the start of each reply the microphone waits (HOLD_MAX_S at most) until it is found.

Unlike the level estimate (``s2s/pipeline/echo.py``), this takes out the echo sample for
sample, so a sustained vowel of the reply that the room happens to make louder is cancelled as
well as the rest of it (the estimate, in power, expects the room's average; it has taken such
a vowel for the user).

Thread-safe: the session records the reply as it sends it, the VAD stage cancels.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import replace

import numpy as np

from s2s.models.audio import StreamResampler
from s2s.models.echo_cancel import CancellerChain, EchoCancelOptions
from s2s.pipeline.messages import Samples

REFERENCE_KEPT_S = 4.0
"""Reply audio kept by when it plays: what is sent ahead of playback (PACE_AHEAD_S) plus the
longest echo path the cancellers could follow, with room to spare."""
REANCHOR_S = 0.02
"""The microphone's samples keep their place on the timeline until ``InputClock`` moves them
by more than this. Its offset steps by a millisecond or two whenever the least-delayed arrival
leaves its window; each step would shift the reply against the microphone, and the cancellers
would lose the echo path for a moment. They follow a slow drift themselves."""
ALIGN_WINDOW_S = 0.25
"""The microphone compared with the reply, at each check, to find the echo path in it."""
ALIGN_EVERY_S = 0.05
FRESH_S = 0.6
"""After a reply starts anew on the timeline, the path is looked for at every block for this
long, until found: the sooner the reply is read at its new shift, the
less the cancellers (AEC3's own delay search among them) move to the shifted path meanwhile,
and the sooner they are right again."""
HOLD_MAX_S = 0.4
"""At a reply's start, the microphone waits for the echo path to be found at most this long
from where the reply's first audible sound can echo (it is found about 150 ms into the echo;
a reply that opens softly takes longer). Meanwhile the cancellers are not given the new
reply at a shift it does not play at: they would start to learn the wrong path, and then
unlearn it (AEC3 also moves its own delay), letting echo through for half a second."""
AUDIBLE = 10 ** (-50 / 20)
"""A reply sample this loud (-50 dBFS) is sound its echo can be found in: TTS output often
opens with a silence, and the hold counts from the first sound after it."""
SETTLE_S = 0.2
"""After a reply's echo path is found, the cancellers' output is trusted alone (see
``trusted``) only from this much later: their first blocks at the new shift."""
RELEARN_S = 1.0
"""When the hold ran out before the path was found, the cancellers took some of the reply at
the old shift: they move to it again, and leak echo meanwhile, for this long after it is
found."""
MIN_WINDOW_S = 0.06
"""The least of a new reply's echo the path is looked for in."""
MAX_PATH_S = 0.6
"""How far behind its timeline the reply's echo is looked for (the client's buffers, the
sound card, the room)."""
MAX_SHIFT_S = 0.06
"""How far a reply may play from where the last one did, relative to their timelines."""
MIN_MATCH = 0.6
"""How alike (normalised correlation) a window's echo path must be to the one learned before it
is taken as that path moved."""
LEARNING_S = 1.5
"""Reply audio the cancellers hear before their output alone decides what is speech: until
they have learned the room they let echo through, and a cough at 1 s into the session's first
reply, with that echo, made 300 ms of speech and interrupted it. Until then the level gate
(``s2s/pipeline/echo.py``) decides as well, as it does for clients the server does not cancel
for."""
ONSET_LEAD_S = 0.2
"""The VAD places an onset up to this much before the speech it heard (it looks back for
where the voice began, and bridges short gaps): echo that leaked at a reply's start may be
given an onset a little before it."""
UNTRUSTED_KEPT = 4
"""Reply starts remembered for ``trusted`` (a VAD onset looks back a second at most)."""
CONTIGUOUS_S = 0.002
"""A frame due to play within this of where the last one ended continues it (the resampler
keeps its state); further off, the reply restarted on the timeline (a client that ran dry)."""


class ReplyEchoCanceller:
    """One session's microphone without the reply's echo. ``start`` loads the libraries."""

    def __init__(self, rate_hz: int, options: EchoCancelOptions | None = None) -> None:
        self.rate_hz = rate_hz
        # The echo's power model (``watch_near_end``) was measured for the client's
        # microphone only; here the reply's timeline is found anew at each reply's start,
        # which that model would have to follow.
        server_options = options if options is not None else EchoCancelOptions()
        self._chain = CancellerChain(rate_hz, replace(server_options, watch_near_end=False))
        self._block = self._chain.block_samples
        self._lock = threading.Lock()  # guards the reply side, below
        kept = round(REFERENCE_KEPT_S * rate_hz)
        self._reference = np.zeros(kept, dtype=np.float32)
        self._position = np.full(kept, -1, dtype=np.int64)  # which sample each slot holds
        self._resampler: StreamResampler | None = None
        self._next_at = -math.inf  # when the audio after the last frame recorded would play
        self._next_index = 0  # the sample of the timeline it goes to
        # Where the reply started anew on the timeline (a new reply, or one whose client ran
        # dry): it may play at another shift from there on.
        self._stretches: deque[int] = deque()
        # The microphone side (the VAD stage's thread only).
        self._near = np.zeros(0, dtype=np.float32)  # samples not yet a whole block
        self._mic_end = 0  # microphone samples so far
        self._aligner = PlaybackAligner(rate_hz)
        self._recent = np.zeros(self._aligner.window, dtype=np.float32)  # the raw microphone
        self._align_every = max(1, round(ALIGN_EVERY_S * rate_hz / self._block))
        self._reply_from = 0  # timeline sample where the current reply's audio began
        self._audible_from: int | None = None  # and where it is first audible (once known)
        self._audible_scan = 0  # the reply is silent from _reply_from up to here
        self._anchor: int | None = None  # timeline sample of microphone sample 0
        self._held: list[tuple[Samples, int]] = []  # blocks waiting for the path, and ends
        self._spilled = False  # blocks of the current reply's echo went on at the old shift
        self._blocks_seen = 0
        # Which microphone samples (the VAD's sample positions) the cancellers' output cannot
        # be trusted alone for: before they learned the room, and from each reply's start
        # until its path is found and settled ([first, end); end None: not found yet).
        self._learned_at: int | None = None
        self._untrusted: deque[tuple[int, int | None]] = deque(maxlen=UNTRUSTED_KEPT)

    def trusted(self, since: int) -> bool:
        """Whether speech that began at microphone sample ``since`` can be taken for the
        user's on the cancellers' output alone (the VAD stage's thread only): they had heard
        LEARNING_S of reply audio by then, and it did not begin while a reply's start was
        still unsettled (that reply's echo path not yet found, or found and not settled: a
        reply whose path is not found, in double talk say, reaches them at the last reply's
        shift, which may be off; one found late, after the hold, leaks for RELEARN_S).
        Speech that began before a reply started is no echo of it."""
        if self._learned_at is None or since < self._learned_at:
            return False
        lead = round(ONSET_LEAD_S * self.rate_hz)
        return not any(
            first - lead <= since and (end is None or since < end) for first, end in self._untrusted
        )

    @property
    def shift(self) -> int:
        """How much later than its timeline the reply is found to play (samples)."""
        return self._aligner.shift

    @property
    def anchor(self) -> int | None:
        """Where the microphone's first sample lies on the timeline (in samples)."""
        return self._anchor

    def start(self) -> None:
        self._chain.start("Echo cancellation on the server (or run s2s-server --server-aec off)")

    # --- the reply --------------------------------------------------------------------------

    def played(self, samples: Samples, starts_at: float, sample_rate_hz: int) -> None:
        """Reply audio that will play from ``starts_at`` (monotonic seconds) on."""
        with self._lock:
            continues = (
                self._resampler is not None
                and self._resampler.from_rate_hz == sample_rate_hz
                and abs(starts_at - self._next_at) <= CONTIGUOUS_S
            )
            if not continues:
                self._resampler = StreamResampler(sample_rate_hz, self.rate_hz)
                self._next_index = round(starts_at * self.rate_hz)
                self._stretches.append(self._next_index)
            assert self._resampler is not None
            self._next_at = starts_at + len(samples) / sample_rate_hz
            converted = self._resampler.push(samples)
            indexes = np.arange(self._next_index, self._next_index + len(converted))
            slots = indexes % len(self._reference)
            self._reference[slots] = converted
            self._position[slots] = indexes
            self._next_index += len(converted)

    def silence_reply(self) -> None:
        """The reply stopped (interrupted): what was due to play from now on never will."""
        now = round(time.monotonic() * self.rate_hz)
        with self._lock:
            self._position[self._position > now] = -1
            self._resampler = None

    # --- the microphone ---------------------------------------------------------------------

    def cancel(self, samples: Samples, ends_at: float) -> Samples:
        """A chunk of the microphone, spoken up to ``ends_at``, without the reply's echo.
        What comes back is the microphone's stream, cleaned, in whole 10 ms blocks and in
        order: as much as was given, give or take a block, except at the start of a reply,
        where its echo is held back (HOLD_MAX_S at most) until the path is found, and then
        comes all at once."""
        self._near = np.concatenate([self._near, np.asarray(samples, dtype=np.float32)])
        self._mic_end += len(samples)
        anchor = round(ends_at * self.rate_hz) - self._mic_end
        if self._anchor is None or abs(anchor - self._anchor) > REANCHOR_S * self.rate_hz:
            self._anchor = anchor
        whole = len(self._near) - len(self._near) % self._block
        last_end = self._anchor + self._mic_end - (len(self._near) - whole)
        first_index = self._mic_end - len(self._near)  # the microphone sample near[0] is
        cleaned: list[Samples] = []
        for begin in range(0, whole, self._block):
            end = last_end - (whole - begin - self._block)
            near = self._near[begin : begin + self._block]
            self._recent = np.concatenate([self._recent[len(near) :], near])
            self._blocks_seen += 1
            self._follow_reply(end, first_index + begin)
            echo_from = self._echo_from()
            fresh = (
                self._searching
                and echo_from is not None
                and end <= echo_from + FRESH_S * self.rate_hz
            )
            if (fresh or self._blocks_seen % self._align_every == 0) and self._look_for_path(
                end, fresh
            ):
                if self._searching:
                    settle = RELEARN_S if self._spilled else SETTLE_S
                    first, _ = self._untrusted[-1]
                    block_end = first_index + begin + self._block
                    self._untrusted[-1] = (first, block_end + round(settle * self.rate_hz))
                fresh = False
            self._held.append((near, end))
            if self._searching and echo_from is not None and echo_from < end:
                if fresh and end <= echo_from + HOLD_MAX_S * self.rate_hz:
                    continue  # the new reply's echo may be in it: wait for its path
                self._spilled = True  # the hold ran out: the echo goes on at the old shift
            for held, held_end in self._held:
                read_at = held_end - self._aligner.shift
                far = self._reply_over(read_at - self._block, read_at)
                cleaned.append(self._chain.process(held, far))
            self._held.clear()
            if self._learned_at is None and (
                self._chain.reply_blocks * self._block >= LEARNING_S * self.rate_hz
            ):
                self._learned_at = first_index + begin + self._block
        self._near = self._near[whole:]
        return np.concatenate(cleaned) if cleaned else np.zeros(0, dtype=np.float32)

    def _follow_reply(self, end: int, index: int) -> None:
        """Note where the reply starts anew on the timeline (``played`` saw it), once the
        microphone block ending at timeline sample ``end`` (microphone sample ``index`` on)
        reads it."""
        read_at = end - self._aligner.shift
        with self._lock:
            started = None
            while self._stretches and self._stretches[0] < read_at:
                started = self._stretches.popleft()
        if started is None:
            return
        self._reply_from = started
        self._audible_from = None
        self._audible_scan = started
        self._spilled = False
        if self._aligner.path_lag is None:
            return  # nothing to look for yet (the first reply: see LEARNING_S)
        if self._searching:
            # The last reply's path was never found (all of it soft, or talked over): its
            # echo is no better known now, so the span goes on until this one's is found.
            index = self._untrusted.pop()[0]
        self._untrusted.append((index, None))

    @property
    def _searching(self) -> bool:
        """Whether the current reply's echo path is still looked for (its span is open)."""
        return bool(self._untrusted) and self._untrusted[-1][1] is None

    def _echo_from(self) -> int | None:
        """The earliest timeline sample of the microphone where the current reply's first
        audible sound can echo, on the path learned (None: no path learned yet, or nothing
        of the reply audible yet)."""
        lag = self._aligner.path_lag
        if lag is None:
            return None
        if self._audible_from is None:
            # Looked for up to where the reply is known (sent ahead of its playing).
            with self._lock:
                known_to = self._next_index
            kept_from = known_to - len(self._reference)  # what is older is no longer kept
            self._audible_scan = max(self._audible_scan, kept_from)
            reply = self._reply_over(self._audible_scan, known_to)
            loud = np.flatnonzero(np.abs(reply) >= AUDIBLE)
            if not len(loud):
                self._audible_scan = max(self._audible_scan, known_to)
                return None
            self._audible_from = self._audible_scan + int(loud[0])
        return self._audible_from + lag - self._aligner.max_shift

    def _look_for_path(self, end: int, fresh: bool) -> bool:
        """Check the microphone up to timeline sample ``end`` for the echo path. Just after a
        reply starts, only from where its echo can begin: before it, the window holds no
        echo of it, and would hide the path for longer."""
        begin = end - self._aligner.window
        if fresh:
            echo_from = self._echo_from()
            if echo_from is None:
                return False  # learned from the regular checks only: spread over the reply
            begin = max(begin, echo_from)
            if end - begin < MIN_WINDOW_S * self.rate_hz:
                return False
        mic = self._recent[len(self._recent) - (end - begin) :]
        return self._aligner.check(mic, self._reply_over(begin - self._aligner.max_path, end))

    def reply_between(self, starts_at: float, ends_at: float) -> Samples:
        """The reply audio due to play over [starts_at, ends_at) (monotonic seconds)."""
        return self._reply_over(round(starts_at * self.rate_hz), round(ends_at * self.rate_hz))

    def _reply_over(self, first: int, end: int) -> Samples:
        """The reply audio due to play over timeline samples [first, end): zeros where none."""
        indexes = np.arange(first, end)
        slots = indexes % len(self._reference)
        with self._lock:
            known = self._position[slots] == indexes
            return np.where(known, self._reference[slots], 0.0).astype(np.float32)


class PlaybackAligner:
    """Pure: how much later than its timeline the reply plays, found again at every reply.

    Each reply starts to play when the client's sound card next asks for audio after it
    arrives, so against the pacing timeline it is late by a different few milliseconds each
    time. To the cancellers that is an echo path that jumped: they learn it again, and
    meanwhile (half a second and more, over an echo 10 dB under the reply) let through echo
    that sounds like speech. So the echo path is found in the microphone itself, by
    correlating it with the reply (whitened, GCC-PHAT: its peaks are the room's paths) over
    lags up to MAX_PATH_S. The first clear ones that the echo fills (the reply sounded
    MAX_PATH_S before the window) are added up and remembered (from the strongest path,
    PATH_SPAN_S of it); each later window is matched against that within
    MAX_SHIFT_S, and where they match is the shift the reply is read back at, so the
    cancellers meet the path they learned.
    """

    def __init__(self, rate_hz: int) -> None:
        self.window = round(ALIGN_WINDOW_S * rate_hz)
        self.max_path = round(MAX_PATH_S * rate_hz)
        self.max_shift = round(MAX_SHIFT_S * rate_hz)
        self._before = round(PATH_LEAD_S * rate_hz)
        self._span = round(PATH_SPAN_S * rate_hz)
        self._taper = round(TAPER_S * rate_hz)
        self._pattern: np.ndarray | None = None  # the path learned, at shift 0
        self._pattern_at = 0  # the lag where it begins
        self._sum: np.ndarray | None = None  # the windows it is learned from, added up
        self._summed = 0
        self.shift = 0  # samples: the reply is read this much earlier than its timeline says
        self.match = 0.0  # of the last check, for tests and diagnostics

    @property
    def path_lag(self) -> int | None:
        """Where the learned path begins, in samples behind the timeline (at shift 0)."""
        return None if self._pattern is None else self._pattern_at

    def check(self, mic: Samples, reply: Samples) -> bool:
        """``mic``: the last samples of the microphone (``window`` of them, or fewer);
        ``reply``: the reply's timeline up to the same moment, ``max_path`` samples more,
        not shifted.
        Whether the learned path was found in them (``shift`` says where)."""
        if _power(reply) < QUIET_POWER or _power(mic) < QUIET_POWER:
            return False
        if self._pattern is None and _power(reply[: len(mic)]) < QUIET_POWER:
            # The reply may not have sounded long enough for its echo to fill the window:
            # where the echo begins inside it, that onset (the reply's, and the room's
            # ringing starting at once) stands out of the whitened correlation as a lone
            # peak at a lag where there is no path, taller than the path's own.
            return False
        paths = _whitened_correlation(mic, reply, self.max_path, self._taper)
        if self._pattern is None:
            if _peakiness(paths) >= FIRST_PEAKINESS:  # an echo to learn from
                self._sum = paths if self._sum is None else self._sum + paths
                self._summed += 1
                if self._summed == LEARN_WINDOWS:
                    self._pattern_at = max(0, int(np.argmax(self._sum)) - self._before)
                    pattern = self._sum[self._pattern_at : self._pattern_at + self._span]
                    self._pattern = pattern - pattern.mean()
            return False
        shifts = np.arange(-self.max_shift, self.max_shift + 1)
        matches = _pearson_along(
            paths, self._pattern, self._pattern_at - self.max_shift, len(shifts)
        )
        best = int(np.argmax(matches))
        self.match = float(matches[best])
        if self.match < MIN_MATCH:
            return False  # the user talking, a pause: nothing to go by
        self.shift = int(shifts[best])
        return True


LEARN_WINDOWS = 8
"""The path is learned from this many windows that hold a clear one, added up."""
QUIET_POWER = 1e-7
"""Windows of reply or microphone under -70 dBFS say nothing about the echo path."""
FIRST_PEAKINESS = 8.0
"""A window holds a clear path when its strongest lag stands this far above the typical one."""
PATH_LEAD_S = 0.002
PATH_SPAN_S = 0.05
"""What of the path is matched: from just before its strongest lag, this long."""
TAPER_S = 0.01
"""The microphone's window fades in and out over this much (see ``_whitened_correlation``)."""


def _power(samples: Samples) -> float:
    return float(np.mean(np.square(samples, dtype=np.float64))) if len(samples) else 0.0


def _whitened_correlation(mic: Samples, reply: Samples, lags: int, taper: int) -> np.ndarray:
    """For lag 0 .. lags-1: how much of the microphone's window is the reply that far back,
    with every frequency weighted alike."""
    # No lag asked for wraps around at len(reply) (mic[k] meets reply[k + lags - L], within it).
    size = 1 << (len(reply) - 1).bit_length()
    # Both windows end at the same sample: cut off square, the two edges alone would correlate
    # at lag 0 over every frequency, which whitening makes a peak as sharp as a real path's
    # (learned as the path in 9 of 88 sessions through simulated rooms, checked from the
    # first reply's start; in 1 of 5 on the room bench).
    spectrum = np.fft.rfft(_tapered(mic, taper), size) * np.conj(np.fft.rfft(reply, size))
    spectrum /= np.abs(spectrum) + 1e-12
    correlation = np.fft.irfft(spectrum, size)  # [n]: sum over k of mic[k] * reply[k - n]
    # The reply's window starts ``lags`` before the microphone's: at lag L, mic[k] meets
    # reply[k + lags - L], which is n = L - lags (negative: from the end, circularly).
    offsets = (np.arange(lags) - lags) % size
    return np.abs(correlation[offsets])


def _tapered(samples: Samples, taper: int) -> np.ndarray:
    """``samples`` faded in and out over ``taper`` samples (raised cosine) at either end."""
    length = min(len(samples) // 2, taper)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(length) / max(length, 1))
    weights = np.ones(len(samples))
    weights[:length] = ramp
    weights[len(samples) - length :] = ramp[::-1]
    return np.asarray(samples, dtype=np.float64) * weights


def _pearson_along(paths: np.ndarray, pattern: np.ndarray, first: int, count: int) -> np.ndarray:
    """The correlation coefficient of ``pattern`` (zero-mean) with the stretch of ``paths``
    as long starting at each of ``first`` .. ``first + count - 1``; 0 where it does not fit."""
    length = len(pattern)
    out = np.zeros(count)
    lo, hi = max(first, 0), min(first + count - 1, len(paths) - length)  # starts that fit
    if hi < lo:
        return out
    segment = paths[lo : hi + length]
    size = 1 << (len(segment) + length).bit_length()
    # sums[j] = sum over u of segment[j + u] * pattern[u]; the pattern's zero mean makes it
    # the same as with each stretch's own mean taken away.
    spectrum = np.fft.rfft(segment, size) * np.conj(np.fft.rfft(pattern, size))
    sums = np.fft.irfft(spectrum, size)[: hi - lo + 1]
    totals = np.concatenate([[0.0], np.cumsum(segment)])
    squares = np.concatenate([[0.0], np.cumsum(np.square(segment))])
    starts = np.arange(hi - lo + 1)
    stretch_sum = totals[starts + length] - totals[starts]
    spread = squares[starts + length] - squares[starts] - stretch_sum**2 / length
    norms = np.sqrt(np.maximum(spread, 0.0)) * np.linalg.norm(pattern)
    out[lo - first : hi - first + 1] = sums / (norms + 1e-12)
    return out


def _peakiness(paths: np.ndarray) -> float:
    return float(paths.max() / (np.median(paths) + 1e-12))

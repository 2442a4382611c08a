"""Telling the user's voice from the assistant's own voice coming back through the microphone,
by level, for clients that do not cancel their echo when the server does not cancel it for
them either (``s2s-server --server-aec off``; ``s2s/server/reply_echo.py`` does).

The gate measures the echo path of each session instead of assuming one. While a reply plays,
it fits how the microphone's power follows the reply's power a moment earlier: a non-negative
response over lags of 0 to ``max_lag_s`` in 20 ms steps (the delay through the network, the
client's buffers and the room, and the room's reverberation), i.e. the echo return loss per
lag. Speech is the user's when the microphone stands clearly above the echo that this estimate
expects from the reply just played: above the worst echo-to-estimate ratio seen while learning
(its 98th percentile) times ``margin``, and 40 dB under the reply no longer counts. The echo
expected is the most the path gives moved by up to 40 ms either way, since each reply plays a
little earlier or later against the pacing timeline than the last.

The same holds per frequency band (BAND_EDGES_HZ): the path's shape over the lags is the
room's, each band has its own gain, and a chunk that stands over its band's echo in at least
MIN_BANDS_OVER bands is the user's as well. A voice as loud as the echo adds only 3 dB to the
whole, well within the echo's own spread, but the two voices differ in spectrum from moment to
moment, and in the bands where the reply is quiet the user's stands 10 dB and more over it
(offline, -10 dB of echo, questions at -26 dBFS: heard in 155 of 300 turns by the whole
band's power alone, 274 with the bands).

It learns the chunks heard while the reply played, except the user's: a chunk at least
LEARN_GUARD_S away from any louder one is learned once that guard has passed. While the
estimate is young (under ``trusted_fit_s`` of echo learned), a chunk nearer to a louder one
(the user's voice, its quieter moments, or echo the estimate did not expect yet) waits
LEARN_HOLD_S, and is learned if no interruption came meanwhile, or if one came but at least
RESCUED_BEFORE_S later (a young estimate that put the echo too low took all of it for a
voice, the echo itself interrupted, and nothing was ever learned again); once the estimate is
trusted, such chunks are not learned, and what was learned while young is judged again by
the echo learned since: a voice among it is left out (REVIEW_ROWS). Learning only what the
gate already took for echo starved it: in some rooms the echo it put above itself was never
learned, the fit settled 10 dB under the real echo, and the echo alone interrupted a third of
the replies (``bench/aec_offline.py --handling server-estimate``). Whatever the fit learns
by mistake (a cough while it was young) stands far over the rest, and is left out of it: in
power, one cough 15 dB over the echo outweighed a hundred chunks of echo, moved the path 0.6 s
later, and the echo of every later reply's start interrupted it.

Until ``min_fit_s`` of echo has been learned (counted while the reply was audible: fitted from
a reply's silent start, the estimate put the echo at nothing and took it for a voice), a fixed
Geigel-style rule stands in: louder than ``ratio`` times the loudest reply audio played within
``echo_delay_s``; then, until the estimate is trusted, a voice must stand ``young_excess``
over the estimate. Everything is timed by sample positions (the reply's by the pacing
timeline, the microphone's by ``InputClock``).
Thread-safe: the session records the reply audio as it sends it, the VAD stage asks.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from functools import cache
from itertools import pairwise

import numpy as np

from s2s.pipeline.messages import Samples

BAND_EDGES_HZ = (100, 300, 500, 800, 1200, 1700, 2400, 3200, 4500, 6000, 8000)
"""The bands the echo is also measured in."""
BANDS = len(BAND_EDGES_HZ) - 1
MIN_BANDS_OVER = 2
"""Bands in which a chunk must stand over the echo to be the user's (with 1, the echo alone
interrupted 1 reply in 100 offline; with 3, a -26 dBFS voice over -10 dB of echo was heard in
60 of 100 turns, with 2, in 76; before the first fit was allowed the bands, in both cases)."""
BLOCK_S = 0.02
"""The time step of the reply's power envelope and of the echo path's lags."""
FAR_BLOCKS_KEPT = 4096
"""Reply power kept, in blocks: about 80 s."""
ROWS_KEPT = 640
"""Echo measurements (one per microphone chunk) the fit uses: about 20 s at 32 ms chunks."""
REFIT_EVERY = 16
"""New measurements between two fits (about half a second)."""
LEARN_GUARD_S = 0.3
"""A chunk this far from any moment louder than the echo is learned as soon as the guard has
passed. The user's quieter syllables around their louder ones are not echo, and learned as echo
they would raise the bar for the next interruption (each barge-in taught the gate a little of
the user's voice)."""
LEARN_HOLD_S = 1.5
"""A chunk nearer than LEARN_GUARD_S to a louder moment waits this long: a user who spoke up
has interrupted the reply by then (300 ms of speech, the VAD's report, the session's reaction),
which drops every chunk still waiting; echo that only looked louder is learned."""
RESCUED_BEFORE_S = 0.6
"""While the estimate is young, an interruption drops only the chunks waiting to be learned
that came less than this before it (the user's onset and the 300 ms of speech it takes to
interrupt); the earlier ones are learned as echo."""
LEARNED_REPLY_POWER = 1e-5
"""A measurement counts towards ``min_fit_s`` and ``trusted_fit_s`` when the reply played
louder than this (-50 dBFS) within the path's lags: the start of a reply is often silent."""
LOUDEST_BLOCKS = 5
"""The fixed rule compares with the reply's power over 100 ms."""
FLOOR_POWER = 1e-8
"""Power (-80 dBFS) under which there is no reply to speak of, and nothing to tell apart."""
PLAY_SHIFT_BLOCKS = 2
"""Each reply plays a little earlier or later against the pacing timeline than the last (up to
25 ms either way): the echo expected is the most the path gives moved by up to this many blocks
(40 ms) either way, or the echo of a syllable's onset or end, a moment off, stands over the
estimate (the echo alone interrupted 13 replies in 600 on the offline bench; none so)."""
UNHEARD_UNDER_REPLY = 1e-4
"""Sound 40 dB under the reply just played is not taken for the user, however little echo is
expected: where a syllable of the reply dies away the room rings on longer than the estimate
expects, at -60 dBFS and below, well under any voice speaking up over the reply."""
NO_BANDS = np.zeros(0)
"""The bands of a gate that does not decide by them (``EchoOptions.bands`` False)."""
AUDIBLE_ECHO_POWER = 1e-6
"""An expected echo above -60 dBFS: where the margin over the echo is calibrated (per band,
this over BANDS)."""
OUTLIER_SHARE = 0.05
"""The share of the measurements that may be left out of the fit as not echo: first those
loudest against the reply power just played, to fit the path without them; then those over
the path's echo by OUTLIER_RATIO and in this top share, to fit it again."""
OUTLIER_RATIO = 4.0
"""How far (power: 6 dB) a measurement stands over the path's echo to be left out."""
REVIEW_ROWS = 64
"""Measurements learned since the estimate is trusted (about 2 s) before those learned while
it was young are judged by them."""


@dataclass(frozen=True, slots=True)
class EchoOptions:
    ratio: float = 0.5
    """Before the echo is measured: an onset is the user's when its RMS exceeds this times the
    reply's (-6 dB, Geigel)."""
    echo_delay_s: float = 0.6
    """Before the echo is measured: how long after a reply frame is due to play its echo may
    still arrive (network, the client's jitter buffer, the sound card's buffers, a loaded
    client that plays late). Also how long after the reply ends speech may still be echo."""
    max_lag_s: float = 1.0
    """The longest echo path the estimate covers: delay plus reverberation."""
    min_fit_s: float = 1.0
    """Echo learned before the estimate is fitted and joins the fixed rule."""
    margin: float = 1.5
    """How far above the worst echo seen while learning the user's speech must stand (power:
    1.5 is 1.8 dB)."""
    min_excess: float = 2.0
    """The least excess over the expected echo (power: 3 dB), however steady the echo."""
    trusted_fit_s: float = 4.0
    """Echo learned before the estimate is trusted: until then, a voice must stand
    ``young_excess`` over it, and echo it took for a voice is learned (after LEARN_HOLD_S)."""
    young_excess: float = 4.0
    """The least excess over a young estimate's echo (power: 6 dB). From a second or two of
    echo the worst ratio is not known yet: it came out at 1 dB, and the echo stood 4 dB over
    the estimate now and then."""
    band_excess: float = 4.0
    """The least excess over a band's echo (power: 6 dB), however steady the echo there; else,
    ``margin`` times the band's worst ratio."""
    bands: bool = True
    """False: the whole band's power alone decides, and the bands are not measured. So beside
    the server's canceller, where the gate decides only while the cancellers learn and a
    reply's start settles, and where a cough got through with the bands (1 of 10 at -10 dB of
    echo on the simulated room; none in three runs before)."""
    learn: bool = True
    """False: keep the fixed rule (no estimate)."""


def rms(samples: Samples) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0


def power(samples: Samples) -> float:
    return float(np.mean(np.square(samples, dtype=np.float64))) if len(samples) else 0.0


@cache
def _band_weights(length: int, sample_rate_hz: int) -> np.ndarray:
    """The weights that sum a ``length``-sample spectrum's squared magnitudes into each band's
    mean power (Parseval, one-sided: the bands of white noise sum to its mean square; a band
    over half the rate gets nothing)."""
    frequencies = np.fft.rfftfreq(length, 1.0 / sample_rate_hz)
    masks = np.stack(
        [(frequencies >= low) & (frequencies < high) for low, high in pairwise(BAND_EDGES_HZ)],
        axis=1,
    )
    return masks.astype(np.float64) * (2.0 / (length * length))


def band_powers(samples: Samples, sample_rate_hz: int) -> np.ndarray:
    """The mean power of ``samples`` in each band (BANDS values). No window: the reply's
    blocks and the microphone's chunks are measured alike, and a taper would weigh a chunk's
    middle over its ends, which the broadband power does not."""
    if len(samples) == 0:
        return np.zeros(BANDS)
    spectrum = np.fft.rfft(np.asarray(samples, dtype=np.float64))
    return np.asarray(np.square(np.abs(spectrum)) @ _band_weights(len(samples), sample_rate_hz))


@dataclass(slots=True)
class _Heard:
    """A microphone chunk heard while the reply played, waiting to be learned as echo."""

    learn_at: float
    ends_at: float
    features: np.ndarray
    mic: float
    duration_s: float
    band_features: np.ndarray  # bands x lags
    band_mic: np.ndarray


class EchoGate:
    def __init__(self, options: EchoOptions | None = None) -> None:
        self.options = options if options is not None else EchoOptions()
        self._lags = max(1, round(self.options.max_lag_s / BLOCK_S))
        self._lock = threading.Lock()  # guards everything below
        # The reply's power envelope: block index (time // BLOCK_S) -> summed power, count.
        self._far_block = np.full(FAR_BLOCKS_KEPT, -1, dtype=np.int64)
        self._far_sum = np.zeros(FAR_BLOCKS_KEPT)
        self._far_count = np.zeros(FAR_BLOCKS_KEPT)
        bands = BANDS if self.options.bands else 0  # none measured where none decide
        self._far_bands = np.zeros((FAR_BLOCKS_KEPT, bands))  # summed power per band
        # What the microphone held while only echo could be in it: reply power per lag, and
        # the microphone's power.
        # The last column is 1: the microphone's own noise, there with or without a reply.
        self._rows = np.zeros((ROWS_KEPT, self._lags + 1))
        self._targets = np.zeros(ROWS_KEPT)
        self._band_rows = np.zeros((ROWS_KEPT, bands, self._lags))
        self._band_targets = np.zeros((ROWS_KEPT, bands))
        self._rows_seen = 0
        self._on_probation = np.zeros(ROWS_KEPT, dtype=bool)  # learned while young
        self._dropped = np.zeros(ROWS_KEPT, dtype=bool)  # found to be a voice after all
        self._learned_s = 0.0
        self._pending: deque[_Heard] = deque()  # in the order they were heard
        self._quiet_from = -math.inf  # chunks from before this wait LEARN_HOLD_S
        self._path: np.ndarray | None = None  # echo power per reply power per lag; noise
        self._response: np.ndarray | None = None  # the path, a row per shift (PLAY_SHIFT_BLOCKS)
        self._worst_ratio = 0.0
        self._band_response: np.ndarray | None = None  # echo per band: shifts x bands x lags
        self._band_noise = np.zeros(BANDS)
        self._band_excess = np.full(BANDS, math.inf)  # inf: not calibrated, never over
        self.fits = 0

    # --- the reply --------------------------------------------------------------------------

    def played(self, samples: Samples, starts_at: float, sample_rate_hz: int) -> None:
        """Reply audio that will play from ``starts_at`` (monotonic seconds) on."""
        step = max(1, round(BLOCK_S * sample_rate_hz))
        with self._lock:
            for begin in range(0, len(samples), step):
                piece = samples[begin : begin + step]
                block = math.floor((starts_at + begin / sample_rate_hz) / BLOCK_S)
                slot = block % FAR_BLOCKS_KEPT
                if self._far_block[slot] != block:
                    self._far_block[slot] = block
                    self._far_sum[slot] = 0.0
                    self._far_count[slot] = 0.0
                    self._far_bands[slot] = 0.0
                self._far_sum[slot] += power(piece) * len(piece)
                if self.options.bands:
                    self._far_bands[slot] += band_powers(piece, sample_rate_hz) * len(piece)
                self._far_count[slot] += len(piece)

    def silence_reply(self) -> None:
        """The reply stopped (interrupted): nothing of it plays any more."""
        with self._lock:
            self._far_block.fill(-1)
            if self._pending and self._learned_s < self.options.trusted_fit_s:
                interrupted_at = self._pending[-1].ends_at
                for waiting in self._pending:
                    if waiting.ends_at <= interrupted_at - RESCUED_BEFORE_S:
                        self._learn(waiting)
            self._pending.clear()  # the user spoke up: what came just before may hold them

    # --- the microphone ---------------------------------------------------------------------

    @property
    def measured(self) -> bool:
        """Whether the echo estimate (not the fixed rule) is in use."""
        with self._lock:
            return self._response is not None

    def expected_echo(self, duration_s: float, ends_at: float) -> float | None:
        """The echo power the estimate expects in a microphone chunk; None before it exists."""
        with self._lock:
            if self._response is None:
                return None
            features = self._features(ends_at - duration_s, ends_at)
            return float(np.max(self._response @ features))

    def louder_than_echo(
        self, samples: Samples, received_at: float, sample_rate_hz: int = 16_000
    ) -> bool:
        """Whether this microphone chunk, spoken up to ``received_at``, stands above the
        reply's echo. A chunk that does not is echo (or silence) and refines the estimate."""
        mic = power(samples)
        band_mic = band_powers(samples, sample_rate_hz) if self.options.bands else NO_BANDS
        starts_at = received_at - len(samples) / sample_rate_hz
        with self._lock:
            features = self._features(starts_at, received_at)
            band_features = NO_BANDS
            if self.options.bands:
                band_features = self._band_features(starts_at, received_at)
            loudest = self._loudest(starts_at, received_at)
            if self._response is None:
                louder = mic > self.options.ratio**2 * loudest
            else:
                expected = float(np.max(self._response @ features))
                least = self.options.min_excess
                if self._learned_s < self.options.trusted_fit_s:
                    least = self.options.young_excess
                excess = max(least, self.options.margin * self._worst_ratio)
                floor = max(FLOOR_POWER, UNHEARD_UNDER_REPLY * loudest)
                louder = mic > excess * expected + floor
                if not louder and self.options.bands:
                    louder = self._bands_over(band_mic, band_features, floor) >= MIN_BANDS_OVER
            if self.options.learn:
                heard = _Heard(0.0, received_at, features, mic, 0.0, band_features, band_mic)
                self._guarded_learn(louder, heard, starts_at)
        return louder

    def reply_playing(self, since: float, now: float) -> bool:
        """Whether reply audio was playing (or its echo could still arrive) in [since, now]."""
        with self._lock:
            return self._loudest(since, now) > 0.0

    # --- inside, under the lock ---------------------------------------------------------------

    def _block_power(self, first: int, last: int) -> np.ndarray:
        """The reply's power per block, blocks ``first`` to ``last`` inclusive."""
        blocks = np.arange(first, last + 1)
        slots = blocks % FAR_BLOCKS_KEPT
        known = self._far_block[slots] == blocks
        counts = np.where(known, self._far_count[slots], 1.0)
        return np.where(known, self._far_sum[slots] / np.maximum(counts, 1.0), 0.0)

    def _loudest(self, since: float, now: float) -> float:
        """The loudest reply power, over 100 ms, that played in [since - echo_delay_s, now]."""
        first = math.floor((since - self.options.echo_delay_s) / BLOCK_S)
        envelope = self._block_power(first - LOUDEST_BLOCKS + 1, math.floor(now / BLOCK_S))
        return float(np.convolve(envelope, np.ones(LOUDEST_BLOCKS) / LOUDEST_BLOCKS, "valid").max())

    def _band_block_power(self, first: int, last: int) -> np.ndarray:
        """The reply's power per block and band, blocks ``first`` to ``last`` inclusive."""
        blocks = np.arange(first, last + 1)
        slots = blocks % FAR_BLOCKS_KEPT
        known = self._far_block[slots] == blocks
        means = self._far_bands[slots] / np.maximum(self._far_count[slots], 1.0)[:, None]
        return np.where(known[:, None], means, 0.0)

    def _lagged(self, envelope: np.ndarray, width: int) -> np.ndarray:
        """Means of ``width`` blocks of an envelope (blocks first, oldest first) ending at its
        last block, then one block earlier, ...: one row per lag."""
        sums = np.concatenate([np.zeros((1, *envelope.shape[1:])), np.cumsum(envelope, axis=0)])
        ends = np.arange(len(envelope), len(envelope) - self._lags, -1)  # lag 0, 1, ...
        return np.asarray((sums[ends] - sums[ends - width]) / width)

    def _features(self, starts_at: float, ends_at: float) -> np.ndarray:
        """The reply's mean power over [starts_at, ends_at] moved back by each lag, then 1."""
        first, last = math.floor(starts_at / BLOCK_S), math.floor(ends_at / BLOCK_S)
        envelope = self._block_power(first - self._lags + 1, last)
        return np.append(self._lagged(envelope, last - first + 1), 1.0)

    def _band_features(self, starts_at: float, ends_at: float) -> np.ndarray:
        """Per band (rows), the reply's mean power over [starts_at, ends_at] moved back by
        each lag (columns)."""
        first, last = math.floor(starts_at / BLOCK_S), math.floor(ends_at / BLOCK_S)
        envelope = self._band_block_power(first - self._lags + 1, last)
        return self._lagged(envelope, last - first + 1).T

    def _bands_over(self, band_mic: np.ndarray, band_features: np.ndarray, floor: float) -> int:
        """In how many bands the chunk stands over the echo expected there."""
        if self._band_response is None:
            return 0
        echo = np.einsum("sbl,bl->sb", self._band_response, band_features).max(axis=0)
        calibrated = np.isfinite(self._band_excess)
        excess = np.where(calibrated, self._band_excess, 0.0)  # inf x 0 would be nan
        bar = np.where(calibrated, excess * (echo + self._band_noise) + floor / BANDS, math.inf)
        return int(np.count_nonzero(band_mic > bar))

    def _guarded_learn(self, louder: bool, heard: _Heard, starts_at: float) -> None:
        """Learn the chunks heard while the reply played: after LEARN_GUARD_S those away from
        any louder moment; the others, while the estimate is young, after LEARN_HOLD_S (unless
        an interruption came), and once it is trusted, never."""
        ends_at = heard.ends_at
        hold_s = LEARN_HOLD_S if self._learned_s < self.options.trusted_fit_s else math.inf
        if louder:
            for waiting in reversed(self._pending):
                if waiting.ends_at <= starts_at - LEARN_GUARD_S:
                    break
                waiting.learn_at = waiting.ends_at + hold_s
            self._quiet_from = ends_at + LEARN_GUARD_S
        if heard.features[:-1].sum() > FLOOR_POWER:
            wait_s = hold_s if starts_at < self._quiet_from else LEARN_GUARD_S
            heard.learn_at = ends_at + wait_s
            heard.duration_s = ends_at - starts_at
            self._pending.append(heard)
        if self._pending and min(waiting.learn_at for waiting in self._pending) <= ends_at:
            kept: deque[_Heard] = deque()
            for waiting in self._pending:
                if waiting.learn_at <= ends_at:
                    self._learn(waiting)
                elif waiting.learn_at < math.inf:
                    kept.append(waiting)
            self._pending = kept

    def _learn(self, heard: _Heard) -> None:
        row = self._rows_seen % ROWS_KEPT
        self._rows[row] = heard.features
        self._targets[row] = heard.mic
        self._on_probation[row] = self._learned_s < self.options.trusted_fit_s
        self._dropped[row] = False
        if self.options.bands:
            self._band_rows[row] = heard.band_features
            self._band_targets[row] = heard.band_mic
        self._rows_seen += 1
        if heard.features[:-1].max() > LEARNED_REPLY_POWER:
            self._learned_s += heard.duration_s
        if self._learned_s >= self.options.min_fit_s and self._rows_seen % REFIT_EVERY == 0:
            self._fit()

    def _fit(self) -> None:
        count = min(self._rows_seen, ROWS_KEPT)
        kept = ~self._dropped[:count]
        if self._learned_s >= self.options.trusted_fit_s:
            kept &= ~self._voices_on_probation(count, kept)
            self._dropped[:count] = ~kept
        rows, targets = self._rows[:count][kept], self._targets[:count][kept]
        echo = self._echo_only(rows, targets)
        self._path = non_negative_least_squares(rows[echo], targets[echo])
        self._response = shifted(self._path, PLAY_SHIFT_BLOCKS)
        expected = np.max(rows @ self._response.T, axis=1)
        # Calibrated over every measurement, those left out of the fit too: a cough among
        # them raises the bar for a while, echo that stood over the rest would have lowered
        # it (and come back to stand over it). And where an echo is expected at all: in the
        # reply's pauses the expected echo is next to nothing, and any ratio there (room noise
        # over almost nothing) says nothing about how far above the echo a user must stand.
        audible = expected > AUDIBLE_ECHO_POWER
        if audible.sum() >= REFIT_EVERY:
            self._worst_ratio = float(np.quantile(targets[audible] / expected[audible], 0.98))
        if self.options.bands:
            self._fit_bands(self._band_rows[:count][kept], self._band_targets[:count][kept], echo)
        self.fits += 1

    def _voices_on_probation(self, count: int, kept: np.ndarray) -> np.ndarray:
        """Which measurements learned while the estimate was young stand over the echo as a
        voice would, judged by the bar of those learned since it is trusted (REVIEW_ROWS of
        them at least): a user who spoke up in the first second of the first reply, before
        the estimate could tell them from the echo, was learned as echo, and raised the bar
        for the next twenty seconds. ``kept``: the first ``count`` measurements not yet left
        out."""
        rows, targets = self._rows[:count], self._targets[:count]
        trusted = kept & ~self._on_probation[:count]
        if self._response is None or trusted.sum() < REVIEW_ROWS:
            return np.zeros(count, dtype=bool)
        expected = np.max(rows @ self._response.T, axis=1)
        audible = expected > AUDIBLE_ECHO_POWER
        if (trusted & audible).sum() < REVIEW_ROWS:
            return np.zeros(count, dtype=bool)
        ratios = targets / np.maximum(expected, FLOOR_POWER)
        worst = float(np.quantile(ratios[trusted & audible], 0.98))
        bar = max(self.options.min_excess, self.options.margin * worst)
        return np.asarray(kept & self._on_probation[:count] & audible & (ratios > bar))

    def _echo_only(self, rows: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Which measurements to fit: all but the few that stand far over the echo (see
        OUTLIER_SHARE)."""
        crude = targets / np.maximum(rows[:, :-1].sum(axis=1), FLOOR_POWER)
        first = crude <= np.quantile(crude, 1.0 - OUTLIER_SHARE)
        path = non_negative_least_squares(rows[first], targets[first])
        expected = np.max(rows @ shifted(path, PLAY_SHIFT_BLOCKS).T, axis=1)
        ratios = targets / np.maximum(expected, FLOOR_POWER)
        return np.asarray(
            ratios <= max(OUTLIER_RATIO, float(np.quantile(ratios, 1.0 - OUTLIER_SHARE)))
        )

    def _fit_bands(self, rows: np.ndarray, targets: np.ndarray, echo: np.ndarray) -> None:
        """Each band's gain and noise floor on the path's shape (fitted on the measurements
        ``echo`` keeps), and its worst ratio (over all). Fitted per band over every lag, a
        second of echo held too few measurements for 51 unknowns, and the fit put the echo of
        the next loud syllable up to 28 dB too low."""
        assert self._path is not None and self._response is not None
        shape = self._path[:-1]
        gains, noise = np.zeros(BANDS), np.zeros(BANDS)
        for band in range(BANDS):
            echo_rows = rows[echo, band, :]
            columns = np.stack([echo_rows @ shape, np.ones(len(echo_rows))], axis=1)
            # Scaled alike: the echo column's values are a millionth of the noise column's.
            scale = np.sqrt(np.mean(np.square(columns), axis=0))
            scale[scale == 0.0] = 1.0
            gains[band], noise[band] = (
                non_negative_least_squares(columns / scale, targets[echo, band]) / scale
            )
        self._band_response = self._response[:, None, :-1] * gains[None, :, None]
        self._band_noise = noise
        expected = np.einsum("sbl,rbl->rsb", self._band_response, rows).max(axis=1) + noise
        excess = np.full(BANDS, math.inf)
        for band in range(BANDS):
            audible = expected[:, band] > AUDIBLE_ECHO_POWER / BANDS
            if audible.sum() >= REFIT_EVERY:
                worst = float(np.quantile(targets[audible, band] / expected[audible, band], 0.98))
                excess[band] = max(self.options.band_excess, self.options.margin * worst)
        self._band_excess = excess


def shifted(response: np.ndarray, blocks: int) -> np.ndarray:
    """The path (lags, then the noise floor) moved by -blocks to +blocks lags, a row each."""
    paths = np.zeros((2 * blocks + 1, len(response)))
    lags = len(response) - 1
    for row, shift in enumerate(range(-blocks, blocks + 1)):
        source = response[max(0, -shift) : lags - max(0, shift)]
        paths[row, max(0, shift) : max(0, shift) + len(source)] = source
        paths[row, -1] = response[-1]
    return paths


def non_negative_least_squares(
    rows: np.ndarray, targets: np.ndarray, rounds: int = 8
) -> np.ndarray:
    """Least squares with every coefficient >= 0, by dropping negative ones and solving again
    (an echo path adds energy at each lag, it never takes it away). A little ridge keeps lags
    the reply never exercised at zero rather than at noise. The ridge is scaled by the columns
    other than the last (the constant 1 of the noise floor, far larger than a reply's power:
    scaled by it, the ridge outweighed the data and flattened the path)."""
    lags = rows.shape[1]
    active = np.ones(lags, dtype=bool)
    solution = np.zeros(lags)
    scale = float(np.mean(np.square(rows[:, :-1] if lags > 1 else rows))) or 1.0
    for _ in range(rounds):
        if not active.any():
            break
        chosen = rows[:, active]
        gram = chosen.T @ chosen + 1e-3 * scale * len(rows) * np.eye(int(active.sum()))
        solution = np.zeros(lags)
        solution[active] = np.linalg.solve(gram, chosen.T @ targets)
        negative = solution < 0
        if not negative.any():
            break
        active &= ~negative
        solution[negative] = 0.0
    return np.maximum(solution, 0.0)

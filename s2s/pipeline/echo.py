"""Telling the user's voice from the assistant's own voice coming back through the microphone,
by level, for clients that do not cancel their echo when the server does not cancel it for
them either (``s2s-server --server-aec off``; ``s2s/server/reply_echo.py`` does).

The gate measures the echo path of each session instead of assuming one. While a reply plays
and the microphone holds no more than echo, it fits how the microphone's power follows the
reply's power a moment earlier: a non-negative response over lags of 0 to ``max_lag_s`` in
20 ms steps (the delay through the network, the client's buffers and the room, and the room's
reverberation), i.e. the echo return loss per lag. Speech is the user's when the microphone
stands clearly above the echo that this estimate expects from the reply just played: above
the worst echo-to-estimate ratio seen while learning (its 98th percentile) times ``margin``.
It learns only from chunks at least LEARN_GUARD_S away from any louder one, so that the
quieter moments of a user talking over the reply are not taken for echo.

Until enough echo has been measured (``min_fit_s`` of reply playing), a fixed Geigel-style
rule stands in: louder than ``ratio`` times the loudest reply audio played within
``echo_delay_s``; from ``provisional_fit_s`` on, a provisional fit joins it, with a wider
margin (``provisional_excess``): a voice at a normal level stands below the fixed rule, and a
user who speaks up in the first second of the session's first reply would go unheard.
Everything is timed by sample positions (the reply's by the pacing timeline,
the microphone's by ``InputClock``). Thread-safe: the session records the reply audio as it
sends it, the VAD stage asks.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from s2s.pipeline.messages import Samples

BLOCK_S = 0.02
"""The time step of the reply's power envelope and of the echo path's lags."""
FAR_BLOCKS_KEPT = 4096
"""Reply power kept, in blocks: about 80 s."""
ROWS_KEPT = 640
"""Echo measurements (one per microphone chunk) the fit uses: about 20 s at 32 ms chunks."""
REFIT_EVERY = 16
"""New measurements between two fits (about half a second)."""
PROVISIONAL_REFIT_EVERY = 4
"""New measurements between two provisional fits (about 130 ms: it has little time)."""
LEARN_GUARD_S = 0.3
"""Echo is learned only this far from any moment louder than the echo: the user's quieter
syllables around their louder ones are not echo, and learned as echo they would raise the bar
for the next interruption (each barge-in taught the gate a little of the user's voice)."""
LOUDEST_BLOCKS = 5
"""The fixed rule compares with the reply's power over 100 ms."""
FLOOR_POWER = 1e-8
"""Power (-80 dBFS) under which there is no reply to speak of, and nothing to tell apart."""
AUDIBLE_ECHO_POWER = 1e-6
"""An expected echo above -60 dBFS: where the margin over the echo is calibrated."""


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
    """Reply playing with the microphone holding only echo, before the estimate is used. At
    2 s, a user as loud as the reply who spoke 1 s into the session's first reply was heard
    only ~900 ms after their onset under the fixed rule, or (on a loaded machine) not at all;
    at 0.5 s, the early estimate once took echo for the user on the simulated room."""
    margin: float = 1.5
    """How far above the worst echo seen while learning the user's speech must stand (power:
    1.5 is 1.8 dB)."""
    min_excess: float = 2.0
    """The least excess over the expected echo (power: 3 dB), however steady the echo."""
    provisional_fit_s: float = 0.4
    """Echo measured before a provisional estimate joins the fixed rule (until min_fit_s)."""
    provisional_excess: float = 4.0
    """How far above the provisional estimate's echo a voice must stand (power: 6 dB; from
    a few hundred ms of echo, its worst ratio is not known yet)."""
    learn: bool = True
    """False: keep the fixed rule (no estimate)."""


def rms(samples: Samples) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0


def power(samples: Samples) -> float:
    return float(np.mean(np.square(samples, dtype=np.float64))) if len(samples) else 0.0


class EchoGate:
    def __init__(self, options: EchoOptions | None = None) -> None:
        self.options = options if options is not None else EchoOptions()
        self._lags = max(1, round(self.options.max_lag_s / BLOCK_S))
        self._lock = threading.Lock()  # guards everything below
        # The reply's power envelope: block index (time // BLOCK_S) -> summed power, count.
        self._far_block = np.full(FAR_BLOCKS_KEPT, -1, dtype=np.int64)
        self._far_sum = np.zeros(FAR_BLOCKS_KEPT)
        self._far_count = np.zeros(FAR_BLOCKS_KEPT)
        # What the microphone held while only echo could be in it: reply power per lag, and
        # the microphone's power.
        # The last column is 1: the microphone's own noise, there with or without a reply.
        self._rows = np.zeros((ROWS_KEPT, self._lags + 1))
        self._targets = np.zeros(ROWS_KEPT)
        self._rows_seen = 0
        self._learned_s = 0.0
        # Measurements waiting out LEARN_GUARD_S: (ends_at, features, microphone power, s).
        self._pending: deque[tuple[float, np.ndarray, float, float]] = deque()
        self._quiet_from = -math.inf  # no learning before this (just after a louder moment)
        self._response: np.ndarray | None = None  # echo power per reply power per lag; noise
        self._provisional: np.ndarray | None = None  # the same, from less than min_fit_s
        self._worst_ratio = 0.0
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
                self._far_sum[slot] += power(piece) * len(piece)
                self._far_count[slot] += len(piece)

    def silence_reply(self) -> None:
        """The reply stopped (interrupted): nothing of it plays any more."""
        with self._lock:
            self._far_block.fill(-1)
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
            return float(self._response @ self._features(ends_at - duration_s, ends_at))

    def louder_than_echo(
        self, samples: Samples, received_at: float, sample_rate_hz: int = 16_000
    ) -> bool:
        """Whether this microphone chunk, spoken up to ``received_at``, stands above the
        reply's echo. A chunk that does not is echo (or silence) and refines the estimate."""
        mic = power(samples)
        starts_at = received_at - len(samples) / sample_rate_hz
        with self._lock:
            features = self._features(starts_at, received_at)
            if self._response is None:
                louder = mic > self.options.ratio**2 * self._loudest(starts_at, received_at)
                if self._provisional is not None:
                    expected = float(self._provisional @ features)
                    louder |= mic > self.options.provisional_excess * expected + FLOOR_POWER
            else:
                expected = float(self._response @ features)
                excess = max(self.options.min_excess, self.options.margin * self._worst_ratio)
                louder = mic > excess * expected + FLOOR_POWER
            if self.options.learn:
                self._guarded_learn(louder, features, mic, starts_at, received_at)
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

    def _features(self, starts_at: float, ends_at: float) -> np.ndarray:
        """The reply's mean power over [starts_at, ends_at] moved back by each lag, then 1."""
        first, last = math.floor(starts_at / BLOCK_S), math.floor(ends_at / BLOCK_S)
        envelope = self._block_power(first - self._lags + 1, last)
        width = last - first + 1
        sums = np.concatenate([[0.0], np.cumsum(envelope)])
        ends = np.arange(len(envelope), len(envelope) - self._lags, -1)  # lag 0, 1, ...
        return np.append((sums[ends] - sums[ends - width]) / width, 1.0)

    def _guarded_learn(
        self, louder: bool, features: np.ndarray, mic: float, starts_at: float, ends_at: float
    ) -> None:
        """Learn the chunks that hold only echo: not louder than it, and not within
        LEARN_GUARD_S of a chunk that was."""
        if louder:
            while self._pending and self._pending[-1][0] > starts_at - LEARN_GUARD_S:
                self._pending.pop()
            self._quiet_from = ends_at + LEARN_GUARD_S
        elif starts_at >= self._quiet_from and features[:-1].sum() > FLOOR_POWER:
            self._pending.append((ends_at, features, mic, ends_at - starts_at))
        while self._pending and self._pending[0][0] <= ends_at - LEARN_GUARD_S:
            _, old_features, old_mic, duration_s = self._pending.popleft()
            self._learn(old_features, old_mic, duration_s)

    def _learn(self, features: np.ndarray, mic: float, duration_s: float) -> None:
        row = self._rows_seen % ROWS_KEPT
        self._rows[row] = features
        self._targets[row] = mic
        self._rows_seen += 1
        self._learned_s += duration_s
        if self._learned_s >= self.options.min_fit_s:
            if self._rows_seen % REFIT_EVERY == 0:
                self._fit()
        elif (
            self._learned_s >= self.options.provisional_fit_s
            and self._rows_seen % PROVISIONAL_REFIT_EVERY == 0
        ):
            self._provisional = non_negative_least_squares(*self._learned())

    def _learned(self) -> tuple[np.ndarray, np.ndarray]:
        """The echo measurements kept: reply power per lag (and 1), microphone power."""
        count = min(self._rows_seen, ROWS_KEPT)
        return self._rows[:count], self._targets[:count]

    def _fit(self) -> None:
        rows, targets = self._learned()
        response = non_negative_least_squares(rows, targets)
        expected = rows @ response
        self._response = response
        # Calibrated where an echo is expected at all: in the reply's pauses the expected echo
        # is next to nothing, and any ratio there (room noise over almost nothing) says
        # nothing about how far above the echo a user must stand.
        audible = expected > AUDIBLE_ECHO_POWER
        if audible.sum() >= REFIT_EVERY:
            self._worst_ratio = float(np.quantile(targets[audible] / expected[audible], 0.98))
        self.fits += 1


def non_negative_least_squares(
    rows: np.ndarray, targets: np.ndarray, rounds: int = 8
) -> np.ndarray:
    """Least squares with every coefficient >= 0, by dropping negative ones and solving again
    (an echo path adds energy at each lag, it never takes it away). A little ridge keeps lags
    the reply never exercised at zero rather than at noise."""
    lags = rows.shape[1]
    active = np.ones(lags, dtype=bool)
    solution = np.zeros(lags)
    scale = float(np.mean(np.square(rows))) or 1.0
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

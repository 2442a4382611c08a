"""When each microphone sample was spoken, on the server's clock, from the samples' own positions.

Audio arrives in bursts: Wi-Fi holds packets back and then delivers them at once, an uplink
stalls for a few hundred milliseconds. Timing speech by arrival would stretch a stall into
silence and squeeze a burst of 300 ms of speech into a few milliseconds. The client captures
in real time, so sample ``i`` was spoken ``i / rate`` after sample 0; only the offset between the
two clocks is unknown. Each chunk bounds it from above (it cannot have arrived before it was
spoken), and the smallest bound seen recently is the least-delayed arrival: that is the offset.
Taking it over a sliding window (not over the whole session) follows the small drift between
the client's sound card and the server's clock.
"""

from __future__ import annotations

from collections import deque

OFFSET_WINDOW_S = 10.0
"""How far back the least-delayed arrival is looked for: longer than any stall worth
absorbing, short enough that sound-card drift (about 0.01%) stays under a millisecond."""


class InputClock:
    """Maps input sample positions to monotonic seconds. Not thread-safe (the VAD stage's)."""

    def __init__(self, sample_rate_hz: int, window_s: float = OFFSET_WINDOW_S) -> None:
        self._rate = sample_rate_hz
        self._window_s = window_s
        # (arrival, offset) with offsets increasing from left to right: the left one is the
        # minimum of the window (a monotonic queue; each entry enters and leaves once).
        self._candidates: deque[tuple[float, float]] = deque()

    def observe(self, end_sample_index: int, received_at: float) -> None:
        """Samples up to ``end_sample_index`` (exclusive) had arrived at ``received_at``."""
        offset = received_at - end_sample_index / self._rate
        while self._candidates and self._candidates[-1][1] >= offset:
            self._candidates.pop()
        self._candidates.append((received_at, offset))
        while self._candidates[0][0] < received_at - self._window_s:
            self._candidates.popleft()

    def time_of(self, sample_index: int) -> float:
        """When sample ``sample_index`` was spoken, as the server's monotonic clock reads
        (plus the least network delay seen). ``observe`` must have been called."""
        return self._candidates[0][1] + sample_index / self._rate

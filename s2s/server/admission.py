"""Admission of a session's input: audio may arrive faster than real time only in a short
burst (a network hiccup caught up), not as a flood. Pure: times are passed in."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AudioBudget:
    rate: float = 1.5
    """Sustained audio accepted, as a multiple of real time."""
    burst_s: float = 2.0
    """Audio that may arrive at once beyond that rate."""


class AudioMeter:
    """A token bucket of audio seconds: refilled at ``rate`` per second of wall time, up
    to ``burst_s``; each frame spends its duration."""

    def __init__(self, budget: AudioBudget, now: float) -> None:
        self._budget = budget
        self._tokens_s = budget.burst_s
        self._at = now

    def admit(self, duration_s: float, now: float) -> bool:
        """Spend ``duration_s`` of audio arriving at ``now``; False: over the budget."""
        elapsed = max(0.0, now - self._at)
        self._at = now
        self._tokens_s = min(self._budget.burst_s, self._tokens_s + elapsed * self._budget.rate)
        self._tokens_s -= duration_s
        return self._tokens_s >= 0.0

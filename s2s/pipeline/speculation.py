"""Scheduling between sessions: when a session may speculate (start its reply at a pause,
before the turn is confirmed), and first chunks before the rest of other replies.

Speculative work must never take model time from another session's confirmed turn. The
policy is shared by every session of a server: while any session's confirmed reply is being
generated, no session starts a speculative one (it switches itself back on as soon as the
model is free of confirmed work).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class SpeculationPolicy:
    """Thread-safe; shared by all sessions of a server. ``enabled=False``: never speculate."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._busy_lock = threading.Lock()  # guards _confirmed_busy and the counters
        self._confirmed_busy = 0
        self.skipped_under_load = 0
        """Pauses where speculation was switched off because confirmed work was running."""

    @contextmanager
    def confirmed_work(self) -> Iterator[None]:
        """Wraps the generation of a confirmed (not speculative) reply."""
        with self._busy_lock:
            self._confirmed_busy += 1
        try:
            yield
        finally:
            with self._busy_lock:
                self._confirmed_busy -= 1

    def allows(self) -> bool:
        """May a session speculate now?"""
        with self._busy_lock:
            allowed = self.enabled and self._confirmed_busy == 0
            if self.enabled and not allowed:
                self.skipped_under_load += 1
            return allowed


MAX_YIELD_S = 0.25
"""Longest a continuation step waits for other sessions' first chunks (it then goes on, so
nothing starves; a reply's later chunks are needed only once its first has played)."""


class FirstChunkPriority:
    """Server-wide: a turn still waiting for its first speakable chunk or first audio comes
    before the rest of other sessions' replies (which run far ahead of their playback).

    Urgent work is bracketed by ``begin()`` and the callable it returns; continuation work
    calls ``yield_to_urgent()`` between steps. Thread-safe.
    """

    def __init__(self, max_yield_s: float = MAX_YIELD_S) -> None:
        self._max_yield_s = max_yield_s
        self._urgent_changed = threading.Condition()
        self._urgent = 0
        self.yields = 0
        """Continuation steps that waited (for metrics and tests)."""

    def begin(self) -> Callable[[], None]:
        """Mark urgent work; the returned callable ends it (idempotent)."""
        with self._urgent_changed:
            self._urgent += 1
        ended = False

        def end() -> None:
            nonlocal ended
            with self._urgent_changed:
                if not ended:
                    ended = True
                    self._urgent -= 1
                    self._urgent_changed.notify_all()

        return end

    def yield_to_urgent(self) -> None:
        """Wait while any urgent work runs, at most ``max_yield_s``."""
        with self._urgent_changed:
            if self._urgent:
                self.yields += 1
                self._urgent_changed.wait_for(lambda: self._urgent == 0, self._max_yield_s)

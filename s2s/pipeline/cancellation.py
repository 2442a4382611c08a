"""Turn cancellation: one generation counter per session, under a lock.

Every item carries the generation it was made in. ``advance()`` moves the session to a new
generation, which makes every item of the old one stale: stages drop them on sight, and long
calls (a model's ``generate``) poll ``is_stale`` through a stopping criterion, so they end
within one step. ``close()`` makes everything stale for good, for shutdown.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class TurnCancellation:
    """A session's generation counter. Thread-safe; every method is non-blocking."""

    def __init__(self) -> None:
        self._generation_lock = threading.Lock()
        self._generation = 0
        self._closed = False

    @property
    def generation(self) -> int:
        with self._generation_lock:
            return self._generation

    @property
    def closed(self) -> bool:
        with self._generation_lock:
            return self._closed

    def advance(self) -> int:
        """Abandon all work of the current generation; return the new generation."""
        with self._generation_lock:
            self._generation += 1
            return self._generation

    def close(self) -> None:
        """Make every generation stale, now and later (shutdown). Idempotent."""
        with self._generation_lock:
            self._closed = True
            self._generation += 1

    def is_stale(self, generation: int) -> bool:
        with self._generation_lock:
            return self._closed or generation != self._generation

    def stop_check(self, generation: int) -> Callable[[], bool]:
        """A zero-argument predicate for loops and stopping criteria: True once stale."""
        return lambda: self.is_stale(generation)

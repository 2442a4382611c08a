"""When a session may speculate: start its reply at a pause, before the turn is confirmed.

Speculative work must never take model time from another session's confirmed turn. The
policy is shared by every session of a server: while any session's confirmed reply is being
generated, no session starts a speculative one (it switches itself back on as soon as the
model is free of confirmed work).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
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

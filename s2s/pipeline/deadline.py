"""One monotonic deadline shared by the steps of a shutdown."""

from __future__ import annotations

import time


class Deadline:
    """``timeout_s`` from now; every wait in a sequence takes ``remaining_s()`` of it."""

    def __init__(self, timeout_s: float) -> None:
        self._expires_at = time.monotonic() + timeout_s

    def remaining_s(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self._expires_at - time.monotonic())

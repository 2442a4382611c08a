"""Fair turn-taking for a model that serves one caller at a time.

Sessions share such a model (transformers, Parler) by taking it for one short step (a decoding
step, a sentence) and handing it back, in arrival order: a long reply can never hold it across
another session's first token, because the waiting session is served before the long reply's
next step.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class TakeTurns:
    """A first-come, first-served lock. ``step()`` is a context manager for one step.

    Unlike ``threading.Lock``, a thread that releases and at once asks again queues behind
    every thread that was already waiting. Safe from any thread.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._condition = threading.Condition()
        self._queue: deque[object] = deque()  # tickets, head holds the model

    @contextmanager
    def step(self) -> Iterator[None]:
        ticket = object()
        with self._condition:
            self._queue.append(ticket)
            while self._queue[0] is not ticket:
                self._condition.wait()
        try:
            yield
        finally:
            with self._condition:
                self._queue.popleft()
                self._condition.notify_all()

"""Stopping a model call that cannot poll ``should_stop`` itself (a blocked socket read, one
ONNX run): a watcher thread polls for it and acts from outside the call."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

POLL_S = 0.02
"""How often the watcher asks: a cancelled call ends within about this long."""


@contextlib.contextmanager
def act_when_stopped(
    should_stop: Callable[[], bool], act: Callable[[], None], name: str
) -> Iterator[None]:
    """While the block runs, call ``act`` once (from the watcher's thread) as soon as
    ``should_stop()`` is True. The watcher is joined when the block ends."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(POLL_S):
            if should_stop():
                act()
                return

    watcher = threading.Thread(target=watch, name=name, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        # Bounded: should_stop may wait briefly (an LLM reply yielding to others' first chunks).
        watcher.join(1.0)

"""The interrupt key: Enter on the terminal stops the assistant's reply. Its thread waits on
stdin and on a wake pipe together, so ``close()`` ends it at once."""

from __future__ import annotations

import os
import selectors
import sys
import threading
from collections.abc import Callable


class InterruptKey:
    def __init__(self, on_press: Callable[[], None]) -> None:
        self._on_press = on_press
        self._wake_read, self._wake_write = os.pipe()
        self._thread = threading.Thread(target=self._run, name="interrupt-key")

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(sys.stdin, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            while True:
                ready = [key.fileobj for key, _ in selector.select()]
                if self._wake_read in ready:
                    return
                if not sys.stdin.readline():
                    return  # stdin closed
                self._on_press()

    def close(self) -> None:
        """Stop waiting for the key; joins the thread. Idempotent."""
        if self._wake_write >= 0:
            os.write(self._wake_write, b"x")
        if self._thread.is_alive():
            self._thread.join(0.2)
        for fd in (self._wake_read, self._wake_write):
            if fd >= 0:
                os.close(fd)
        self._wake_read = self._wake_write = -1

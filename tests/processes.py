"""Real processes for the end-to-end tests: the server and client console scripts."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
STARTUP_BOUND_S = 180.0
"""Generous: loading and warming the CPU models takes ~10 s here."""
HANG_BOUND_S = 2.0
"""The bound a client's Ctrl+C or SIGTERM test allows (the promise is 0.5 s: 4x)."""
SERVER_EXIT_BOUND_S = 4.0
"""The bound a server's SIGTERM or SIGINT test allows: 2x its promise of 2 s, so a loaded CI
machine does not turn a clean exit into a failure; each test prints the time it measured."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Process:
    """A console script with stdout and stderr each drained by a thread as it writes (a chatty
    process never blocks on a full pipe); stdout is also offered line by line."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, stdin: int | None = None
    ) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            args,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._stderr_lines: list[str] = []
        self._stderr_changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="stdout-reader", daemon=True)
        self._reader.start()
        self._stderr_reader = threading.Thread(
            target=self._read_stderr, name="stderr-reader", daemon=True
        )
        self._stderr_reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._stderr_changed:
                self._stderr_lines.append(line)
                self._stderr_changed.notify_all()

    def wait_for_stderr(self, predicate: Any, timeout_s: float) -> str:
        """The first stderr line for which ``predicate(line)`` holds; fails on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._stderr_changed:
            while True:
                for line in self._stderr_lines:
                    if predicate(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or not self._stderr_reader.is_alive():
                    raise AssertionError(
                        f"{self.args[0]}: no such stderr line in {timeout_s} s; "
                        f"saw {self._stderr_lines[-5:]}"
                    )
                self._stderr_changed.wait(min(left, 0.5))

    def wait_for(self, predicate: Any, timeout_s: float) -> str:
        """The first stdout line for which ``predicate(line)`` holds; fails on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"{self.args[0]}: nothing matched within {timeout_s} s; saw {self.seen[-5:]}"
                ) from None
            if line is None:
                raise AssertionError(f"{self.args[0]} exited ({self.proc.wait()}): {self.stderr()}")
            self.seen.append(line)
            if predicate(line):
                return line

    def wait_for_event(self, kind: str, timeout_s: float) -> dict[str, Any]:
        line = self.wait_for(
            lambda line: line.startswith("{") and json.loads(line).get("type") == kind, timeout_s
        )
        event: dict[str, Any] = json.loads(line)
        return event

    def events(self) -> list[dict[str, Any]]:
        """Every JSON line printed so far (drains the reader)."""
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.seen.append(line)
        return [json.loads(line) for line in self.seen if line.startswith("{")]

    def signal_and_time(self, signum: int) -> tuple[int, float]:
        """Send a signal; return the exit status and the seconds it took to exit."""
        began = time.monotonic()
        self.proc.send_signal(signum)
        try:
            status = self.proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"{self.args[0]} ignored {signal.Signals(signum).name}") from None
        return status, time.monotonic() - began

    def stderr(self) -> str:
        """What the process wrote to stderr so far (all of it, once it has exited)."""
        if self.proc.poll() is not None:
            self._stderr_reader.join(5.0)
        with self._stderr_changed:
            return "".join(self._stderr_lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_server(*extra: str) -> tuple[Process, str]:
    port = free_port()
    server = Process([str(BIN / "s2s-server"), "--device", "cpu", "--port", str(port), *extra])
    server.wait_for(lambda line: "listening on" in line, STARTUP_BOUND_S)
    return server, f"ws://127.0.0.1:{port}"


def start_client(
    url: str, *extra: str, env: dict[str, str] | None = None, stdin: int | None = None
) -> Process:
    return Process([str(BIN / "s2s-client"), "--url", url, "--json", *extra], env=env, stdin=stdin)

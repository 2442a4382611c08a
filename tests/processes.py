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
"""The bound a Ctrl+C or SIGTERM test allows (the promise is 0.5 s for the client)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Process:
    """A console script with its stdout read line by line on a thread (so it never blocks)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, name="stdout-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

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
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_server(*extra: str) -> tuple[Process, str]:
    port = free_port()
    server = Process([str(BIN / "s2s-server"), "--device", "cpu", "--port", str(port), *extra])
    server.wait_for(lambda line: "listening on" in line, STARTUP_BOUND_S)
    return server, f"ws://127.0.0.1:{port}"


def start_client(url: str, *extra: str, env: dict[str, str] | None = None) -> Process:
    return Process([str(BIN / "s2s-client"), "--url", url, "--json", *extra], env=env)

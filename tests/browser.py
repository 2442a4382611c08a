"""A real headless Chromium, its microphone fed from a WAV file, driven through the DevTools
protocol (JSON over a WebSocket): enough to load a page, read its state and screenshot it."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

from tests.processes import free_port

STARTUP_BOUND_S = 30.0


def chromium() -> str | None:
    """The browser binary, if one is installed (Debian names it ``chromium``)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """One headless Chromium showing ``url``; ``close()`` ends it."""

    def __init__(self, url: str, microphone_wav: Path, profile_dir: Path) -> None:
        binary = chromium()
        assert binary is not None, "no chromium installed"
        port = free_port()
        self.process = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",  # tests run as root in a container
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                f"--user-data-dir={profile_dir}",
                f"--remote-debugging-port={port}",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={microphone_wav}%noloop",
                "--autoplay-policy=no-user-gesture-required",
                "--window-size=900,720",
                url,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._ids = itertools.count(1)
        self._devtools: ClientConnection | None = None
        self._devtools = self._attach(port)

    def _attach(self, port: int) -> ClientConnection:
        deadline = time.monotonic() + STARTUP_BOUND_S
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
                if pages:
                    # legacy=True: held open across calls, outside a with-block.
                    return connect(pages[0]["webSocketDebuggerUrl"], max_size=None, legacy=True)
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"chromium did not start: {self.stderr()}")
            time.sleep(0.2)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events that arrive meanwhile are skipped)."""
        assert self._devtools is not None
        call_id = next(self._ids)
        self._devtools.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._devtools.recv(timeout=STARTUP_BOUND_S))
            if message.get("id") == call_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return dict(message["result"])

    def evaluate(self, expression: str) -> Any:
        """A JavaScript expression's value in the page (JSON-able values only)."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, bound_s: float, every_s: float = 0.05) -> Any:
        """Poll ``expression`` until it is truthy; its value. Fails after ``bound_s``."""
        deadline = time.monotonic() + bound_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                state = self.evaluate("JSON.stringify(window.s2s)")
                raise AssertionError(f"not within {bound_s} s: {expression}; page: {state}")
            time.sleep(every_s)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def stderr(self) -> str:
        if self.process.poll() is None or self.process.stderr is None:
            return ""
        return self.process.stderr.read()[-2000:]

    def close(self) -> None:
        if self._devtools is not None:
            self._devtools.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

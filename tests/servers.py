"""An in-process s2s server on the real CPU models, serving on a thread, for socket tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from s2s.models.profiles import LoadedModels
from s2s.pipeline.pipeline import Pipeline
from s2s.server.app import S2SServer, ServerConfig
from s2s.server.assembly import build_session_pipeline
from s2s.server.session import SessionLimits

SETTLE_BOUND_S = 5.0


class Running:
    """An S2SServer serving on a thread, with the pipelines it built."""

    def __init__(
        self,
        models: LoadedModels,
        max_sessions: int = 2,
        token: str | None = None,
        build: Callable[..., Pipeline] | None = None,
        **config_changes: Any,
    ) -> None:
        """``config_changes``: ``ServerConfig`` fields other than the test defaults."""
        self.pipelines: list[Pipeline] = []
        make = build or (lambda **kwargs: build_session_pipeline(models, **kwargs))

        def build_and_keep(**kwargs: Any) -> Pipeline:
            pipeline = make(**kwargs)
            self.pipelines.append(pipeline)
            return pipeline

        config = ServerConfig(
            **{
                "port": 0,
                "max_sessions": max_sessions,
                "token": token,
                "max_frame_bytes": 64 * 1024,
                "limits": SessionLimits(handshake_timeout_s=2.0),
                **config_changes,
            }
        )
        self.server = S2SServer(config, build_and_keep, {"device": "cpu"})
        self.server.start()
        self.url = f"ws://127.0.0.1:{self.server.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="test-server")
        self._thread.start()

    def stop(self) -> None:
        assert self.server.shutdown(2.0) == []
        self._thread.join(5.0)


def settle(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + SETTLE_BOUND_S
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())

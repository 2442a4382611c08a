"""Readiness, stall detection and metrics over real HTTP and WebSocket on loopback, with a
pipeline whose one stage can be wedged at will (no models)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from s2s.models.audio import to_pcm16
from s2s.pipeline.pipeline import Pipeline
from s2s.server.app import S2SServer, ServerConfig
from s2s.server.protocol import CloseCodes
from s2s.server.session import SessionLimits
from tests.fakes import Wedged
from tests.servers import settle

STALL_AFTER_S = 0.3


class Served:
    def __init__(self, limits: SessionLimits | None = None) -> None:
        self.stage = Wedged()

        def build(**kwargs: Any) -> Pipeline:
            return Pipeline(
                [self.stage],
                deliver=kwargs["deliver"],
                on_event=kwargs["on_event"],
                session_id=kwargs["session_id"],
            )

        config = ServerConfig(
            port=0, stall_timeout_s=STALL_AFTER_S, limits=limits or SessionLimits()
        )
        self.server = S2SServer(config, build, models_info=None)  # still loading
        self.server.start()
        self.base = f"http://127.0.0.1:{self.server.port}"
        self.url = f"ws://127.0.0.1:{self.server.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="test-server")
        self._thread.start()

    def stop(self) -> None:
        self.stage.release.set()
        assert self.server.shutdown(2.0) == []
        self._thread.join(5.0)


@pytest.fixture
def served() -> Iterator[Served]:
    running = Served()
    yield running
    running.stop()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_not_ready_while_loading_then_ready(served: Served) -> None:
    assert get(f"{served.base}/readyz") == (503, "loading models\n")
    assert get(f"{served.base}/healthz") == (200, "ok\n")  # alive, only not ready
    with connect(served.url, open_timeout=5) as early, pytest.raises(ConnectionClosed) as closed:
        early.recv(timeout=5)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
        CloseCodes.TRY_AGAIN_LATER,
        "models still loading",
    )
    served.server.mark_ready({"device": "cpu"})
    assert get(f"{served.base}/readyz") == (200, "ready\n")
    _, metrics = get(f"{served.base}/metrics")
    assert 's2s_sessions_refused_total{reason="loading"} 1.0' in metrics
    assert "s2s_ready 1.0" in metrics


def test_a_wedged_stage_turns_healthz_unhealthy_until_it_moves(served: Served) -> None:
    served.server.mark_ready({"device": "cpu"})
    with connect(served.url, open_timeout=5) as client:
        hello = {"type": "hello", "protocol": 1, "input_sample_rate": 16000}
        client.send(json.dumps(hello))
        assert json.loads(client.recv(timeout=5))["type"] == "ready"
        client.send(to_pcm16(np.zeros(1600, dtype=np.float32)))
        assert served.stage.entered.wait(5.0)
        assert get(f"{served.base}/healthz") == (200, "ok\n")  # busy, not yet stalled
        time.sleep(STALL_AFTER_S * 2)
        status, text = get(f"{served.base}/healthz")
        assert status == 503
        assert text.startswith("stalled: wedged of session s1")
        served.stage.release.set()
        assert settle(lambda: get(f"{served.base}/healthz") == (200, "ok\n"))


def test_a_session_is_closed_at_the_session_length_limit() -> None:
    served = Served(SessionLimits(max_session_s=0.5))
    try:
        served.server.mark_ready({"device": "cpu"})
        with connect(served.url, open_timeout=5) as client:
            client.send(json.dumps({"type": "hello", "protocol": 1}))
            assert json.loads(client.recv(timeout=5))["type"] == "ready"
            bye = json.loads(client.recv(timeout=5))  # about 0.5 s later
            with pytest.raises(ConnectionClosed) as closed:
                client.recv(timeout=5)
    finally:
        served.stop()
    assert bye["type"] == "bye" and "session length limit" in bye["reason"]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == CloseCodes.POLICY_VIOLATION


def test_a_session_whose_audio_is_not_taken_is_closed_not_queued_forever() -> None:
    """The VAD stage is wedged: audio within the rate limit piles up in front of it until
    the bound (250 frames), then the session is closed with 1013 and the reason."""
    served = Served()
    try:
        served.server.mark_ready({"device": "cpu"})
        with connect(served.url, open_timeout=5) as client:
            client.send(json.dumps({"type": "hello", "protocol": 1}))
            assert json.loads(client.recv(timeout=5))["type"] == "ready"
            frame = to_pcm16(np.zeros(160, dtype=np.float32))  # 10 ms
            with pytest.raises(ConnectionClosed) as closed:
                for _ in range(400):  # 1.33x real time: within the audio budget
                    client.send(frame)
                    time.sleep(0.0075)
                client.recv(timeout=5)
        assert served.stage.entered.is_set()
    finally:
        served.stop()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == CloseCodes.TRY_AGAIN_LATER
    assert "not keeping up" in closed.value.rcvd.reason

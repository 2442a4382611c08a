"""Clients that misbehave must not hold up anyone else, on a real server process with real
sockets: one that stops reading its socket, one that floods audio."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from s2s.models.audio import resample, to_pcm16
from s2s.models.profiles import LoadedModels
from tests.conftest import spoken_wav
from tests.processes import SERVER_EXIT_BOUND_S, start_client, start_server

pytestmark = pytest.mark.models

SEND_TIMEOUT_S = 4.0
STORY_MADE_S = 6.0
"""After the stuck client asks: its long reply is generated and synthesised by then, so the
healthy turn measures the stuck socket's effect, not two replies sharing two cores."""
CUT_OFF_BOUND_S = 60.0
"""Generous: the reply must be made, fill the buffers, then time out."""


def question_pcm(path: Path) -> bytes:
    audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    speech = resample(audio.mean(axis=1).astype(np.float32), rate, 16_000)
    return to_pcm16(np.concatenate([speech, np.zeros(32_000, dtype=np.float32)]))


def test_a_client_that_stops_reading_is_cut_off_and_others_go_on(
    cpu_models: LoadedModels, tmp_path: Path
) -> None:
    story = spoken_wav(cpu_models, "Tell me a long story about a dragon and a knight.", tmp_path)
    question = spoken_wav(cpu_models, "What is the capital of France?", tmp_path)
    server, url = start_server(
        "--send-timeout-s",
        str(SEND_TIMEOUT_S),
        "--system-prompt",
        "You tell long, detailed stories of many sentences.",
        "--max-new-tokens",
        "200",
    )
    try:
        solo = healthy_turn(url, question)
        # The stuck client: a receive buffer of 4 KiB, a reply at 48 kHz, and no reads.
        raw = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck = connect(url, sock=raw, open_timeout=5, close_timeout=0.5, legacy=True)
        stuck.send(json.dumps({"type": "hello", "protocol": 1, "output_sample_rate": 48000}))
        pcm = question_pcm(story)
        began = time.monotonic()
        frame = 3200  # 100 ms at 16 kHz
        for index, start in enumerate(range(0, len(pcm), frame)):  # in real time
            time.sleep(max(0.0, began + index * 0.1 - time.monotonic()))
            stuck.send(pcm[start : start + frame])
        time.sleep(STORY_MADE_S)  # its reply is made; its audio now waits on a full socket
        beside = healthy_turn(url, question)
        # The stuck client is cut off, without it ever reading: its session ends.
        base = url.replace("ws://", "http://")
        cut = wait_for_metric(base, 's2s_errors_total{code="client_not_reading"}', CUT_OFF_BOUND_S)
        cut_after_s = time.monotonic() - began
        active = wait_for_metric(base, "s2s_sessions_active", 10.0, want=0.0)
        status, took = server.signal_and_time(signal.SIGTERM)
    finally:
        server.kill()
    stuck.close()
    print(
        f"healthy turn: voice-to-voice {solo['voice_to_voice_ms']} ms alone, "
        f"{beside['voice_to_voice_ms']} ms beside the stuck client; "
        f"stuck client cut off {cut_after_s:.1f} s after it asked; "
        f"SIGTERM exit {status} after {took * 1000:.0f} ms"
    )
    assert "paris" in beside["assistant_text"].lower()
    assert beside["voice_to_voice_ms"] <= 2 * solo["voice_to_voice_ms"]
    assert cut == 1.0 and active == 0.0
    assert status == 0 and took < SERVER_EXIT_BOUND_S, server.stderr()
    assert "cutting off" in server.stderr()


def healthy_turn(url: str, question: Path) -> dict[str, Any]:
    client = start_client(url, "--file", str(question))
    assert client.proc.wait(timeout=120) == 0, client.stderr()
    [turn] = [e for e in client.events() if e["type"] == "turn"]
    return turn


def wait_for_metric(base: str, name: str, bound_s: float, want: float | None = None) -> float:
    """Poll /metrics until ``name`` is present (and equals ``want``, if given)."""
    deadline = time.monotonic() + bound_s
    while True:
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
            text = response.read().decode()
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        if match and (want is None or float(match.group(1)) == want):
            return float(match.group(1))
        assert time.monotonic() < deadline, f"{name} not {want} within {bound_s} s"
        time.sleep(0.2)


def test_a_flood_of_audio_is_refused_and_the_server_stays_small(
    cpu_models: LoadedModels, tmp_path: Path
) -> None:
    """Thirty seconds of audio sent as fast as the socket takes it: ``rate_limited`` and a 1008
    close once the burst allowance is spent; the server's memory hardly moves, and a normal
    turn works right after. (A client that goes on flooding long after the close may not read
    them: its unread data makes the server's close a reset, which discards both in flight.)"""
    question = spoken_wav(cpu_models, "What is the capital of France?", tmp_path)
    server, url = start_server()
    try:
        before_kib = rss_kib(server.proc.pid)
        events: list[dict[str, Any]] = []
        with connect(url, open_timeout=5, close_timeout=1) as flood:
            flood.send(json.dumps({"type": "hello", "protocol": 1}))
            events.append(json.loads(flood.recv(timeout=5)))
            frame = bytes(3200)  # 100 ms of silence at 16 kHz
            sent = 0
            try:
                while sent < 300:
                    flood.send(frame)
                    sent += 1
            except ConnectionClosed:
                pass
            try:
                while True:
                    message = flood.recv(timeout=10)
                    if isinstance(message, str):
                        events.append(json.loads(message))
            except ConnectionClosed as closed:
                close = closed.rcvd
        time.sleep(1.0)  # anything the flood left queued would be worked through now
        after_kib = rss_kib(server.proc.pid)
        turn = healthy_turn(url, question)
        status, took = server.signal_and_time(signal.SIGTERM)
    finally:
        server.kill()
    growth_mib = (after_kib - before_kib) / 1024
    print(f"flood: {sent} frames sent before the close; RSS growth {growth_mib:.1f} MiB")
    errors = [e for e in events if e["type"] == "error"]
    assert [e["code"] for e in errors] == ["rate_limited"]
    assert close is not None and close.code == 1008 and "real time" in close.reason
    assert growth_mib < 50
    assert "paris" in turn["assistant_text"].lower()
    assert status == 0 and took < SERVER_EXIT_BOUND_S


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match
    return int(match.group(1))

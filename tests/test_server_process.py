"""The server and client as a user runs them: real processes, real sockets, real signals."""

from __future__ import annotations

import json
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import soundfile
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from s2s.models.audio import resample
from s2s.models.profiles import LoadedModels
from tests.processes import (
    BIN,
    HANG_BOUND_S,
    SERVER_EXIT_BOUND_S,
    STARTUP_BOUND_S,
    Process,
    free_port,
    start_client,
    start_server,
)
from tests.ws import mute_session

pytestmark = pytest.mark.models


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def test_a_full_turn_from_file_to_saved_reply(
    question_wav: Path, cpu_models: LoadedModels, tmp_path: Path
) -> None:
    """Question audio in, reply audio out: the JSON turn line has every field, the saved reply
    transcribes back to words of the reply text, and /healthz answers."""
    server, url = start_server()
    try:
        port = url.rsplit(":", 1)[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as health:
            assert health.status == 200
        reply_path = tmp_path / "reply.wav"
        client = start_client(url, "--file", str(question_wav), "--save", str(reply_path))
        assert client.proc.wait(timeout=120) == 0, client.stderr()
    finally:
        server.signal_and_time(signal.SIGTERM)
    events = client.events()
    [turn] = [e for e in events if e["type"] == "turn"]
    print(json.dumps(turn))
    assert {"capital", "france"} <= words(turn["user_text"])
    assert "paris" in turn["assistant_text"].lower()
    assert turn["voice_to_voice_ms"] > 0
    assert set(turn["server"]) >= {
        "end_of_turn_ms",
        "stt_ms",
        "llm_first_token_ms",
        "tts_first_audio_ms",
    }
    kinds = [e["type"] for e in events]
    for kind in (
        "ready",
        "speech_started",
        "speech_stopped",
        "transcript",
        "reply_text",
        "reply_audio_start",
        "reply_audio_end",
        "metrics",
    ):
        assert kind in kinds
    audio, rate = soundfile.read(str(reply_path), dtype="float32")
    assert rate == 24_000 and len(audio) > rate // 2
    heard = cpu_models.stt.transcribe(resample(audio, rate, 16_000))
    print(f"reply heard back: {heard!r}")
    assert len(words(heard) & words(turn["assistant_text"])) >= 3


def test_sigterm_mid_reply_stops_the_server_within_2s_and_tells_the_client(
    question_wav: Path,
) -> None:
    """SIGTERM while a reply is being made: server exits 0 (every thread joined) within 2 s;
    the client is told why and exits without a traceback."""
    server, url = start_server()
    client = start_client(url, "--file", str(question_wav))
    client.wait_for_event("transcript", 60.0)
    status, took = server.signal_and_time(signal.SIGTERM)
    print(f"server exit {status} after {took * 1000:.0f} ms")
    assert status == 0, server.stderr()
    assert took < SERVER_EXIT_BOUND_S
    assert client.proc.wait(timeout=HANG_BOUND_S) == 0
    assert any(e["type"] == "bye" for e in client.events())
    stderr = client.stderr()
    assert "server shutting down" in stderr and "Traceback" not in stderr


def test_an_unreachable_hub_model_fails_fast_with_one_clear_line() -> None:
    """A hub id that is not cached, offline: exit 2 and a message naming the model and the
    pre-download command, no traceback."""
    server = Process(
        [str(BIN / "s2s-server"), "--device", "cpu", "--llm-model", "Qwen/Qwen2.5-1.5B-Instruct"]
    )
    status = server.proc.wait(timeout=60)
    stderr = server.stderr()
    assert status == 2
    assert "huggingface-cli download Qwen/Qwen2.5-1.5B-Instruct" in stderr
    assert "Traceback" not in stderr


def test_client_without_server_says_so(question_wav: Path) -> None:
    """Nothing listening: one line naming the URL, exit 1."""
    client = start_client("ws://127.0.0.1:9", "--file", str(question_wav))
    assert client.proc.wait(timeout=10) == 1
    stderr = client.stderr()
    assert "cannot connect to ws://127.0.0.1:9" in stderr
    assert "Traceback" not in stderr


def test_client_with_a_missing_file_says_so(tmp_path: Path) -> None:
    """A --file that does not exist: exit 2 naming it."""
    client = start_client("ws://127.0.0.1:9", "--file", str(tmp_path / "nope.wav"))
    assert client.proc.wait(timeout=10) == 2
    assert "no such file" in client.stderr()


def test_while_the_models_load_readyz_says_so_and_sigterm_exits_at_once() -> None:
    """The port is bound before the models load: /readyz answers 503 and /healthz 200 while
    they do; a SIGTERM then exits at once (nothing is served yet, loading is abandoned)."""
    server = Process([str(BIN / "s2s-server"), "--device", "cpu", "--port", str(free_port())])
    line = server.wait_for(lambda text: "loading models" in text, 60.0)
    base = re.search(r"http://[\d.]+:\d+", line)
    assert base, line
    try:
        with urllib.request.urlopen(f"{base.group(0)}/readyz", timeout=5) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    with urllib.request.urlopen(f"{base.group(0)}/healthz", timeout=5) as response:
        alive = response.status
    exit_status, took = server.signal_and_time(signal.SIGTERM)
    assert (status, alive) == (503, 200)
    assert exit_status == 128 + signal.SIGTERM and took < SERVER_EXIT_BOUND_S, server.stderr()
    assert "Traceback" not in server.stderr()


def test_serving_beyond_loopback_without_a_token_makes_one_and_prints_it() -> None:
    """`--host 0.0.0.0` and no `--token`: a random token, printed once, is required;
    /healthz stays open. `--no-auth` serves without one, on purpose."""
    server, url = start_server("--host", "0.0.0.0")
    try:
        [line] = [seen for seen in server.seen if "no --token" in seen]
        found = re.search(r"--token (\S+),", line)
        assert found, line
        token = found.group(1)
        local = url.replace("0.0.0.0", "127.0.0.1")
        with urllib.request.urlopen(f"{local.replace('ws', 'http')}/healthz", timeout=5) as r:
            assert r.status == 200
        with pytest.raises(InvalidStatus) as refused:
            connect(local, open_timeout=5).close()
        assert refused.value.response.status_code == 401
        with connect(f"{local}/?token={token}", open_timeout=5) as accepted:
            accepted.send(json.dumps({"type": "hello", "protocol": 1}))
            assert json.loads(accepted.recv(timeout=5))["type"] == "ready"
    finally:
        server.signal_and_time(signal.SIGTERM)
    open_server, open_url = start_server("--host", "0.0.0.0", "--no-auth")
    try:
        assert not [seen for seen in open_server.seen if "no --token" in seen]
        with connect(open_url.replace("0.0.0.0", "127.0.0.1"), open_timeout=5) as accepted:
            accepted.send(json.dumps({"type": "hello", "protocol": 1}))
            assert json.loads(accepted.recv(timeout=5))["type"] == "ready"
    finally:
        open_server.signal_and_time(signal.SIGTERM)


def test_environment_variables_configure_the_server_and_sigint_stops_it() -> None:
    """Every option has an S2S_ variable: port, token and session limit set only that way are
    in force; SIGINT (Ctrl+C) while serving then stops it cleanly (status 0) in time."""
    port = free_port()
    server = Process(
        [str(BIN / "s2s-server")],
        env={
            "S2S_DEVICE": "cpu",
            "S2S_PORT": str(port),
            "S2S_TOKEN": "from-the-environment",
            "S2S_MAX_SESSIONS": "1",
        },
    )
    try:
        server.wait_for(lambda line: "listening on" in line, STARTUP_BOUND_S)
        url = f"ws://127.0.0.1:{port}"
        with pytest.raises(InvalidStatus) as refused:
            connect(url, open_timeout=5).close()
        assert refused.value.response.status_code == 401
        headers = {"Authorization": "Bearer from-the-environment"}
        with connect(url, additional_headers=headers, open_timeout=5) as first:
            first.send(json.dumps({"type": "hello", "protocol": 1}))
            assert json.loads(first.recv(timeout=5))["type"] == "ready"
            with (
                connect(url, additional_headers=headers, open_timeout=5) as second,
                pytest.raises(ConnectionClosed) as closed,
            ):
                second.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        assert "1 sessions at most" in closed.value.rcvd.reason
    except BaseException:
        server.kill()
        raise
    status, took = server.signal_and_time(signal.SIGINT)
    print(f"SIGINT while serving: exit {status} after {took * 1000:.0f} ms")
    assert status == 0 and took < SERVER_EXIT_BOUND_S, server.stderr()
    assert "stopped cleanly" in server.stderr()


def test_a_second_signal_exits_at_once() -> None:
    """While the first SIGTERM's shutdown waits on a client that never answers the close, a
    second signal ends the process there and then, with status 128 + its number."""
    server, url = start_server()
    try:
        silent = mute_session(url)
    except BaseException:
        server.kill()
        raise
    try:
        began = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for_stderr(lambda line: "shutting down" in line, SERVER_EXIT_BOUND_S)
        status, _ = server.signal_and_time(signal.SIGINT)
        took = time.monotonic() - began
    finally:
        silent.close()
    print(f"second signal: exit {status} after {took * 1000:.0f} ms")
    assert status == 128 + signal.SIGINT, server.stderr()
    assert took < SERVER_EXIT_BOUND_S

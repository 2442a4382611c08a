"""What the README promises of ``s2s-client``, run as a real process: ``--half-duplex``,
``--list-devices``, the Enter key that interrupts, and SIGTERM. The server is in-process with
instant fake models (``tests/fake_models.py``): these claims are about the client."""

from __future__ import annotations

import os
import pty
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from s2s.pipeline.messages import Samples
from tests.fake_models import RATE_HZ, fake_models, spoken
from tests.processes import BIN, HANG_BOUND_S, start_client
from tests.pulse import pulse_env, speak_into_microphone
from tests.servers import Running, settle

__all__ = ["pulse_env"]  # the fixture, used by name below

TURN_BOUND_S = 30.0


@pytest.fixture
def server() -> Iterator[Running]:
    baseline = threading.active_count()
    # The fake voice and the fake user are tones of one pitch: a real echo canceller takes
    # the user's tone over the reply's for echo and removes it. These claims are about the
    # client, so the server tells the user by level (--server-aec off).
    running = Running(fake_models(), echo_cancel=None)
    yield running
    running.stop()
    assert settle(lambda: threading.active_count() <= baseline)


def wav(path: Path, *parts: Samples) -> Path:
    soundfile.write(str(path), np.concatenate(parts), RATE_HZ)
    return path


def silence(seconds: float) -> Samples:
    return np.zeros(round(seconds * RATE_HZ), dtype=np.float32)


def question_then_talking_over_the_reply(folder: Path) -> Path:
    """A question (0.6 s), its end-of-turn silence, then 0.7 s of loud speech from 2.2 s on:
    inside the fake reply's 2.6 s of audio, which starts about 1.1 s in."""
    return wav(
        folder / "over.wav",
        spoken(0.6, silence_s=0.8),
        silence(0.8),
        spoken(0.7, silence_s=3.0),
    )


@pytest.mark.parametrize("half_duplex", [False, True], ids=["full-duplex", "half-duplex"])
def test_half_duplex_keeps_the_microphone_closed_while_the_reply_plays(
    server: Running, tmp_path: Path, half_duplex: bool
) -> None:
    """The same file: full duplex, speech over the reply interrupts it (barge-in); with
    --half-duplex the microphone sends silence while the reply plays, so the reply plays to
    its end and the speech over it is never heard."""
    audio = question_then_talking_over_the_reply(tmp_path)
    extra = ["--half-duplex"] if half_duplex else []
    client = start_client(server.url, "--file", str(audio), *extra)
    try:
        assert client.proc.wait(timeout=TURN_BOUND_S) == 0, client.stderr()
    finally:
        client.kill()
    events = client.events()
    kinds = [e["type"] for e in events]
    if half_duplex:
        assert "interrupted" not in kinds
        assert [e["turn_id"] for e in events if e["type"] == "speech_started"] == [0]
        assert [e["turn_id"] for e in events if e["type"] == "reply_audio_end"] == [0]
    else:
        interrupted = [e for e in events if e["type"] == "interrupted"]
        assert interrupted and interrupted[0]["reason"] == "barge-in", kinds


def test_sigterm_ends_the_client_at_once(server: Running, tmp_path: Path) -> None:
    """SIGTERM mid-session: exit status 143 within the bound, no traceback."""
    audio = wav(tmp_path / "long.wav", spoken(), silence(20.0))
    client = start_client(server.url, "--file", str(audio))
    client.wait_for_event("ready", TURN_BOUND_S)
    status, took = client.signal_and_time(signal.SIGTERM)
    print(f"SIGTERM: exit {status} after {took * 1000:.0f} ms")
    assert status == 128 + signal.SIGTERM and took < HANG_BOUND_S, client.stderr()
    assert "Traceback" not in client.stderr()


def test_list_devices_shows_the_sound_devices(pulse_env: dict[str, str]) -> None:
    """--list-devices prints sounddevice's list (here the virtual PulseAudio devices) and
    exits 0 without connecting anywhere."""
    from tests.processes import Process

    lister = Process([str(BIN / "s2s-client"), "--list-devices"], env=pulse_env)
    assert lister.proc.wait(timeout=TURN_BOUND_S) == 0, lister.stderr()
    listed = "".join(lister.seen) + "".join(_drain(lister))
    assert "pulse" in listed.lower(), listed


def test_enter_interrupts_the_reply(
    server: Running, pulse_env: dict[str, str], tmp_path: Path
) -> None:
    """With the microphone and a terminal: Enter during a reply sends ``interrupt`` and the
    reply stops (``interrupted``, client interrupt); Ctrl+C then exits 130."""
    question = wav(tmp_path / "q.wav", silence(0.3), spoken())
    controller, terminal = pty.openpty()
    try:
        client = start_client(server.url, env=pulse_env, stdin=terminal)
        client.wait_for_event("ready", TURN_BOUND_S)
        client.wait_for_stderr(lambda line: "press Enter" in line, TURN_BOUND_S)
        speak_into_microphone(pulse_env, question)
        client.wait_for_event("reply_audio_start", TURN_BOUND_S)
        os.write(controller, b"\n")
        interrupted = client.wait_for_event("interrupted", TURN_BOUND_S)
        assert interrupted["reason"] == "client interrupt"
        status, took = client.signal_and_time(signal.SIGINT)
        assert status == 130 and took < HANG_BOUND_S, client.stderr()
    finally:
        os.close(controller)
        os.close(terminal)


@pytest.mark.parametrize("no_aec", [False, True], ids=["aec", "no-aec"])
def test_the_microphone_is_echo_cancelled_unless_asked_not_to(
    server: Running, pulse_env: dict[str, str], tmp_path: Path, no_aec: bool
) -> None:
    """Microphone and speaker both in use: the client cancels the speaker's echo and says so
    in hello (``ready`` echoes ``options.echo_cancelled``); ``--no-aec`` turns it off. A
    question spoken into the microphone gets through the canceller either way."""
    question = wav(tmp_path / "q.wav", silence(0.3), spoken())
    client = start_client(server.url, *(["--no-aec"] if no_aec else []), env=pulse_env)
    try:
        ready = client.wait_for_event("ready", TURN_BOUND_S)
        assert ready["options"]["echo_cancelled"] is (not no_aec)
        speak_into_microphone(pulse_env, question)
        assert client.wait_for_event("transcript", TURN_BOUND_S)["text"] == "a question"
        status, took = client.signal_and_time(signal.SIGINT)
        assert status == 130 and took < HANG_BOUND_S, client.stderr()
    finally:
        client.kill()


def test_a_file_is_sent_as_it_is(server: Running, tmp_path: Path) -> None:
    """Streaming a file has no speaker echo to cancel: no canceller, and the server is told."""
    client = start_client(server.url, "--file", str(wav(tmp_path / "q.wav", spoken())))
    try:
        ready = client.wait_for_event("ready", TURN_BOUND_S)
        assert ready["options"]["echo_cancelled"] is False
        assert client.proc.wait(timeout=TURN_BOUND_S) == 0, client.stderr()
    finally:
        client.kill()


def _drain(process: object) -> list[str]:
    lines = []
    queue_ = process.lines  # type: ignore[attr-defined]
    while not queue_.empty():
        line = queue_.get_nowait()
        if line is not None:
            lines.append(line)
    return lines

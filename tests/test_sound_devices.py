"""The client through real sounddevice streams (PulseAudio virtual devices, paced in real time)."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from s2s.models.audio import resample
from s2s.models.profiles import LoadedModels
from tests.processes import HANG_BOUND_S, start_client, start_server
from tests.pulse import pulse_env, record_speaker, speak_into_microphone

pytestmark = pytest.mark.models
__all__ = ["pulse_env"]  # the fixture, used by name below


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    server, url = start_server()
    yield url
    server.signal_and_time(signal.SIGTERM)


def test_a_spoken_question_through_microphone_and_speaker(
    pulse_env: dict[str, str],
    server_url: str,
    question_wav: Path,
    cpu_models: LoadedModels,
    tmp_path: Path,
) -> None:
    """The question played into the microphone is answered out of the speaker, audibly."""
    heard_path = tmp_path / "speaker.wav"
    recorder = record_speaker(pulse_env, heard_path)
    client = start_client(server_url, env=pulse_env)
    try:
        client.wait_for_event("ready", 30.0)  # the microphone is live
        speak_into_microphone(pulse_env, question_wav)
        turn = client.wait_for_event("turn", 60.0)
        client.wait_for_event("reply_played", 60.0)  # the speaker has played all of it
        status, took = client.signal_and_time(signal.SIGINT)
    finally:
        recorder.terminate()
        recorder.wait(10)
        client.kill()
    print(f"turn: {turn}; Ctrl+C exit {status} after {took * 1000:.0f} ms")
    assert status == 130 and took < HANG_BOUND_S
    assert "capital" in turn["user_text"].lower()
    audio, rate = soundfile.read(str(heard_path), dtype="float32", always_2d=True)
    heard = cpu_models.stt.transcribe(resample(audio.mean(axis=1).astype(np.float32), rate, 16_000))
    print(f"speaker said: {heard!r}")
    # What came out of the speaker is the reply: most of its words are heard in the recording
    # (whisper tiny mishears a word or two of synthetic speech now and then).
    said = set(words(turn["assistant_text"]))
    assert said and len(said & set(words(heard))) >= len(said) / 2, (said, heard)


def words(text: str) -> list[str]:
    """The words worth comparing: longer than three letters, lower case, no punctuation."""
    return [w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 3]


def test_ctrl_c_during_playback(
    pulse_env: dict[str, str], server_url: str, question_wav: Path
) -> None:
    """While the reply is coming out of the speaker."""
    client = start_client(server_url, "--file", str(question_wav), "--play", env=pulse_env)
    client.wait_for_event("reply_audio_start", 60.0)
    time.sleep(0.3)
    status, took = client.signal_and_time(signal.SIGINT)
    print(f"Ctrl+C during playback: exit {status} after {took * 1000:.0f} ms")
    assert status == 130, client.stderr()
    assert took < HANG_BOUND_S

"""Shared fixtures: the real CPU models, loaded once per test run."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from s2s.models.audio import resample
from s2s.models.profiles import LoadedModels, load_models, profile_for
from s2s.pipeline.messages import Samples
from tests.processes import Process, free_port

# Tests never reach the model hub: a model that is not on disk must fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPEECH_END_FRAME_SAMPLES = 160
"""10 ms at 16 kHz: the resolution of the 'true end of speech' measure."""


@pytest.fixture(scope="session")
def cpu_models() -> LoadedModels:
    return load_models(profile_for("cpu"))


@pytest.fixture(scope="session")
def question_wav(cpu_models: LoadedModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """'What is the capital of France?' spoken by Piper, as a stereo 22.05 kHz WAV (the client
    must convert rate and channels), with half a second of silence before."""
    return spoken_wav(cpu_models, "What is the capital of France?", tmp_path_factory.mktemp("q"))


def spoken_wav(models: LoadedModels, text: str, folder: Path) -> Path:
    voice = models.tts
    speech = np.concatenate(list(voice.stream(text, lambda: False)))
    lead = np.zeros(voice.sample_rate_hz // 2, dtype=np.float32)
    mono = np.concatenate([lead, speech])
    path = folder / (text.lower().replace(" ", "-").strip("?.!") + ".wav")
    soundfile.write(str(path), np.stack([mono, mono], axis=1), voice.sample_rate_hz)
    return path


def speech_with_silence(
    models: LoadedModels, text: str, silence_s: float = 1.0
) -> tuple[Samples, int]:
    """Piper speaks ``text``; returned at 16 kHz with ``silence_s`` of silence on each side,
    plus the true sample where the speech ends (the last 10 ms frame above 1% of the peak)."""
    voice = models.tts
    spoken = np.concatenate(list(voice.stream(text, lambda: False)))
    speech = resample(spoken, voice.sample_rate_hz, 16_000)
    frame = SPEECH_END_FRAME_SAMPLES
    frames = len(speech) // frame
    rms = np.sqrt((speech[: frames * frame].reshape(frames, frame) ** 2).mean(axis=1))
    last_loud = int(np.nonzero(rms > 0.01 * np.abs(speech).max())[0][-1])
    pad = np.zeros(int(silence_s * 16_000), dtype=np.float32)
    true_end = len(pad) + (last_loud + 1) * frame
    return np.concatenate([pad, speech, pad]).astype(np.float32), true_end


@pytest.fixture
def fake_server(request: pytest.FixtureRequest) -> Iterator[tuple[Process, str]]:
    """A misbehaving server (``tests/fake_servers.py``; the mode is the parameter) in a
    process of its own, resumed if a test froze it, then killed."""
    port = free_port()
    fake = Process([sys.executable, "-m", "tests.fake_servers", request.param, str(port)])
    fake.wait_for(lambda line: "listening" in line, 30.0)
    yield fake, f"ws://127.0.0.1:{port}"
    fake.proc.send_signal(signal.SIGCONT)
    fake.kill()

"""A private PulseAudio with virtual devices, so the client runs through real sounddevice
streams with no sound card: a null sink as the speaker (its monitor is what was heard), and a
second null sink remapped as the microphone (what is played into it is what the mic hears)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

SPEAKER_SINK = "vspk"
MIC_FEED_SINK = "vmic_feed"
MIC_SOURCE = "vmic"


@pytest.fixture(scope="session")
def pulse_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Environment variables that point sounddevice (through ALSA's pulse plugin) at it."""
    if shutil.which("pulseaudio") is None or shutil.which("pactl") is None:
        pytest.skip("PulseAudio is not installed (bash .ci/install.sh --dev installs it as root)")
    root = tmp_path_factory.mktemp("pulse")
    home, runtime = root / "home", root / "run"
    home.mkdir()
    runtime.mkdir(mode=0o700)
    (home / ".asoundrc").write_text("pcm.!default { type pulse }\nctl.!default { type pulse }\n")
    env = {"HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    subprocess.run(
        [
            "pulseaudio",
            "--daemonize=yes",
            "--exit-idle-time=-1",
            "-n",
            f"--load=module-null-sink sink_name={SPEAKER_SINK}",
            f"--load=module-null-sink sink_name={MIC_FEED_SINK}",
            f"--load=module-remap-source source_name={MIC_SOURCE} master={MIC_FEED_SINK}.monitor",
            "--load=module-native-protocol-unix",
            "--load=module-always-sink",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=30,
    )
    pactl(env, "set-default-sink", SPEAKER_SINK)
    pactl(env, "set-default-source", MIC_SOURCE)
    yield env
    subprocess.run(["pulseaudio", "--kill"], env=env, capture_output=True, timeout=10)


def pactl(env: dict[str, str], *args: str) -> None:
    subprocess.run(["pactl", *args], env=env, check=True, capture_output=True, timeout=10)


def record_speaker(env: dict[str, str], path: Path) -> subprocess.Popen[bytes]:
    """Start recording what the speaker plays; stop with terminate()."""
    return subprocess.Popen(
        ["parec", f"--device={SPEAKER_SINK}.monitor", "--file-format=wav", str(path)], env=env
    )


def speak_into_microphone(env: dict[str, str], wav: Path) -> None:
    """Play a file into the virtual microphone, in real time; returns when it has played."""
    subprocess.run(
        ["paplay", f"--device={MIC_FEED_SINK}", str(wav)], env=env, check=True, timeout=60
    )

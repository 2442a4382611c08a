"""``s2s-demo``, the README's first command after the install: one real spoken turn."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tests.processes import BIN

pytestmark = pytest.mark.models


def test_the_demo_answers_a_spoken_question_and_saves_the_answer(tmp_path: Path) -> None:
    """It speaks the question, serves it, prints the conversation and the latency, saves the
    spoken answer, stops its server, and shows how to run it yourself; exit status 0."""
    out = tmp_path / "out"
    done = subprocess.run(
        [str(BIN / "s2s-demo"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "capital of france" in done.stdout.lower()  # the transcript
    assert "paris" in done.stdout.lower()  # the answer
    assert "ms" in done.stdout and "voice-to-voice" in done.stdout.lower()
    assert f"the spoken answer is in {out / 'reply.wav'}" in done.stdout
    assert "s2s-server --device cuda --host 0.0.0.0 --token T" in done.stdout
    answer, rate = soundfile.read(str(out / "reply.wav"), dtype="float32")
    assert len(answer) / rate > 0.5 and float(np.abs(answer).max()) > 0.05
    assert (out / "question.wav").is_file()
    assert "Traceback" not in done.stderr

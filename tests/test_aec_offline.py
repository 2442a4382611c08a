"""The offline barge-in bench (``bench/aec_offline.py``) on one session: the delays it reports
are what the client's canceller and the server's VAD did with real models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.aec_offline import (
    COUGH_CLIPS,
    TURNS_PER_SESSION,
    Job,
    load_worker,
    run_session,
    synthesize,
)
from bench.barge_in_room import QUESTIONS
from s2s.pipeline.segmenter import VadOptions


@pytest.mark.models
def test_questions_over_a_reply_are_heard_no_sooner_than_the_minimum_onset(
    tmp_path: Path,
) -> None:
    """A user at -20 dBFS over a -20 dB echo is heard every time through the client's
    canceller, never before 300 ms; the clips written to the cache come back the same; the
    echo alone never interrupts the server's level estimate."""
    cache = tmp_path / "clips"
    voices = synthesize(cache)
    again = synthesize(cache)
    assert len(again.coughs) == COUGH_CLIPS
    for first, second in zip(voices.coughs, again.coughs, strict=True):
        np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(voices.reply, again.reply)
    load_worker(again)
    session = run_session(Job("barge-in", echo_db=-20.0, user_db=-20.0, seed=1))
    delays = session["outcomes"]
    assert len(delays) == TURNS_PER_SESSION
    assert all(isinstance(delay, float) for delay in delays), delays
    assert min(delays) >= VadOptions().min_speech_ms, delays
    # The server's level estimate with the real VAD: the echo alone (-10 dB, ten replies)
    # never interrupts (on the offline bench: none of 600 replies; in this room, before the
    # estimate learned the echo it took for the user, 7 of 10).
    echo = run_session(Job("echo", echo_db=-10.0, user_db=None, seed=4, handling="server-estimate"))
    assert echo["outcomes"] == [False] * TURNS_PER_SESSION
    assert echo["echo_interruptions"] == 0


def test_a_cache_from_before_several_coughs_gives_its_one_cough(tmp_path: Path) -> None:
    cache = tmp_path / "old.npz"
    clip = np.linspace(-0.1, 0.1, 2400, dtype=np.float32)
    clips: dict[str, Any] = {f"question{k}": np.zeros(10) for k in range(len(QUESTIONS))}
    clips.update(reply=np.zeros(10, dtype=np.float32), prompt=clips["question0"], cough=clip)
    with cache.open("wb") as file:
        np.savez(file, **clips)
    voices = synthesize(cache)
    assert len(voices.coughs) == 1
    np.testing.assert_array_equal(voices.coughs[0], clip)


def test_a_cache_without_a_cough_is_refused_by_name(tmp_path: Path) -> None:
    cache = tmp_path / "empty.npz"
    clips: dict[str, Any] = {f"question{k}": np.zeros(10) for k in range(len(QUESTIONS))}
    clips.update(reply=np.zeros(10), prompt=np.zeros(10))
    with cache.open("wb") as file:
        np.savez(file, **clips)
    with pytest.raises(ValueError, match="no cough clip"):
        synthesize(cache)

"""The offline barge-in bench (``bench/aec_offline.py``) on one session: the delays it reports
are what the client's canceller and the server's VAD did with real models."""

from __future__ import annotations

import pytest

from bench.aec_offline import TURNS_PER_SESSION, Job, load_worker, run_session, synthesize
from s2s.pipeline.segmenter import VadOptions


@pytest.mark.models
def test_questions_over_a_reply_are_heard_no_sooner_than_the_minimum_onset() -> None:
    """A user at -20 dBFS over a -20 dB echo is heard every time, never before 300 ms."""
    load_worker(synthesize())
    session = run_session(Job("barge-in", echo_db=-20.0, user_db=-20.0, seed=1))
    delays = session["outcomes"]
    assert len(delays) == TURNS_PER_SESSION
    assert all(isinstance(delay, float) for delay in delays), delays
    assert min(delays) >= VadOptions().min_speech_ms, delays

"""Layer 1: the client's turn bookkeeping."""

from __future__ import annotations

from s2s.client.turns import TurnTracker


def test_a_turn_reports_its_texts_latency_and_server_times() -> None:
    """Speech end placed on the send timeline; latency to the first reply audio."""
    tracker = TurnTracker(16_000)
    tracker.sent(0, 16_000, at=101.0)  # the first second, sent at t=101
    for event in (
        {"type": "speech_started", "turn_id": 0, "sample_index": 1_600},
        {"type": "speech_stopped", "turn_id": 0, "sample_index": 8_000},  # captured at 100.5
        {"type": "transcript", "turn_id": 0, "text": "Hi"},
        {"type": "reply_text", "turn_id": 0, "text": "Hello."},
        {"type": "metrics", "turn_id": 0, "stt_ms": 80.0},
        {"type": "reply_audio_start", "turn_id": 0},
    ):
        assert tracker.on_event(event) == []
    tracker.audio_received(at=101.7)
    [turn] = tracker.on_event({"type": "reply_audio_end", "turn_id": 0})
    assert turn["user_text"] == "Hi" and turn["assistant_text"] == "Hello."
    assert turn["voice_to_voice_ms"] == 1200.0
    assert turn["server"]["stt_ms"] == 80.0 and not turn["interrupted"]
    assert tracker.all_answered()


def test_an_interrupted_turn_closes_as_interrupted() -> None:
    """The interrupted event names the turn; it is reported once, marked."""
    tracker = TurnTracker(16_000)
    tracker.on_event({"type": "speech_started", "turn_id": 0, "sample_index": 0})
    tracker.on_event({"type": "reply_audio_start", "turn_id": 0})
    [turn] = tracker.on_event({"type": "interrupted", "turn_id": 0, "reason": "barge-in"})
    assert turn["interrupted"]
    assert tracker.on_event({"type": "interrupted", "turn_id": 0, "reason": "again"}) == []
    assert not tracker.assistant_speaking(0.0)

"""Layer 1 for barge-in: the echo gate, the reply ledger and history amendment, pure."""

from __future__ import annotations

import numpy as np

from s2s.pipeline.echo import EchoGate, EchoOptions
from s2s.pipeline.history import INTERRUPTED_MARK, ChatHistory, HistoryOptions
from s2s.pipeline.messages import Samples
from s2s.server.playback import ReplyLedger
from s2s.server.protocol import Playback, ProtocolError, parse_client_text

RATE = 16_000


def tone(level: float, seconds: float = 0.1) -> Samples:
    """A sine whose RMS is ``level``."""
    t = np.arange(int(RATE * seconds)) / RATE
    samples: Samples = (level * np.sqrt(2) * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return samples


def test_quiet_speech_during_a_reply_is_echo_and_loud_speech_is_not() -> None:
    """Geigel test: mic below ratio x reply level is echo; above is the user."""
    gate = EchoGate(EchoOptions(ratio=0.5, echo_delay_s=0.3))
    for i in range(10):
        gate.played(tone(0.2), starts_at=10.0 + i * 0.1, sample_rate_hz=RATE)
    assert gate.reply_playing(10.45, 10.55)
    assert gate.louder_than_echo(tone(0.2, 0.032), 10.6)  # as loud as the reply: the user
    assert not gate.louder_than_echo(tone(0.06, 0.032), 10.6)  # -10 dB: echo


def test_nothing_is_echo_when_no_reply_plays() -> None:
    """Long after the reply, or once it was silenced, no reply is playing."""
    gate = EchoGate(EchoOptions(echo_delay_s=0.3))
    gate.played(tone(0.2), starts_at=1.0, sample_rate_hz=RATE)
    assert not gate.reply_playing(4.9, 5.0)
    assert gate.louder_than_echo(tone(0.01, 0.032), 5.0)
    gate.played(tone(0.2), starts_at=5.0, sample_rate_hz=RATE)
    gate.silence_reply()
    assert not gate.reply_playing(4.9, 5.05)


def test_ledger_turns_played_time_into_heard_words() -> None:
    """Whole chunks played count whole; a chunk half played counts half its words."""
    ledger = ReplyLedger()
    ledger.sent(3, 0, "One two three four.", RATE, RATE)  # 1 s
    ledger.sent(3, 1, "Five six seven eight.", RATE // 2, RATE)
    ledger.sent(3, 1, "Five six seven eight.", RATE // 2, RATE)  # the chunk's second frame
    assert ledger.heard_text(3, 1000.0) == "One two three four."
    assert ledger.heard_text(3, 1500.0) == "One two three four. Five six"
    assert ledger.heard_text(3, 250.0) == "One"
    assert ledger.heard_text(4, 1000.0) is None


def test_heard_text_replaces_the_reply_whichever_comes_first() -> None:
    """The playback report may arrive before or after the LLM stage records the reply."""
    after = ChatHistory(HistoryOptions(), len)
    after.record("q", "The whole long reply.", turn_id=1)
    after.amend_heard(1, "The whole")
    before = ChatHistory(HistoryOptions(), len)
    before.amend_heard(1, "The whole")
    before.record("q", "The whole long reply.", interrupted=True, turn_id=1)
    for history in (after, before):
        assert history.prompt("next")[2]["content"] == "The whole" + INTERRUPTED_MARK


def test_playback_report_parses_and_rejects_bad_fields() -> None:
    """A valid report becomes a Playback; a wrong turn id or a negative time is bad_message."""
    assert parse_client_text('{"type": "playback", "turn_id": 2, "played_ms": 812.5}') == Playback(
        2, 812.5
    )
    for bad in (
        '{"type": "playback", "turn_id": "x", "played_ms": 1}',
        '{"type": "playback", "turn_id": 1, "played_ms": -5}',
    ):
        try:
            parse_client_text(bad)
        except ProtocolError as exc:
            assert exc.code == "bad_message"
        else:
            raise AssertionError(f"accepted {bad}")

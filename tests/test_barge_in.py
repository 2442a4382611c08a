"""Barge-in, over real sockets on the CPU defaults, with a scripted user whose virtual speaker
leaks into the microphone at -10 dB (a laptop without echo cancellation)."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from s2s.client.room import RoomOptions, at_level
from s2s.models.audio import resample
from s2s.models.profiles import LoadedModels
from s2s.pipeline.history import INTERRUPTED_MARK, ChatMessage, HistoryOptions
from s2s.pipeline.messages import Samples
from s2s.pipeline.pipeline import Pipeline
from s2s.server.assembly import build_session_pipeline
from tests.scripted_user import RATE_HZ, ScriptedUser, leading_silence_s
from tests.servers import Running

pytestmark = pytest.mark.models

LONG_ANSWERS = (
    "You are a helpful assistant. Answer in English, in detail, in four or five sentences."
)
ECHO_GAIN = 0.3
"""About -10 dB: a laptop speaker heard by its own microphone."""
ROOM = RoomOptions(delay_ms=100, reverb_ms=200, echo_db=-10.0)
"""A laptop's speaker as its microphone hears it, with the room's reverberation."""
REPLY_BOUND_S = 90.0
MIN_ONSET_MS = 300
"""The default shortest speech that interrupts a reply."""
ONE_STEP_S = 0.25
"""Generous bound for one decoding step of the LLM (about 60 ms here)."""


@dataclass
class Call:
    messages: list[ChatMessage]
    deltas: list[tuple[float, str]] = field(default_factory=list)
    cancelled: bool | None = None
    """Whether the call ended because its turn was cancelled (None: still running)."""

    @property
    def text(self) -> str:
        return "".join(delta for _, delta in self.deltas)


DELTA_PACE_S = 0.09
"""The recording LLM takes at least this long a delta, so a reply of 64 tokens (5.8 s) is
still being generated when the user speaks over its first two seconds of audio, however fast
or loaded the machine (else "no late tokens" would hold trivially)."""


class RecordingChat:
    """The real LLM, paced, with every call's prompt and the time of every delta recorded."""

    def __init__(self, inner: LoadedModels) -> None:
        self._inner = inner.llm
        self.calls: list[Call] = []

    def count_tokens(self, text: str) -> int:
        return self._inner.count_tokens(text)

    def stream(
        self, messages: Sequence[ChatMessage], should_stop: Callable[[], bool]
    ) -> Iterator[str]:
        call = Call(list(messages))
        self.calls.append(call)
        try:
            for delta in self._inner.stream(messages, should_stop):
                call.deltas.append((time.monotonic(), delta))
                yield delta
                time.sleep(DELTA_PACE_S)
        finally:
            call.cancelled = should_stop()


@pytest.fixture
def chat(cpu_models: LoadedModels) -> RecordingChat:
    return RecordingChat(cpu_models)


@pytest.fixture
def server(
    request: pytest.FixtureRequest, cpu_models: LoadedModels, chat: RecordingChat
) -> Iterator[Running]:
    """The server on the CPU defaults; parametrized indirectly with "server-estimate", it
    leaves clients without AEC to its level estimate instead of cancelling their echo."""
    # The recording wrapper stands in for the LLM (it has the same two methods).
    models = dataclasses.replace(cpu_models, llm=chat)
    history = HistoryOptions(system_prompt=LONG_ANSWERS)

    def build(**kwargs: object) -> Pipeline:
        return build_session_pipeline(models, history_options=history, **kwargs)  # type: ignore[arg-type]

    changes: dict[str, Any] = {}
    if getattr(request, "param", None) == "server-estimate":
        changes["echo_cancel"] = None
    running = Running(cpu_models, build=build, **changes)
    yield running
    running.stop()


ECHO_HANDLING = pytest.mark.parametrize(
    ("server", "aec"),
    [("server-aec", False), ("server-estimate", False), ("client-aec", True)],
    ids=["server-aec", "server-estimate", "client-aec"],
    indirect=["server"],
)
"""Who deals with the echo: the server's canceller (the default for clients without one),
the server's level estimate (``--server-aec off``), the client's canceller."""


@pytest.fixture
def speak(cpu_models: LoadedModels) -> Callable[[str], Samples]:
    def spoken(text: str) -> Samples:
        voice = cpu_models.tts
        audio = np.concatenate(list(voice.stream(text, lambda: False)))
        return resample(audio, voice.sample_rate_hz, RATE_HZ)

    return spoken


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def test_speaking_over_the_reply_interrupts_it(
    server: Running, chat: RecordingChat, speak: Callable[[str], Samples]
) -> None:
    """The user speaks 2 s into a long reply: playback stops promptly, no old audio or tokens
    follow, the new question is answered, and the history keeps only what was heard. (Not
    sooner: over the session's first second of reply audio the server is still measuring the
    echo, and what stands in (the fixed rule, then a provisional estimate with a wide margin)
    may hear only the voice's louder syllables: with the fixed rule alone, at 1 s, 1 run in 6
    was not interrupted.)"""
    user = ScriptedUser(server.url, echo_gain=ECHO_GAIN)
    try:
        user.say(speak("Tell me about the history of Paris."), at=time.monotonic() + 0.3)
        reply = user.wait_for("reply_audio_start", REPLY_BOUND_S, turn_id=0)
        question = speak("What is the capital of France?")
        barge_in = user.say(question, at=reply.at + 2.0)
        interrupted = user.wait_for("interrupted", 30.0)
        answer = user.wait_for("transcript", REPLY_BOUND_S, turn_id=1)
        user.wait_for("reply_audio_end", REPLY_BOUND_S, turn_id=1)
    finally:
        user.close()

    assert barge_in.first_sent_at is not None
    speech_began = barge_in.first_sent_at + leading_silence_s(question)
    stop_ms = (user.interrupted_at[0] - speech_began) * 1000.0
    after_onset_ms = stop_ms - MIN_ONSET_MS
    print(
        f"playback stopped {stop_ms:.0f} ms after the user began speaking over it, "
        f"{after_onset_ms:.0f} ms after the {MIN_ONSET_MS} ms onset that interrupts"
    )
    assert after_onset_ms < 1000.0

    after = user.received[user.received.index(interrupted) + 1 :]
    next_reply = next(
        i for i, r in enumerate(after) if r.event and r.event["type"] == "reply_audio_start"
    )
    assert not [r for r in after[:next_reply] if r.audio_samples], (
        "old reply audio after interrupted"
    )

    first, second = chat.calls[0], chat.calls[1]
    # The old reply was still being generated when it was interrupted (else "no late
    # tokens" below would hold trivially), and the cancel is what ended it.
    assert first.cancelled, "the LLM had finished before the barge-in: nothing was tested"
    late = [at for at, _ in first.deltas if at > interrupted.at + ONE_STEP_S]
    assert not late, f"{len(late)} tokens of the old reply after the interruption"

    assert answer.event is not None and "capital" in answer.event["text"].lower()

    heard = [m["content"] for m in second.messages if m["role"] == "assistant"][-1]
    print(f"generated: {first.text!r}\nkept in history: {heard!r}")
    assert heard.endswith(INTERRUPTED_MARK)
    heard_words, generated = words(heard.removesuffix(INTERRUPTED_MARK)), words(first.text)
    assert 0 < len(heard_words) < len(generated)
    assert heard_words == generated[: len(heard_words)]


@ECHO_HANDLING
def test_a_normal_voice_interrupts_over_the_echo(
    server: Running, speak: Callable[[str], Samples], aec: bool
) -> None:
    """The user at -20 dBFS (about the reply's own level; its echo comes back at -10 dB
    through the room) speaks 3 s into a long reply: it is interrupted, and the question is the
    next turn. By then the server has learned the room, to cancel the echo or to measure it."""
    user_dbfs = -20.0
    user = ScriptedUser(server.url, room=ROOM, aec=aec)
    try:
        user.say(speak("Tell me about the history of Paris."), at=time.monotonic() + 0.3)
        reply = user.wait_for("reply_audio_start", REPLY_BOUND_S, turn_id=0)
        question = at_level(speak("What is the capital of France?"), user_dbfs)
        user.say(question, at=reply.at + 3.0)
        interrupted = user.wait_for("interrupted", 30.0)
        answer = user.wait_for("transcript", REPLY_BOUND_S, turn_id=1)
    finally:
        user.close()
    assert interrupted.event is not None and interrupted.event["reason"] == "barge-in"
    # The question is the next turn, with words in it. Which words is not asserted: with the
    # canceller at this echo level, its suppressor turns the user down while the reply's echo
    # is as loud as they are, and whisper tiny heard "Apple of France." and "Cool, friends."
    # for "What is the capital of France?" (the README's barge-in section says so).
    assert answer.event is not None and answer.event["text"].strip()
    print(f"heard over the reply: {answer.event['text']!r}")


def test_a_cough_does_not_interrupt(server: Running, speak: Callable[[str], Samples]) -> None:
    """A 150 ms burst of voice during the reply: no interruption, the reply plays to its end."""
    burst = speak("Ha!")
    loudest = int(np.argmax(np.abs(burst)))
    start = max(0, loudest - RATE_HZ * 75 // 1000)
    cough = burst[start : start + RATE_HZ * 150 // 1000] * 1.5
    user = ScriptedUser(server.url, echo_gain=ECHO_GAIN)
    try:
        user.say(speak("Tell me about the history of Paris."), at=time.monotonic() + 0.3)
        reply = user.wait_for("reply_audio_start", REPLY_BOUND_S, turn_id=0)
        user.say(cough, at=reply.at + 1.0)
        user.wait_for("reply_audio_end", REPLY_BOUND_S, turn_id=0)
        time.sleep(1.0)
    finally:
        user.close()
    assert not user.events("interrupted")
    assert [r.event["turn_id"] for r in user.events("transcript") if r.event] == [0]


@ECHO_HANDLING
def test_the_assistants_own_voice_does_not_interrupt_it(
    server: Running, speak: Callable[[str], Samples], aec: bool
) -> None:
    """Two replies come back into the microphone through a room (-10 dB, 100 ms late, 200 ms
    of reverberation) all the way through: no interruption, and the echo never becomes a turn
    of its own, whoever deals with it."""
    user = ScriptedUser(server.url, room=ROOM, aec=aec)
    question = speak("Tell me about the history of Paris.")
    try:
        for turn in (0, 1):
            user.say(question, at=time.monotonic() + 0.3)
            user.wait_for("reply_audio_start", REPLY_BOUND_S, turn_id=turn)
            user.wait_for("reply_audio_end", REPLY_BOUND_S, turn_id=turn)
            time.sleep(1.5)  # the last of the reply plays and echoes
    finally:
        user.close()
    reply_audio_s = sum(r.audio_samples for r in user.received) / RATE_HZ
    print(f"replies played for {reply_audio_s:.1f} s with their echo in the microphone")
    assert reply_audio_s > 6.0
    assert not user.events("interrupted")
    assert [r.event["turn_id"] for r in user.events("transcript") if r.event] == [0, 1]

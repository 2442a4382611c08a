"""Instant stand-ins for the four models, with the real stages, sessions and sockets around
them: for tests whose claim is about the protocol or the session, not about the models.

The VAD hears any loud window as speech; the transcriber says what a tone's level stands for;
the chat answers with a fixed reply word by word; the voice speaks each word as a short tone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from s2s.models.profiles import LoadedModels, profile_for
from s2s.pipeline.history import ChatMessage
from s2s.pipeline.messages import Samples

RATE_HZ = 16_000
SPEECH_LEVEL = 0.3
REPLY = "Hello there. This is a fake reply with a few words in it."
WORD_S = 0.2
"""Audio per word of the reply: a reply of 13 words plays for 2.6 s."""


class LoudWindows:
    """A stand-in for Silero: a window is speech when its RMS is over 0.02."""

    def new_state(self) -> np.ndarray:
        return np.zeros(1, dtype=np.float32)

    def probability(self, window: Samples, state: np.ndarray) -> tuple[float, np.ndarray]:
        level = float(np.sqrt(np.mean(np.square(window[-512:], dtype=np.float64))))
        return (1.0 if level > 0.02 else 0.0), state


class GatedTranscriber:
    """Says 'a question' for speech, '' for audio with nothing loud in it. While ``hold`` is
    cleared it waits (a slow STT); the next ``failures`` calls raise (a turn is transcribed
    twice with speculation: at its pause and, if that failed, at its end)."""

    def __init__(self) -> None:
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        self.failures = 0
        self.calls = 0

    def transcribe(self, samples: Samples) -> str:
        self.calls += 1
        self.entered.set()
        self.hold.wait(30.0)
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("the fake transcriber failed on purpose")
        peak = float(np.max(np.abs(samples))) if len(samples) else 0.0
        return "a question" if peak > 0.1 else ""


class FixedChat:
    """Answers every prompt with ``REPLY``, a word per step, checking ``should_stop``."""

    def __init__(self, reply: str = REPLY) -> None:
        self.reply = reply
        self.prompts: list[list[ChatMessage]] = []

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)

    def stream(
        self, messages: Sequence[ChatMessage], should_stop: Callable[[], bool]
    ) -> Iterator[str]:
        self.prompts.append(list(messages))
        for k, word in enumerate(self.reply.split(" ")):
            if should_stop():
                return
            yield word if k == 0 else " " + word


class ToneVoice:
    """Speaks each word as ``WORD_S`` of a 330 Hz tone."""

    sample_rate_hz = RATE_HZ

    def stream(self, text: str, should_stop: Callable[[], bool]) -> Iterator[Samples]:
        t = np.arange(round(WORD_S * RATE_HZ)) / RATE_HZ
        word = (0.2 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
        for _ in text.split():
            if should_stop():
                return
            yield word


def fake_models(
    transcriber: GatedTranscriber | None = None, chat: FixedChat | None = None
) -> LoadedModels:
    return LoadedModels(
        profile=profile_for("cpu"),
        vad=LoudWindows(),  # type: ignore[arg-type]
        stt=transcriber or GatedTranscriber(),
        llm=chat or FixedChat(),
        tts=ToneVoice(),
        load_s={},
    )


def spoken(seconds: float = 0.6, level: float = SPEECH_LEVEL, silence_s: float = 0.8) -> Samples:
    """What the fake VAD and transcriber take for a question: a tone, then silence."""
    t = np.arange(round(seconds * RATE_HZ)) / RATE_HZ
    voice = level * np.sqrt(2) * np.sin(2 * np.pi * 220 * t)
    silence = np.zeros(round(silence_s * RATE_HZ))
    samples: Samples = np.concatenate([voice, silence]).astype(np.float32)
    return samples

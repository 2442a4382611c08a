"""The reply speculated during the end-of-turn wait: the STT stage's decision, the history's
pending entries, and whole sessions over real sockets (a user who pauses mid-question, a
final transcript that differs from the provisional one)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pytest
from websockets.sync.client import connect

from s2s.models.audio import resample, to_pcm16
from s2s.models.profiles import LoadedModels
from s2s.pipeline.history import ChatHistory, ChatMessage, HistoryOptions
from s2s.pipeline.messages import Samples, SpeculationSettled, SpeechSegment, Transcript, TurnClock
from s2s.pipeline.segmenter import END_LEVEL_DB, VadEnded, VadEvent, VadPaused, VadStarted
from s2s.pipeline.speculation import SpeculationPolicy
from s2s.pipeline.stages import LlmStage, SttStage
from s2s.server.assembly import build_session_pipeline
from tests.harness import run_stage
from tests.servers import Running, settle

RATE_HZ = 16_000
FRAME_S = 0.02
HANG_BOUND_S = 60.0


# --- the STT stage's decision ---------------------------------------------------------------


class ScriptedTranscriber:
    """Returns the given texts, one per call."""

    def __init__(self, *texts: str) -> None:
        self._texts = list(texts)

    def transcribe(self, samples: Samples) -> str:
        return self._texts.pop(0)


def segment(end: int, provisional: bool) -> SpeechSegment:
    return SpeechSegment(
        session_id="t",
        turn_id=0,
        generation=0,
        samples=np.zeros(end, dtype=np.float32),
        sample_rate_hz=RATE_HZ,
        start_sample_index=0,
        end_sample_index=end,
        clock=TurnClock(),
        provisional=provisional,
    )


def test_the_pause_text_goes_on_at_once_and_a_same_final_confirms_it() -> None:
    """Provisional then the same final: one speculative transcript, settled as a hit."""
    stage = SttStage(ScriptedTranscriber("hello there"), SpeculationPolicy())
    run = run_stage(stage, [segment(800, True), segment(800, False)])
    [transcript] = run.outputs
    assert isinstance(transcript, Transcript) and transcript.speculative
    [settled] = run.events.of_type(SpeculationSettled)
    assert settled.outcome == "hit" and settled.generation == 0


def test_a_different_final_text_discards_the_speculation_and_goes_on_anew() -> None:
    """The final transcript differs: settled as discarded, the generation moves on, and the
    final text goes out under the new generation."""
    stage = SttStage(ScriptedTranscriber("hello", "hello there friend"), SpeculationPolicy())
    run = run_stage(stage, [segment(800, True), segment(1600, False)])
    speculative, final = run.outputs
    assert isinstance(speculative, Transcript) and speculative.speculative
    assert isinstance(final, Transcript) and not final.speculative
    assert final.text == "hello there friend" and final.generation == 1
    [settled] = run.events.of_type(SpeculationSettled)
    assert settled.outcome == "discarded" and settled.generation == 0


def test_no_speculation_while_another_sessions_confirmed_reply_is_generating() -> None:
    """Confirmed work first: while it runs, a pause only transcribes ahead."""
    policy = SpeculationPolicy()
    with policy.confirmed_work():
        run = run_stage(
            SttStage(ScriptedTranscriber("hello"), policy),
            [segment(800, True), segment(800, False)],
        )
    [transcript] = run.outputs
    assert isinstance(transcript, Transcript) and not transcript.speculative
    assert not run.events.of_type(SpeculationSettled)
    assert policy.skipped_under_load == 1


# --- the history keeps only committed replies -----------------------------------------------


@pytest.mark.parametrize("settle_first", [False, True])
@pytest.mark.parametrize("keep", [True, False])
def test_a_speculative_reply_joins_the_history_only_once_confirmed(
    settle_first: bool, keep: bool
) -> None:
    """Whichever comes first, the reply or its outcome, only a kept reply is in the prompt."""
    history = ChatHistory(HistoryOptions(), lambda text: len(text.split()))
    key = (3, 7)
    if settle_first:
        history.settle(key, keep)
        history.record_speculative(key, "question", "answer")
    else:
        history.record_speculative(key, "question", "answer")
        assert len(history) == 0  # pending: not in the prompt yet
        history.settle(key, keep)
    assert len(history) == (1 if keep else 0)
    prompt = history.prompt("next")
    assert ({"role": "assistant", "content": "answer"} in prompt) == keep


# --- whole sessions over real sockets -------------------------------------------------------


@dataclass
class Heard:
    """What a client received, each with its arrival time."""

    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    audio_at: list[float] = field(default_factory=list)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [event for _, event in self.events if event["type"] == kind]


def talk(
    url: str, audio: Samples, before_close: Callable[[], None] = lambda: None
) -> tuple[Heard, float]:
    """Stream ``audio`` (16 kHz) in real time, then silence until the reply ends; returns what
    came back and when the last of ``audio`` was sent. ``before_close`` runs while the
    session is still open, after the reply."""
    heard = Heard()
    with connect(url, open_timeout=10, close_timeout=2) as connection:
        connection.send(
            json.dumps(
                {
                    "type": "hello",
                    "protocol": 1,
                    "input_sample_rate": RATE_HZ,
                    "output_sample_rate": RATE_HZ,
                }
            )
        )
        assert json.loads(connection.recv(timeout=10))["type"] == "ready"
        reply_ended = threading.Event()

        def receive() -> None:
            try:
                while True:
                    message = connection.recv(timeout=HANG_BOUND_S)
                    if isinstance(message, bytes):
                        heard.audio_at.append(time.monotonic())
                        continue
                    event = json.loads(message)
                    heard.events.append((time.monotonic(), event))
                    if event["type"] == "reply_audio_end":
                        reply_ended.set()
                        return
            except Exception:
                reply_ended.set()

        receiver = threading.Thread(target=receive, name="test-receiver")
        receiver.start()
        frame = int(FRAME_S * RATE_HZ)
        began = time.monotonic()
        sent_until = 0.0
        silence = np.zeros(frame, dtype=np.float32)
        for index, start in enumerate(range(0, len(audio), frame)):
            _wait_until(began + index * FRAME_S)
            connection.send(to_pcm16(audio[start : start + frame]))
            sent_until = time.monotonic()
        index = len(audio) // frame
        while not reply_ended.is_set() and time.monotonic() - began < HANG_BOUND_S:
            index += 1
            _wait_until(began + index * FRAME_S)
            connection.send(to_pcm16(silence))
        receiver.join(HANG_BOUND_S)
        before_close()
    return heard, sent_until


def _wait_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def spoken(models: LoadedModels, text: str) -> Samples:
    """Piper says ``text`` at 16 kHz, cut where the VAD's own end rule cuts (frames 26 dB
    under the loud ones are silence), so that a pause in the test is the pause it adds."""
    voice = models.tts
    speech = np.concatenate(list(voice.stream(text, lambda: False)))
    speech = resample(speech, voice.sample_rate_hz, RATE_HZ).astype(np.float32)
    frame = RATE_HZ // 100
    frames = len(speech) // frame
    rms = np.sqrt((speech[: frames * frame].reshape(frames, frame) ** 2).mean(axis=1))
    loud = np.nonzero(rms > np.percentile(rms, 90) * 10 ** (END_LEVEL_DB / 20))[0]
    return speech[loud[0] * frame : (loud[-1] + 1) * frame]


def silence(seconds: float) -> Samples:
    return np.zeros(int(seconds * RATE_HZ), dtype=np.float32)


@pytest.fixture
def baseline_threads() -> Iterator[None]:
    before = threading.active_count()
    yield
    assert settle(lambda: threading.active_count() <= before), [
        t.name for t in threading.enumerate()
    ]


@pytest.mark.models
@pytest.mark.usefixtures("baseline_threads")
def test_a_pause_mid_question_gives_one_turn_and_no_early_audio(
    cpu_models: LoadedModels,
) -> None:
    """'What is the capital' - 300 ms - 'of the country France?': one turn whose transcript
    holds both halves, no reply audio before the second half ended, the speculation at the pause
    abandoned (missed), only the committed reply in the history, nothing left behind."""
    audio = np.concatenate(
        [
            silence(0.5),
            spoken(cpu_models, "What is the capital"),
            silence(0.3),
            # Several words: a lone "of France?" was heard as "A friend?" now and then.
            spoken(cpu_models, "of the country France?"),
            silence(0.2),
        ]
    )
    running = Running(cpu_models)
    left_behind: list[str] = []

    def nothing_left_behind() -> None:
        """With the reply done and the session still open: no item in any stage's queue and
        no confirmed work counted (speculation allowed again)."""
        [pipeline] = running.pipelines
        for runner in pipeline.runners[1:]:
            if not settle(runner.inbox.empty):
                left_behind.append(runner.stage.name)
        if not cpu_models.speculation.allows():
            left_behind.append("confirmed work still counted")

    try:
        heard, second_half_sent = talk(running.url, audio, nothing_left_behind)
        outcomes = dict(running.server.speculation_outcomes)
        [pipeline] = running.pipelines
        history = pipeline.stage(LlmStage).history
        assert settle(lambda: len(history) == 1)
    finally:
        running.stop()
    [transcript] = heard.of("transcript")
    print(f"transcript {transcript['text']!r}; outcomes {outcomes}")
    assert {"capital", "country"} <= set(re.findall(r"[a-z]+", transcript["text"].lower()))
    assert len(heard.of("speech_stopped")) == 1
    assert heard.audio_at and min(heard.audio_at) > second_half_sent
    assert outcomes.get("missed", 0) >= 1  # the pause was speculated on, then abandoned
    [metrics] = heard.of("metrics")
    assert metrics["speculation"] in ("hit", "missed")
    user_turns = [m for m in history.prompt("next") if m["role"] == "user"]
    assert [m["content"] for m in user_turns[:-1]] == [transcript["text"]]
    assert left_behind == []


class EchoChat:
    """A chat backend that answers 'Answer to: <question>' one word at a time."""

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stream(
        self, messages: Sequence[ChatMessage], should_stop: Callable[[], bool]
    ) -> Iterator[str]:
        for word in f"Answer to: {messages[-1]['content']}.".split():
            if should_stop():
                return
            time.sleep(0.01)
            yield word + " "


class ToneVoice:
    """A synthesizer that says anything as 0.3 s of a quiet tone."""

    sample_rate_hz = RATE_HZ

    def stream(self, text: str, should_stop: Callable[[], bool]) -> Iterator[Samples]:
        t = np.arange(int(0.3 * RATE_HZ)) / RATE_HZ
        yield (0.05 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


class ScriptedVad:
    """A VAD that hears speech from 0.5 s, reports a pause at 1.1 s, and ends the turn at
    1.4 s without reporting a resumption (as when the user trails on quietly): the final
    segment is longer than the one transcribed at the pause."""

    def __init__(self) -> None:
        self._received = 0
        self._script: list[tuple[float, VadEvent]] = [
            (0.6, VadStarted(self._at(0.5))),
            (1.2, VadPaused(silence(0.6), self._at(0.5), self._at(1.1))),
            (1.9, VadEnded(silence(0.9), self._at(0.5), self._at(1.4))),
        ]

    @staticmethod
    def _at(seconds: float) -> int:
        return int(seconds * RATE_HZ)

    @property
    def in_speech(self) -> bool:
        return 0 < len(self._script) < 3

    def push(self, samples: Samples) -> list[VadEvent]:
        self._received += len(samples)
        due = [event for at, event in self._script if self._at(at) <= self._received]
        self._script = self._script[len(due) :]
        return due

    def restart(self, speech_start: int) -> None:
        pass

    def forget(self, until: int) -> None:
        pass

    def commit(self) -> list[VadEvent]:
        return []

    def clear(self) -> list[VadEvent]:
        return []


@pytest.mark.models
@pytest.mark.usefixtures("baseline_threads")
def test_a_different_final_transcript_regenerates_and_only_the_final_reply_is_heard(
    cpu_models: LoadedModels,
) -> None:
    """The transcriber hears the pause and the end differently: the speculative reply is
    discarded, made again from the final text, and the client sees and hears only that one."""
    models = replace(
        cpu_models,
        stt=ScriptedTranscriber("first words", "first words and the rest"),
        llm=EchoChat(),
        tts=ToneVoice(),
        speculation=SpeculationPolicy(),
    )
    running = Running(
        models,
        build=lambda **kwargs: build_session_pipeline(
            models, voice_activity=ScriptedVad(), **kwargs
        ),
    )
    audio = silence(2.0)
    try:
        heard, _ = talk(running.url, audio)
        [pipeline] = running.pipelines
        history = pipeline.stage(LlmStage).history
        assert settle(lambda: len(history) == 1)
        outcomes = dict(running.server.speculation_outcomes)
    finally:
        running.stop()
    assert [e["text"] for e in heard.of("transcript")] == ["first words and the rest"]
    texts = " ".join(e["text"] for e in heard.of("reply_text"))
    assert texts.strip() == "Answer to: first words and the rest."
    assert len(heard.of("reply_audio_start")) == 1
    assert outcomes == {"discarded": 1}
    [metrics] = heard.of("metrics")
    assert metrics["speculation"] == "discarded"
    assert history.prompt("next")[1:3] == [
        {"role": "user", "content": "first words and the rest"},
        {"role": "assistant", "content": "Answer to: first words and the rest."},
    ]

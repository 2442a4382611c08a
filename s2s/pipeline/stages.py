"""The four stages of a voice turn: VAD -> STT -> LLM -> TTS.

Each takes its model through the constructor (already loaded, possibly shared with other
sessions) and only moves items: the models live in ``s2s/models/``. No stage holds a lock on a
model: each model serves several sessions at once or takes turns per step itself, so no
session's output ever waits on another session's whole reply.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from s2s.pipeline.chunker import ChunkerOptions, SpeakableChunker
from s2s.pipeline.echo import EchoGate
from s2s.pipeline.history import ChatHistory, ChatMessage
from s2s.pipeline.input_clock import InputClock
from s2s.pipeline.messages import (
    AudioChunk,
    InputCommand,
    InputCommandDone,
    NoWords,
    ReplyAudio,
    ReplyText,
    Samples,
    SpeculationSettled,
    SpeechResumed,
    SpeechSegment,
    SpeechStarted,
    SpeechStopped,
    Transcript,
    TurnClock,
    TurnMetrics,
)
from s2s.pipeline.segmenter import VadEnded, VadEvent, VadPaused, VadResumed, VadStarted
from s2s.pipeline.speculation import FirstChunkPriority, SpeculationPolicy
from s2s.pipeline.stage import Stage, StageContext

# --- what the stages need from the models (see models/) -------------------------------------


class VoiceActivity(Protocol):
    """One session's streaming VAD (``s2s.models.vad.StreamingVad``)."""

    @property
    def in_speech(self) -> bool: ...

    def push(self, samples: Samples) -> list[VadEvent]: ...

    def restart(self, speech_start: int) -> None: ...

    def forget(self, until: int) -> None: ...

    def commit(self) -> list[VadEvent]: ...

    def clear(self) -> list[VadEvent]: ...


class Transcriber(Protocol):
    def transcribe(self, samples: Samples) -> str: ...


class ChatBackend(Protocol):
    def stream(
        self, messages: list[ChatMessage], should_stop: Callable[[], bool]
    ) -> Iterator[str]: ...


class Synthesizer(Protocol):
    @property
    def sample_rate_hz(self) -> int: ...

    def stream(self, text: str, should_stop: Callable[[], bool]) -> Iterator[Samples]: ...


class Resampler(Protocol):
    def push(self, samples: Samples, last: bool = False) -> Samples: ...


class EchoCanceller(Protocol):
    """Takes the reply's echo out of the microphone (``s2s.server.reply_echo``)."""

    def cancel(self, samples: Samples, ends_at: float) -> Samples:
        """A chunk spoken up to ``ends_at`` (monotonic seconds): the cleaned stream so far
        (whole blocks, in order; held back for a moment at a reply's start)."""
        ...

    def trusted(self, since: int) -> bool:
        """Whether speech that began at microphone sample ``since`` can be taken for the
        user's on its output alone (it had learned the room, and no reply's start was still
        settling there): where not, the echo gate decides as well."""
        ...


REPLIES_TRACKED = 8
"""Replies per session whose first audio is remembered (only the current one matters)."""
LOUD_SHARE = 0.75
"""Of the minimum onset, how much must be louder than the echo (the rest: dips). A 150 ms
cough touches six 32 ms chunks (192 ms): at 2/3, one stray loud chunk of echo after it made
an onset on the simulated room (1 cough in 10 at -10 dB of echo)."""
ECHO_DIP_S = 0.2
"""Within speech over echo, quieter moments up to this long (between syllables and words) do
not end it. At 0.1 s a user at -26 dBFS over -10 dB of echo was missed 3 times in 16 on a
simulated room (the quieter syllables sink into the echo); at 0.2 s, never. A cough bridged to
a stray loud moment of the echo then spans 300 ms too: LOUD_SHARE turns that away."""


# --- VAD ------------------------------------------------------------------------------------


class VadStage(Stage[AudioChunk | InputCommand, SpeechSegment]):
    """Microphone audio in; one ``SpeechSegment`` per utterance out, with speech events."""

    name = "vad"
    # The user's audio is never stale: speech that arrives while a reply is cancelled is the
    # start of the next turn.
    accepts_stale_input = True

    def __init__(
        self,
        vad: VoiceActivity,
        sample_rate_hz: int,
        echo_gate: EchoGate | None = None,
        min_speech_ms: int = 300,
        echo_canceller: EchoCanceller | None = None,
    ) -> None:
        """``echo_gate`` tells the user from the reply's echo by level; ``echo_canceller``
        removes the echo before the VAD hears it: once it has learned the room, speech is
        speech, and the gate (if any) is no longer asked."""
        self._vad = vad
        self._sample_rate_hz = sample_rate_hz
        self._echo_gate = echo_gate
        self._echo_canceller = echo_canceller
        self._min_speech_samples = min_speech_ms * sample_rate_hz // 1000
        self._dip_samples = round(ECHO_DIP_S * sample_rate_hz)
        # Loudness is tracked in sample positions, not arrival times: a stalled or bursty
        # uplink must neither break a run of speech nor shorten it.
        self._loud_since: int | None = None  # the user louder than the echo since this sample
        self._last_loud_end = 0
        self._loud_samples = 0  # of the run since _loud_since
        self._clock = InputClock(sample_rate_hz)
        self._next_turn_id = 0
        self._stream_end = 0  # input samples seen so far
        self._speech_started_at: float | None = None
        self._ignoring_echo = False
        self._cleaned_end = 0  # samples the echo canceller has given back (the VAD's stream)
        self.echoes_ignored = 0

    def handle(self, item: AudioChunk | InputCommand, ctx: StageContext) -> Iterator[SpeechSegment]:
        if isinstance(item, InputCommand):
            yield from self._command(item, ctx)
            return
        if item.sample_rate_hz != self._sample_rate_hz:
            raise ValueError(
                f"VAD expects {self._sample_rate_hz} Hz audio, got {item.sample_rate_hz} Hz"
            )
        chunk_end = item.first_sample_index + len(item.samples)
        self._stream_end = chunk_end
        self._clock.observe(chunk_end, item.received_at)
        self._track_loudness(item, chunk_end)
        samples = item.samples
        if self._echo_canceller is not None:
            samples = self._echo_canceller.cancel(samples, self._clock.time_of(chunk_end))
            self._cleaned_end += len(samples)
        yield from self._segments(self._vad.push(samples), ctx)
        self._user_spoke_up(ctx)
        self._judge_again_once_trusted()

    def _command(self, item: InputCommand, ctx: StageContext) -> Iterator[SpeechSegment]:
        """The client ends its turn now (``commit``) or drops it (``clear``)."""
        users_speech = self._vad.in_speech and not self._ignoring_echo
        if item.action == "clear" or not users_speech:
            events = self._vad.clear()  # echo under way is dropped either way
            self._ignoring_echo = False
        else:
            events = self._vad.commit()
        yield from self._segments(events, ctx)
        ctx.emit(
            InputCommandDone(
                session_id=ctx.session_id,
                turn_id=self._next_turn_id,
                generation=ctx.cancellation.generation,
                action=item.action,
                applied=users_speech,
            )
        )

    def _time_of(self, sample_index: int) -> float:
        """When that sample was spoken (before any audio arrived: now)."""
        return self._clock.time_of(sample_index) if self._stream_end else time.monotonic()

    def _segments(self, events: list[VadEvent], ctx: StageContext) -> Iterator[SpeechSegment]:
        for event in events:
            index = (
                event.sample_index
                if isinstance(event, VadStarted | VadResumed)
                else event.speech_end_sample_index
            )
            at = self._time_of(index)
            session_id, turn_id = ctx.session_id, self._next_turn_id
            generation = ctx.cancellation.generation
            if isinstance(event, VadStarted) and self._maybe_echo(index):
                self._ignoring_echo = True  # the assistant hearing itself, until shown otherwise
                self.echoes_ignored += 1
                continue
            if self._ignoring_echo:
                self._ignoring_echo = not isinstance(event, VadEnded)
                continue
            if isinstance(event, VadStarted | VadResumed):
                if isinstance(event, VadStarted):
                    self._speech_started_at = at
                kind = SpeechStarted if isinstance(event, VadStarted) else SpeechResumed
                ctx.emit(
                    kind(
                        session_id=session_id,
                        turn_id=turn_id,
                        generation=generation,
                        sample_index=index,
                        at=at,
                    )
                )
                continue
            provisional = isinstance(event, VadPaused)
            if not provisional:
                ctx.emit(
                    SpeechStopped(
                        session_id=session_id,
                        turn_id=turn_id,
                        generation=generation,
                        sample_index=index,
                        at=at,
                    )
                )
                self._next_turn_id += 1
            yield SpeechSegment(
                session_id=session_id,
                turn_id=turn_id,
                generation=generation,
                samples=event.samples,
                sample_rate_hz=self._sample_rate_hz,
                start_sample_index=event.start_sample_index,
                end_sample_index=index,
                clock=TurnClock(
                    speech_started_at=self._speech_started_at,
                    speech_ended_at=at,
                    end_of_turn_at=None if provisional else time.monotonic(),
                ),
                provisional=provisional,
            )

    def _track_loudness(self, item: AudioChunk, chunk_end: int) -> None:
        """Since which sample the microphone has been louder than the reply's echo could be
        (quieter moments under ECHO_DIP_S, between syllables, allowed)."""
        if self._echo_gate is None:
            return
        spoken_by = self._clock.time_of(chunk_end)
        if self._echo_gate.louder_than_echo(item.samples, spoken_by, self._sample_rate_hz):
            if self._loud_since is None:
                self._loud_since = item.first_sample_index
                self._loud_samples = 0
            self._last_loud_end = chunk_end
            self._loud_samples += len(item.samples)
        elif self._loud_since is not None and chunk_end - self._last_loud_end > self._dip_samples:
            self._loud_since = None

    def _louder_long_enough(self) -> bool:
        """Louder than the echo over the minimum onset, and for most of it: a cough followed
        by a stray loud moment of the echo spans as long, but is mostly quiet."""
        return (
            self._loud_since is not None
            and self._last_loud_end - self._loud_since >= self._min_speech_samples
            and self._loud_samples >= LOUD_SHARE * self._min_speech_samples
        )

    def _maybe_echo(self, onset: int) -> bool:
        """Speech while the reply plays is taken for its echo unless the microphone has
        already been louder than that echo for the minimum onset (a cough is too short)."""
        if self._echo_gate is None:
            return False
        if self._echo_canceller is not None and self._echo_canceller.trusted(onset):
            return False
        if not self._echo_gate.reply_playing(self._time_of(onset), self._time_of(self._stream_end)):
            return False
        return not self._louder_long_enough()

    def _judge_again_once_trusted(self) -> None:
        """Speech taken for echo because the canceller's output could not be trusted alone
        where it began (it was still learning the room, or a reply's start had not settled)
        is judged again once it can be: the VAD starts over from there, and speech that goes
        on for the minimum onset is the user's. A question from 1.1 s into the session's
        first reply was otherwise lost whole (the canceller is trusted from 1.5 s; the gate's
        fixed rule, before it has measured the room, cannot hear -26 dBFS over the echo)."""
        canceller = self._echo_canceller
        if canceller is None or not (self._ignoring_echo and self._vad.in_speech):
            return
        if canceller.trusted(self._cleaned_end):
            self._vad.forget(self._cleaned_end)
            self._ignoring_echo = False

    def _user_spoke_up(self, ctx: StageContext) -> None:
        """While echo is being ignored, the user may start talking over it: once the microphone
        has been louder than the echo for min_speech_ms, that is the user's onset."""
        if not (self._ignoring_echo and self._vad.in_speech and self._louder_long_enough()):
            return
        assert self._loud_since is not None
        onset, self._loud_since = self._loud_since, None
        self._vad.restart(onset)  # the segment starts with the user, not with the echo
        self._ignoring_echo = False
        onset_at = self._time_of(onset)
        self._speech_started_at = onset_at
        ctx.emit(
            SpeechStarted(
                session_id=ctx.session_id,
                turn_id=self._next_turn_id,
                generation=ctx.cancellation.generation,
                sample_index=onset,
                at=onset_at,
            )
        )


@dataclass(frozen=True, slots=True)
class _Speculation:
    """A reply started at a pause: for which turn, generation, audio and text."""

    turn_id: int
    generation: int
    span: tuple[int, int]
    text: str


class SttStage(Stage[SpeechSegment, Transcript]):
    """Transcribes each final segment. A provisional segment (sent as the silence began) is
    transcribed ahead and its text kept: when the final segment with the same audio arrives,
    the text is ready, and the end-of-turn wait has hidden the transcription.

    With a ``speculation`` policy that allows it, the provisional text also goes on at once,
    as a speculative ``Transcript``: the reply is made during the end-of-turn wait and held
    back by the session. At the final segment, ``SpeculationSettled`` says whether it stands
    (the same text: ``hit``) or not (``discarded``: the generation moves on, which abandons
    it, and the final text goes on under the new generation).
    """

    name = "stt"

    def __init__(
        self, transcriber: Transcriber, speculation: SpeculationPolicy | None = None
    ) -> None:
        self._transcriber = transcriber
        self._policy = speculation
        self._ahead: tuple[tuple[int, int], str] | None = None
        self._speculation: _Speculation | None = None
        self.reused_ahead = 0
        """Final segments whose text was already transcribed ahead (for tests and metrics)."""

    def handle(self, item: SpeechSegment, ctx: StageContext) -> Iterator[Transcript]:
        span = (item.start_sample_index, item.end_sample_index)
        if item.provisional:
            text = self._transcribe(item.samples)
            self._ahead = (span, text)
            if text and self._policy is not None and self._policy.allows():
                self._speculation = _Speculation(item.turn_id, item.generation, span, text)
                transcript = self._transcript(item, text, item.generation, speculative=True)
                # Emitted here, not by the LLM stage: the session must see it before this
                # stage can settle it.
                ctx.emit(transcript)
                yield transcript
            return
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == span:
            text = ahead[1]
            self.reused_ahead += 1
        else:
            text = self._transcribe(item.samples)
        generation = item.generation
        speculation, self._speculation = self._speculation, None
        if speculation is not None and not ctx.cancellation.is_stale(speculation.generation):
            hit = speculation.text == text and speculation.turn_id == item.turn_id
            if not hit:
                generation = ctx.cancellation.advance()
            ctx.emit(
                SpeculationSettled(
                    session_id=item.session_id,
                    turn_id=speculation.turn_id,
                    generation=speculation.generation,
                    outcome="hit" if hit else "discarded",
                    end_of_turn_at=item.clock.end_of_turn_at,
                    speech_ended_at=item.clock.speech_ended_at,
                )
            )
            if hit:
                return  # the reply is already on its way
        if not text:
            # Noise that looked like speech: no reply, and the session stops waiting for one.
            ctx.emit(
                NoWords(session_id=item.session_id, turn_id=item.turn_id, generation=generation)
            )
            return
        yield self._transcript(item, text, generation, speculative=False)

    @staticmethod
    def _transcript(
        item: SpeechSegment, text: str, generation: int, speculative: bool
    ) -> Transcript:
        return Transcript(
            session_id=item.session_id,
            turn_id=item.turn_id,
            generation=generation,
            text=text,
            clock=item.clock.stamp(transcribed_at=time.monotonic()),
            speculative=speculative,
        )

    def _transcribe(self, samples: Samples) -> str:
        return self._transcriber.transcribe(samples)


# --- LLM ------------------------------------------------------------------------------------


class LlmStage(Stage[Transcript, ReplyText]):
    """Streams the reply through the speakable-chunk splitter and keeps the session's history.

    The turn's last ``ReplyText`` has ``is_last=True`` (its text may be empty), so the TTS
    stage knows where the reply ends without waiting for another chunk. With ``whole_reply``
    (the benchmark's baseline) the reply goes out as one chunk once it is complete.
    """

    name = "llm"

    def __init__(
        self,
        backend: ChatBackend,
        history: ChatHistory,
        chunker_options: ChunkerOptions | None = None,
        whole_reply: bool = False,
        speculation: SpeculationPolicy | None = None,
        priority: FirstChunkPriority | None = None,
    ) -> None:
        self._backend = backend
        self.history = history
        self._chunker_options = chunker_options
        self._whole_reply = whole_reply
        self._policy = speculation
        self._priority = priority

    def handle(self, item: Transcript, ctx: StageContext) -> Iterator[ReplyText]:
        chunker = SpeakableChunker(self._chunker_options)
        clock = item.clock
        reply: list[str] = []
        index = 0
        finished = False
        is_stale = ctx.cancellation.stop_check(item.generation)
        end_urgent = self._priority.begin() if self._priority is not None else lambda: None

        def should_stop() -> bool:
            # Called between tokens (on the engine's thread for CTranslate2): once this reply
            # has its first chunk, its later tokens wait briefly for other sessions' first
            # chunks, which users are waiting for; this reply's later chunks are not needed
            # before its first has played.
            if index > 0 and self._priority is not None:
                self._priority.yield_to_urgent()
            return is_stale()

        if not item.speculative:
            ctx.emit(item)  # a speculative one was emitted by the STT stage

        def chunk(text: str, is_last: bool) -> ReplyText:
            nonlocal clock, index
            clock = clock.stamp(first_text_chunk_at=time.monotonic())
            out = ReplyText(
                session_id=item.session_id,
                turn_id=item.turn_id,
                generation=item.generation,
                text=text,
                chunk_index=index,
                is_last=is_last,
                clock=clock,
            )
            index += 1
            end_urgent()
            ctx.emit(out)
            return out

        confirmed = (
            self._policy.confirmed_work()
            if self._policy is not None and not item.speculative
            else nullcontext()
        )
        try:
            with confirmed:
                # No lock here: the backend serves sessions at once, or takes turns per step.
                for delta in self._backend.stream(self.history.prompt(item.text), should_stop):
                    clock = clock.stamp(first_token_at=time.monotonic())
                    reply.append(delta)
                    if not self._whole_reply:
                        for text in chunker.push(delta):
                            yield chunk(text, is_last=False)
            rest = ["".join(reply).strip()] if self._whole_reply else chunker.finish()
            yield chunk(rest[0] if rest else "", is_last=True)
            finished = True
        finally:
            # Runs on a normal end and when the runner abandons this generator (cancellation).
            end_urgent()
            if item.speculative:
                key = (item.turn_id, item.generation)
                self.history.record_speculative(key, item.text, "".join(reply), not finished)
            else:
                self.history.record(
                    item.text, "".join(reply), interrupted=not finished, turn_id=item.turn_id
                )


# --- TTS ------------------------------------------------------------------------------------


class TtsStage(Stage[ReplyText, ReplyAudio]):
    """Speaks each reply chunk as it comes; resamples to the session's output rate.

    Emits ``TurnMetrics`` with the turn's first audio, when every stage's time is known.
    With ``whole_reply`` (the benchmark's baseline) each chunk's audio is synthesised in full
    before any of it is sent.
    """

    name = "tts"

    def __init__(
        self,
        synthesizer: Synthesizer,
        output_rate_hz: int,
        make_resampler: Callable[[int, int], Resampler],
        whole_reply: bool = False,
        priority: FirstChunkPriority | None = None,
    ) -> None:
        self._whole_reply = whole_reply
        self._priority = priority
        self._synthesizer = synthesizer
        self._output_rate_hz = output_rate_hz
        self._make_resampler = make_resampler
        # Replies whose first audio was made; a reply cancelled before its last chunk never
        # leaves by itself, so only the most recent few are kept.
        self._turns_with_audio: dict[tuple[int, int], None] = {}

    def handle(self, item: ReplyText, ctx: StageContext) -> Iterator[ReplyAudio]:
        is_stale = ctx.cancellation.stop_check(item.generation)
        first = item.chunk_index == 0
        end_urgent = (
            self._priority.begin() if first and self._priority is not None else lambda: None
        )

        def should_stop() -> bool:
            # A later chunk's synthesis waits briefly for other sessions' first audio.
            if not first and self._priority is not None:
                self._priority.yield_to_urgent()
            return is_stale()

        try:
            yield from self._handle(item, ctx, should_stop, end_urgent)
        finally:
            end_urgent()

    def _handle(
        self,
        item: ReplyText,
        ctx: StageContext,
        should_stop: Callable[[], bool],
        end_urgent: Callable[[], None],
    ) -> Iterator[ReplyAudio]:
        resampler = self._make_resampler(self._synthesizer.sample_rate_hz, self._output_rate_hz)
        if item.text:
            pieces = self._speak(item.text, resampler, should_stop)
            if self._whole_reply:
                pieces = iter([np.concatenate(list(pieces) or [np.zeros(0, dtype=np.float32)])])
            for audio in pieces:
                if len(audio):
                    end_urgent()
                    yield self._audio(item, audio, is_last=False, ctx=ctx)
        if item.is_last:
            self._turns_with_audio.pop((item.turn_id, item.generation), None)
            yield self._audio(item, np.zeros(0, dtype=np.float32), is_last=True, ctx=ctx)

    def _speak(
        self, text: str, resampler: Resampler, should_stop: Callable[[], bool]
    ) -> Iterator[Samples]:
        for samples in self._synthesizer.stream(text, should_stop):
            yield resampler.push(samples)
        yield resampler.push(np.zeros(0, dtype=np.float32), last=True)

    def _audio(
        self, item: ReplyText, samples: Samples, is_last: bool, ctx: StageContext
    ) -> ReplyAudio:
        clock = item.clock
        key = (item.turn_id, item.generation)
        if len(samples) and key not in self._turns_with_audio:
            self._turns_with_audio[key] = None
            while len(self._turns_with_audio) > REPLIES_TRACKED:
                del self._turns_with_audio[next(iter(self._turns_with_audio))]
            clock = clock.stamp(first_audio_at=time.monotonic())
            ctx.emit(TurnMetrics.from_clock(item, clock))
        return ReplyAudio(
            session_id=item.session_id,
            turn_id=item.turn_id,
            generation=item.generation,
            samples=samples,
            sample_rate_hz=self._output_rate_hz,
            text=item.text,
            chunk_index=item.chunk_index,
            is_last=is_last,
            clock=clock,
        )

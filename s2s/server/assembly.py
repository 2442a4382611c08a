"""Wiring one session's pipeline from the shared, already loaded models."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from s2s.models.audio import StreamResampler
from s2s.models.profiles import LoadedModels
from s2s.models.vad import StreamingVad
from s2s.pipeline.chunker import ChunkerOptions
from s2s.pipeline.echo import EchoGate
from s2s.pipeline.history import ChatHistory, HistoryOptions
from s2s.pipeline.messages import Event, Message
from s2s.pipeline.pipeline import Pipeline
from s2s.pipeline.segmenter import VAD_SAMPLE_RATE_HZ
from s2s.pipeline.stage import Stage
from s2s.pipeline.stages import (
    EchoCanceller,
    LlmStage,
    SttStage,
    TtsStage,
    VadStage,
    VoiceActivity,
)


def build_session_pipeline(
    models: LoadedModels,
    *,
    session_id: str,
    output_rate_hz: int,
    deliver: Callable[[Message], None],
    on_event: Callable[[Event], None],
    history_options: HistoryOptions | None = None,
    chunker_options: ChunkerOptions | None = None,
    baseline: bool = False,
    speculate: bool = True,
    echo_gate: EchoGate | None = None,
    echo_canceller: EchoCanceller | None = None,
    voice_activity: VoiceActivity | None = None,
    vad_overrides: Mapping[str, float] | None = None,
) -> Pipeline:
    """A new pipeline with its own VAD state and history; the models are shared.

    ``baseline`` turns off the overlaps (the whole reply, then its whole synthesis), as the
    simplest cascade would run: the benchmark compares it with the streaming pipeline.
    ``speculate`` starts the reply at a pause, before the end of the turn is confirmed, when
    the server's policy allows it (no other session's confirmed reply in progress).
    ``voice_activity``: the session's streaming VAD (default: Silero on the shared model).
    ``vad_overrides``: ``VadOptions`` fields this session's client asked for.
    """
    history = ChatHistory(history_options or HistoryOptions(), models.llm.count_tokens)
    vad_options = models.profile.vad
    if vad_overrides:
        vad_options = replace(vad_options, **vad_overrides)  # type: ignore[arg-type]
    if baseline:
        vad_options = replace(vad_options, pause_after_ms=None)  # no transcription ahead
    stages: list[Stage[Any, Any]] = [
        VadStage(
            voice_activity or StreamingVad(models.vad, vad_options),
            VAD_SAMPLE_RATE_HZ,
            echo_gate,
            vad_options.min_speech_ms,
            echo_canceller,
        ),
        SttStage(models.stt, models.speculation if speculate and not baseline else None),
        LlmStage(
            models.llm,
            history,
            chunker_options,
            whole_reply=baseline,
            speculation=models.speculation,
            priority=models.priority,
        ),
        TtsStage(
            models.tts,
            output_rate_hz,
            StreamResampler,
            whole_reply=baseline,
            priority=models.priority,
        ),
    ]
    return Pipeline(
        stages,
        deliver=deliver,
        on_event=on_event,
        session_id=session_id,
        name=f"session-{session_id}",
    )

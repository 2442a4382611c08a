"""Wiring one session's pipeline from the shared, already loaded models."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models.audio import StreamResampler
from models.profiles import LoadedModels
from models.vad import StreamingVad
from pipeline.chunker import ChunkerOptions
from pipeline.history import ChatHistory, HistoryOptions
from pipeline.messages import Event, Message
from pipeline.pipeline import Pipeline
from pipeline.segmenter import VAD_SAMPLE_RATE_HZ
from pipeline.stage import Stage
from pipeline.stages import LlmStage, SttStage, TtsStage, VadStage


def build_session_pipeline(
    models: LoadedModels,
    *,
    session_id: str,
    output_rate_hz: int,
    deliver: Callable[[Message], None],
    on_event: Callable[[Event], None],
    history_options: HistoryOptions | None = None,
    chunker_options: ChunkerOptions | None = None,
) -> Pipeline:
    """A new pipeline with its own VAD state and history; the models are shared."""
    history = ChatHistory(history_options or HistoryOptions(), models.llm.count_tokens)
    stages: list[Stage[Any, Any]] = [
        VadStage(StreamingVad(models.vad, models.profile.vad), VAD_SAMPLE_RATE_HZ),
        SttStage(models.stt, models.stt_lock),
        LlmStage(models.llm, history, chunker_options, models.llm_lock),
        TtsStage(models.tts, output_rate_hz, StreamResampler, models.tts_lock),
    ]
    return Pipeline(
        stages,
        deliver=deliver,
        on_event=on_event,
        session_id=session_id,
        name=f"session-{session_id}",
    )

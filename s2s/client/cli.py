"""``s2s-client``: talk to an s2s server from the microphone, or stream a file headless.

Ctrl+C at any moment exits with status 130 within half a second: the socket is shut down,
the audio streams are stopped and closed, and every thread is joined.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from s2s.client.app import ClientConfig, ClientError, VoiceClient
from s2s.client.audio import (
    FileSource,
    MicrophoneSource,
    NullSink,
    RecordingSink,
    Sink,
    Source,
    SpeakerSink,
    list_devices,
)
from s2s.client.echo_cancel import EchoCancelledSource, EchoCanceller
from s2s.client.keys import InterruptKey
from s2s.models.echo_cancel import EchoCancelOptions
from s2s.models.errors import ModelUnavailable
from s2s.server import protocol

EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2s-client", description="Talk to an s2s server.")
    parser.add_argument(
        "--url", default="ws://127.0.0.1:8765", help="server address (default ws://127.0.0.1:8765)"
    )
    parser.add_argument("--token", default=os.environ.get("S2S_TOKEN"), help="the server's --token")
    parser.add_argument(
        "--ca-file", help="for wss:// with a self-signed certificate: the CA (PEM) to trust"
    )
    parser.add_argument(
        "--input-device", help="microphone: a device index or name (see --list-devices)"
    )
    parser.add_argument("--output-device", help="speaker: a device index or name")
    parser.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    parser.add_argument(
        "--half-duplex",
        action="store_true",
        help="mute the microphone while a reply plays (speakers without echo cancellation)",
    )
    parser.add_argument(
        "--no-aec",
        action="store_true",
        help="do not cancel the speaker's echo in the microphone (on by default when both the "
        "microphone and the speaker are in use; the server then gates echo by its own estimate)",
    )
    parser.add_argument(
        "--noise-suppression",
        action="store_true",
        help="also suppress steady noise (fans, hum) in the microphone, after the echo canceller",
    )
    parser.add_argument(
        "--file",
        type=Path,
        help="stream this audio file (any rate/channels) instead of the microphone, then exit",
    )
    parser.add_argument(
        "--play", action="store_true", help="with --file: also play the replies on the speaker"
    )
    parser.add_argument("--save", type=Path, help="record the replies to this WAV file")
    parser.add_argument("--json", action="store_true", help="one JSON object per line per event")
    parser.add_argument(
        "--input-rate",
        type=int,
        default=protocol.DEFAULT_INPUT_RATE_HZ,
        help="sample rate sent (default 16000)",
    )
    parser.add_argument(
        "--output-rate",
        type=int,
        default=protocol.DEFAULT_OUTPUT_RATE_HZ,
        help="sample rate asked for replies (default 24000)",
    )
    return parser


def device(value: str | None) -> str | int | None:
    return int(value) if value is not None and value.isdigit() else value


class Printer:
    """Human-readable conversation, or one JSON line per event with --json."""

    def __init__(self, as_json: bool, from_microphone: bool) -> None:
        self._as_json = as_json
        self._prompt = "speak now (Ctrl+C to stop)" if from_microphone else "streaming the file"
        self._replying = False
        # Events come from the receiver and the sender threads: one line each, never two
        # interleaved on one line (print writes the text and its newline separately).
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        with self._lock:
            self._print(event)

    def _print(self, event: dict[str, Any]) -> None:
        if self._as_json:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()
            return
        kind = event.get("type")
        if kind == "ready":
            print(
                f"connected (session {event.get('session_id')}; "
                f"models: {event.get('models')}); {self._prompt}",
                flush=True,
            )
        elif kind == "transcript":
            print(f"you: {event.get('text')}", flush=True)
        elif kind == "reply_text":
            if not self._replying:
                print("assistant:", end="", flush=True)
                self._replying = True
            if event.get("text"):
                print(f" {event.get('text')}", end="", flush=True)
        elif kind == "turn":
            self._replying = False
            latency = event.get("voice_to_voice_ms")
            shown = f"{latency:.0f} ms" if isinstance(latency, int | float) else "n/a"
            cut = " (interrupted)" if event.get("interrupted") else ""
            print(f"\n  [voice-to-voice {shown}{cut}]", flush=True)
        elif kind == "error":
            print(
                f"\nserver error ({event.get('code')}): {event.get('message')}",
                file=sys.stderr,
                flush=True,
            )
        elif kind == "interrupted":
            self._replying = False
            print(" [interrupted]", flush=True)
        elif kind == "bye":
            print(f"\nserver: {event.get('reason')}", file=sys.stderr, flush=True)


def on_terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def canceller_options(noise_suppression: bool) -> EchoCancelOptions:
    """AEC3 with the chain that keeps the voice whole over the reply, or, where pyaec has no
    wheel (not every platform), AEC3 alone, said on stderr."""
    keep_voice = importlib.util.find_spec("pyaec") is not None
    if not keep_voice:
        print(
            "s2s-client: note: pyaec is not installed, so echo cancellation is AEC3 alone: "
            "over a loud echo, speak up to interrupt (pip install pyaec)",
            file=sys.stderr,
        )
    return EchoCancelOptions(noise_suppression=noise_suppression, keep_voice=keep_voice)


def main(argv: list[str] | None = None) -> int:
    # Explicitly, because a shell starts background jobs with SIGINT ignored, and Python keeps
    # an inherited SIG_IGN: Ctrl+C (or kill -INT) must always stop the client.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_terminate)
    # The client says in one line why a connection ended; websockets' own account of the
    # same event (a keepalive timeout, with its traceback) would only bury it.
    logging.getLogger("websockets").setLevel(logging.CRITICAL)
    args = build_parser().parse_args(argv)
    if args.list_devices:
        print(list_devices())
        return 0
    if args.file is not None and not args.file.is_file():
        print(f"s2s-client: error: no such file: {args.file}", file=sys.stderr)
        return 2
    playing = args.file is None or args.play
    # The speaker's echo is cancelled where there is one to cancel: a live microphone beside
    # a playing speaker.
    canceller = None
    if args.file is None and playing and not args.no_aec:
        try:
            canceller = EchoCanceller(
                args.input_rate, args.output_rate, canceller_options(args.noise_suppression)
            )
        except ValueError as exc:
            print(f"s2s-client: error: {exc}", file=sys.stderr)
            return 2
    source: Source = (
        FileSource(args.file, args.input_rate)
        if args.file
        else MicrophoneSource(args.input_rate, device(args.input_device))
    )
    if canceller is not None:
        source = EchoCancelledSource(source, canceller)
    sink: Sink = (
        SpeakerSink(
            args.output_rate,
            device(args.output_device),
            on_played=canceller.reference if canceller is not None else None,
        )
        if playing
        else NullSink(args.output_rate)
    )
    recorder = RecordingSink(sink) if args.save else None
    client = VoiceClient(
        ClientConfig(
            url=args.url,
            token=args.token,
            half_duplex=args.half_duplex,
            exit_after_reply=args.file is not None,
            ca_file=args.ca_file,
            echo_cancelled=canceller is not None,
        ),
        source,
        recorder or sink,
        Printer(args.json, from_microphone=args.file is None),
    )

    def exit_now(signum: int, _frame: FrameType | None) -> None:
        os._exit(128 + signum)  # a second Ctrl+C while closing: leave at once

    key = InterruptKey(client.interrupt) if args.file is None and sys.stdin.isatty() else None
    if key is not None:
        key.start()
        print("press Enter to interrupt the assistant", file=sys.stderr)
    code = 0
    try:
        outcome = client.run()
        code = outcome.exit_code
        if outcome.message:
            print(f"s2s-client: {outcome.message}", file=sys.stderr)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except (ClientError, ModelUnavailable, ValueError) as exc:
        print(f"s2s-client: error: {exc}", file=sys.stderr)
        code = 1
    except Exception as exc:  # any device error from PortAudio, reported in one line
        print(f"s2s-client: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    finally:
        signal.signal(signal.SIGINT, exit_now)
        if key is not None:
            key.close()
        stuck = client.close()
        if stuck:
            print(f"s2s-client: threads still alive at exit: {', '.join(stuck)}", file=sys.stderr)
    if recorder is not None and args.save:
        recorder.save(args.save)
    return code


if __name__ == "__main__":
    sys.exit(main())

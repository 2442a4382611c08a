"""``s2s-demo``: one real spoken turn, end to end, on the offline CPU models.

Makes a spoken question with the offline voice, starts ``s2s-server`` on loopback, streams the
question with ``s2s-client --file`` in real time, prints the conversation and the latency,
saves the spoken answer, stops the server, and shows the two commands to run it yourself.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from s2s.models.errors import ModelUnavailable
from s2s.models.tts import TtsOptions, load_synthesizer

SERVER_START_BOUND_S = 300.0
QUESTION = "What is the capital of France?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="s2s-demo", description=__doc__)
    parser.add_argument("--question", default=QUESTION, help="what to ask (spoken by Piper)")
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for the audio files")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    question_wav, reply_wav = args.out / "question.wav", args.out / "reply.wav"
    try:
        speak(args.question, question_wav)
    except ModelUnavailable as exc:
        print(f"s2s-demo: error: {exc}", file=sys.stderr)
        return 2
    print(f"[demo] question spoken to {question_wav}: {args.question!r}")

    bin_dir = Path(sys.executable).parent
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    print(f"[demo] starting s2s-server --device cpu --port {port} (loads and warms the models)")
    server = subprocess.Popen(
        [
            str(bin_dir / "s2s-server"),
            "--device",
            "cpu",
            "--port",
            str(port),
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if not wait_until_listening(server):
            print(
                "s2s-demo: error: the server did not start (see its messages above)",
                file=sys.stderr,
            )
            return 1
        print(f"[demo] s2s-client --url {url} --file {question_wav} --save {reply_wav}")
        client = subprocess.run(
            [
                str(bin_dir / "s2s-client"),
                "--url",
                url,
                "--file",
                str(question_wav),
                "--save",
                str(reply_wav),
            ],
            check=False,
        )
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    if client.returncode != 0:
        return client.returncode
    print(f"[demo] the spoken answer is in {reply_wav}")
    print(
        "\nOn your own machines (pick any secret for T):\n"
        "  s2s-server --device cuda --host 0.0.0.0 --token T  # the GPU host (or --device cpu)\n"
        "  s2s-client --url ws://GPU-HOST:8765 --token T      # your laptop; Ctrl+C to stop\n"
        "  or open http://GPU-HOST:8765/?token=T in a browser (https or localhost: see README)"
    )
    return 0


def speak(text: str, path: Path) -> None:
    import soundfile

    voice = load_synthesizer(TtsOptions())
    audio = np.concatenate(list(voice.stream(text, lambda: False)))
    soundfile.write(str(path), audio, voice.sample_rate_hz)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_listening(server: subprocess.Popen[str]) -> bool:
    assert server.stdout is not None
    deadline = time.monotonic() + SERVER_START_BOUND_S
    for line in server.stdout:
        if "listening on" in line:
            return True
        if time.monotonic() > deadline:
            break
    return False


if __name__ == "__main__":
    sys.exit(main())

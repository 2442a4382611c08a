"""``s2s-bench``: voice-to-voice latency, end to end, with the server's per-stage breakdown.

Method: every question is streamed in real time as a client would (``s2s-client --file``
logic, one connection per question so that history never grows), and the client measures
voice-to-voice latency: from the end of the user's speech in the sent audio to the first reply
audio received. The server reports its own time in each stage. Warm-up turns are not counted.
Each pipeline mode (streaming, which speculates the reply during the end-of-turn wait, and
with ``--compare-baseline``, at the first concurrency level, streaming without speculation
and the no-overlap baseline) runs against the same server in the same run. Each concurrency
level runs that many simulated users at once, staggered as real users are (each starts at a
random moment of the first turn's length and pauses 0.5-2 s between turns); a refused or
failed turn counts as failed. Percentiles are over all counted turns of a level.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from s2s.client.app import ClientConfig, ClientError, VoiceClient
from s2s.client.audio import FileSource, NullSink
from s2s.client.turns import SERVER_STAGE_FIELDS

QUESTIONS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Tell me a fun fact about the ocean.",
    "What should I cook for dinner tonight?",
    "Why is the sky blue?",
    "Can you recommend a good book to read on a rainy weekend?",
    "What is two plus two?",
    "How far away is the moon from the earth?",
    "Give me one tip for sleeping better.",
    "What is the tallest mountain in the world, and where is it?",
    "Hello!",
    "What time of year is best for visiting Japan?",
)
METRICS = ("voice_to_voice_ms", *SERVER_STAGE_FIELDS, "transport_ms", "speculation_saved_ms")
BREAKDOWN = (
    ("end_of_turn_ms", "end-of-turn wait"),
    ("stt_ms", "STT"),
    ("llm_first_chunk_ms", "LLM to first chunk"),
    ("tts_first_audio_ms", "TTS to first audio"),
    ("transport_ms", "transport + client"),
)
LEAD_SILENCE_S = 0.3
SPAWN_BOUND_S = 600.0
QUESTION_RATE_HZ = 16_000
USER_PAUSE_S = (0.5, 2.0)
"""A simulated user's pause between one answer and the next question."""


@dataclass(frozen=True, slots=True)
class Question:
    path: Path
    speech_s: float


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="s2s-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="ws://127.0.0.1:8765", help="a running server")
    parser.add_argument("--token", help="the server's --token")
    parser.add_argument("--spawn-server", action="store_true", help="start s2s-server itself")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda", "auto"],
        help="with --spawn-server: the device profile (default cpu)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="with --spawn-server: one more argument for s2s-server (repeatable)",
    )
    parser.add_argument("--runs", type=int, default=3, help="repetitions of the question set")
    parser.add_argument(
        "--questions",
        type=int,
        default=len(QUESTIONS),
        help=f"how many built-in questions (default {len(QUESTIONS)})",
    )
    parser.add_argument("--audio-dir", type=Path, help="your own questions (.wav/.flac) instead")
    parser.add_argument(
        "--concurrency",
        type=concurrency_levels,
        default=[1],
        help="users at once; a comma-separated list runs each level in turn (e.g. 1,2,4)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="turns not counted, per mode")
    parser.add_argument(
        "--compare-baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run, at the first level, streaming without speculation and the no-overlap "
        "baseline (default on)",
    )
    parser.add_argument("--out", type=Path, help="write per-turn and summary figures as JSON")
    parser.add_argument("--plot", type=Path, help="write a PNG chart of the breakdown")
    args = parser.parse_args(argv)

    questions = prepare_questions(args.audio_dir, args.questions)
    server: subprocess.Popen[str] | None = None
    url = args.url
    try:
        if args.spawn_server:
            extra = list(args.server_arg)
            if not any(a.startswith("--max-sessions") for a in extra):
                extra += ["--max-sessions", str(max(args.concurrency))]
            server, url = spawn_server(args.device, extra)
        ready = probe(url, args.token)
        levels = [("streaming", c) for c in args.concurrency]
        if args.compare_baseline:
            first = args.concurrency[0]
            levels[1:1] = [("no-speculation", first), ("baseline", first)]
        results: dict[str, Any] = {
            "method": __doc__.strip().split("\n\n", 1)[1].replace("\n", " "),
            "machine": machine(),
            "models": ready.get("models", {}),
            "runs": args.runs,
            "concurrency": args.concurrency,
            "warmup_turns": args.warmup,
            "questions": [
                {"file": q.path.name, "speech_s": round(q.speech_s, 2)} for q in questions
            ],
            "modes": {},
        }
        for mode, concurrency in levels:
            print(
                f"[bench] {mode}: {args.warmup} warm-up turn(s), then {args.runs} x "
                f"{len(questions)} questions, {concurrency} at a time",
                flush=True,
            )
            turns = run_mode(url, args.token, mode, questions, args.runs, concurrency, args.warmup)
            results["modes"][f"{mode} x{concurrency}"] = {
                "pipeline": mode,
                "concurrency": concurrency,
                "turns": turns,
                "summary": summarize(turns),
            }
    except (ClientError, RuntimeError) as exc:
        print(f"s2s-bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
    print_table(results)
    failed = sum(mode["summary"]["failed"] for mode in results["modes"].values())
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
        print(f"[bench] wrote {args.out}")
    if args.plot:
        plot(results, args.plot)
        print(f"[bench] wrote {args.plot}")
    if failed:
        print(f"s2s-bench: {failed} turn(s) failed", file=sys.stderr)
        return 3
    return 0


def concurrency_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be 1 or more")
    return levels


# --- questions -----------------------------------------------------------------------------


def prepare_questions(audio_dir: Path | None, count: int) -> list[Question]:
    import soundfile

    if audio_dir is not None:
        paths = sorted([*audio_dir.glob("*.wav"), *audio_dir.glob("*.flac")])
        if not paths:
            raise SystemExit(f"s2s-bench: error: no .wav or .flac files in {audio_dir}")
        return [Question(p, soundfile.info(str(p)).duration) for p in paths]
    from s2s.models.audio import resample
    from s2s.models.llm import cache_dir
    from s2s.models.tts import TtsOptions, load_synthesizer

    folder = cache_dir() / "bench-questions"
    folder.mkdir(parents=True, exist_ok=True)
    chosen = QUESTIONS[: max(1, count)]
    missing = [q for q in chosen if not (folder / file_name(q)).is_file()]
    voice = load_synthesizer(TtsOptions()) if missing else None
    questions = []
    for text in chosen:
        path = folder / file_name(text)
        if voice is not None and text in missing:
            speech = np.concatenate(list(voice.stream(text, lambda: False)))
            speech = resample(speech, voice.sample_rate_hz, QUESTION_RATE_HZ)
            lead = np.zeros(int(LEAD_SILENCE_S * QUESTION_RATE_HZ), dtype=np.float32)
            soundfile.write(str(path), np.concatenate([lead, speech]), QUESTION_RATE_HZ)
        questions.append(Question(path, soundfile.info(str(path)).duration - LEAD_SILENCE_S))
    return questions


def file_name(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") + ".wav"


# --- running -------------------------------------------------------------------------------


def spawn_server(device: str, extra: list[str]) -> tuple[subprocess.Popen[str], str]:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    command = [
        str(Path(sys.executable).parent / "s2s-server"),
        "--device",
        device,
        "--port",
        str(port),
        "--log-level",
        "WARNING",
        *extra,
    ]
    print(f"[bench] starting {' '.join(command[1:])}; it loads and warms the models", flush=True)
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    deadline = time.monotonic() + SPAWN_BOUND_S
    for line in server.stdout:
        if "listening on" in line:
            # Keep draining its stdout so that the server never blocks on a full pipe.
            threading.Thread(target=server.stdout.read, name="server-stdout", daemon=True).start()
            return server, f"ws://127.0.0.1:{port}"
        if time.monotonic() > deadline:
            break
    server.kill()
    raise RuntimeError("the spawned server did not start; see its messages above")


def probe(url: str, token: str | None) -> dict[str, Any]:
    """Connect once to check the server and learn its models."""
    from websockets.sync.client import connect

    from s2s.server import protocol

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        with connect(url, additional_headers=headers, open_timeout=10) as connection:
            connection.send(protocol.hello(QUESTION_RATE_HZ, QUESTION_RATE_HZ))
            ready: dict[str, Any] = json.loads(connection.recv(timeout=10))
    except Exception as exc:
        raise ClientError(f"cannot use the server at {url}: {exc}") from exc
    return ready


def one_turn(url: str, token: str | None, mode: str, question: Question) -> dict[str, Any]:
    events: list[dict[str, Any]] = []
    client = VoiceClient(
        ClientConfig(url=url, token=token, exit_after_reply=True, pipeline=mode),
        FileSource(question.path, QUESTION_RATE_HZ),
        NullSink(QUESTION_RATE_HZ),
        events.append,
    )
    try:
        outcome = client.run()
    except Exception as exc:  # a refused or broken connection is a failed turn, not a crash
        return {"question": question.path.name, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        client.close()
    turns = [e for e in events if e.get("type") == "turn"]
    if outcome.exit_code != 0 or not turns:
        return {"question": question.path.name, "error": outcome.message or "no turn"}
    turn = turns[0]
    ready = next((e for e in events if e.get("type") == "ready"), {})
    row: dict[str, Any] = {
        "question": question.path.name,
        "pipeline": ready.get("options", {}).get("pipeline"),
        "speech_s": round(question.speech_s, 2),
        "user_text": turn["user_text"],
        "assistant_text": turn["assistant_text"],
        "voice_to_voice_ms": turn["voice_to_voice_ms"],
        **turn["server"],
    }
    if row["voice_to_voice_ms"] is not None and row.get("server_voice_to_voice_ms") is not None:
        row["transport_ms"] = round(row["voice_to_voice_ms"] - row["server_voice_to_voice_ms"], 1)
    if row.get("stt_ms") is not None:
        row["stt_rtf"] = round(row["stt_ms"] / 1000.0 / max(question.speech_s, 0.1), 3)
    return row


def run_mode(
    url: str,
    token: str | None,
    mode: str,
    questions: list[Question],
    runs: int,
    concurrency: int,
    warmup: int,
) -> list[dict[str, Any]]:
    for _ in range(warmup):
        one_turn(url, token, mode, questions[0])
    work = [q for _ in range(runs) for q in questions]
    turns: list[dict[str, Any]] = []
    work_lock = threading.Lock()  # guards work and turns
    # Users do not arrive in lockstep: each starts somewhere within the first question's length
    # and pauses between turns (listening to the answer, thinking). Seeded: runs compare.
    chance = random.Random(concurrency)
    first_s = questions[0].speech_s + 1.0
    starts = [0.0] + [chance.uniform(0, first_s) for _ in range(concurrency - 1)]
    pauses = [chance.uniform(*USER_PAUSE_S) for _ in range(len(work))]

    def worker(start_s: float) -> None:
        time.sleep(start_s)
        while True:
            with work_lock:
                if not work:
                    return
                question = work.pop(0)
                pause_s = pauses.pop()
            row = one_turn(url, token, mode, question)
            with work_lock:
                turns.append(row)
                done = len(turns)
            shown = row.get("voice_to_voice_ms", row.get("error"))
            print(
                f"  [{mode} x{concurrency} {done}/{runs * len(questions)}] "
                f"{question.path.name}: {shown}",
                flush=True,
            )
            if concurrency > 1:
                time.sleep(pause_s)

    threads = [
        threading.Thread(target=worker, args=(start,), name=f"bench-{i}")
        for i, start in enumerate(starts)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return turns


# --- reporting -----------------------------------------------------------------------------


def summarize(turns: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"turns": len(turns), "failed": sum("error" in t for t in turns)}
    outcomes = [t.get("speculation") for t in turns if "error" not in t]
    summary["speculation"] = {
        outcome: outcomes.count(outcome) for outcome in ("hit", "missed", "discarded")
    }
    for metric in (*METRICS, "stt_rtf"):
        values = [t[metric] for t in turns if isinstance(t.get(metric), int | float)]
        if values:
            summary[metric] = {
                "p50": round(float(np.percentile(values, 50)), 1),
                "p90": round(float(np.percentile(values, 90)), 1),
                "p95": round(float(np.percentile(values, 95)), 1),
                "max": round(float(max(values)), 1),
                "n": len(values),
            }
    return summary


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{results['method']}")
    print(f"machine: {results['machine']}; models: {results['models']}")
    header = f"{'metric':28}" + "".join(f"{m + ' p50/p90/p95/max':>36}" for m in results["modes"])
    print(header)
    for metric in (*METRICS, "stt_rtf"):
        cells = []
        for mode in results["modes"].values():
            figures = mode["summary"].get(metric)
            cells.append(
                "/".join(f"{figures[k]:g}" for k in ("p50", "p90", "p95", "max"))
                if figures
                else "-"
            )
        print(f"{metric:28}" + "".join(f"{c:>36}" for c in cells))
    for name, mode in results["modes"].items():
        print(f"{name}: {mode['summary']['turns']} turns, {mode['summary']['failed']} failed")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results["modes"])
    figure, axes = plt.subplots(figsize=(9, 1.2 + 0.9 * len(modes)))
    for row, mode in enumerate(modes):
        summary = results["modes"][mode]["summary"]
        left = 0.0
        for index, (metric, label) in enumerate(BREAKDOWN):
            width = summary.get(metric, {}).get("p50", 0.0)
            axes.barh(row, width, left=left, color=f"C{index}", label=label if row == 0 else None)
            left += width
        total = summary.get("voice_to_voice_ms", {}).get("p50")
        if total is not None:
            axes.text(left + 20, row, f"{total:.0f} ms", va="center")
    axes.set_xlim(0, axes.get_xlim()[1] * 1.12)  # room for the totals
    axes.set_yticks(range(len(modes)), modes)
    axes.set_xlabel("median milliseconds from the end of the user's speech")
    axes.set_title(f"s2s voice-to-voice latency ({results['machine']})", fontsize=9)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def machine() -> str:
    try:
        import os

        cores = os.cpu_count()
    except Exception:
        cores = None
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = ", " + torch.cuda.get_device_name(0)
    except Exception:
        pass
    return f"{platform.machine()} {cores} cores{gpu}, Python {platform.python_version()}"


if __name__ == "__main__":
    sys.exit(main())

"""The client's echo canceller and the server's VAD (or the server's level estimate), without
sockets or a server: coughs, questions and replies alone by the hundred, so that a change to
how the echo is told from the user shows its effect on each way barge-in fails (a cough or the
echo that interrupts, a user heard late or not at all) in minutes.

The room bench (``barge_in_room.py``) runs the whole service under load, ten events per case
in one room, and a failure that comes once in a hundred, or in one room of ten, shows there by
chance or not at all. Here each session is a room (a delay of 50-150 ms, a 200 ms tail, an echo
of -10 or -20 dB) and ten turns: a prompt at -20 dBFS, a pause for the server's thinking, then
6 s of the long reply from a random point (half of them with an underflow: 0.1-0.5 s of silence
within), with a 150 ms cough at -20 dBFS, a question at the user's level, or nothing (the echo
alone) at a random moment 0.5-4 s in; the coughs are COUGH_CLIPS syntheses of the same "Ha!",
taken in turn (Piper's voice differs a little from one synthesis to the next, and one clip is
heard far more often than another).

- ``--handling client-aec`` (the default): the microphone (the room's echo plus the user) goes
  through the client's ``EchoCanceller`` in lockstep with what the speaker played (as in
  ``tests/scripted_user.py``), and its output through Silero VAD with the server's
  ``VadOptions`` for a client that cancels its echo (its threshold 0.4): such a client is
  trusted by the server, so speech the VAD reports during a reply is an interruption. The
  reply plays on regardless.
- ``--handling server-estimate``: the microphone goes, in 32 ms chunks, into the server's VAD
  stage with its level estimate (``s2s-server --server-aec off``) and the default VAD options;
  each reply is put on the estimate's timeline PLAY_OFFSET_S earlier than it played. Speech
  the stage reports while a reply plays interrupts it as in the server: the estimate is told,
  and the reply falls silent STOP_S later.

A cough counts as heard when speech is reported starting from 0.3 s before it to 1.5 s after.
A question's delay is from its speech onset to the end of the window (or chunk) in which
speech was reported (the 300 ms minimum onset included; the socket and the server's queues
are not). "Echo heard first": speech reported during the reply before the event (or at all,
with the echo alone).

Sessions run in two processes (two cores). Prints a table and writes JSON.

    .venv/bin/python bench/aec_offline.py [--handling client-aec|server-estimate]
        [--sessions 20] [--seed 1] [--voices clips.npz] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.barge_in_room import (  # noqa: E402
    LONG_REPLY,
    QUESTIONS,
    a_cough,
    percentile,
    room_for,
    speaker,
)
from s2s.client.echo_cancel import EchoCanceller  # noqa: E402
from s2s.client.room import Room, at_level  # noqa: E402
from s2s.models.audio import resample  # noqa: E402
from s2s.models.profiles import profile_for  # noqa: E402
from s2s.models.tts import load_synthesizer  # noqa: E402
from s2s.models.vad import WINDOW_SAMPLES, SileroVad, StreamingVad  # noqa: E402
from s2s.pipeline.cancellation import TurnCancellation  # noqa: E402
from s2s.pipeline.echo import EchoGate, EchoOptions  # noqa: E402
from s2s.pipeline.messages import AudioChunk, Event, Samples, SpeechStarted  # noqa: E402
from s2s.pipeline.segmenter import VadOptions, VadStarted  # noqa: E402
from s2s.pipeline.stage import StageContext  # noqa: E402
from s2s.pipeline.stages import VadStage  # noqa: E402
from s2s.server.session import ECHO_CANCELLED_VAD_THRESHOLD  # noqa: E402
from tests.scripted_user import RATE_HZ, leading_silence_s  # noqa: E402

TURNS_PER_SESSION = 10
REPLY_S = 6.0
"""Of the long reply, per turn: the events fall 0.5-4 s in."""
THINKING_S = (0.8, 1.6)
"""Between the prompt's end and the reply's start: the server transcribing and thinking."""
UNDERFLOW_SHARE = 0.5
UNDERFLOW_S = (0.1, 0.5)
QUESTION_S = 2.0
"""Of each question: long past the 300 ms onset, short enough to keep sessions quick."""
COUGH_CLIPS = 4
"""Syntheses of the cough: of eight, one was heard 1 time in 400 and another 10 (through the
canceller before its leftover rule, ``QUIET_BANDS``, and with the VAD at 0.5)."""
HEARD_FROM_S, HEARD_TO_S = -0.3, 1.5
"""Speech reported this near a cough is the cough (or what the canceller left of the echo
around it)."""
ECHO_TAIL_S = 1.0
"""After a reply's last sample, how long speech reported is still taken as its echo's doing
(an interruption, to the server, while the reply's end plays out)."""
PLAY_OFFSET_S = (0.04, 0.09)
"""How much later than the server's pacing timeline says each reply plays at the client (its
jitter buffer and sound card), on top of the room's delay: the level estimate's lags cover it."""
MICROPHONE_CHUNK = 512
"""Samples per microphone message, as ``s2s-client`` and the scripted user send them."""
NETWORK_S = 0.005
STOP_S = 0.1
"""From an interruption to the client's speaker falling silent (the reply audio it had
buffered, and the message's way)."""
"""From the microphone to the server: each chunk arrives this long after its last sample."""


@dataclass(frozen=True, slots=True)
class Voices:
    """Every clip the sessions play, synthesized once (Piper's output varies between calls)."""

    reply: Samples
    prompt: Samples
    coughs: tuple[Samples, ...]
    questions: tuple[Samples, ...]


@dataclass(frozen=True, slots=True)
class Job:
    kind: str  # "cough", "barge-in" or "echo" (the reply alone)
    echo_db: float
    user_db: float | None
    seed: int
    handling: str = "client-aec"  # or "server-estimate"


def synthesize(cache: Path | None = None) -> Voices:
    """The clips, from ``cache`` when it exists (written there otherwise): Piper's output varies
    between calls, and a cough that differs by a little is heard more or less often, so runs
    that compare two versions of the canceller should share their clips. A cache holds its
    own coughs (one in those written before there were several)."""
    if cache is not None and cache.exists():
        with np.load(cache) as saved:
            questions = tuple(saved[f"question{k}"] for k in range(len(QUESTIONS)))
            names = sorted((n for n in saved.files if n.startswith("cough")), key=_clip_order)
            coughs = tuple(saved[name] for name in names)
            if not coughs:
                raise ValueError(f"{cache} holds no cough clip (cough0, cough1, ...)")
            return Voices(saved["reply"], saved["prompt"], coughs, questions)
    voice = load_synthesizer(profile_for("cpu").tts)
    say = speaker(voice)
    reply = np.concatenate(list(voice.stream(LONG_REPLY, lambda: False)))
    voices = Voices(
        reply=resample(reply, voice.sample_rate_hz, RATE_HZ).astype(np.float32),
        prompt=at_level(say("Tell me about Paris."), -20),
        coughs=tuple(a_cough(say) for _ in range(COUGH_CLIPS)),
        questions=tuple(say(q) for q in QUESTIONS),
    )
    if cache is not None:
        clips: dict[str, Any] = {f"question{k}": q for k, q in enumerate(voices.questions)}
        clips.update({f"cough{k}": cough for k, cough in enumerate(voices.coughs)})
        clips.update(reply=voices.reply, prompt=voices.prompt)
        with cache.open("wb") as file:  # a path, not np.savez's name + ".npz"
            np.savez(file, **clips)
    return voices


def _clip_order(name: str) -> int:
    """cough, cough0, cough1, ..., cough10 in that order."""
    return int(name.removeprefix("cough") or -1)


_voices: Voices | None = None
_vad_model: SileroVad | None = None


def load_worker(voices: Voices) -> None:
    global _voices, _vad_model
    _voices, _vad_model = voices, SileroVad.load()


def silence(seconds: float) -> Samples:
    return np.zeros(int(seconds * RATE_HZ), dtype=np.float32)


def run_session(job: Job) -> dict[str, Any]:
    """One room, ten turns; what the VAD made of each event."""
    assert _voices is not None and _vad_model is not None, "load_worker first"
    voices, rng = _voices, random.Random(job.seed)
    room = Room(room_for(job.echo_db, rng), RATE_HZ)
    played: list[Samples] = []
    spoken: list[Samples] = []
    events: list[int] = []  # sample of each cough, or of each question's speech onset
    into_reply_s: list[float] = []  # each event's moment in its reply
    replies: list[tuple[int, int, float]] = []  # each reply's first sample, end, play offset

    def add(speaker_out: Samples, user: Samples) -> None:
        n = max(len(speaker_out), len(user))
        played.append(np.pad(speaker_out, (0, n - len(speaker_out))).astype(np.float32))
        spoken.append(np.pad(user, (0, n - len(user))).astype(np.float32))

    nothing = np.zeros(0, dtype=np.float32)
    for turn in range(TURNS_PER_SESSION):
        add(silence(0.3), voices.prompt)
        add(silence(rng.uniform(*THINKING_S)), nothing)
        start = int(rng.uniform(0, len(voices.reply) / RATE_HZ - REPLY_S) * RATE_HZ)
        reply = voices.reply[start : start + int(REPLY_S * RATE_HZ)]
        if rng.random() < UNDERFLOW_SHARE:
            at = int(rng.uniform(0.5, 4.5) * RATE_HZ)
            reply = np.concatenate([reply[:at], silence(rng.uniform(*UNDERFLOW_S)), reply[at:]])
        at = int(rng.uniform(0.5, 4.0) * RATE_HZ)
        user = np.zeros(len(reply), dtype=np.float32)
        if job.kind == "cough":
            clip, onset = voices.coughs[turn % len(voices.coughs)], 0
        elif job.kind == "echo":
            clip, onset = nothing, 0
        else:
            assert job.user_db is not None
            question = voices.questions[turn % len(voices.questions)]
            clip = at_level(question, job.user_db)[: int(QUESTION_S * RATE_HZ)]
            onset = int(leading_silence_s(clip) * RATE_HZ)
        clip = clip[: len(user) - at]
        user[at : at + len(clip)] = clip
        reply_from = sum(map(len, played))
        events.append(reply_from + at + onset)
        into_reply_s.append((at + onset) / RATE_HZ)
        replies.append((reply_from, reply_from + len(reply), rng.uniform(*PLAY_OFFSET_S)))
        add(reply, user)
        add(silence(1.0), nothing)

    speaker_out, microphone_user = np.concatenate(played), np.concatenate(spoken)
    if job.handling == "client-aec":
        starts = client_aec_starts(room, speaker_out, microphone_user)
    else:
        starts = server_estimate_starts(room, speaker_out, microphone_user, replies)
    outcomes: list[float | bool | None] = []
    echo_first: list[bool] = []  # per turn: speech reported during the reply before the event
    for at, (reply_from, reply_to, _) in zip(events, replies, strict=True):
        window = [
            (began, reported)
            for began, reported in starts
            if reply_from < reported <= reply_to + ECHO_TAIL_S * RATE_HZ
        ]
        before = [s for s in window if s[0] <= at + HEARD_FROM_S * RATE_HZ]
        near = [s for s in window if at + HEARD_FROM_S * RATE_HZ < s[0] < at + HEARD_TO_S * RATE_HZ]
        if job.kind == "echo":
            echo_first.append(bool(window))
            outcomes.append(bool(window))
            continue
        echo_first.append(bool(before))
        if job.kind == "cough":
            outcomes.append(bool(near))
        else:
            outcomes.append((near[0][1] - at) * 1000.0 / RATE_HZ if near else None)
    return {
        "job": job,
        "outcomes": outcomes,
        "into_reply_s": into_reply_s,
        "echo_first": echo_first,
        "echo_interruptions": sum(echo_first),
    }


def client_aec_starts(
    room: Room, speaker_out: Samples, microphone_user: Samples
) -> list[tuple[int, int]]:
    """The client's canceller, then the VAD at the server's threshold for echo-cancelled
    clients: (where each speech began, the end of the window that reported it). The replies
    play on whatever the VAD reports (the delays to the first report are what is measured)."""
    assert _vad_model is not None
    canceller = EchoCanceller(RATE_HZ, RATE_HZ)
    canceller.start()
    vad = StreamingVad(_vad_model, VadOptions(threshold=ECHO_CANCELLED_VAD_THRESHOLD))
    starts: list[tuple[int, int]] = []
    frame = WINDOW_SAMPLES
    for begin in range(0, len(speaker_out) - frame + 1, frame):
        out = speaker_out[begin : begin + frame]
        microphone = room.echo(out) + microphone_user[begin : begin + frame]
        canceller.reference(out)
        for event in vad.push(canceller.cancel(microphone)):
            if isinstance(event, VadStarted):
                starts.append((event.sample_index, begin + frame))
    return starts


def server_estimate_starts(
    room: Room,
    speaker_out: Samples,
    microphone_user: Samples,
    replies: list[tuple[int, int, float]],
) -> list[tuple[int, int]]:
    """The server's VAD stage with its level estimate (``--server-aec off``) and default VAD
    options, as for a client without AEC: each reply is put on the gate's timeline
    ``play offset`` earlier than the speaker played it (the client's buffers), each microphone
    chunk arrives as it is spoken. Speech reported while a reply plays interrupts it, as in
    the server: the gate is told, and the reply falls silent STOP_S later (what the client had
    buffered). (Where each speech began, the chunk that reported it.)"""
    assert _vad_model is not None
    speaker_out = speaker_out.copy()
    options = VadOptions()
    gate = EchoGate(EchoOptions())
    stage = VadStage(StreamingVad(_vad_model, options), RATE_HZ, gate, options.min_speech_ms, None)
    emitted: list[Event] = []
    ctx = StageContext("bench", TurnCancellation(), emitted.append)
    started_at = 1000.0  # the monotonic time of sample 0
    starts: list[tuple[int, int]] = []
    pending = list(replies)
    playing: tuple[int, int, float] | None = None
    for begin in range(0, len(speaker_out), MICROPHONE_CHUNK):
        end = min(begin + MICROPHONE_CHUNK, len(speaker_out))
        while pending and pending[0][0] < end:
            playing = pending.pop(0)
            reply_from, reply_to, offset_s = playing
            timeline_at = started_at + reply_from / RATE_HZ - offset_s
            gate.played(speaker_out[reply_from:reply_to], timeline_at, RATE_HZ)
        samples = room.echo(speaker_out[begin:end]) + microphone_user[begin:end]
        chunk = AudioChunk(
            session_id="bench",
            turn_id=0,
            generation=0,
            samples=samples,
            sample_rate_hz=RATE_HZ,
            first_sample_index=begin,
            received_at=started_at + (begin + len(samples)) / RATE_HZ + NETWORK_S,
        )
        emitted.clear()
        list(stage.handle(chunk, ctx))
        reported = [(e.sample_index, end) for e in emitted if isinstance(e, SpeechStarted)]
        starts += reported
        if reported and playing is not None and end < playing[1]:
            stop = end + round(STOP_S * RATE_HZ)
            speaker_out[stop : playing[1]] = 0.0
            gate.silence_reply()  # the replies' audio from before is forgotten: nothing plays
            playing = None
    return starts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sessions", type=int, default=20, help="per case, ten events each (default 20)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--echo-db", type=float, nargs="+", default=[-10.0, -20.0])
    parser.add_argument("--user-db", type=float, nargs="+", default=[-30.0, -26.0, -20.0])
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=("cough", "barge-in", "echo"),
        default=["echo", "cough", "barge-in"],
    )
    parser.add_argument(
        "--handling",
        choices=("client-aec", "server-estimate"),
        default="client-aec",
        help="who tells the user from the echo: the client's canceller (default) or the "
        "server's level estimate (s2s-server --server-aec off)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="the JSON report (default: bench/results/aec-offline.json, or "
        "server-estimate-offline.json with --handling server-estimate)",
    )
    parser.add_argument(
        "--voices",
        type=Path,
        help="an .npz of the clips to reuse (written on the first run): Piper's voice varies "
        "between runs, and so do the figures with it",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        name = "aec-offline" if args.handling == "client-aec" else "server-estimate-offline"
        args.out = ROOT / "bench/results" / f"{name}.json"
    rng = random.Random(args.seed)
    cases = [
        (kind, echo_db, user_db)
        for kind in args.kinds
        for echo_db in args.echo_db
        for user_db in (args.user_db if kind == "barge-in" else [None])
    ]
    jobs = [
        Job(kind, echo_db, user_db, rng.randrange(10**9), args.handling)
        for kind, echo_db, user_db in cases
        for _ in range(args.sessions)
    ]
    began = time.monotonic()
    voices = synthesize(args.voices)
    context = multiprocessing.get_context("spawn")
    with context.Pool(2, initializer=load_worker, initargs=(voices,)) as pool:
        sessions = pool.map(run_session, jobs, chunksize=1)
    results = []
    for kind, echo_db, user_db in cases:
        case = [
            session
            for session in sessions
            if (session["job"].kind, session["job"].echo_db, session["job"].user_db)
            == (kind, echo_db, user_db)
        ]
        outcomes = [outcome for session in case for outcome in session["outcomes"]]
        result = summarize(kind, echo_db, user_db, outcomes)
        result["echo_interruptions"] = sum(session["echo_interruptions"] for session in case)
        results.append(result)
    report = {
        "machine": "2-core CPU, two processes",
        "handling": args.handling,
        "method": __doc__.split("\n\n")[1].replace("\n", " "),
        "sessions_per_case": args.sessions,
        "seed": args.seed,
        "wall_s": round(time.monotonic() - began, 1),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print_table(results)
    return 0


def summarize(
    kind: str, echo_db: float, user_db: float | None, outcomes: list[float | bool | None]
) -> dict[str, Any]:
    if kind in ("cough", "echo"):
        return {
            "kind": kind,
            "echo_db": echo_db,
            "replies": len(outcomes),
            "heard": sum(1 for heard in outcomes if heard),
        }
    delays = sorted(d for d in outcomes if isinstance(d, float))
    return {
        "kind": kind,
        "echo_db": echo_db,
        "user_db": user_db,
        "questions": len(outcomes),
        "heard": len(delays),
        "median_ms": percentile(delays, 0.5),
        "p95_ms": percentile(delays, 0.95),
        "over_600_ms": sum(1 for d in delays if d > 600),
        "max_ms": round(delays[-1], 1) if delays else None,
    }


def print_table(results: list[dict[str, Any]]) -> None:
    print(
        "\n| echo | event | heard | onset -> speech reported: median / p95 / max "
        "| over 600 ms | echo heard first |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        if r["kind"] in ("cough", "echo"):
            event = "cough" if r["kind"] == "cough" else "echo alone"
            print(
                f"| {r['echo_db']:g} dB | {event} | {r['heard']}/{r['replies']} | | | "
                f"{r['echo_interruptions']} |"
            )
        else:
            print(
                f"| {r['echo_db']:g} dB | question at {r['user_db']:g} dBFS | "
                f"{r['heard']}/{r['questions']} | "
                f"{r['median_ms']} / {r['p95_ms']} / {r['max_ms']} ms | {r['over_600_ms']} | "
                f"{r['echo_interruptions']} |"
            )


if __name__ == "__main__":
    sys.exit(main())

"""Barge-in through a simulated room: does a user speaking at a normal level interrupt the
reply, and does the reply's own echo never do so?

The scripted user of the test suite (``tests/scripted_user.py``) talks to an in-process server
on the CPU defaults (Silero VAD, faster-whisper, Piper; the LLM is a fixed long answer, so
that every reply is long and the figures do not depend on what a 135M model says). Its
speaker reaches its microphone through a room (``s2s/client/room.py``): a delay of 50-150 ms,
a 200 ms exponential reverberation tail, an echo of -10 or -20 dB. With ``aec`` the client
cancels the echo (``s2s/client/echo_cancel.py``: AEC3, with speexdsp ahead of it while the
user talks over a reply) and says so in hello; without, the server cancels it
(``s2s/server/reply_echo.py``, the same cancellers), or with ``--server-aec off`` its level
estimate decides.

For each case, 10 interruptions at random moments (0.5-4 s) of long replies: the user's
question at -30, -26 or -20 dBFS. Then, per room, 10 long replies with nothing but their echo,
and 10 coughs (150 ms) over replies. Prints a table and writes JSON.

    .venv/bin/python bench/barge_in_room.py [--trials 10] [--out bench/results/barge-in-room.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from s2s.client.room import RoomOptions, at_level  # noqa: E402
from s2s.models.audio import resample  # noqa: E402
from s2s.models.echo_cancel import EchoCancelOptions  # noqa: E402
from s2s.models.profiles import load_models, profile_for  # noqa: E402
from s2s.models.tts import Synthesizer  # noqa: E402
from s2s.pipeline.history import ChatMessage  # noqa: E402
from s2s.pipeline.messages import Samples  # noqa: E402
from s2s.server.assembly import build_session_pipeline  # noqa: E402
from tests.scripted_user import RATE_HZ, ScriptedUser, leading_silence_s  # noqa: E402
from tests.servers import Running  # noqa: E402

LONG_REPLY = (
    "Paris has been a center of learning and art for centuries. The city grew along the "
    "river Seine, where its first settlers built a small town on an island. Kings made it "
    "their capital, and its great cathedral took almost two hundred years to finish. Today "
    "millions of people visit its museums, its parks and its cafes every year."
)
QUESTIONS = (
    "What about Germany and its capital?",
    "Can you tell me something else?",
    "How far is it from London by train?",
    "What is the weather like there in spring?",
)
"""No short word before a comma at the start: speech of 300 ms is what interrupts, and a lone
"Stop," is shorter than that (it counts as a cough)."""
REPLY_BOUND_S = 180.0  # the long reply plays for over a minute when nobody interrupts it
INTERRUPT_BOUND_S = 3.0
"""After the question ends: an interruption later than this counts as missed."""
MIN_ONSET_MS = 300
CONCURRENT_SESSIONS = 3


class LongAnswers:
    """Every turn gets the same long answer, a word at a time."""

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)

    def stream(
        self, messages: Sequence[ChatMessage], should_stop: Callable[[], bool]
    ) -> Iterator[str]:
        for k, word in enumerate(LONG_REPLY.split(" ")):
            if should_stop():
                return
            yield word if k == 0 else " " + word


def speaker(voice: Synthesizer) -> Callable[[str], Samples]:
    """The user's voice: the Piper voice, pitched down (played 10% slower)."""

    def say(text: str) -> Samples:
        audio = np.concatenate(list(voice.stream(text, lambda: False)))
        return resample(audio, round(voice.sample_rate_hz * 1.1), RATE_HZ)

    return say


def room_for(echo_db: float, rng: random.Random) -> RoomOptions:
    return RoomOptions(
        delay_ms=rng.uniform(50, 150), reverb_ms=200, echo_db=echo_db, seed=rng.randrange(10**6)
    )


def interruptions(
    url: str,
    say: Callable[[str], Samples],
    room: RoomOptions,
    aec: bool,
    user_db: float,
    trials: int,
    rng: random.Random,
) -> dict[str, Any]:
    """``trials`` questions spoken over long replies; each interruption's answer is the next
    reply to speak over."""
    user = ScriptedUser(url, room=room, aec=aec)
    delays_ms: list[float] = []
    vad_onsets_ms: list[float] = []  # where the server placed the start of the speech
    missed_at: list[str | None] = []
    missed = 0
    prompt = at_level(say("Tell me about Paris."), -20)
    try:
        user.say(prompt, at=time.monotonic() + 0.3)
        turn = later_turn(user, "transcript", -1, REPLY_BOUND_S)
        for trial in range(trials):
            reply = user.wait_for("reply_audio_start", REPLY_BOUND_S, turn_id=turn)
            question = at_level(say(QUESTIONS[trial % len(QUESTIONS)]), user_db)
            into_reply_s = rng.uniform(0.5, 4.0)
            spoken = user.say(question, at=reply.at + into_reply_s)
            count = len(user.interrupted_at)
            ends_at = spoken.at + len(question) / RATE_HZ
            while time.monotonic() < ends_at + INTERRUPT_BOUND_S and (
                len(user.interrupted_at) == count
            ):
                time.sleep(0.02)
            if len(user.interrupted_at) > count and spoken.first_sent_at is not None:
                onset = spoken.first_sent_at + leading_silence_s(question)
                delays_ms.append((user.interrupted_at[count] - onset) * 1000.0)
                missed_at.append(None)
                started = [r for r in user.events("speech_started") if r.at > spoken.at]
                if started and started[0].event is not None:
                    heard_from = user.mic_started_at + started[0].event["sample_index"] / RATE_HZ
                    vad_onsets_ms.append((heard_from - onset) * 1000.0)
                turn = later_turn(user, "transcript", turn, REPLY_BOUND_S)
                continue
            missed += 1
            missed_at.append(f"reply {trial}, {into_reply_s:.1f} s in")
            user.wait_for("reply_audio_end", REPLY_BOUND_S, turn_id=turn)
            user.say(prompt, at=time.monotonic() + 0.5)  # ask again for the next long reply
            turn = later_turn(user, "transcript", turn, REPLY_BOUND_S)
    finally:
        user.close()
    return {
        "interrupted": len(delays_ms),
        "trials": trials,
        "missed": missed,
        "missed_at": [m for m in missed_at if m is not None],
        "onset_to_interrupted_ms": delays_ms,
        "onset_to_vad_onset_ms": vad_onsets_ms,
        "erle_db": erle_db(user),
    }


def later_turn(user: ScriptedUser, kind: str, turn: int, timeout_s: float) -> int:
    """The turn of the first ``kind`` event after ``turn`` (echo that became a turn shifts
    the numbering: the figures count such turns, the script follows them)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        later = [r.event["turn_id"] for r in user.events(kind) if r.event["turn_id"] > turn]  # type: ignore[index]
        if later:
            return int(later[-1])
        time.sleep(0.02)
    raise AssertionError(f"no {kind} after turn {turn} within {timeout_s} s: {user.kinds()}")


def echo_alone(
    url: str,
    say: Callable[[str], Samples],
    room: RoomOptions,
    aec: bool,
    replies: int,
    cough: bool,
    rng: random.Random,
) -> dict[str, Any]:
    """``replies`` long replies with only their echo in the microphone (and, with ``cough``, a
    150 ms burst of voice during each): nothing may interrupt or become a turn."""
    user = ScriptedUser(url, room=room, aec=aec)
    cough_audio = a_cough(say)
    try:
        turn = -1
        for _ in range(replies):
            user.say(at_level(say("Tell me about Paris."), -20), at=time.monotonic() + 0.3)
            turn = later_turn(user, "transcript", turn, REPLY_BOUND_S)
            reply = user.wait_for("reply_audio_start", REPLY_BOUND_S, turn_id=turn)
            if cough:
                user.say(cough_audio, at=reply.at + rng.uniform(0.5, 4.0))
            reply_over(user, turn, REPLY_BOUND_S)
            time.sleep(1.0)  # the echo's tail, and any turn it might make
    finally:
        user.close()
    turns = [r.event["turn_id"] for r in user.events("transcript") if r.event]
    return {
        "replies": replies,
        "interruptions": len(user.interrupted_at),
        "extra_turns": len(turns) - replies,
        "erle_db": erle_db(user),
    }


def a_cough(say: Callable[[str], Samples]) -> Samples:
    """150 ms of a voice at -20 dBFS around its loudest moment: a cough's burst."""
    burst = say("Ha!")
    loudest = int(np.argmax(np.abs(burst)))
    start = max(0, loudest - RATE_HZ * 75 // 1000)
    return at_level(burst[start : start + RATE_HZ * 150 // 1000], -20)


def reply_over(user: ScriptedUser, turn: int, timeout_s: float) -> None:
    """Until the reply of ``turn`` has played to its end or was interrupted (the figures
    count interruptions; the script goes on with the next reply)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(
            r.event["turn_id"] == turn  # type: ignore[index]
            for kind in ("reply_audio_end", "interrupted")
            for r in user.events(kind)
        ):
            return
        time.sleep(0.02)
    raise AssertionError(f"reply {turn} neither ended nor was interrupted: {user.kinds()}")


def erle_db(user: ScriptedUser) -> float | None:
    """Echo return loss enhancement: the echo's power before the canceller over what is left
    after it, over the frames where only echo reached the microphone (after the first second
    of convergence)."""
    skip = round(1.0 * RATE_HZ / 512)
    before, after = user.echo_power_in[skip:], user.echo_power_out[skip:]
    if not before:
        return None
    return round(10 * math.log10(sum(before) / max(sum(after), 1e-12)), 1)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--echo-db", type=float, nargs="+", default=[-10.0, -20.0], help="the rooms' echo levels"
    )
    parser.add_argument(
        "--aec", choices=("both", "yes", "no"), default="both", help="with the client's AEC"
    )
    parser.add_argument(
        "--server-aec",
        choices=("on", "off"),
        default="on",
        help="without the client's AEC: the server cancels the echo (on, the server's "
        "default) or its level estimate decides (off)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/barge-in-room.json")
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=("barge-in", "echo alone", "cough"),
        default=["barge-in", "echo alone", "cough"],
        help="which cases to run",
    )
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)

    models = load_models(profile_for("cpu"))
    models = dataclasses.replace(models, llm=LongAnswers())
    say = speaker(models.tts)
    server = Running(
        models,
        max_sessions=CONCURRENT_SESSIONS + 1,
        build=lambda **kwargs: build_session_pipeline(models, **kwargs),
        echo_cancel=EchoCancelOptions() if args.server_aec == "on" else None,
    )
    without_aec = "server AEC" if args.server_aec == "on" else "server estimate"
    jobs: list[tuple[dict[str, Any], Callable[[], dict[str, Any]]]] = []
    for aec in {"both": (True, False), "yes": (True,), "no": (False,)}[args.aec]:
        for echo_db in args.echo_db:
            for user_db in (-30.0, -26.0, -20.0):
                room = room_for(echo_db, rng)
                seed = rng.randrange(10**6)
                case = {
                    "aec": aec,
                    "echo_handled_by": "client AEC" if aec else without_aec,
                    "echo_db": echo_db,
                    "user_db": user_db,
                    "kind": "barge-in",
                    "delay_ms": round(room.delay_ms),
                }
                jobs.append(
                    (
                        case,
                        functools.partial(
                            interruptions,
                            server.url,
                            say,
                            room,
                            aec,
                            user_db,
                            args.trials,
                            random.Random(seed),
                        ),
                    )
                )
            for kind in ("echo alone", "cough"):
                room = room_for(echo_db, rng)
                seed = rng.randrange(10**6)
                case = {
                    "aec": aec,
                    "echo_handled_by": "client AEC" if aec else without_aec,
                    "echo_db": echo_db,
                    "kind": kind,
                    "delay_ms": round(room.delay_ms),
                }
                jobs.append(
                    (
                        case,
                        functools.partial(
                            echo_alone,
                            server.url,
                            say,
                            room,
                            aec,
                            args.trials,
                            kind == "cough",
                            random.Random(seed),
                        ),
                    )
                )
    # Every case's room and seed are drawn above whichever kinds run, so that a case run alone
    # meets the same room and moments as in the full run.
    jobs = [(case, job) for case, job in jobs if case["kind"] in args.kinds]
    results: list[dict[str, Any]] = []
    results_lock = threading.Lock()
    pending = list(jobs)

    def worker() -> None:
        while True:
            with results_lock:
                if not pending:
                    return
                case, job = pending.pop(0)
            try:
                outcome = job()
            except AssertionError as exc:
                outcome = {"error": str(exc)}
            with results_lock:
                results.append({**case, **outcome})
                print(json.dumps({**case, **summary_of(outcome)}), flush=True)

    began = time.monotonic()
    workers = [threading.Thread(target=worker) for _ in range(CONCURRENT_SESSIONS)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    server.stop()
    report: dict[str, Any] = {
        "machine": "2-core CPU, CPU defaults",
        "wall_s": round(time.monotonic() - began, 1),
        "results": sorted(
            results, key=lambda r: (not r["aec"], r["kind"], r["echo_db"], r.get("user_db", 0))
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print_table(report["results"])
    return 0


def summary_of(outcome: dict[str, Any]) -> dict[str, Any]:
    delays = outcome.get("onset_to_interrupted_ms")
    if delays is None:
        return outcome
    shown = {k: v for k, v in outcome.items() if not k.startswith("onset_to")}
    return {
        **shown,
        "median_ms": percentile(delays, 0.5),
        "p95_ms": percentile(delays, 0.95),
        "vad_onset_median_ms": percentile(outcome["onset_to_vad_onset_ms"], 0.5),
    }


def print_table(results: list[dict[str, Any]]) -> None:
    print(
        "\n| echo handled by | echo | user | interrupted "
        "| onset -> interrupted median / p95 | ERLE |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        aec = r.get("echo_handled_by", "client AEC" if r["aec"] else "server estimate")
        erle = f"{r['erle_db']} dB" if r.get("erle_db") is not None else "-"
        if "error" in r:
            print(f"| {aec} | {r['echo_db']:g} dB | {r['kind']} | error: {r['error']} | | |")
        elif r["kind"] == "barge-in":
            delays = r["onset_to_interrupted_ms"]
            median = statistics.median(delays) if delays else None
            shown = (
                f"{median:.0f} / {percentile(delays, 0.95):.0f} ms" if median is not None else "-"
            )
            print(
                f"| {aec} | {r['echo_db']:g} dB | {r['user_db']:g} dBFS | "
                f"{r['interrupted']}/{r['trials']} | {shown} | {erle} |"
            )
        else:
            print(
                f"| {aec} | {r['echo_db']:g} dB | {r['kind']}, {r['replies']} replies | "
                f"{r['interruptions']} interruptions, {r['extra_turns']} extra turns | | "
                f"{erle} |"
            )


if __name__ == "__main__":
    sys.exit(main())

"""Soak: four sessions at once on a real server process, turn after turn, with random
barge-ins, interrupts and abrupt disconnects. Afterwards nothing is left: no session, no
thread beyond the baseline, no memory growth; and no reply audio ever followed its
``interrupted``.

In CI it runs a few turns per session; for the long run (figures for a note):
``python -m tests.test_soak --turns 25``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import signal
import socket
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from s2s.models.audio import resample, to_pcm16
from s2s.models.profiles import LoadedModels, load_models, profile_for
from tests.conftest import spoken_wav
from tests.processes import SERVER_EXIT_BOUND_S, start_server

pytestmark = pytest.mark.models

SESSIONS = 4
CI_TURNS = 6
FRAME = 1600  # 100 ms at 16 kHz
TURN_BOUND_S = 60.0
QUESTIONS = (
    "What is the capital of France?",
    "Tell me a story about a brave knight.",
    "How many legs does a spider have?",
)
RETRIES_1013 = 10
ACTIONS = ("listen", "listen", "barge-in", "interrupt", "disconnect")


@dataclass
class Tally:
    actions: Counter[str] = field(default_factory=Counter)
    interrupted: int = 0
    replies: int = 0
    late_audio: int = 0
    """Binary frames after ``interrupted`` and before the next ``reply_audio_start``."""
    failures: list[str] = field(default_factory=list)
    retried: int = 0
    """Reconnections answered 1013 (the old connection's end not yet seen) and retried."""
    lock: threading.Lock = field(default_factory=threading.Lock)


class Talker:
    """One client: a session, in real time, 100 ms frames, draining what the server sends
    between frames and checking the order."""

    def __init__(self, url: str, questions: list[bytes], rng: random.Random, tally: Tally):
        self._url = url
        self._questions = questions
        self._rng = rng
        self._tally = tally
        self._connection: ClientConnection | None = None
        self._after_interrupted = False
        self._reply_started = False
        self._reply_ended = False
        self._interrupted = False
        self._clock = 0.0

    def warm_up(self) -> None:
        """One plain turn: the model libraries' lazy buffers and thread pools for this many
        sessions exist afterwards, so what the soak adds is measured, not first use."""
        self._open()
        self._turn("listen")
        self._close()

    def run(self, turns: int) -> None:
        done = 0
        while done < turns:
            self._open()
            while done < turns:
                action = self._rng.choice(ACTIONS)
                done += 1
                with self._tally.lock:
                    self._tally.actions[action] += 1
                if not self._turn(action):
                    break  # disconnected: a new session
        self._close()

    def _open(self) -> None:
        """A session; at --max-sessions right after an abrupt disconnect of ours, the server
        may not have seen that connection end yet: 1013, try again later, as clients do."""
        for attempt in range(RETRIES_1013):
            connection = connect(self._url, open_timeout=10, close_timeout=1, legacy=True)
            connection.send(json.dumps({"type": "hello", "protocol": 1}))
            try:
                ready = json.loads(connection.recv(timeout=10))
            except ConnectionClosed as closed:
                if closed.rcvd is None or closed.rcvd.code != 1013 or attempt == RETRIES_1013 - 1:
                    raise
                with self._tally.lock:
                    self._tally.retried += 1
                time.sleep(0.2)
                continue
            assert ready["type"] == "ready", ready
            self._connection = connection
            self._clock = time.monotonic()
            return

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _turn(self, action: str) -> bool:
        """One question and the chosen action; False: the session was dropped."""
        self._reply_started = self._reply_ended = self._interrupted = False
        self._speak(self._rng.choice(self._questions))
        if not self._silence_until(lambda: self._reply_started, TURN_BOUND_S, "a reply"):
            return True
        if action == "disconnect":
            assert self._connection is not None
            self._connection.socket.shutdown(socket.SHUT_RDWR)  # no close frame: gone
            self._connection.close()
            self._connection = None
            return False
        if action == "interrupt":
            assert self._connection is not None
            self._connection.send(json.dumps({"type": "interrupt"}))
            self._silence_until(lambda: self._interrupted or self._reply_ended, 10.0, "interrupted")
        elif action == "barge-in":
            self._speak(self._rng.choice(self._questions))  # the next turn
            self._silence_until(lambda: self._reply_ended, TURN_BOUND_S, "the next reply")
        else:
            self._silence_until(lambda: self._reply_ended, TURN_BOUND_S, "the reply's end")
        return True

    def _speak(self, pcm: bytes) -> None:
        whole = pcm + bytes(-len(pcm) % (FRAME * 2))  # whole frames only, as clients send
        for start in range(0, len(whole), FRAME * 2):
            self._send(whole[start : start + FRAME * 2])

    def _silence_until(self, condition: Callable[[], bool], bound_s: float, what: str) -> bool:
        deadline = time.monotonic() + bound_s
        while not condition():
            if time.monotonic() > deadline:
                with self._tally.lock:
                    self._tally.failures.append(f"no {what} within {bound_s:g} s")
                return False
            self._send(bytes(FRAME * 2))
        return True

    def _send(self, frame: bytes) -> None:
        assert self._connection is not None
        self._clock += FRAME / 16_000
        self._drain(max(0.0, self._clock - time.monotonic()))
        self._connection.send(frame)

    def _drain(self, wait_s: float) -> None:
        """Take in everything the server sent, waiting up to ``wait_s`` (the frame pace)."""
        assert self._connection is not None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                message = self._connection.recv(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return
            self._account(message)

    def _account(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            if self._after_interrupted:
                with self._tally.lock:
                    self._tally.late_audio += 1
            return
        event = json.loads(message)
        kind = event["type"]
        if kind == "reply_audio_start":
            self._after_interrupted = False
            self._reply_started = True
        elif kind == "reply_audio_end":
            self._reply_ended = True
            with self._tally.lock:
                self._tally.replies += 1
        elif kind == "interrupted":
            self._after_interrupted = True
            self._interrupted = True
            with self._tally.lock:
                self._tally.interrupted += 1
        elif kind == "error":
            with self._tally.lock:
                self._tally.failures.append(f"error event: {event}")


def run_all(
    talkers: list[Talker], work: Callable[[Talker], None], bound_s: float
) -> list[threading.Thread]:
    workers = [
        threading.Thread(target=work, args=(talker,), name=f"talker-{i}")
        for i, talker in enumerate(talkers)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(bound_s)
    return workers


def settle(condition: Callable[[], bool], bound_s: float = 10.0) -> None:
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline and not condition():
        time.sleep(0.2)


def pcm16k(path: Path) -> bytes:
    audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    speech = resample(audio.mean(axis=1).astype(np.float32), rate, 16_000)
    return to_pcm16(speech)


def proc_status(pid: int, field_name: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field_name}:\s+(\d+)", text, re.MULTILINE)
    assert match, field_name
    return int(match.group(1))


RSS_SAMPLE_S = 0.2


class PeakRss:
    """The highest resident memory (kB) of a process over a ``with`` block, sampled every
    RSS_SAMPLE_S."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.peak = proc_status(pid, "VmRSS")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler")

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status(self._pid, "VmRSS"))

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            self.peak = max(self.peak, proc_status(self._pid, "VmRSS"))


def active_sessions(base: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(r"^s2s_sessions_active (\S+)$", text, re.MULTILINE)
    assert match
    return float(match.group(1))


@dataclass
class Figures:
    turns: int
    seconds: float
    actions: dict[str, int]
    replies: int
    interrupted: int
    late_audio_frames: int
    failures: list[str]
    retried_1013: int
    threads_before: int
    threads_after: int
    rss_growth_mib: float
    """At the end, over the highest seen in the first half (which also fills the allocator's
    per-thread arenas). Not over where the first half ended: the allocators keep and give
    back tens of MiB as sessions come and go (the echo cancellers' native library most: the
    second half was measured from -39 to +77 MiB with the same code), which is no growth; a
    leak only ever adds, so it shows against the peak as well."""
    rss_first_half_mib: float
    """The first half's peak over the start."""
    sessions_after: float
    exit_status: int
    exit_s: float
    stuck_workers: list[str]


def soak(models: LoadedModels, folder: Path, turns: int, seed: int = 7) -> Figures:
    questions = [pcm16k(spoken_wav(models, text, folder)) for text in QUESTIONS]
    server, url = start_server("--max-sessions", str(SESSIONS))
    base = url.replace("ws://", "http://")
    tally = Tally()
    try:
        pid = server.proc.pid
        talkers = [Talker(url, questions, random.Random(seed + i), tally) for i in range(SESSIONS)]
        run_all(talkers, lambda talker: talker.warm_up(), TURN_BOUND_S * 2)
        settle(lambda: active_sessions(base) == 0)
        threads_before, rss_before = proc_status(pid, "Threads"), proc_status(pid, "VmRSS")
        tally.actions.clear()
        tally.replies = tally.interrupted = 0
        began = time.monotonic()
        peaks: list[int] = []
        for _ in range(2):  # two equal halves: the second shows whether memory keeps growing
            with PeakRss(pid) as rss:
                workers = run_all(
                    talkers, lambda talker: talker.run(turns // 2), turns * TURN_BOUND_S
                )
                settle(lambda: active_sessions(base) == 0)
            peaks.append(rss.peak)
        took = time.monotonic() - began
        settle(lambda: active_sessions(base) == 0 and proc_status(pid, "Threads") <= threads_before)
        threads_after, rss_after = proc_status(pid, "Threads"), proc_status(pid, "VmRSS")
        sessions_after = active_sessions(base)
        status, exit_s = server.signal_and_time(signal.SIGTERM)
    finally:
        server.kill()
    return Figures(
        turns=SESSIONS * turns,
        seconds=round(took, 1),
        actions=dict(tally.actions),
        replies=tally.replies,
        interrupted=tally.interrupted,
        late_audio_frames=tally.late_audio,
        failures=tally.failures,
        retried_1013=tally.retried,
        threads_before=threads_before,
        threads_after=threads_after,
        rss_growth_mib=round((rss_after - peaks[0]) / 1024, 1),
        rss_first_half_mib=round((peaks[0] - rss_before) / 1024, 1),
        sessions_after=sessions_after,
        exit_status=status,
        exit_s=round(exit_s, 2),
        stuck_workers=[w.name for w in workers if w.is_alive()],
    )


def test_soak_leaves_nothing_behind(cpu_models: LoadedModels, tmp_path: Path) -> None:
    figures = soak(cpu_models, tmp_path, CI_TURNS)
    print(f"soak: {figures}")
    assert figures.stuck_workers == [] and figures.failures == []
    assert figures.late_audio_frames == 0
    assert figures.sessions_after == 0
    assert figures.threads_after <= figures.threads_before
    assert figures.rss_growth_mib < 50
    assert figures.exit_status == 0 and figures.exit_s < SERVER_EXIT_BOUND_S


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="s2s soak run (real server, CPU models)")
    parser.add_argument("--turns", type=int, default=25, help="turns per session")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        figures = soak(load_models(profile_for("cpu")), Path(folder), args.turns)
        print(json.dumps(dataclasses.asdict(figures)))

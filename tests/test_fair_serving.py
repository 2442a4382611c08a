"""Sessions share a model without waiting for each other's whole reply: the turn-taking lock
on its own, then two sessions' LLM stages on one slow step-wise backend."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from s2s.pipeline.cancellation import TurnCancellation
from s2s.pipeline.history import ChatHistory, ChatMessage, HistoryOptions
from s2s.pipeline.messages import Pill, ReplyText, Transcript, TurnClock
from s2s.pipeline.speculation import FirstChunkPriority
from s2s.pipeline.stage import StageContext, StageRunner
from s2s.pipeline.stages import LlmStage
from s2s.pipeline.turns import TakeTurns

HANG_BOUND_S = 10.0
STEP_S = 0.02
"""One fake decoding step."""


def test_turns_alternate_between_two_callers_in_arrival_order() -> None:
    """A caller that releases and asks again queues behind the one already waiting."""
    turns = TakeTurns("model")
    order: list[str] = []
    both_waiting = threading.Barrier(2)

    def caller(name: str) -> None:
        both_waiting.wait(HANG_BOUND_S)
        for _ in range(6):
            with turns.step():
                order.append(name)
                time.sleep(0.005)

    threads = [threading.Thread(target=caller, args=(n,)) for n in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_BOUND_S)
    assert sorted(order) == ["a"] * 6 + ["b"] * 6
    # After both have started, no caller takes two steps in a row while the other waits.
    tail = order[2:-2]
    assert all(x != y for x, y in itertools.pairwise(tail)), order


def test_a_cancelled_caller_frees_its_share_at_once() -> None:
    """Once a caller stops asking, the other is served on every step: its step rate doubles."""
    turns = TakeTurns("model")
    stop_a = threading.Event()
    a_steps_after_stop = 0

    def looping_a() -> None:
        nonlocal a_steps_after_stop
        while True:
            with turns.step():
                if stop_a.is_set():
                    a_steps_after_stop += 1
                    return
                time.sleep(STEP_S)

    a = threading.Thread(target=looping_a)
    a.start()
    b_times: list[float] = []
    for i in range(20):
        if i == 10:
            stop_a.set()
        with turns.step():
            b_times.append(time.monotonic())
            time.sleep(STEP_S)
    a.join(HANG_BOUND_S)
    assert a_steps_after_stop == 1
    shared = b_times[9] - b_times[2]
    alone = b_times[19] - b_times[12]
    print(f"7 steps shared {shared * 1000:.0f} ms, alone {alone * 1000:.0f} ms")
    assert alone < shared * 0.75


class SlowStepBackend:
    """A chat backend that takes the model for one step per token, like the transformers
    one: ``tokens`` words, each after STEP_S."""

    def __init__(self, turns: TakeTurns, tokens: int) -> None:
        self._turns = turns
        self._tokens = tokens

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stream(
        self, messages: Sequence[ChatMessage], should_stop: Callable[[], bool]
    ) -> Iterator[str]:
        for i in range(self._tokens):
            if should_stop():
                return
            with self._turns.step():
                time.sleep(STEP_S)
            yield f" word{i}."


def transcript(text: str) -> Transcript:
    return Transcript(session_id="t", turn_id=0, generation=0, text=text, clock=TurnClock())


def test_two_sessions_first_chunks_interleave_rather_than_queue() -> None:
    """Session B asks while session A's long reply streams: B's first chunk comes within a few
    steps, long before A's reply ends (a lock per reply would make B wait for all of A)."""
    turns = TakeTurns("llm")
    a_chunks: list[tuple[float, str]] = []
    b_first: list[float] = []
    a_started = threading.Event()

    def session_a() -> None:
        stage = LlmStage(SlowStepBackend(turns, 60), ChatHistory(HistoryOptions(), len))
        stage_outputs = _collect(stage, a_started)
        a_chunks.extend(stage_outputs)

    def session_b() -> None:
        a_started.wait(HANG_BOUND_S)
        time.sleep(10 * STEP_S)  # A is well into its reply
        asked = time.monotonic()
        stage = LlmStage(SlowStepBackend(turns, 3), ChatHistory(HistoryOptions(), len))
        outputs = _collect(stage, None)
        b_first.append(outputs[0][0] - asked)
        b_first.append(outputs[0][0])

    threads = [threading.Thread(target=session_a), threading.Thread(target=session_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_BOUND_S)
    b_wait_s, b_first_at = b_first
    a_last_at = a_chunks[-1][0]
    late_s = a_last_at - b_first_at
    print(f"B's first chunk after {b_wait_s * 1000:.0f} ms; A's last {late_s:.2f} s later")
    assert b_first_at < a_last_at - 10 * STEP_S
    assert b_wait_s < 20 * STEP_S  # B's own 3 steps interleaved with A's, not 50 of A's


def _collect(stage: LlmStage, started: threading.Event | None) -> list[tuple[float, str]]:
    """Run one turn through the stage; the arrival time and text of each reply chunk."""
    inbox: queue.Queue[Transcript | Pill] = queue.Queue()
    outbox: queue.Queue[ReplyText | Pill] = queue.Queue()
    ctx = StageContext("t", TurnCancellation(), lambda _event: None)
    runner: StageRunner[Transcript, ReplyText] = StageRunner(
        stage, inbox, outbox, ctx, "llm-under-test"
    )
    runner.start()
    inbox.put(transcript("hello"))
    inbox.put(Pill.PILL)
    if started is not None:
        started.set()
    chunks: list[tuple[float, str]] = []
    while (out := outbox.get(timeout=HANG_BOUND_S)) is not Pill.PILL:
        if isinstance(out, ReplyText) and out.text:
            chunks.append((time.monotonic(), out.text))
    runner.thread.join(HANG_BOUND_S)
    return chunks


def test_continuation_waits_for_another_sessions_first_chunk_and_goes_on_when_it_ends() -> None:
    """While a first chunk is being made, a continuation step waits; it goes on as soon as the
    first chunk is done, long before its bound."""
    priority = FirstChunkPriority(max_yield_s=HANG_BOUND_S)
    end_urgent = priority.begin()
    waited: list[float] = []

    def continuation() -> None:
        began = time.monotonic()
        priority.yield_to_urgent()
        waited.append(time.monotonic() - began)

    thread = threading.Thread(target=continuation)
    thread.start()
    time.sleep(0.2)
    assert thread.is_alive()  # still waiting behind the first chunk
    end_urgent()
    end_urgent()  # idempotent: ending twice does not free a second urgent turn
    thread.join(HANG_BOUND_S)
    assert 0.15 < waited[0] < HANG_BOUND_S / 2 and priority.yields == 1


def test_a_continuation_step_never_waits_longer_than_its_bound() -> None:
    """Urgent work that never ends (a stuck first chunk) delays others by the bound only."""
    priority = FirstChunkPriority(max_yield_s=0.1)
    priority.begin()
    began = time.monotonic()
    priority.yield_to_urgent()
    assert time.monotonic() - began < 2.0


def test_no_wait_without_urgent_work() -> None:
    """With no first chunk pending, continuation steps go straight on."""
    priority = FirstChunkPriority(max_yield_s=HANG_BOUND_S)
    priority.begin()()
    began = time.monotonic()
    priority.yield_to_urgent()
    assert time.monotonic() - began < 1.0 and priority.yields == 0

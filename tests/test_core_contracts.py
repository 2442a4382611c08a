"""Layer 1 and 2: the core's smaller promises, each pinned down. Stage threads are named after
their pipeline and stage (a stuck one is reported by name) and never keep the process alive;
a failure is an event with its fields and a logged traceback; stale work is counted and its
generator closed; a stall is measured from the last output."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from s2s.pipeline.cancellation import TurnCancellation
from s2s.pipeline.messages import Message, Pill, StageError, TurnInterrupted
from s2s.pipeline.pipeline import Pipeline, PipelineClosed
from s2s.pipeline.stage import Stage, StageContext, StageRunner
from tests.fakes import Append, Explode, Gate, Note, Stuck, note
from tests.harness import HANG_BOUND_S, EventLog, run_stage, texts


class Sink:
    def __init__(self) -> None:
        self.items: list[Message] = []

    def __call__(self, item: Message) -> None:
        self.items.append(item)


def started(stages: list[Stage[Note, Note]], **kwargs: object) -> tuple[Pipeline, Sink, EventLog]:
    sink, events = Sink(), EventLog()
    pipeline = Pipeline(stages, deliver=sink, on_event=events, **kwargs)  # type: ignore[arg-type]
    pipeline.start()
    return pipeline, sink, events


# --- pipeline ---------------------------------------------------------------------------------


def test_a_pipeline_needs_a_stage() -> None:
    with pytest.raises(ValueError, match="at least one stage"):
        Pipeline([], deliver=Sink(), on_event=EventLog())


def test_threads_are_named_after_the_pipeline_and_never_keep_the_process_alive() -> None:
    pipeline, _, _ = started([Append("1"), Append("2")], name="session-s9")
    names = [runner.thread.name for runner in pipeline.runners]
    assert names == ["session-s9-append1", "session-s9-append2"]
    threads = [runner.thread for runner in pipeline.runners] + [pipeline._sink_thread]
    assert threads[-1].name == "session-s9-sink"
    assert all(thread.daemon for thread in threads)
    assert pipeline.stop(HANG_BOUND_S).clean


def test_cancel_turn_reports_the_interruption_with_its_fields() -> None:
    pipeline, _, events = started([Append("1")])
    before = time.monotonic()
    generation = pipeline.cancel_turn("barge-in", turn_id=4)
    [interrupted] = events.of_type(TurnInterrupted)
    assert (interrupted.session_id, interrupted.turn_id) == ("local", 4)
    assert (
        (interrupted.generation, interrupted.reason) == (generation, "barge-in") == (1, "barge-in")
    )
    assert before <= interrupted.at <= time.monotonic()
    assert pipeline.stop(HANG_BOUND_S).clean


class SaysWhoItIs(Stage[Note, Note]):
    name = "who"

    def handle(self, item: Note, ctx: StageContext) -> Iterator[Note]:
        yield note(ctx.session_id)


def test_the_session_and_cancellation_given_are_the_stages_own() -> None:
    cancellation = TurnCancellation()
    pipeline, sink, _ = started([SaysWhoItIs()], session_id="s7", cancellation=cancellation)
    assert pipeline.cancellation is cancellation and pipeline.session_id == "s7"
    pipeline.feed(note("x"))
    assert pipeline.stop(HANG_BOUND_S).clean
    assert texts(sink.items) == ["s7"]


def test_feed_after_stop_is_refused_naming_the_item() -> None:
    pipeline, _, _ = started([Append("1")], name="p1")
    pipeline.stop(HANG_BOUND_S)
    with pytest.raises(PipelineClosed, match="p1 is stopping; Note refused"):
        pipeline.feed(note("late"))


def test_stop_before_start_is_clean() -> None:
    pipeline = Pipeline([Append("1")], deliver=Sink(), on_event=EventLog())
    report = pipeline.stop(0.1)
    assert report.clean and report.stuck_threads == ()


def test_a_stuck_stage_is_named_in_the_report_and_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stuck = Stuck()
    pipeline, _, _ = started([stuck], name="p2")
    pipeline.feed(note("x"))
    assert stuck.entered.wait(HANG_BOUND_S)
    with caplog.at_level(logging.WARNING, logger="s2s.pipeline.pipeline"):
        report = pipeline.stop(0.2)
    assert not report.clean and not report.pill_reached_sink
    assert report.stuck_threads == ("p2-stuck", "p2-sink")
    assert "p2: threads still alive at the deadline: p2-stuck, p2-sink" in caplog.text
    stuck.release.set()
    assert pipeline.stop(HANG_BOUND_S).clean


def test_stalled_counts_from_the_last_output_and_is_strict() -> None:
    stuck = Stuck()
    pipeline, _, _ = started([Append("0"), stuck])
    assert pipeline.stalled(time.monotonic(), 0.0) == []  # idle: no stall
    pipeline.feed(note("x"))
    assert stuck.entered.wait(HANG_BOUND_S)
    now = time.monotonic() + 10.0
    [(name, stalled_s)] = pipeline.stalled(now, 9.0)
    assert name == "stuck" and 10.0 <= stalled_s < 10.0 + HANG_BOUND_S
    assert pipeline.stalled(now, stalled_s) == []  # exactly at the bound: not yet
    stuck.release.set()
    assert pipeline.stop(HANG_BOUND_S).clean


def test_queue_depths_count_what_waits_in_front_of_each_stage() -> None:
    gate = Gate()
    pipeline, _, _ = started([gate, Append("!")])
    for name in ("a", "b", "c"):
        pipeline.feed(note(name))
    assert gate.holding.wait(HANG_BOUND_S)
    assert pipeline.queue_depths() == {"gate": 2, "append!": 0}
    assert pipeline.pending_input() == 2
    gate.open.set()
    assert pipeline.stop(HANG_BOUND_S).clean


def test_stage_lookup_by_type() -> None:
    append = Append("1")
    pipeline, _, _ = started([append, Explode()], name="p3")
    assert pipeline.stage(Append) is append
    with pytest.raises(LookupError, match="p3 has no Gate"):
        pipeline.stage(Gate)
    assert pipeline.stop(HANG_BOUND_S).clean


def test_a_failed_delivery_is_an_event_with_its_fields_and_a_logged_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def deliver(item: Message) -> None:
        raise ConnectionError() if "quiet" in getattr(item, "text", "") else KeyError("gone")

    events = EventLog()
    pipeline = Pipeline([Append("!")], deliver=deliver, on_event=events, session_id="s3", name="p4")
    pipeline.start()
    with caplog.at_level(logging.ERROR, logger="s2s.pipeline.pipeline"):
        pipeline.feed(note("loud", generation=0, turn_id=5))
        pipeline.feed(note("quiet", generation=0, turn_id=6))
        assert pipeline.stop(HANG_BOUND_S).clean
    loud, quiet = events.of_type(StageError)
    assert (loud.session_id, loud.turn_id, loud.generation, loud.stage) == ("s3", 5, 0, "sink")
    assert (loud.error_type, loud.detail) == ("KeyError", "'gone'")
    assert (quiet.error_type, quiet.detail) == ("ConnectionError", "ConnectionError")
    assert "p4: delivering Note failed" in caplog.text
    assert "KeyError: 'gone'" in caplog.text  # the traceback is logged


def test_a_failing_event_outlet_is_logged_and_the_pipeline_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def outlet(event: object) -> None:
        raise RuntimeError("outlet down")

    sink = Sink()
    pipeline = Pipeline([Append("!")], deliver=sink, on_event=outlet, name="p5")
    pipeline.start()
    with caplog.at_level(logging.ERROR, logger="s2s.pipeline.pipeline"):
        pipeline.cancel_turn("barge-in")
    assert "p5: event outlet failed on TurnInterrupted" in caplog.text
    assert "outlet down" in caplog.text
    pipeline.feed(note("after", generation=1))
    assert pipeline.stop(HANG_BOUND_S).clean
    assert texts(sink.items) == ["after!"]


def test_a_stale_item_at_the_sink_is_skipped_and_later_ones_delivered() -> None:
    entered, release = threading.Event(), threading.Event()
    delivered: list[str] = []

    def deliver(item: Message) -> None:
        entered.set()
        release.wait(HANG_BOUND_S)
        delivered.append(getattr(item, "text", ""))

    pipeline = Pipeline([Append("!")], deliver=deliver, on_event=EventLog())
    pipeline.start()
    pipeline.feed(note("a"))
    pipeline.feed(note("b"))
    assert entered.wait(HANG_BOUND_S)
    time.sleep(0.05)  # b has reached the sink's queue behind a
    pipeline.cancel_turn("flush")
    pipeline.feed(note("c", generation=1))
    release.set()
    assert pipeline.stop(HANG_BOUND_S).clean
    assert delivered[0] == "a!" and delivered[-1] == "c!" and "b!" not in delivered


# --- stage runner -----------------------------------------------------------------------------


def run_runner(
    stage: Stage[Note, Note], items: list[Note], cancellation: TurnCancellation
) -> tuple[StageRunner[Note, Note], list[Message | Pill]]:
    """The items and the pill through one runner; its outputs once its thread has ended."""
    inbox: queue.Queue[Message | Pill] = queue.Queue()
    outbox: queue.Queue[Message | Pill] = queue.Queue()
    ctx = StageContext("t", cancellation, EventLog())
    runner: StageRunner[Note, Note] = StageRunner(stage, inbox, outbox, ctx, "r")  # type: ignore[arg-type]
    runner.start()
    for item in items:
        inbox.put(item)
    inbox.put(Pill.PILL)
    runner.thread.join(HANG_BOUND_S)
    assert not runner.thread.is_alive()
    return runner, [outbox.get_nowait() for _ in range(outbox.qsize())]


def test_stale_inputs_are_counted_one_each() -> None:
    cancellation = TurnCancellation()
    cancellation.advance()
    items = [note("old1"), note("old2"), note("new", generation=1)]
    runner, outputs = run_runner(Append("!"), items, cancellation)
    assert runner.dropped_stale == 2
    assert outputs == [note("new!", generation=1), Pill.PILL]


class TwoThenCleanup(Stage[Note, Note]):
    """Yields two items, the turn is cancelled after the first; records its cleanup."""

    name = "two"

    def __init__(self) -> None:
        self.closed = threading.Event()

    def handle(self, item: Note, ctx: StageContext) -> Iterator[Note]:
        try:
            yield item
            ctx.cancellation.advance()  # the turn is cancelled while this output is made
            yield item
            yield item
        finally:
            self.closed.set()


def test_a_stale_output_is_counted_once_and_closes_its_generator() -> None:
    stage = TwoThenCleanup()
    runner, outputs = run_runner(stage, [note("x")], TurnCancellation())
    assert stage.closed.is_set()
    assert runner.dropped_stale == 1
    assert outputs == [note("x"), Pill.PILL]


class Microphone(Stage[Note, Note]):
    name = "mic"
    accepts_stale_input = True

    def handle(self, item: Note, ctx: StageContext) -> Iterator[Note]:
        yield note(item.text, generation=ctx.cancellation.generation)


def test_a_stage_that_accepts_stale_input_still_gets_it() -> None:
    cancellation = TurnCancellation()
    cancellation.advance()
    run = run_stage(Microphone(), [note("said during a reply", generation=0)], cancellation)
    assert texts(run.outputs) == ["said during a reply"]


class FlushesWhoItIs(Stage[Note, Note]):
    name = "flush"

    def handle(self, item: Note, ctx: StageContext) -> Iterator[Note]:
        return iter(())

    def finish(self, ctx: StageContext) -> Iterator[Note]:
        yield note(f"bye from {ctx.session_id}")


def test_finish_gets_the_context() -> None:
    run = run_stage(FlushesWhoItIs(), [note("x")], session_id="s5")
    assert texts(run.outputs) == ["bye from s5"]


class FinishFails(Stage[Note, Note]):
    name = "finish-fails"

    def handle(self, item: Note, ctx: StageContext) -> Iterator[Note]:
        return iter(())

    def finish(self, ctx: StageContext) -> Iterator[Note]:
        raise OSError("disk full")


def test_a_failure_is_an_event_with_its_fields_and_a_logged_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cancellation = TurnCancellation()
    cancellation.advance()
    with caplog.at_level(logging.ERROR, logger="s2s.pipeline.stage"):
        handled = run_stage(Explode(), [note("boom", generation=1, turn_id=3)], cancellation, "s6")
        finished = run_stage(FinishFails(), [], cancellation, "s6")
    [error] = handled.events.of_type(StageError)
    assert (error.session_id, error.turn_id, error.generation) == ("s6", 3, 1)
    assert "stage explode failed on 'Note'" in caplog.text
    assert "ValueError: cannot handle 'boom'" in caplog.text  # with its traceback
    [flush_error] = finished.events.of_type(StageError)
    assert (flush_error.turn_id, flush_error.generation) == (-1, 1)
    assert (flush_error.error_type, flush_error.detail) == ("OSError", "disk full")
    assert "stage finish-fails failed on 'NoneType'" in caplog.text


class SlowThenStuck(Stage[Note, Note]):
    name = "slow"

    def __init__(self) -> None:
        self.yielded_at = 0.0
        self.stuck = threading.Event()
        self.release = threading.Event()

    def handle(self, item: Note, ctx: StageContext) -> Iterator[Note]:
        time.sleep(0.3)
        self.yielded_at = time.monotonic()
        yield item
        self.stuck.set()
        self.release.wait(HANG_BOUND_S)


def test_a_stall_is_measured_from_the_last_output_and_idle_is_zero() -> None:
    slow = SlowThenStuck()
    pipeline, _, _ = started([slow])
    [runner] = pipeline.runners
    assert runner.stalled_s(time.monotonic()) == 0.0
    began = time.monotonic()
    pipeline.feed(note("x"))
    assert slow.stuck.wait(HANG_BOUND_S)
    now = time.monotonic()
    stalled_s = runner.stalled_s(now)
    assert 0.0 < stalled_s <= now - slow.yielded_at + 0.01
    assert stalled_s < now - began - 0.2  # not from when the item was taken
    assert runner.stalled_s(now - 3600.0) == 0.0  # never negative
    slow.release.set()
    assert pipeline.stop(HANG_BOUND_S).clean
    assert runner.stalled_s(time.monotonic()) == 0.0


class AdvancesThenFails(Stage[Note, Note]):
    """The turn is cancelled while this handler works on it; then the handler fails, with an
    empty message."""

    name = "advances"

    def handle(self, item: Note, ctx: StageContext) -> Iterator[Note]:
        ctx.cancellation.advance()
        raise ValueError()


def test_a_failure_names_the_items_generation_and_the_exception_type_when_it_has_no_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def outlet(event: object) -> None:
        raise RuntimeError("outlet down")

    stage: Stage[Note, Note] = AdvancesThenFails()
    inbox: queue.Queue[Any] = queue.Queue()
    outbox: queue.Queue[Any] = queue.Queue()
    events = EventLog()
    cancellation = TurnCancellation()
    ctx = StageContext("t", cancellation, events)
    runner: StageRunner[Note, Note] = StageRunner(stage, inbox, outbox, ctx, "r")
    runner.start()
    inbox.put(note("x", generation=0))
    inbox.put(Pill.PILL)
    runner.thread.join(HANG_BOUND_S)
    [error] = events.of_type(StageError)
    assert error.generation == 0 and cancellation.generation == 1
    assert (error.error_type, error.detail) == ("ValueError", "ValueError")
    failing_ctx = StageContext("t", TurnCancellation(), outlet)
    failing: StageRunner[Note, Note] = StageRunner(stage, inbox, outbox, failing_ctx, "f")
    with caplog.at_level(logging.ERROR, logger="s2s.pipeline.stage"):
        failing.start()
        inbox.put(note("y"))
        inbox.put(Pill.PILL)
        failing.thread.join(HANG_BOUND_S)
    assert "event outlet failed while reporting a advances error" in caplog.text
    assert not failing.thread.is_alive()


class TwoStaleOutputs(Stage[Note, Note]):
    name = "two-stale"

    def handle(self, item: Note, ctx: StageContext) -> Iterator[Note]:
        ctx.cancellation.advance()
        yield item  # stale at once


def test_each_stale_output_is_counted() -> None:
    runner, outputs = run_runner(
        TwoStaleOutputs(), [note("a"), note("b", generation=1)], TurnCancellation()
    )
    assert runner.dropped_stale == 2
    assert outputs == [Pill.PILL]

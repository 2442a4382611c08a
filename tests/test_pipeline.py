"""Layer 2b: whole pipelines of fake stages that are slow, stuck, failing or generating."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from s2s.pipeline.messages import Message, StageError, TurnInterrupted
from s2s.pipeline.pipeline import Pipeline, PipelineClosed
from s2s.pipeline.stage import Stage, StageContext
from tests.fakes import Append, Explode, Gate, Note, StepGenerator, Stuck, note
from tests.harness import EventLog, texts

HANG_BOUND_S = 10.0


class Sink:
    """Collects delivered items; ``wait_for(n)`` blocks until n have arrived."""

    def __init__(self) -> None:
        self.items: list[Message] = []
        self._arrived = threading.Condition()

    def __call__(self, item: Message) -> None:
        with self._arrived:
            self.items.append(item)
            self._arrived.notify_all()

    def wait_for(self, count: int) -> bool:
        with self._arrived:
            return self._arrived.wait_for(lambda: len(self.items) >= count, HANG_BOUND_S)


@pytest.fixture
def built() -> Iterator[list[Pipeline]]:
    """Pipelines made by a test; any left running are cancelled afterwards."""
    made: list[Pipeline] = []
    yield made
    for pipeline in made:
        pipeline.cancel(timeout_s=1.0)


def make(built: list[Pipeline], stages: list[Stage[Note, Note]]) -> tuple[Pipeline, Sink, EventLog]:
    sink, events = Sink(), EventLog()
    pipeline = Pipeline(stages, deliver=sink, on_event=events, session_id="test")
    built.append(pipeline)
    pipeline.start()
    return pipeline, sink, events


def test_pill_reaches_the_sink_through_every_stage(built: list[Pipeline]) -> None:
    """stop(): everything fed is handled by every stage, the pill arrives, all threads join."""
    pipeline, sink, _ = make(built, [Append("1", 0.01), Append("2"), Append("3", 0.01)])
    for name in ("a", "b", "c"):
        pipeline.feed(note(name))
    report = pipeline.stop(timeout_s=HANG_BOUND_S)
    assert report.clean
    assert texts(sink.items) == ["a123", "b123", "c123"]
    assert not [runner.thread.name for runner in pipeline.runners if runner.thread.is_alive()]


def test_a_raising_stage_reports_and_the_next_item_works(built: list[Pipeline]) -> None:
    """A stage error becomes an event, the next item is still processed, the pill arrives."""
    pipeline, sink, events = make(built, [Append("1"), Explode(), Append("3")])
    pipeline.feed(note("boom"))
    pipeline.feed(note("fine"))
    assert sink.wait_for(1)
    report = pipeline.stop(timeout_s=HANG_BOUND_S)
    assert report.clean
    assert texts(sink.items) == ["fine13"]
    [error] = events.of_type(StageError)
    assert error.stage == "explode"


def test_stop_meets_its_deadline_and_names_a_stuck_stage(built: list[Pipeline]) -> None:
    """A stage stuck in a call that ignores the pill does not hold stop() past its deadline."""
    stuck = Stuck()
    pipeline, _, _ = make(built, [Append("1"), stuck, Append("3")])
    pipeline.feed(note("x"))
    assert stuck.entered.wait(HANG_BOUND_S)
    began = time.monotonic()
    report = pipeline.stop(timeout_s=0.5)
    elapsed = time.monotonic() - began
    stuck.release.set()
    assert elapsed < 0.5 + 0.25, f"stop took {elapsed:.2f} s"
    assert not report.pill_reached_sink
    assert "pipeline-stuck" in report.stuck_threads
    assert "pipeline-append1" not in report.stuck_threads


def test_cancel_turn_drops_stale_items_in_every_stage(built: list[Pipeline]) -> None:
    """Items of the old generation queued anywhere are dropped; new ones pass."""
    stages: list[Stage[Note, Note]] = [Append("1"), Append("2"), Append("3")]
    sink, events = Sink(), EventLog()
    pipeline = Pipeline(stages, deliver=sink, on_event=events, session_id="test")
    built.append(pipeline)
    # One old-generation item already waiting in front of every stage, then the turn is cut.
    for runner in pipeline.runners:
        runner.inbox.put(note("old", generation=0))
    new_generation = pipeline.cancel_turn("barge-in")
    pipeline.start()
    pipeline.feed(note("new", generation=new_generation))
    report = pipeline.stop(timeout_s=HANG_BOUND_S)
    assert report.clean
    assert texts(sink.items) == ["new123"]
    assert [runner.dropped_stale for runner in pipeline.runners] == [1, 1, 1]
    [interrupted] = events.of_type(TurnInterrupted)
    assert interrupted.generation == new_generation


def test_cancel_turn_stops_a_generation_loop_within_one_step(built: list[Pipeline]) -> None:
    """A generate loop polling the cancellation ends at its next step, and its output stops."""
    generator = StepGenerator(steps=100, step_s=0.05)
    pipeline, sink, _ = make(built, [generator, Append("!")])
    pipeline.feed(note("t"))
    assert sink.wait_for(3)
    cancel_at = time.monotonic()
    pipeline.cancel_turn("barge-in")
    report = pipeline.stop(timeout_s=HANG_BOUND_S)
    assert report.clean
    # At most the step under way when the cancel came finishes; none of its output is
    # delivered (whatever the scheduling between this thread and the stage's).
    after = [at for at in generator.step_done_at if at > cancel_at]
    assert len(after) <= 1
    assert len(sink.items) <= len(generator.step_done_at) - len(after)


def test_cancel_abandons_in_flight_work_and_still_delivers_the_pill(
    built: list[Pipeline],
) -> None:
    """cancel(): the generation loop stops within a step, queued items are not handled."""
    generator = StepGenerator(steps=100, step_s=0.05)
    pipeline, sink, _ = make(built, [generator, Append("!")])
    for name in ("a", "b", "c"):
        pipeline.feed(note(name))
    assert generator.started.wait(HANG_BOUND_S)
    cancel_at = time.monotonic()
    report = pipeline.cancel(timeout_s=HANG_BOUND_S)
    assert report.clean
    assert len([at for at in generator.step_done_at if at > cancel_at]) <= 1
    assert generator.inputs == ["a"]  # b and c were queued behind it and never handled
    assert all(item.text.startswith("a") for item in sink.items if isinstance(item, Note))


def test_the_pill_survives_cancels_with_items_queued(built: list[Pipeline]) -> None:
    """Repeated turn cancels while items wait behind a gate never drop the pill."""
    gate = Gate()
    pipeline, sink, _ = make(built, [gate, Append("!")])
    for i in range(5):
        pipeline.feed(note(f"n{i}"))
    assert gate.holding.wait(HANG_BOUND_S)
    pipeline.stop(timeout_s=0.0)  # the pill is now queued behind the held items
    for _ in range(3):
        pipeline.cancel_turn("flush")
    gate.open.set()
    report = pipeline.stop(timeout_s=HANG_BOUND_S)
    assert report.clean
    assert sink.items == []


def test_stop_and_cancel_are_idempotent(built: list[Pipeline]) -> None:
    """Second and third calls return clean reports and feed() is refused after stop."""
    pipeline, _, _ = make(built, [Append("1")])
    assert pipeline.stop().clean
    assert pipeline.stop().clean
    assert pipeline.cancel().clean
    with pytest.raises(PipelineClosed):
        pipeline.feed(note("late"))


def test_a_failing_deliver_is_an_event_not_a_dead_sink(built: list[Pipeline]) -> None:
    """If delivering raises, a 'sink' StageError is emitted and later items still arrive."""
    delivered: list[str] = []

    def deliver(item: Message) -> None:
        assert isinstance(item, Note)
        if item.text == "bad!":
            raise ConnectionError("client went away")
        delivered.append(item.text)

    events = EventLog()
    pipeline = Pipeline([Append("!")], deliver=deliver, on_event=events)
    built.append(pipeline)
    pipeline.start()
    pipeline.feed(note("bad"))
    pipeline.feed(note("good"))
    assert pipeline.stop(timeout_s=HANG_BOUND_S).clean
    assert delivered == ["good!"]
    assert [e.stage for e in events.of_type(StageError)] == ["sink"]


class ExitsTheThread(Stage[Note, Note]):
    """Raises SystemExit (a BaseException, which no ``except Exception`` catches) on 'quit'."""

    name = "exits"

    def handle(self, item: Note, ctx: StageContext) -> Iterator[Note]:
        if item.text.startswith("quit"):
            raise SystemExit("the handler left")
        yield item


class FailsToFinish(Stage[Note, Note]):
    """Passes items; its end-of-stream flush raises."""

    name = "fails-to-finish"

    def handle(self, item: Note, ctx: StageContext) -> Iterator[Note]:
        yield item

    def finish(self, ctx: StageContext) -> Iterator[Note]:
        raise RuntimeError("flush failed")


def test_the_pill_passes_a_handler_that_raises_a_base_exception(built: list[Pipeline]) -> None:
    """SystemExit in a handler ends that stage's thread, yet the pill still reaches the sink
    and every thread joins: stop() is clean."""
    pipeline, sink, _ = make(built, [Append("1"), ExitsTheThread(), Append("3")])
    pipeline.feed(note("a"))
    pipeline.feed(note("quit"))
    report = pipeline.stop(timeout_s=HANG_BOUND_S)
    assert report.clean, report
    assert pipeline.pill_reached_sink.is_set()
    assert texts(sink.items) == ["a13"]


def test_the_pill_passes_a_finish_that_raises(built: list[Pipeline]) -> None:
    """A failing flush is reported as a StageError and the pill still arrives."""
    pipeline, sink, events = make(built, [FailsToFinish(), Append("2")])
    pipeline.feed(note("a"))
    report = pipeline.stop(timeout_s=HANG_BOUND_S)
    assert report.clean, report
    assert pipeline.pill_reached_sink.is_set()
    assert texts(sink.items) == ["a2"]
    [error] = events.of_type(StageError)
    assert error.stage == "fails-to-finish" and error.detail == "flush failed"


def test_cancel_from_another_thread_mid_step_stops_within_a_step(built: list[Pipeline]) -> None:
    """cancel() called by a thread other than the consumer while a step is running: the
    generator stops at its next step, the pill arrives, the report is clean."""
    generator = StepGenerator(steps=1000, step_s=0.02)
    pipeline, _, _ = make(built, [generator])
    pipeline.feed(note("go"))
    assert generator.started.wait(HANG_BOUND_S)
    reports = []
    canceller = threading.Thread(target=lambda: reports.append(pipeline.cancel(HANG_BOUND_S)))
    canceller.start()
    canceller.join(HANG_BOUND_S)
    [report] = reports
    assert report.clean, report
    assert pipeline.pill_reached_sink.is_set()
    assert generator.steps_run < 1000
    assert not any(runner.thread.is_alive() for runner in pipeline.runners)

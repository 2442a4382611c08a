"""Layer 2: one stage at a time through the harness."""

from __future__ import annotations

from collections.abc import Iterator

from s2s.pipeline.cancellation import TurnCancellation
from s2s.pipeline.messages import StageError
from s2s.pipeline.stage import Stage, StageContext
from tests.fakes import Append, Explode, Note, note
from tests.harness import run_stage, texts


class Repeat(Stage[Note, Note]):
    """Emits each item as many times as the number in its text (zero included)."""

    name = "repeat"

    def handle(self, item: Note, ctx: StageContext) -> Iterator[Note]:
        for _ in range(int(item.text)):
            yield item


class Buffer(Stage[Note, Note]):
    """Holds everything until end of stream, then flushes it as one item."""

    name = "buffer"

    def __init__(self) -> None:
        self._held: list[str] = []

    def handle(self, item: Note, ctx: StageContext) -> Iterator[Note]:
        self._held.append(item.text)
        return iter(())

    def finish(self, ctx: StageContext) -> Iterator[Note]:
        yield note("+".join(self._held))


def test_outputs_keep_order_and_the_pill_comes_last() -> None:
    """Items come out in order, the pill after them, and the thread joins."""
    run = run_stage(Append("!"), [note("a"), note("b"), note("c")])
    assert texts(run.outputs) == ["a!", "b!", "c!"]
    assert run.ended_with_pill and run.thread_joined


def test_a_handler_may_emit_zero_or_many_items() -> None:
    """Zero, one or several outputs per input all come through in order."""
    run = run_stage(Repeat(), [note("2"), note("0"), note("1")])
    assert texts(run.outputs) == ["2", "2", "1"]
    assert run.ended_with_pill


def test_finish_flushes_before_the_pill() -> None:
    """What a stage buffers is flushed at end of stream, ahead of the pill."""
    run = run_stage(Buffer(), [note("x"), note("y")])
    assert texts(run.outputs) == ["x+y"]
    assert run.ended_with_pill and run.thread_joined


def test_a_raising_handler_reports_and_carries_on() -> None:
    """The failing item becomes a StageError event; the items after it still come out."""
    run = run_stage(Explode(), [note("ok1"), note("boom", turn_id=7), note("ok2")])
    assert texts(run.outputs) == ["ok1", "ok2"]
    [error] = run.events.of_type(StageError)
    assert (error.stage, error.turn_id, error.error_type) == ("explode", 7, "ValueError")
    assert "boom" in error.detail
    assert run.ended_with_pill and run.thread_joined


def test_stale_input_is_dropped() -> None:
    """Items of a generation the session has moved past never reach the handler."""
    cancellation = TurnCancellation()
    cancellation.advance()
    run = run_stage(
        Append("!"), [note("old", generation=0), note("new", generation=1)], cancellation
    )
    assert texts(run.outputs) == ["new!"]
    assert run.ended_with_pill

"""Fake stages for the pipeline tests: slow, stuck, failing, and a step-wise generator."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

from s2s.pipeline.messages import AudioChunk, Message
from s2s.pipeline.stage import Stage, StageContext


@dataclass(frozen=True, slots=True, kw_only=True)
class Note(Message):
    text: str


def note(text: str, generation: int = 0, turn_id: int = 0) -> Note:
    return Note(session_id="test", turn_id=turn_id, generation=generation, text=text)


class Append(Stage[Note, Note]):
    """Appends a suffix: shows which stages an item went through."""

    def __init__(self, suffix: str, delay_s: float = 0.0) -> None:
        self.name = f"append{suffix}"
        self._suffix = suffix
        self._delay_s = delay_s

    def handle(self, item: Note, ctx: StageContext) -> Iterator[Note]:
        if self._delay_s:
            time.sleep(self._delay_s)
        yield replace(item, text=item.text + self._suffix)


class Explode(Stage[Note, Note]):
    """Raises on items whose text contains 'boom'; passes the rest."""

    name = "explode"

    def handle(self, item: Note, ctx: StageContext) -> Iterator[Note]:
        if "boom" in item.text:
            raise ValueError(f"cannot handle {item.text!r}")
        yield item


class Stuck(Stage[Note, Note]):
    """Blocks in a call that ignores the pill and cancellation until ``release`` is set."""

    name = "stuck"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def handle(self, item: Note, ctx: StageContext) -> Iterator[Note]:
        self.entered.set()
        self.release.wait()
        yield item


class Gate(Stage[Note, Note]):
    """Holds each item until ``open`` is set, then passes it."""

    name = "gate"

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.open = threading.Event()

    def handle(self, item: Note, ctx: StageContext) -> Iterator[Note]:
        self.holding.set()
        self.open.wait()
        yield item


class StepGenerator(Stage[Note, Note]):
    """A fake model generate loop: one step every ``step_s``, each step yields a token.

    Like a model's ``generate`` with a stopping criterion, it polls the cancellation once per
    step; ``steps_run`` counts what it computed.
    """

    name = "generate"

    def __init__(self, steps: int, step_s: float) -> None:
        self._steps = steps
        self._step_s = step_s
        self.steps_run = 0
        self.step_done_at: list[float] = []
        """When each step finished (monotonic seconds)."""
        self.inputs: list[str] = []
        """The text of every item the handler took, in order."""
        self.started = threading.Event()
        self.stopped_at: float | None = None

    def handle(self, item: Note, ctx: StageContext) -> Iterator[Note]:
        should_stop = ctx.cancellation.stop_check(item.generation)
        self.inputs.append(item.text)
        self.started.set()
        for step in range(self._steps):
            if should_stop():
                self.stopped_at = time.monotonic()
                return
            time.sleep(self._step_s)
            self.steps_run += 1
            self.step_done_at.append(time.monotonic())
            yield replace(item, text=f"{item.text}:{step}")


class Wedged(Stage[AudioChunk, AudioChunk]):
    """A model call that ignores every cancellation: hangs on the first audio until
    ``release`` is set (or 30 s pass)."""

    name = "wedged"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def handle(self, item: AudioChunk, ctx: StageContext) -> Iterator[AudioChunk]:
        self.entered.set()
        self.release.wait(30.0)
        return iter(())

"""Run one stage on its own thread: items and the pill in; outputs, events and the pill out."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from s2s.pipeline.cancellation import TurnCancellation
from s2s.pipeline.messages import Event, Message, Pill
from s2s.pipeline.stage import Stage, StageContext, StageRunner

HANG_BOUND_S = 10.0
"""Generous bound for a harness run: only hangs should ever reach it."""


@dataclass
class EventLog:
    """A thread-safe list of events, usable as an ``on_event`` outlet."""

    events: list[Event] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def of_type(self, kind: type[Any]) -> list[Any]:
        with self._lock:
            return [event for event in self.events if isinstance(event, kind)]


@dataclass
class StageRun:
    outputs: list[Message]
    events: EventLog
    ended_with_pill: bool
    thread_joined: bool


def run_stage(
    stage: Stage[Any, Any],
    items: Iterable[Message],
    cancellation: TurnCancellation | None = None,
    session_id: str = "test",
) -> StageRun:
    """Push ``items`` then the pill through ``stage``; collect everything until the pill."""
    inbox: queue.Queue[Message | Pill] = queue.Queue()
    outbox: queue.Queue[Message | Pill] = queue.Queue()
    events = EventLog()
    ctx = StageContext(session_id, cancellation or TurnCancellation(), events)
    runner = StageRunner(stage, inbox, outbox, ctx, f"harness-{stage.name}")
    runner.start()
    for item in items:
        inbox.put(item)
    inbox.put(Pill.PILL)
    outputs: list[Message] = []
    ended_with_pill = False
    while True:
        try:
            out = outbox.get(timeout=HANG_BOUND_S)
        except queue.Empty:
            break
        if out is Pill.PILL:
            ended_with_pill = outbox.empty()
            break
        outputs.append(out)
    runner.thread.join(HANG_BOUND_S)
    return StageRun(outputs, events, ended_with_pill, not runner.thread.is_alive())


def texts(messages: Sequence[Message]) -> list[str]:
    return [getattr(message, "text", "") for message in messages]

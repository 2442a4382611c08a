"""The generic stage: one input queue, one output queue, a handler, a thread.

A ``Stage`` is the pure part: ``handle`` turns one input item into zero or more output items.
A ``StageRunner`` is the thin thread that moves items between the queues. The runner owns
the three guarantees the peer we replace lacked:

* the pill is forwarded in a ``finally`` block, so no exception can keep it from the next
  stage;
* a handler that raises becomes a ``StageError`` event (traceback logged) and the runner goes
  on with the next item;
* items of a stale generation are dropped, both on the way in and as the handler yields them,
  so a cancelled turn stops costing work at the next item or step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

from s2s.pipeline.cancellation import TurnCancellation
from s2s.pipeline.messages import Event, Message, Pill, StageError

log = logging.getLogger(__name__)

In = TypeVar("In", bound=Message)
Out = TypeVar("Out", bound=Message)


@dataclass(frozen=True, slots=True)
class StageContext:
    """What a handler may use besides its item: the session's cancellation and event outlet.

    ``emit`` must be thread-safe and must not block (the pipeline's ``on_event`` contract).
    """

    session_id: str
    cancellation: TurnCancellation
    emit: Callable[[Event], None]


class Stage(ABC, Generic[In, Out]):
    """A pipeline stage. Subclasses get their models and options through the constructor,
    which must do no I/O; model loading happens in factories before the pipeline is built."""

    name: str = "stage"
    accepts_stale_input: ClassVar[bool] = False
    """True for stages whose input is never stale (the user's microphone audio: speech that
    arrives during a reply is the next turn, not a leftover of the old one)."""

    @abstractmethod
    def handle(self, item: In, ctx: StageContext) -> Iterable[Out]:
        """Process one item; yield zero or more outputs. May be a generator: the runner stops
        pulling from it as soon as an output is stale, so a generator that yields per step
        is cancelled within one step."""

    def finish(self, ctx: StageContext) -> Iterable[Out]:
        """Flush what is buffered at end of stream, before the pill moves on. Default: none."""
        return ()


class StageRunner(Generic[In, Out]):
    """Runs one ``Stage`` on its own thread between ``inbox`` and ``outbox``."""

    def __init__(
        self,
        stage: Stage[In, Out],
        inbox: queue.Queue[In | Pill],
        outbox: queue.Queue[Out | Pill],
        ctx: StageContext,
        thread_name: str,
    ) -> None:
        self.stage = stage
        self.inbox = inbox
        self.outbox = outbox
        self._ctx = ctx
        # Daemon: a stage stuck in a call that ignores cancellation (a C extension, a model
        # without a stopping criterion) must not keep the process alive after the pipeline
        # has reported it by name; it is still always joined with a timeout first.
        self.thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self.dropped_stale = 0
        self._busy_since: float | None = None  # working on an item, with no output since

    def stalled_s(self, now: float) -> float:
        """How long the handler has been on one item without producing anything (0: idle).
        A healthy stage makes an output every step; a wedged model call makes none."""
        since = self._busy_since  # one read: the runner's thread may clear it meanwhile
        return 0.0 if since is None else max(0.0, now - since)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                item = self.inbox.get()
                if item is Pill.PILL:
                    self._finish()
                    return
                if self._is_stale_input(item):
                    self.dropped_stale += 1
                    continue
                self._process(item)
        finally:
            # The pill always moves on, whatever happened above: this is what keeps one
            # failing stage from hanging every stage after it.
            self.outbox.put(Pill.PILL)

    def _is_stale_input(self, item: In) -> bool:
        cancellation = self._ctx.cancellation
        if cancellation.closed:
            return True
        return not self.stage.accepts_stale_input and cancellation.is_stale(item.generation)

    def _process(self, item: In) -> None:
        self._busy_since = time.monotonic()
        try:
            self._forward(self.stage.handle(item, self._ctx))
        except Exception as exc:
            self._report(exc, item)
        finally:
            self._busy_since = None

    def _finish(self) -> None:
        if self._ctx.cancellation.closed:
            return
        try:
            self._forward(self.stage.finish(self._ctx))
        except Exception as exc:
            self._report(exc, None)

    def _forward(self, outputs: Iterable[Out]) -> None:
        iterator = iter(outputs)
        try:
            for out in iterator:
                if self._ctx.cancellation.is_stale(out.generation):
                    self.dropped_stale += 1
                    break
                self.outbox.put(out)
                if self._busy_since is not None:
                    self._busy_since = time.monotonic()  # progress
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                # Closing a generator runs its cleanup now (GeneratorExit), which is how a
                # streaming model call learns it was abandoned.
                close()

    def _report(self, exc: Exception, item: In | None) -> None:
        log.error("stage %s failed on %r", self.stage.name, type(item).__name__, exc_info=exc)
        event = StageError(
            session_id=self._ctx.session_id,
            turn_id=item.turn_id if item is not None else -1,
            generation=item.generation if item is not None else self._ctx.cancellation.generation,
            stage=self.stage.name,
            error_type=type(exc).__name__,
            detail=str(exc) or type(exc).__name__,
        )
        try:
            self._ctx.emit(event)
        except Exception:
            log.exception("event outlet failed while reporting a %s error", self.stage.name)

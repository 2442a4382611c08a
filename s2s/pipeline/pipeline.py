"""A chain of stage threads, wired from injected stages, with stop and cancel under deadlines.

::

    feed() -> [head queue] -> stage 1 -> ... -> stage N -> [sink queue] -> sink thread -> deliver()

``stop()`` ends the stream: the pill goes in at the head behind everything already fed, each
stage finishes its work, forwards the pill and exits, and ``stop()`` returns once the pill
has reached the sink and the threads have joined, or once its deadline has passed.
``cancel()`` ends it now: in-flight work is abandoned (the session's generation is closed, so
stages drop every item and long calls stop at their next step) and the pill still travels the
whole chain, because the pill is the only thing that tells a stage to exit.
``cancel_turn()`` abandons only the current turn; the pipeline carries on with the next.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from s2s.pipeline.cancellation import TurnCancellation
from s2s.pipeline.deadline import Deadline
from s2s.pipeline.messages import Event, Message, Pill, StageError, TurnInterrupted
from s2s.pipeline.stage import Stage, StageContext, StageRunner

log = logging.getLogger(__name__)

S = TypeVar("S", bound=Stage[Any, Any])

DEFAULT_STOP_TIMEOUT_S = 2.0


class PipelineClosed(RuntimeError):
    """Raised by ``feed()`` once the pipeline is stopping: the item would never be handled."""


@dataclass(frozen=True, slots=True)
class ShutdownReport:
    """How a ``stop()`` or ``cancel()`` ended."""

    pill_reached_sink: bool
    stuck_threads: tuple[str, ...]
    """Names of the threads still alive at the deadline (never waited on further)."""

    @property
    def clean(self) -> bool:
        return self.pill_reached_sink and not self.stuck_threads


class Pipeline:
    """Stage threads joined by queues. Construct, ``start()``, ``feed()``, then ``stop()``.

    ``deliver`` receives every item that leaves the last stage, on the sink thread, in
    order. ``on_event`` receives events from every stage thread: it must be thread-safe and
    must not block. Neither is ever passed the pill.
    """

    def __init__(
        self,
        stages: Sequence[Stage[Any, Any]],
        *,
        deliver: Callable[[Message], None],
        on_event: Callable[[Event], None],
        session_id: str = "local",
        cancellation: TurnCancellation | None = None,
        name: str = "pipeline",
    ) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        self.session_id = session_id
        self.name = name
        self.cancellation = cancellation if cancellation is not None else TurnCancellation()
        self._deliver = deliver
        self._on_event = on_event
        ctx = StageContext(session_id, self.cancellation, on_event)
        # Unbounded queues: what flows here is a few seconds of audio and text per turn, and a
        # bounded put() would be one more blocking call that a stop has to be able to wake.
        queues: list[queue.Queue[Message | Pill]] = [queue.Queue() for _ in range(len(stages) + 1)]
        self._head = queues[0]
        self._sink = queues[-1]
        self.runners: list[StageRunner[Any, Any]] = [
            StageRunner(stage, queues[i], queues[i + 1], ctx, f"{name}-{stage.name}")
            for i, stage in enumerate(stages)
        ]
        # Daemon for the same reason as the stage threads (see StageRunner).
        self._sink_thread = threading.Thread(
            target=self._drain_sink, name=f"{name}-sink", daemon=True
        )
        self.pill_reached_sink = threading.Event()
        self._state_lock = threading.Lock()  # guards _started and _pill_sent
        self._started = False
        self._pill_sent = False

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start every thread. Idempotent."""
        with self._state_lock:
            if self._started:
                return
            self._started = True
        for runner in self.runners:
            runner.start()
        self._sink_thread.start()

    def feed(self, item: Message) -> None:
        """Put an item in at the head. Non-blocking. Raises ``PipelineClosed`` once stopping."""
        with self._state_lock:
            if self._pill_sent:
                raise PipelineClosed(f"{self.name} is stopping; {type(item).__name__} refused")
            self._head.put(item)

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> ShutdownReport:
        """Finish the stream: pill in at the head, wait for it at the sink, join every thread.

        Returns within ``timeout_s`` whatever the stages do. Idempotent: a second call waits
        for the same pill under its own deadline.
        """
        return self._shut_down(Deadline(timeout_s))

    def cancel(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> ShutdownReport:
        """Abandon in-flight work now, then shut down as ``stop()`` does. Idempotent."""
        self.cancellation.close()
        return self._shut_down(Deadline(timeout_s))

    def cancel_turn(self, reason: str, turn_id: int = -1) -> int:
        """Abandon the current turn's work in every stage; return the new generation.

        Queued items of the old generation are dropped as they are reached; the pill is
        never among them, since it carries no generation.
        """
        generation = self.cancellation.advance()
        self._emit(
            TurnInterrupted(
                session_id=self.session_id,
                turn_id=turn_id,
                generation=generation,
                reason=reason,
                at=time.monotonic(),
            )
        )
        return generation

    def stalled(self, now: float, after_s: float) -> list[tuple[str, float]]:
        """Stages on one item with no output for longer than ``after_s``: (name, seconds)."""
        found = []
        for runner in self.runners:
            stalled_s = runner.stalled_s(now)
            if stalled_s > after_s:
                found.append((runner.stage.name, stalled_s))
        return found

    def pending_input(self) -> int:
        """Items fed and not yet taken by the first stage."""
        return self._head.qsize()

    def queue_depths(self) -> dict[str, int]:
        """Items waiting in front of each stage."""
        return {runner.stage.name: runner.inbox.qsize() for runner in self.runners}

    def stage(self, kind: type[S]) -> S:
        """The pipeline's stage of the given type (the first, if several)."""
        for runner in self.runners:
            if isinstance(runner.stage, kind):
                return runner.stage
        raise LookupError(f"{self.name} has no {kind.__name__}")

    # --- internals ------------------------------------------------------------------------

    def _shut_down(self, deadline: Deadline) -> ShutdownReport:
        with self._state_lock:
            if not self._pill_sent:
                self._pill_sent = True
                self._head.put(Pill.PILL)
            started = self._started
        if started:
            self.pill_reached_sink.wait(deadline.remaining_s())
            for thread in self._threads():
                thread.join(deadline.remaining_s())
        stuck = tuple(t.name for t in self._threads() if t.is_alive())
        if stuck:
            log.warning("%s: threads still alive at the deadline: %s", self.name, ", ".join(stuck))
        return ShutdownReport(self.pill_reached_sink.is_set() or not started, stuck)

    def _threads(self) -> list[threading.Thread]:
        return [runner.thread for runner in self.runners] + [self._sink_thread]

    def _drain_sink(self) -> None:
        while True:
            item = self._sink.get()
            if item is Pill.PILL:
                self.pill_reached_sink.set()
                return
            if self.cancellation.is_stale(item.generation):
                continue
            try:
                self._deliver(item)
            except Exception as exc:
                log.error("%s: delivering %s failed", self.name, type(item).__name__, exc_info=exc)
                self._emit(
                    StageError(
                        session_id=self.session_id,
                        turn_id=item.turn_id,
                        generation=item.generation,
                        stage="sink",
                        error_type=type(exc).__name__,
                        detail=str(exc) or type(exc).__name__,
                    )
                )

    def _emit(self, event: Event) -> None:
        try:
            self._on_event(event)
        except Exception:
            log.exception("%s: event outlet failed on %s", self.name, type(event).__name__)

"""``s2s-selfcheck``: run the pipeline core once, end to end, with no models.

A canned reply streams word by word through the speakable-chunk splitter, a stage that raises
on purpose shows an error travelling as an event, and the pipeline is stopped under a deadline.
Exit status 0 when the pill reached the sink and every thread joined.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

from pipeline.chunker import SpeakableChunker
from pipeline.messages import Event, Message, ReplyText, StageError, Transcript, TurnClock
from pipeline.pipeline import Pipeline
from pipeline.stage import Stage, StageContext

CANNED_REPLY = "Sure, Dr. Smith: the capital of France is Paris. It has about 2.1 million people."


class CannedReply(Stage[Transcript, ReplyText]):
    """Streams a fixed reply through the splitter, like an LLM would; fails on 'fail'."""

    name = "reply"

    def handle(self, item: Transcript, ctx: StageContext) -> Iterator[ReplyText]:
        if item.text == "fail":
            raise RuntimeError("asked to fail")
        chunker = SpeakableChunker()
        chunks = [c for word in CANNED_REPLY.split(" ") for c in chunker.push(word + " ")]
        chunks += chunker.finish()
        for index, text in enumerate(chunks):
            yield ReplyText(
                session_id=item.session_id,
                turn_id=item.turn_id,
                generation=item.generation,
                text=text,
                chunk_index=index,
                is_last=index == len(chunks) - 1,
                clock=item.clock,
            )


def main() -> int:
    def deliver(item: Message) -> None:
        assert isinstance(item, ReplyText)
        print(f"  chunk {item.chunk_index}: {item.text}")

    def on_event(event: Event) -> None:
        if isinstance(event, StageError):
            print(f"  event: stage {event.stage} failed ({event.error_type}: {event.detail})")

    pipeline = Pipeline([CannedReply()], deliver=deliver, on_event=on_event, name="selfcheck")
    pipeline.start()
    for turn_id, text in enumerate(["fail", "What is the capital of France?"]):
        clock = TurnClock(speech_ended_at=time.monotonic())
        pipeline.feed(
            Transcript(session_id="local", turn_id=turn_id, generation=0, text=text, clock=clock)
        )
    report = pipeline.stop(timeout_s=2.0)
    print(
        f"pipeline stopped: pill reached sink={report.pill_reached_sink}, "
        f"threads left={list(report.stuck_threads)}"
    )
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())

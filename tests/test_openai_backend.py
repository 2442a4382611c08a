"""The OpenAI-compatible backend against a small local server speaking the streaming format."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from s2s.models.llm import LlmHttpError, OpenAICompatibleChat, OpenAIOptions
from s2s.pipeline.history import ChatHistory, HistoryOptions
from s2s.pipeline.messages import ReplyText, StageError, Transcript, TurnClock
from s2s.pipeline.stages import LlmStage
from tests.harness import run_stage

REPLY_DELTAS = ["The capital", " of France", " is Paris.", " It is lovely."]


class FakeChatServer(BaseHTTPRequestHandler):
    """Streams REPLY_DELTAS as chat.completion.chunk events; the model name picks a failure."""

    requests: ClassVar[list[dict[str, object]]] = []
    stalled = threading.Event()
    """Model 'stall': after two deltas the server waits (up to 20 s) until this is set."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeChatServer.requests.append(body)
        if self.headers.get("Authorization") != "Bearer secret":
            self._error(401, "Incorrect API key provided")
            return
        if body["model"] == "missing":
            self._error(404, "The model 'missing' does not exist")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for k, delta in enumerate(REPLY_DELTAS):
            if k == 2 and body["model"] == "stall":
                FakeChatServer.stalled.wait(20.0)
            chunk = {
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": delta}}],
            }
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")

    def _error(self, status: int, message: str) -> None:
        payload = json.dumps(
            {"error": {"message": message, "type": "invalid_request_error"}}
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def base_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeChatServer)
    thread = threading.Thread(target=server.serve_forever, name="fake-openai")
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()
    thread.join(5)


def chat(base_url: str, model: str = "tiny", api_key: str = "secret") -> OpenAICompatibleChat:
    return OpenAICompatibleChat(OpenAIOptions(base_url=base_url, model=model, api_key=api_key))


def test_streams_the_deltas(base_url: str) -> None:
    """Each server-sent delta arrives as one text delta, in order, and the request is a stream."""
    deltas = list(chat(base_url).stream([{"role": "user", "content": "Hi"}], lambda: False))
    assert deltas == REPLY_DELTAS
    assert FakeChatServer.requests[-1]["stream"] is True


def test_stops_reading_when_cancelled(base_url: str) -> None:
    """Once should_stop is true no further delta is yielded."""
    got: list[str] = []
    for delta in chat(base_url).stream([{"role": "user", "content": "Hi"}], lambda: len(got) >= 2):
        got.append(delta)
    assert got == REPLY_DELTAS[:2]


def test_a_cancel_ends_a_read_blocked_on_a_stalled_server(base_url: str) -> None:
    """The server stops sending mid-reply (its read timeout is 30 s): cancelling the turn
    shuts the stream down from the cancelling side, and the stream ends at once, quietly."""
    FakeChatServer.stalled.clear()
    stop = threading.Event()
    got: list[str] = []
    ended = threading.Event()

    def consume() -> None:
        for delta in chat(base_url, model="stall").stream([], stop.is_set):
            got.append(delta)
        ended.set()

    consumer = threading.Thread(target=consume, name="consumer")
    consumer.start()
    try:
        deadline = time.monotonic() + 5.0
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == REPLY_DELTAS[:2]
        assert not ended.wait(0.3)  # blocked on the stalled server
        stop.set()
        assert ended.wait(5.0), "the stream waited for its read timeout"
    finally:
        FakeChatServer.stalled.set()
        consumer.join(5.0)
    assert got == REPLY_DELTAS[:2]


@pytest.mark.parametrize(
    ("model", "api_key", "expected"),
    [
        ("tiny", "wrong", "HTTP 401: Incorrect API key"),
        ("missing", "secret", "HTTP 404: The model"),
    ],
)
def test_http_errors_are_clear(base_url: str, model: str, api_key: str, expected: str) -> None:
    """The server's status and its error message make up the exception's text."""
    with pytest.raises(LlmHttpError, match=expected):
        list(
            chat(base_url, model, api_key).stream(
                [{"role": "user", "content": "Hi"}], lambda: False
            )
        )


def test_unreachable_server_is_a_clear_error() -> None:
    """A closed port reads 'cannot reach', not a socket traceback."""
    with pytest.raises(LlmHttpError, match="cannot reach the LLM server"):
        list(
            chat("http://127.0.0.1:9/v1").stream([{"role": "user", "content": "Hi"}], lambda: False)
        )


def test_in_the_llm_stage_deltas_become_speakable_chunks(base_url: str) -> None:
    """Through the LLM stage the deltas become sentence chunks, the last one marked."""
    stage = LlmStage(chat(base_url), ChatHistory(HistoryOptions(), len))
    item = Transcript(session_id="t", turn_id=0, generation=0, text="Capital?", clock=TurnClock())
    run = run_stage(stage, [item])
    replies = [out for out in run.outputs if isinstance(out, ReplyText)]
    assert [r.text for r in replies] == ["The capital of France is Paris.", "It is lovely."]
    assert [r.is_last for r in replies] == [False, True]
    assert replies[0].clock.first_token_at is not None
    assert len(stage.history) == 1


def test_in_the_llm_stage_http_errors_are_stage_errors(base_url: str) -> None:
    """A refused request becomes a StageError event naming the cause; the stage carries on."""
    stage = LlmStage(chat(base_url, api_key="wrong"), ChatHistory(HistoryOptions(), len))
    item = Transcript(session_id="t", turn_id=3, generation=0, text="Capital?", clock=TurnClock())
    run = run_stage(stage, [item])
    [error] = run.events.of_type(StageError)
    assert (error.stage, error.turn_id, error.error_type) == ("llm", 3, "LlmHttpError")
    assert "HTTP 401" in error.detail
    assert run.ended_with_pill and run.thread_joined

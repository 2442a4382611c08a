"""Prometheus metrics of one server (``GET /metrics``), in a registry of its own.

Latencies are histograms in seconds, per stage of a turn, from the same figures each session
sends its client in ``metrics`` events; the rest are counters and gauges of sessions, turns,
interruptions and errors, and the queue depths of the running pipelines, read at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
STAGES_MS = {
    "end_of_turn": "end_of_turn_ms",
    "stt": "stt_ms",
    "llm_first_token": "llm_first_token_ms",
    "llm_first_chunk": "llm_first_chunk_ms",
    "tts_first_audio": "tts_first_audio_ms",
    "voice_to_voice": "server_voice_to_voice_ms",
}
"""Histogram ``stage`` label -> the ``metrics`` event field it is made from."""
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _QueueDepths(Collector):
    """Items waiting in front of each stage, summed over the sessions, read at scrape time."""

    def __init__(self, read: Callable[[], Mapping[str, int]]) -> None:
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "s2s_queue_depth",
            "Items waiting in front of each stage, all sessions",
            labels=["stage"],
        )
        for stage, depth in sorted(self._read().items()):
            family.add_metric([stage], depth)
        yield family


class ServerMetrics:
    def __init__(
        self,
        active_sessions: Callable[[], int],
        queue_depths: Callable[[], Mapping[str, int]],
    ) -> None:
        self.registry = CollectorRegistry()
        self._latency = Histogram(
            "s2s_turn_stage_seconds",
            "Time each stage of a turn took (voice_to_voice: end of speech to first audio)",
            ["stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        active = Gauge("s2s_sessions_active", "Open sessions", registry=self.registry)
        active.set_function(active_sessions)
        self.ready = Gauge(
            "s2s_ready",
            "1 once the models are loaded and sessions are served",
            registry=self.registry,
        )
        self._sessions = Counter(
            "s2s_sessions", "Sessions opened, by protocol", ["protocol"], registry=self.registry
        )
        self._refused = Counter(
            "s2s_sessions_refused",
            "Connections refused, by reason",
            ["reason"],
            registry=self.registry,
        )
        self._turns = Counter("s2s_turns", "User turns answered", registry=self.registry)
        self._interruptions = Counter(
            "s2s_interruptions",
            "Replies interrupted, by reason",
            ["reason"],
            registry=self.registry,
        )
        self._errors = Counter(
            "s2s_errors",
            "Errors, by code: those sent to clients, and client_not_reading (cut off)",
            ["code"],
            registry=self.registry,
        )
        self._speculation = Counter(
            "s2s_speculation",
            "Replies speculated at a pause, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.registry.register(_QueueDepths(queue_depths))

    def session_opened(self, protocol: str) -> None:
        self._sessions.labels(protocol).inc()

    def session_refused(self, reason: str) -> None:
        self._refused.labels(reason).inc()

    def turn(self, fields: Mapping[str, object]) -> None:
        """A turn's first audio went out: its stage times (``metrics`` event fields, ms)."""
        self._turns.inc()
        for stage, name in STAGES_MS.items():
            value = fields.get(name)
            if isinstance(value, int | float):
                self._latency.labels(stage).observe(value / 1000)

    def interrupted(self, reason: str) -> None:
        self._interruptions.labels(reason).inc()

    def error(self, code: str) -> None:
        self._errors.labels(code).inc()

    def speculation(self, outcome: str) -> None:
        self._speculation.labels(outcome).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

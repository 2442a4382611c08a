"""s2s-bench end to end: spawns its own server, runs both pipelines, writes JSON and a chart."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.processes import BIN

pytestmark = pytest.mark.models

STAGES = (
    "end_of_turn_ms",
    "stt_ms",
    "llm_first_token_ms",
    "llm_first_chunk_ms",
    "tts_first_audio_ms",
    "transport_ms",
    "voice_to_voice_ms",
)


def test_bench_spawns_a_server_and_reports_every_stage(tmp_path: Path) -> None:
    """Per-turn and summary figures for every stage, for streaming at two concurrency levels,
    streaming without speculation and the baseline (each really run as such by the server),
    speculation outcomes counted, and a PNG."""
    out, chart = tmp_path / "r.json", tmp_path / "r.png"
    done = subprocess.run(
        [
            str(BIN / "s2s-bench"),
            "--spawn-server",
            "--device",
            "cpu",
            "--runs",
            "1",
            "--questions",
            "2",
            "--warmup",
            "0",
            "--concurrency",
            "1,2",
            "--out",
            str(out),
            "--plot",
            str(chart),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert set(results["modes"]) == {
        "streaming x1",
        "no-speculation x1",
        "baseline x1",
        "streaming x2",
    }
    assert results["models"]["llm"] and results["machine"]
    for mode in results["modes"].values():
        assert len(mode["turns"]) == 2 and mode["summary"]["failed"] == 0
        for turn in mode["turns"]:
            assert turn["pipeline"] == mode["pipeline"]  # the server's own word in `ready`
            assert all(isinstance(turn[stage], int | float) for stage in STAGES)
        if mode["pipeline"] != "streaming":
            assert sum(mode["summary"]["speculation"].values()) == 0
        for stage in STAGES:
            figures = mode["summary"][stage]
            assert figures["p50"] <= figures["p90"] <= figures["p95"] <= figures["max"]
    # Alone on the server, every streaming turn is speculated at its pause and confirmed.
    assert results["modes"]["streaming x1"]["summary"]["speculation"]["hit"] == 2
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "voice_to_voice_ms" in done.stdout  # the table


def test_refused_turns_count_as_failed(tmp_path: Path) -> None:
    """Two users against a one-session server: the refused turns are counted as failed in the
    summary and the exit status, not dropped."""
    out = tmp_path / "r.json"
    command = [str(BIN / "s2s-bench"), "--spawn-server", "--server-arg=--max-sessions=1"]
    command += ["--runs", "2", "--questions", "2", "--warmup", "0", "--concurrency", "3"]
    command += ["--no-compare-baseline", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    print(done.stdout[-2000:])
    results = json.loads(out.read_text())
    [level] = results["modes"].values()
    failed = [turn for turn in level["turns"] if "error" in turn]
    assert len(level["turns"]) == 4  # every turn is reported, answered or not
    assert failed and level["summary"]["failed"] == len(failed)
    assert done.returncode == 3, done.stderr[-2000:]

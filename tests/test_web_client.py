"""The web client in a real browser, and the server's HTTP endpoints beside it.

Chromium runs headless with its microphone fed from a WAV file of a spoken question, opens
the page a real ``s2s-server`` serves at ``/`` (CPU defaults, a token), and the test reads
the page's state through the DevTools protocol, as a person would watch it.
"""

from __future__ import annotations

import http.client
import re
import shutil
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from s2s.models.profiles import LoadedModels
from tests.browser import Browser, chromium
from tests.processes import Process, start_server

TOKEN = "browser-secret"
TURN_BOUND_S = 90.0
"""Generous: from page load to a finished turn on a loaded 2-core machine."""
SCREENSHOT_DIR = Path(__file__).resolve().parent.parent / "out"

pytestmark = pytest.mark.skipif(
    chromium() is None,
    reason="no chromium: the dev install (.ci/install.sh --dev, as root on Debian) puts it in",
)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[Process, str]]:
    process, url = start_server("--token", TOKEN)
    try:
        yield process, url.replace("ws://", "http://")
    finally:
        process.signal_and_time(signal.SIGTERM)
        process.kill()


def microphone_wav(models: LoadedModels, text: str, path: Path, after_s: float) -> Path:
    """``text`` spoken by Piper after 1.5 s of silence, then ``after_s`` of silence: mono
    PCM16, as Chromium's fake capture device reads it."""
    voice = models.tts
    speech = np.concatenate(list(voice.stream(text, lambda: False)))
    rate = voice.sample_rate_hz
    audio = np.concatenate(
        [np.zeros(int(1.5 * rate)), speech, np.zeros(int(after_s * rate))]
    ).astype(np.float32)
    soundfile.write(str(path), audio, rate, subtype="PCM_16")
    return path


@pytest.fixture
def browser_for() -> Iterator[list[Browser]]:
    opened: list[Browser] = []
    yield opened
    for browser in opened:
        browser.close()


def open_page(
    server: tuple[Process, str], wav: Path, tmp_path: Path, opened: list[Browser]
) -> Browser:
    _, base = server
    browser = Browser(f"{base}/?autostart=1&token={TOKEN}", wav, tmp_path / "profile")
    opened.append(browser)
    return browser


def test_a_spoken_question_is_answered_in_the_page_and_played(
    server: tuple[Process, str],
    cpu_models: LoadedModels,
    tmp_path: Path,
    browser_for: list[Browser],
) -> None:
    wav = microphone_wav(cpu_models, "What is the capital of France?", tmp_path / "q.wav", 12.0)
    page = open_page(server, wav, tmp_path, browser_for)
    page.wait_for("window.s2s && window.s2s.state === 'listening'", 30.0)
    page.wait_for("window.s2s.turns.length >= 1", TURN_BOUND_S)
    # reply_audio_end came: everything was received; let the page play what it holds.
    page.wait_for(
        "window.s2s.playedSamples > 0 && window.s2s.playedSamples >= window.s2s.receivedSamples",
        30.0,
    )
    state = page.evaluate("window.s2s")
    turn = state["turns"][0]
    shown = page.evaluate("document.querySelector('#conversation').innerText")
    screenshot = page.screenshot(tmp_path / "web-client.png")
    SCREENSHOT_DIR.mkdir(exist_ok=True)
    shutil.copy(screenshot, SCREENSHOT_DIR / "web-client.png")
    print(f"browser turn: {turn}; played {state['playedSamples']} samples; {screenshot}")

    assert "capital" in turn["user_text"].lower() and "france" in turn["user_text"].lower()
    assert turn["assistant_text"].strip()
    assert turn["interrupted"] is False
    assert turn["voice_to_voice_ms"] is not None and turn["voice_to_voice_ms"] > 0
    assert turn["user_text"] in shown and turn["assistant_text"] in shown
    assert state["playedSamples"] >= state["receivedSamples"] > 0.5 * state["sampleRate"]
    assert state["errors"] == [] and state["staleFrames"] == 0

    # The same turn, as an operator's Prometheus sees it.
    metrics = scrape(server[1], TOKEN)
    assert sample(metrics, "s2s_turns_total") >= 1
    assert sample(metrics, 's2s_sessions_total{protocol="v1"}') >= 1
    assert sample(metrics, 's2s_turn_stage_seconds_count{stage="voice_to_voice"}') >= 1
    assert sample(metrics, "s2s_ready") == 1


def test_stop_interrupts_the_reply(
    server: tuple[Process, str],
    cpu_models: LoadedModels,
    tmp_path: Path,
    browser_for: list[Browser],
) -> None:
    wav = microphone_wav(
        cpu_models, "Tell me a long story about a brave knight.", tmp_path / "story.wav", 20.0
    )
    page = open_page(server, wav, tmp_path, browser_for)
    page.wait_for("window.s2s && window.s2s.state === 'speaking'", TURN_BOUND_S)
    page.wait_for("window.s2s.playedSamples > 2400", 10.0)  # 0.1 s heard
    page.evaluate("document.querySelector('#stop').click()")
    page.wait_for("window.s2s.turns.length >= 1", 10.0)
    turn = page.evaluate("window.s2s.turns[0]")
    stopped = page.evaluate("window.s2s")
    page.evaluate("new Promise(done => setTimeout(done, 1500))")  # anything late arrives now
    later = page.evaluate("window.s2s")
    print(f"stopped turn: {turn}; played {stopped['playedSamples']}, then {later['playedSamples']}")
    assert turn["interrupted"] is True
    assert later["staleFrames"] == 0  # no audio of the stopped reply after `interrupted`
    tolerance = stopped["sampleRate"] // 20  # a progress report in flight: 50 ms
    assert later["playedSamples"] <= stopped["playedSamples"] + tolerance  # flushed: silence
    assert later["errors"] == []


def test_health_readiness_metrics_and_the_page_over_plain_http(server: tuple[Process, str]) -> None:
    _, base = server
    assert fetch(f"{base}/healthz") == (200, "ok\n")
    assert fetch(f"{base}/readyz") == (200, "ready\n")
    status, page = fetch(f"{base}/")
    assert status == 200 and '<script type="module" src="app.js">' in page
    assert fetch(f"{base}/app.js")[0] == 200
    assert fetch(f"{base}/../pyproject.toml")[0] != 200
    assert fetch(f"{base}/metrics")[0] == 401  # the token guards the metrics too
    assert fetch(f"{base}/metrics?token=wrong")[0] == 401
    assert "s2s_sessions_active" in scrape(base, TOKEN)


def fetch(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except http.client.HTTPException as exc:
        return 0, str(exc)


def scrape(base: str, token: str) -> str:
    status, text = fetch(f"{base}/metrics", token)
    assert status == 200, text
    return text


def sample(exposition: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", exposition, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))

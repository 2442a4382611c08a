"""Layer 1: the server's options, from the command line and from S2S_ variables."""

from __future__ import annotations

import subprocess
import sys

import pytest

from s2s.models.echo_cancel import EchoCancelOptions
from s2s.pipeline.echo import EchoOptions
from s2s.pipeline.history import HistoryOptions
from s2s.server.app import ServerConfig
from s2s.server.cli import build_parser, profile_from_args, server_config


def config_for(argv: list[str]) -> ServerConfig:
    args = build_parser().parse_args(["--device", "cpu", *argv])
    return server_config(args, profile_from_args(args), HistoryOptions())


def test_echo_ratio_0_turns_the_echo_test_off() -> None:
    """--echo-ratio 0 is for headsets: no echo test, any speech during a reply interrupts."""
    assert config_for(["--echo-ratio", "0"]).echo is None
    assert config_for(["--echo-ratio", "0.3"]).echo == EchoOptions(ratio=0.3)
    assert config_for([]).echo == EchoOptions(ratio=0.5)


def test_server_aec_on_cancels_the_echo_and_off_leaves_it_to_the_level_estimate() -> None:
    """--server-aec on (default): the server cancels the echo for clients that do not; off:
    the level estimate of --echo-ratio decides alone."""
    for on in (config_for([]), config_for(["--server-aec", "on"])):
        assert on.echo_cancel == EchoCancelOptions()
    off = config_for(["--server-aec", "off"])
    assert off.echo_cancel is None
    assert off.echo == EchoOptions(ratio=0.5)


def test_a_server_without_the_echo_cancellers_says_so_at_start() -> None:
    """Without livekit (an install without the server's extras), the server (--server-aec on
    by default) fails at once with exit 2 and one line naming the package and the way out,
    before any model loads."""
    code = (
        "import sys; sys.modules['livekit'] = None; sys.modules['livekit.rtc'] = None; "
        "from s2s.server.cli import main; "
        "sys.exit(main(['--device', 'cpu', '--port', '0']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2, done.stderr
    assert "'livekit'" in done.stderr
    assert "--server-aec off" in done.stderr
    assert "loading" not in done.stdout


def test_every_option_can_come_from_an_s2s_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """S2S_ plus the option's name; the command line wins; empty counts as unset."""
    monkeypatch.setenv("S2S_ECHO_RATIO", "0")
    monkeypatch.setenv("S2S_MAX_SESSIONS", "7")
    monkeypatch.setenv("S2S_MAX_OPENING", "3")
    monkeypatch.setenv("S2S_IDLE_TIMEOUT_S", "")
    config = config_for([])
    assert config.echo is None
    assert (config.max_sessions, config.max_opening) == (7, 3)
    assert config.limits.idle_timeout_s == 300.0
    assert config_for(["--max-sessions", "2"]).max_sessions == 2


def test_stt_window_picks_the_fitted_window_the_full_one_or_the_device_default() -> None:
    """--stt-window fitted|full|auto maps to fitted_window True|False|None (cpu only)."""

    def fitted_window(argv: list[str]) -> bool | None:
        return profile_from_args(
            build_parser().parse_args(["--device", "cpu", *argv])
        ).stt.fitted_window

    assert fitted_window([]) is None
    assert fitted_window(["--stt-window", "fitted"]) is True
    assert fitted_window(["--stt-window", "full"]) is False

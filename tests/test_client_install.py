"""The laptop install: only the client and its few dependencies, none of the model stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALL_BOUND_S = 600


def test_the_client_installs_alone_without_torch_and_runs(tmp_path: Path) -> None:
    """`pip install ".[client]"` into a fresh venv (the README's laptop install): torch and
    the model libraries are absent, and `s2s-client --help` runs."""
    venv = tmp_path / "laptop"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", f"{ROOT}[client]"],
        capture_output=True,
        text=True,
        timeout=INSTALL_BOUND_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    absent = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.util as u; "
            "print([m for m in ('torch', 'transformers', 'ctranslate2', 'onnxruntime') "
            "if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert absent.stdout.strip() == "[]", absent.stdout + absent.stderr
    helped = subprocess.run(
        [str(venv / "bin" / "s2s-client"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0, helped.stderr
    assert "--url" in helped.stdout
    # The echo canceller runs on the laptop's own livekit (the newest, not the pinned one).
    cancelled = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import numpy as np; from s2s.client.echo_cancel import EchoCanceller; "
            "c = EchoCanceller(16000, 24000); c.start(); c.reference(np.zeros(768, 'float32')); "
            "print(len(c.cancel(np.zeros(512, 'float32'))), c.blocks)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cancelled.stdout.strip() == "512 3", cancelled.stdout + cancelled.stderr
    # The same wheel carries the protocol and the web client the server serves.
    shipped = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.resources as r; s = r.files('s2s.server'); "
            "print(sorted(p.name for p in s.joinpath('web').iterdir() if '.' in p.name "
            "and not p.name.endswith(('.py', '.pyc'))), s.joinpath('PROTOCOL.md').is_file())",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shipped.stdout.strip() == (
        "['app.js', 'capture.js', 'index.html', 'playback.js', 'style.css'] True"
    ), shipped.stdout + shipped.stderr
    size_mb = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file()) / 1e6
    print(f"client-only environment: {size_mb:.0f} MB")

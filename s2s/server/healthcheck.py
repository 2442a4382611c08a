"""The container health check: ``python -m s2s.server.healthcheck`` exits 0 when the server
on this host is alive and working (``/healthz``: no stage stalled) and ready (``/readyz``: the
models are loaded), 1 otherwise. While the models load, the image's start period keeps that
from counting as a failure; a wedged pipeline later turns the container unhealthy. The port
is the server's own setting (``S2S_PORT``, default 8765), so a container started on another
port checks the right one."""

from __future__ import annotations

import os
import sys
import urllib.request

from s2s.server.app import DEFAULT_PORT

TIMEOUT_S = 3.0


def main() -> int:
    port = os.environ.get("S2S_PORT") or str(DEFAULT_PORT)
    for path in ("/healthz", "/readyz"):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT_S):
                pass
        except OSError as exc:
            print(f"unhealthy: {path}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

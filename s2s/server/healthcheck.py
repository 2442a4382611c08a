"""The container health check: ``python -m s2s.server.healthcheck`` exits 0 when the server
on this host answers ``/healthz``, 1 otherwise. The port is the server's own setting
(``S2S_PORT``, default 8765), so a container started on another port checks the right one."""

from __future__ import annotations

import os
import sys
import urllib.request

from s2s.server.app import DEFAULT_PORT

TIMEOUT_S = 3.0


def main() -> int:
    port = os.environ.get("S2S_PORT") or str(DEFAULT_PORT)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=TIMEOUT_S):
            return 0
    except OSError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

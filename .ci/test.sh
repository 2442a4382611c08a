#!/usr/bin/env bash
# The README's test command: install with the test tools, then lint, type-check and test.
# Exits non-zero on any failure, including pytest collecting no tests (its exit status 5).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash .ci/install.sh --dev
venv=${S2S_VENV:-$root/.venv}
echo "[test] ruff"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
echo "[test] mypy"
"$venv/bin/mypy"
echo "[test] pytest"
# No hub access in tests: a model that is not on disk must fail fast, never download.
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$venv/bin/python" -m pytest -p no:cacheprovider "$@"

#!/usr/bin/env bash
# The whole suite N times in a row (default 5) with one core kept busy beside it: a test that
# races the clock shows up here before it flakes in CI. Prints each run's outcome and time;
# the full logs are left in loaded-runs/. Needs the dev install (bash .ci/install.sh --dev).
#
#   bash .ci/loaded-runs.sh [RUNS]
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
runs=${1:-5}
mkdir -p loaded-runs
python3 -c 'while True: pass' &  # the busy core
busy=$!
trap 'kill $busy 2>/dev/null' EXIT
failed=0
for run in $(seq 1 "$runs"); do
  began=$(date +%s)
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider \
    > "loaded-runs/run-$run.log" 2>&1
  status=$?
  [[ $status -eq 0 ]] || failed=$((failed + 1))
  summary=$(grep -E "passed|failed|error" "loaded-runs/run-$run.log" | tail -1)
  echo "run $run: exit $status after $(( $(date +%s) - began )) s: $summary"
  grep -E "^FAILED|^ERROR" "loaded-runs/run-$run.log" || true
done
echo "$((runs - failed)) of $runs runs passed with one core busy"
[[ $failed -eq 0 ]]

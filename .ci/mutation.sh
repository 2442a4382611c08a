#!/usr/bin/env bash
# Mutation testing of the pipeline core (mutmut): every mutant of the six core modules in
# [tool.mutmut] is run against the core's pure tests; prints the score per file.
# Not part of every CI run (about 5 minutes on 2 cores). Needs the dev install.
#
#   bash .ci/mutation.sh            run, then print the summary
#   .venv/bin/mutmut results        the surviving mutants; .venv/bin/mutmut show NAME for one
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
[[ -x .venv/bin/mutmut ]] || .venv/bin/pip install --quiet "mutmut==3.8.1"
rm -rf mutants
.venv/bin/mutmut run > mutants.log 2>&1 || true  # progress output; the summary follows
.venv/bin/python - <<'PY'
import collections, json, pathlib, re, subprocess
out = subprocess.run([".venv/bin/mutmut", "results", "--all", "true"], capture_output=True, text=True).stdout
tally = collections.defaultdict(collections.Counter)
for line in out.splitlines():
    match = re.match(r"\s*(s2s\.pipeline\.\w+)\.\S+: (\w[\w ]*)", line)
    if match:
        tally[match.group(1)][match.group(2).strip()] += 1
for module, counts in sorted(tally.items()):
    total = sum(counts.values())
    killed = counts["killed"] + counts["timeout"]
    print(f"{module:32} {killed:4}/{total:<4} killed ({100 * killed / total:5.1f}%)  {dict(counts)}")
PY

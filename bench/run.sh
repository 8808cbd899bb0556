#!/usr/bin/env bash
# `make bench`: the storage, C-FIND and retrieve benchmarks (docs/benchmarks.md).
# Usage: bash bench/run.sh [store] [find] [retrieve] [dropfolder] [sync] [readers] [workflow]
#        (default: all)
# Knobs: BENCH_REPEATS (5 runs per figure), BENCH_SLICES (300 CT slices),
#        BENCH_STUDIES (10000 in the C-FIND index), BENCH_FIND_N (20 queries),
#        BENCH_ORDERS (500 HL7 orders), BENCH_WORKLIST_ITEMS (5000 scheduled items).
# Results: bench/out/<name>.json and a table per benchmark; a summary at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
export TCP_NODELAY=1  # dcmtk leaves Nagle on without it (~14 s instead of ~0.5 s)
py=.venv/bin/python
[ -x "$py" ] || py=python3
# A wheel install has its modules compiled by pip; this editable checkout, under
# PYTHONDONTWRITEBYTECODE=1, would compile them again in every timed process.
"$py" -m compileall -q appliance sync provisioning >/dev/null
scripts=("$@")
if [ ${#scripts[@]} -eq 0 ]; then
  scripts=(store find retrieve)
  [ -f bench/dropfolder.py ] && scripts+=(dropfolder)
  [ -f bench/sync.py ] && scripts+=(sync)
  [ -f bench/readers.py ] && scripts+=(readers)
  [ -f bench/workflow.py ] && scripts+=(workflow)
fi
status=0
for name in "${scripts[@]}"; do
  rm -f "bench/out/$name.json"  # a failed run must not leave an older figure behind
  "$py" "bench/$name.py" || { echo "bench/$name.py failed" >&2; status=1; }
done
"$py" bench/summary.py || status=1
exit $status

#!/usr/bin/env bash
# `make bench`: the storage, C-FIND and retrieve benchmarks (docs/benchmarks.md).
# Usage: bash bench/run.sh [store] [find] [retrieve] [dropfolder] [sync] [readers] [workflow]
#        [web] [metrics] [migrate]  (default: all)
# Knobs: BENCH_REPEATS (5 runs per figure), BENCH_SLICES (300 CT slices),
#        BENCH_SMALL_STUDIES (2000 one-instance studies stored over 4 associations),
#        BENCH_STUDIES (10000 in the C-FIND index), BENCH_FIND_N (20 queries),
#        BENCH_FIND_LARGE=1 (C-FIND at BENCH_FIND_LARGE_STUDIES, 100000, too),
#        BENCH_ORDERS (500 HL7 orders), BENCH_WORKLIST_ITEMS (5000 scheduled items),
#        BENCH_MIGRATE_STUDIES (100 studies migrated from dcmqrscp).
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
  [ -f bench/web.py ] && scripts+=(web)
  [ -f bench/metrics.py ] && scripts+=(metrics)
  [ -f bench/migrate.py ] && scripts+=(migrate)
fi
# store, find, retrieve (issue 17) and web (issue 16, its DICOMweb plugin) compare with
# Orthanc when Debian's packages install (as root): a reference, not a dependency of the
# product (bench/orthanc.py runs it). Otherwise the scripts say Orthanc was not measured.
if [[ " ${scripts[*]} " =~ \ (store|find|retrieve|web)\  ]] \
    && ! dpkg -s orthanc orthanc-dicomweb >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  mkdir -p bench/out
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q orthanc orthanc-dicomweb \
    >bench/out/orthanc-apt.log 2>&1 || echo "orthanc did not install (bench/out/orthanc-apt.log)"
fi
status=0
for name in "${scripts[@]}"; do
  rm -f "bench/out/$name.json"  # a failed run must not leave an older figure behind
  "$py" "bench/$name.py" || { echo "bench/$name.py failed" >&2; status=1; }
done
"$py" bench/summary.py || status=1
exit $status

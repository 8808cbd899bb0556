"""Where the processes of one data home count their events: `<home>/run/metrics`.

prometheus-client sums the counters of several processes (the serve workers,
the sync agent, one-shot commands such as `sync --once`) through its
multiprocess mode: each process writes its values to memory-mapped files named
after its pid in one folder, and a scrape adds them up. The mode is chosen
when prometheus-client is first imported, from $PROMETHEUS_MULTIPROC_DIR, so
`use_metrics_dir` runs before anything imports `appliance.base.metrics`
(the `serve` and `sync` commands call it first). A process that never calls
it (a test importing a handler) counts in its own memory.

Counters start from zero when `serve` starts: its supervisor removes the files
of processes that are gone (`fresh=True`). Files of a live process (a running
sync agent) are kept, so a restart of `serve` never hides the agent's counts.
A worker that dies while serve runs keeps its counters in the sum (they must not
go backwards), but its live gauges go (`forget_live_values`): the associations
it held are not open any more.

The files live on the data home's disk, which ingest may fill to the last block.
prometheus-client makes them sparse (truncate) and writes each new series into
the mapping: a page never written before needs a block then, and on a full disk
the kernel answers that write with SIGBUS, which killed serve at the first C-GET
or new status after the disk filled. compat.back_metric_pages reserves the blocks
first, so a full disk is an OSError (ENOSPC) where a series is created, never a
SIGBUS.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from appliance.base import compat

ENV = "PROMETHEUS_MULTIPROC_DIR"
_PID = re.compile(r"_(\d+)\.db$")


def metrics_dir(home: Path) -> Path:
    return home / "run" / "metrics"


def use_metrics_dir(home: Path, *, fresh: bool = False) -> Path:
    """Point prometheus-client's multiprocess mode at the home's folder (created 0700).

    With `fresh`, the files of processes no longer running are removed first.
    Raises RuntimeError when prometheus-client was imported before without this
    folder: its values would stay in this process and never reach a scrape."""
    folder = metrics_dir(home)
    current = os.environ.get(ENV)
    if "prometheus_client" in sys.modules and current != str(folder):
        raise RuntimeError("prometheus_client was imported before use_metrics_dir(): "
                           "call it first in the command that starts the process")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if fresh:
        for path in folder.glob("*.db"):
            match = _PID.search(path.name)
            if match and not _alive(int(match.group(1))):
                path.unlink(missing_ok=True)
    os.environ[ENV] = str(folder)
    compat.back_metric_pages()
    return folder


def forget_live_values(pid: int) -> None:
    """Drop the live gauges (multiprocess_mode "livesum": open associations, ingests in
    progress) of a process that died without lowering them."""
    folder = os.environ.get(ENV)
    if folder:
        # Imported here: prometheus-client reads $PROMETHEUS_MULTIPROC_DIR at import.
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""Where the processes of one data home count their events: `<home>/run/metrics`.

prometheus-client sums the counters of several processes (the serve workers,
the sync agent, one-shot commands such as `sync --once`) through its
multiprocess mode: each process writes its values to memory-mapped files named
after its pid in one folder, and a scrape adds them up. The mode is chosen
when prometheus-client is first imported, from $PROMETHEUS_MULTIPROC_DIR, so
`use_metrics_dir` runs before anything imports `appliance.base.metrics`
(the `serve` and `sync` commands call it first). A process that never calls
it (a test importing a handler) counts in its own memory.

Counters never go backwards while the data home lives. When a process starts to
count (`use_metrics_dir`: serve, the agent, `sync --once`...), it adds the counters
and histograms of processes that are gone (old workers, past agents, `sync --once`)
into one file per type, `counter_gone.db` and `histogram_gone.db`, and removes their
files; their gauges go. (Only serve's start did: an agent that systemd restarted every
5 s, failing at its start, left three files each time until serve restarted.)
Removing their counts instead made each counter fall by them, but not to zero while
a running sync agent's own counts stayed: Prometheus takes a counter that falls for a
reset followed by as many new events as it still shows, so a restart of serve
re-counted every recall the agent ever failed, and PacsEdgeRecallsFailing fired on a
healthy box. (A crash between writing the new file and removing the folded ones
counts those twice, once.) The files are never fsynced: after a power cut one may be
empty or half written, and is removed with its counts (the counters fall once) rather
than stop serve.

A worker that dies while serve runs keeps its counters in the sum too, but its live
gauges go (`process_ended`): the associations it held are not open any more. Its
counters and histograms are folded then, not at the next start of serve: a worker
dying over and over left two files each time, which took the data home's disk and
every scrape read. A fold holds an exclusive flock on the folder and a scrape a shared
one (`counts_read`): a scrape that read a process's file and then the `_gone` file it
had just been added to counted it twice, a counter up then down, which Prometheus
takes for a reset.

The files live on the data home's disk, which ingest may fill to the last block.
prometheus-client makes them sparse (truncate) and writes each new series into
the mapping: a page never written before needs a block then, and on a full disk
the kernel answers that write with SIGBUS, which killed serve at the first C-GET
or new status after the disk filled. compat.back_metric_pages reserves the blocks
first, so a full disk is an OSError (ENOSPC) where a series is created, never a
SIGBUS.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from appliance.base import compat

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
_PID = re.compile(r"_(\d+)\.db$")
_FOLDED = ("counter", "histogram")  # gauges of ended processes say nothing any more


def metrics_dir(home: Path) -> Path:
    return home / "run" / "metrics"


def use_metrics_dir(home: Path) -> Path:
    """Point prometheus-client's multiprocess mode at the home's folder (created 0700),
    folding the files of processes no longer running first (`fold_gone`).

    Raises RuntimeError when prometheus-client was imported before without this
    folder: its values would stay in this process and never reach a scrape."""
    folder = metrics_dir(home)
    current = os.environ.get(ENV)
    if "prometheus_client" in sys.modules and current != str(folder):
        raise RuntimeError("prometheus_client was imported before use_metrics_dir(): "
                           "call it first in the command that starts the process")
    # run/ too: mkdir's parents take the umask's mode (0755 for a command run by hand),
    # and run/ also holds serve's lock (serve_lock.py); docs/storage.md says 0700.
    folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.mkdir(exist_ok=True, mode=0o700)
    os.environ[ENV] = str(folder)  # before prometheus-client loads (fold_gone loads it)
    compat.back_metric_pages()
    fold_gone(folder)
    return folder


def fold_gone(folder: Path) -> None:
    """Add the counters and histograms of processes no longer running into
    `<type>_gone.db` and remove their files (the module docstring says why)."""
    with _folder_lock(folder, fcntl.LOCK_EX):
        _fold_gone(folder)


@contextlib.contextmanager
def counts_read(folder: Path) -> Iterator[None]:
    """Hold off folds while a scrape reads the files of `folder`."""
    with _folder_lock(folder, fcntl.LOCK_SH):
        yield


@contextlib.contextmanager
def _folder_lock(folder: Path, operation: int) -> Iterator[None]:
    # On the folder itself: a lock file would need an inode, which a full disk may lack.
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)


def _fold_gone(folder: Path) -> None:
    gone = [path for path in folder.glob("*.db")
            if (match := _PID.search(path.name)) and not _alive(int(match.group(1)))]
    for kind in _FOLDED:
        files = [path for path in gone if path.name.startswith(f"{kind}_")]
        if not files:
            continue
        kept = folder / f"{kind}_gone.db"
        sources = _readable([kept, *files] if kept.exists() else files)
        if not sources:
            continue
        new = folder / f"{kind}_gone.db.new"  # not *.db: no scrape reads it half written
        try:
            new.unlink(missing_ok=True)  # a crash's leftover would be mapped as it is
            compat.write_metric_file(str(new), [str(path) for path in sources])
            new.replace(kept)
        except OSError as exc:
            # A full disk: their counts go as before (the counters fall once) rather
            # than the room their files take, which this process needs for its own.
            new.unlink(missing_ok=True)
            log.warning("counts of ended processes dropped kind=%s error=%s", kind,
                        exc.strerror)
    for path in gone:
        path.unlink(missing_ok=True)


def _readable(files: list[Path]) -> list[Path]:
    """`files` but those a power cut left empty or half written, which are removed: their
    counts are lost (the counters fall once), and reading them failed serve's start."""
    damaged = [path for path in files if not compat.metric_file_readable(str(path))]
    for path in damaged:
        path.unlink(missing_ok=True)
    if damaged:
        log.warning("metric files unreadable after a crash: their counts dropped files=%d",
                    len(damaged))
    return [path for path in files if path not in damaged]


def process_ended(pid: int) -> None:
    """Drop the live gauges (multiprocess_mode "livesum": open associations, ingests in
    progress) of a process that died without lowering them, and fold its counters and
    histograms (with those of any other ended process) into the `_gone` files."""
    folder = os.environ.get(ENV)
    if folder:
        # Imported here: prometheus-client reads $PROMETHEUS_MULTIPROC_DIR at import.
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, folder)
        fold_gone(Path(folder))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

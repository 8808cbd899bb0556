"""Named crash and pause points for crash-consistency and interleaving tests.

`crash_point(name)` does nothing unless a test's environment names that point:

- PACS_EDGE_CRASH_AT=name: the process kills itself with SIGKILL at exactly
  that step, as a power cut would. The tests use it to prove that an agent
  killed between any two steps of replication, eviction or recall resumes or
  rolls back without losing the only copy of anything (the same idea as
  PostgreSQL's injection points).
- PACS_EDGE_PAUSE_AT=name with PACS_EDGE_PAUSE_DIR=folder: the process creates
  `folder/reached` and waits there until `folder/go` exists (at most
  PAUSE_LIMIT seconds), so a test can run a second operation at exactly that
  step of the first: a barrier across processes, no sleeps.

Never set them on a real box.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "PACS_EDGE_CRASH_AT"
PAUSE_ENV = "PACS_EDGE_PAUSE_AT"
PAUSE_DIR_ENV = "PACS_EDGE_PAUSE_DIR"
PAUSE_LIMIT = 120.0


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(PAUSE_ENV) == name:
        _pause(Path(os.environ[PAUSE_DIR_ENV]))


def _pause(folder: Path) -> None:
    (folder / "reached").touch()
    deadline = time.monotonic() + PAUSE_LIMIT
    while not (folder / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.01)

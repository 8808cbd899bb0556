"""Named crash points for crash-consistency tests.

`crash_point(name)` does nothing unless the environment variable
PACS_EDGE_CRASH_AT equals `name`; then the process kills itself with SIGKILL
at exactly that step, as a power cut would. The tests use it to prove that an
agent killed between any two steps of replication, eviction or recall
resumes or rolls back without losing the only copy of anything (the same
idea as PostgreSQL's injection points). Never set it on a real box.
"""

from __future__ import annotations

import os
import signal

ENV = "PACS_EDGE_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)

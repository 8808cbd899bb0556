"""Every pacs-edge process marks itself non-dumpable at start (prctl PR_SET_DUMPABLE 0).

Why: `pacs-edge serve` and the sync agent run as the same user, and the
privilege split (docs/security.md) hides the secrets serve does not need from
serve's mount namespace. A process of the same user could still reach them
through another pacs-edge process's /proc entries: /proc/PID/root opens files
in that process's mount namespace (the sync agent's, where the site key is),
/proc/PID/mem and /proc/PID/environ read its memory. The kernel opens those
entries of a non-dumpable process only to CAP_SYS_PTRACE, which no pacs-edge
unit has, and `ProtectProc=invisible` then hides the process altogether. A
non-dumpable process also writes no core dump, which would hold keys and PHI.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def make_undumpable() -> None:
    """Linux only; elsewhere (macOS development) a no-op."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("cannot make the process non-dumpable error=%s",
                    os.strerror(ctypes.get_errno()))

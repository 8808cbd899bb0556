"""`kill -USR1 <pid>` writes every thread's stack to stderr (the journal).

Why: a process that hangs (a stop that never ends, a listener that stops
answering) is otherwise a black box on a box in the field, and a
non-dumpable process (undumpable.py) cannot be read with py-spy or gdb by
the same user. faulthandler writes file names, line numbers and function
names only, no variable's value, so the dump holds no PHI and no key.
"""

from __future__ import annotations

import faulthandler
import signal
import sys


def dump_stacks_on_sigusr1() -> None:
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)

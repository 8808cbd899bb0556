"""Where the processes' log lines go (appliance/base/logsetup.py)."""

from __future__ import annotations

import subprocess
import sys

SHOWN_WITH_A_BAR = """
import io, logging
from rich.console import Console
from rich.progress import Progress
from appliance.base.logsetup import setup_logging

setup_logging("info")
terminal = Console(file=io.StringIO(), force_terminal=True, width=80)
with Progress(console=terminal) as progress:
    progress.add_task("migrating", total=10)
    logging.getLogger("appliance.example").info("day done day=20261206")
print(repr(terminal.file.getvalue()))
"""


def test_a_line_logged_under_a_progress_bar_is_printed_above_it() -> None:
    """A command's bar (rich) takes sys.stderr while it is shown; the log handler must
    write to it then, or its lines break into the bar in the operator's terminal."""
    run = subprocess.run([sys.executable, "-c", SHOWN_WITH_A_BAR], capture_output=True,
                         text=True, timeout=60, check=True)
    shown = run.stdout
    assert "day done day=20261206" in shown, (shown, run.stderr)
    assert "day done" not in run.stderr, run.stderr

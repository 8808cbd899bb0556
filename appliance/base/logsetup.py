"""Process-wide logging set-up: one format for every pacs-edge process.

Messages are lowercase events with key=value fields and never carry patient
data (see logsafe); this module only decides where they go and how they look.

`[log] level` applies to pacs-edge's own loggers only. Other libraries log at
WARNING and above whatever the level: their debug and info lines are not
written with logsafe's rule in mind (aiosqlite's debug line names each call
with its arguments: patient IDs, names, UIDs), so `debug` must not open them.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

OWN_LOGGERS = ("appliance", "sync", "provisioning")


class _StderrNow:
    """sys.stderr as it is when a line is written, not when logging was set up: a
    command's progress bar (rich) puts a proxy there while it is shown, which prints
    the line above the bar. Written to the stream of set-up time, lines broke into the
    bar and left pieces of it behind in the terminal."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _LocalTimeWithOffset(logging.Formatter):
    """Each line's time in the box's local time with its UTC offset, to the millisecond:
    2026-11-01T01:30:00.250-04:00. Without the offset the hour the clock repeats on the
    night daylight saving ends was logged twice alike (01:30 EDT, then 01:30 EST), and
    a line could not be placed against the audit trail's UTC times."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created, UTC).astimezone().isoformat(
            timespec="milliseconds")


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(_StderrNow())
    handler.setFormatter(_LocalTimeWithOffset("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(getattr(logging, level.upper()))

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

OWN_LOGGERS = ("appliance", "sync", "provisioning")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(getattr(logging, level.upper()))

"""Process-wide logging set-up: one format for every pacs-edge process.

Messages are lowercase events with key=value fields and never carry patient
data (see logsafe); this module only decides where they go and how they look.
"""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )

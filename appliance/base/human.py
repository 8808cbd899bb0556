"""Sizes and times for people: the CLI's reports and the web status page."""

from __future__ import annotations

import time


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def human_time(epoch: float | None) -> str:
    """Local time to the second; "never" for a moment that has not happened (None or 0)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "never"

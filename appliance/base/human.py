"""Sizes and times for people: the CLI's reports and the web status page."""

from __future__ import annotations

import time


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def human_time(epoch: float | None, *, clock: str = "%Y-%m-%d %H:%M:%S") -> str:
    """Local time to the second, with the zone's name (EST, CEST, UTC): on the night
    daylight saving ends the hour from 01:00 is shown twice, and only the name tells
    01:30 EDT from 01:30 EST an hour later; it also says which zone the box keeps.
    "never" for a moment that has not happened (None or 0)."""
    return time.strftime(f"{clock} %Z", time.localtime(epoch)) if epoch else "never"

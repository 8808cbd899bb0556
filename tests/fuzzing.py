"""What the seeded fuzz tests share: their seed and length, and the checks after a step.

- SEED / STEPS: PACS_EDGE_FUZZ_SEED and PACS_EDGE_FUZZ_STEPS (`make soak` sets them;
  a failure names the seed and step, and the same seed replays the same inputs);
- unhandled(server): the lines of the serve log since the test began that say an
  exception escaped a handler (a Traceback, aiohttp's "Error handling request",
  asyncio's "Task exception was never retrieved"); expected failures are logged as
  one-line events, so any of these is a defect;
- rss_kb(pid) / threads(pid): from /proc/PID/status of the test's own server;
  wait_for_threads(pid, at_most): until its threads are back to a count.
"""

from __future__ import annotations

import os
import random
import socket
import ssl
import time
from collections.abc import Sequence
from pathlib import Path

from conftest import EdgeServer

SEED = int(os.environ.get("PACS_EDGE_FUZZ_SEED", "20261205"))
_STEPS = os.environ.get("PACS_EDGE_FUZZ_STEPS")

_UNHANDLED = ("Traceback (most recent call last)", "Error handling request",
              "Task exception was never retrieved", "Exception in callback",
              "Unhandled exception")


def steps(default: int) -> int:
    """PACS_EDGE_FUZZ_STEPS, else the module's CI default (a few seconds of work)."""
    return int(_STEPS) if _STEPS else default


def unhandled(server: EdgeServer, since: int = 0) -> list[str]:
    """Log lines (from byte `since` of the serve log on) that report an unhandled error."""
    text = server.log()[since:]
    return [line for line in text.splitlines() if any(mark in line for mark in _UNHANDLED)]


def log_size(server: EdgeServer) -> int:
    return len(server.log())


def _proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {key}")


def rss_kb(pid: int) -> int:
    return _proc_status(pid, "VmRSS")


def threads(pid: int) -> int:
    return _proc_status(pid, "Threads")


def wait_for_threads(pid: int, at_most: int, *, deadline_seconds: float = 30.0) -> int:
    """Poll until the process runs at most `at_most` threads (or a deadline); returns the
    count."""
    deadline = time.monotonic() + deadline_seconds
    while threads(pid) > at_most and time.monotonic() < deadline:
        time.sleep(0.1)
    return threads(pid)


def send_in_pieces(rng: random.Random, sock: socket.socket, payload: bytes, *,
                   sizes: Sequence[int], pause_chance: float) -> bool:
    """Write `payload` in pieces of random `sizes` (and the whole rest, at times), now and
    then pausing up to 50 ms; False if the server closed the connection first."""
    at = 0
    try:
        while at < len(payload):
            size = rng.choice([*sizes, len(payload)])
            sock.sendall(payload[at:at + size])
            at += size
            if rng.random() < pause_chance:
                time.sleep(rng.uniform(0, 0.05))
    except (ConnectionError, ssl.SSLError):
        return False
    return True

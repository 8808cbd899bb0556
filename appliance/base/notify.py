"""Service readiness and watchdog pings for systemd (`Type=notify`, `WatchdogSec=`).

The units in systemd/ start `pacs-edge serve` and `pacs-edge sync` with
$NOTIFY_SOCKET set; systemd counts a service as started only once it sends
READY=1, and restarts it when WATCHDOG=1 pings stop for longer than
WatchdogSec. The datagram protocol is spoken by the `sdnotify` library; this
module only decides when to speak:

- `starting()` when a start-up begins whose steps grow with the box: it asks
  for more start-up time (EXTEND_TIMEOUT_USEC) at once and every
  EXTEND_EVERY seconds until `ready()`. An index migration that builds an
  index over the instance table takes ~9 s at 3 million instances, and fsck
  after an unclean stop ~18 s: at 20 million they outlast the units' 90 s
  start timeout, systemd kills the start, the migration rolls back, and the
  next start begins it again, for ever;
- `ready()` after the service can do its job (the DIMSE port is listening,
  the agent's jobs are scheduled), with a one-line STATUS= for
  `systemctl status`;
- `watchdog()` from the service's main loop, every `interval()` seconds:
  half of $WATCHDOG_USEC, as sd_watchdog_enabled(3) recommends, so one late
  wake-up does not get the service killed. A loop that hangs stops pinging,
  which is the point;
- `reloading()` when serve begins to load a renewed certificate (SIGHUP, the
  units' ExecReload=), then `ready()` again once it is loaded or refused: systemd
  shows the unit "reloading" in between (RELOADING=1 with the MONOTONIC_USEC=
  that systemd 253 and later ask for; older ones ignore both);
- `stopping()` when a graceful stop begins, so systemd does not mistake the
  drain for a hang.

Without $NOTIFY_SOCKET (a terminal, the tests, a box without systemd) every
call is a no-op. $WATCHDOG_PID, when set, must name this process: a child
that inherited the variables must not ping for its parent.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping

from sdnotify import SystemdNotifier

log = logging.getLogger(__name__)

EXTEND_EVERY = 20.0  # seconds between two requests for more start-up time
EXTEND_BY_USEC = 60_000_000  # what each asks for: room for two late requests


class Notifier:
    """One process's channel to systemd; every method is safe to call without systemd."""

    def __init__(self, *, silent: bool = False) -> None:
        """`silent`: never speak (a worker process whose supervisor speaks for the service)."""
        # sdnotify reads $NOTIFY_SOCKET itself, so this reads the same environment.
        self._socket_path = "" if silent else os.environ.get("NOTIFY_SOCKET", "")
        self._watchdog_usec = _watchdog_usec(os.environ)
        self._sender: SystemdNotifier | None = None
        self._failed = False
        self._lock = threading.Lock()  # the start-up thread sends too
        self._started = threading.Event()  # set by ready(), close(): no more extensions

    @property
    def enabled(self) -> bool:
        return bool(self._socket_path)

    @property
    def watchdog_enabled(self) -> bool:
        return self.enabled and self._watchdog_usec > 0

    def interval(self, default: float) -> float:
        """Seconds until the next watchdog ping is due (`default` without a watchdog)."""
        if not self.watchdog_enabled:
            return default
        return min(default, self._watchdog_usec / 2_000_000)

    def starting(self, status: str, *, every: float = EXTEND_EVERY) -> None:
        """Ask for more start-up time now and every `every` seconds until ready() (or
        close()), from a daemon thread: the steps that take long (SQLite's) block the
        caller. Pings the watchdog with it too, should a systemd arm it before READY=1."""
        if not self.enabled:
            return

        def keep_asking() -> None:
            extend = f"EXTEND_TIMEOUT_USEC={EXTEND_BY_USEC}\nSTATUS={status}"
            if self.watchdog_enabled:
                extend += "\nWATCHDOG=1"
            while not self._started.is_set():
                self._send(extend, unless_started=True)
                self._started.wait(every)

        threading.Thread(target=keep_asking, name="systemd-start-extension",
                         daemon=True).start()

    def ready(self, status: str) -> None:
        self._started.set()
        self._send(f"READY=1\nSTATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def watchdog(self) -> None:
        if self.watchdog_enabled:
            self._send("WATCHDOG=1")

    def stopping(self) -> None:
        """The last message of a run: a graceful stop began. Closes the channel."""
        self._send("STOPPING=1")
        self.close()

    def close(self) -> None:
        self._started.set()
        with self._lock:
            if self._sender is not None and self._sender.socket is not None:
                self._sender.socket.close()
            self._sender = None
            self._failed = True  # nothing more is sent

    def _send(self, message: str, *, unless_started: bool = False) -> None:
        with self._lock:
            if not self.enabled or self._failed or (unless_started and self._started.is_set()):
                return
            try:
                if self._sender is None:
                    # debug=True: the library raises instead of swallowing, so a
                    # broken socket is logged once here rather than never.
                    self._sender = SystemdNotifier(debug=True)
                self._sender.notify(message)
            except OSError as exc:
                self._failed = True
                log.warning("cannot notify systemd; further notifications skipped error=%s",
                            exc)


def _watchdog_usec(env: Mapping[str, str]) -> int:
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(os.getpid()):
        return 0
    try:
        return max(0, int(env.get("WATCHDOG_USEC", "0")))
    except ValueError:
        return 0

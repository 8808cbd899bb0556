"""The services speak systemd's notify protocol: READY=1 once ready, WATCHDOG=1 while alive.

The real `pacs-edge serve` (one process, and the multi-worker supervisor) and
`pacs-edge sync` run as subprocesses with $NOTIFY_SOCKET naming a unix
datagram socket this test listens on, as systemd would for Type=notify, and
$WATCHDOG_USEC small so pings come quickly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomlkit
from conftest import EdgeServer
from syncagent import SyncAgent

from appliance.base.notify import EXTEND_BY_USEC, Notifier

WATCHDOG_USEC = 400_000  # pings every 0.2 s
DEADLINE = 30.0


class NotifySocket:
    """The listening end of $NOTIFY_SOCKET: collects every datagram received."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def wait_for(self, predicate: Callable[[list[str]], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while not predicate(self.messages):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {DEADLINE} s; got {self.messages}")
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.sock.close()


def _ready_then_pings(messages: list[str]) -> bool:
    ready = [i for i, m in enumerate(messages) if "READY=1" in m.splitlines()]
    return bool(ready) and messages[ready[0] + 1:].count("WATCHDOG=1") >= 2


def _asked_for_start_time_first(messages: list[str]) -> bool:
    """The start began by asking for more start-up time, before READY=1 (a migration of
    a large index must not be killed by the unit's start timeout: base/notify.py)."""
    ready = next(i for i, m in enumerate(messages) if "READY=1" in m.splitlines())
    return any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in messages[:ready])


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_sends_ready_then_watchdog_pings(
        workers: int, edge_home: Path, notify_socket: NotifySocket,
        edge_server_factory: Callable[..., EdgeServer], monkeypatch: pytest.MonkeyPatch) -> None:
    server = _notifying_server(workers, edge_home, notify_socket, edge_server_factory,
                               monkeypatch)
    notify_socket.wait_for(_ready_then_pings, "READY=1 followed by two WATCHDOG=1")
    ready = next(m for m in notify_socket.messages if "READY=1" in m)
    assert f"STATUS=accepting associations on port {server.port}" in ready
    # Only the process systemd watches speaks: never a second READY from a worker.
    assert sum("READY=1" in m for m in notify_socket.messages) == 1
    assert _asked_for_start_time_first(notify_socket.messages), notify_socket.messages
    assert server.stop() == 0
    notify_socket.wait_for(lambda msgs: "STOPPING=1" in msgs, "STOPPING=1")


def _reloading_then_ready(messages: list[str]) -> bool:
    reloading = [i for i, m in enumerate(messages) if "RELOADING=1" in m.splitlines()]
    return bool(reloading) and any("READY=1" in m.splitlines()
                                   for m in messages[reloading[0] + 1:])


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_reload_sends_reloading_then_ready(
        workers: int, edge_home: Path, notify_socket: NotifySocket,
        edge_server_factory: Callable[..., EdgeServer], monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGHUP (the units' ExecReload=) shows the unit reloading until serve is done, with
    the MONOTONIC_USEC= that systemd 253 and later want next to RELOADING=1."""
    server = _notifying_server(workers, edge_home, notify_socket, edge_server_factory,
                               monkeypatch)
    notify_socket.wait_for(_ready_then_pings, "READY=1 followed by two WATCHDOG=1")
    os.kill(server.pid, signal.SIGHUP)
    notify_socket.wait_for(_reloading_then_ready, "RELOADING=1 followed by READY=1")
    reloading = next(m for m in notify_socket.messages if "RELOADING=1" in m)
    assert reloading.splitlines()[1].startswith("MONOTONIC_USEC=")
    assert server.stop() == 0


def test_sync_agent_sends_ready_then_watchdog_pings(
        edge_home: Path, notify_socket: NotifySocket) -> None:
    agent = SyncAgent(edge_home, env=notify_socket.env()).start()
    try:
        notify_socket.wait_for(_ready_then_pings, "READY=1 followed by two WATCHDOG=1")
        assert any("STATUS=sync agent running" in m for m in notify_socket.messages)
        assert _asked_for_start_time_first(notify_socket.messages), notify_socket.messages
    finally:
        assert agent.stop() == 0
    notify_socket.wait_for(lambda msgs: "STOPPING=1" in msgs, "STOPPING=1")


def test_notifier_is_silent_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    notifier = Notifier()
    assert not notifier.enabled and not notifier.watchdog_enabled
    assert notifier.interval(30.0) == 30.0
    notifier.ready("x")  # no socket: nothing to send, nothing raised
    notifier.watchdog()


def test_watchdog_interval_is_half_of_watchdog_usec(
        notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    notifier = Notifier()
    assert notifier.interval(30.0) == 10.0
    assert notifier.interval(5.0) == 5.0
    assert Notifier(silent=True).interval(30.0) == 30.0


def test_watchdog_for_another_pid_is_not_ours(
        notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    notifier = Notifier()
    assert notifier.enabled and not notifier.watchdog_enabled
    notifier.watchdog()
    notifier.ready("only this")
    notifier.close()
    notify_socket.wait_for(lambda msgs: bool(msgs), "a message")
    assert notify_socket.messages == ["READY=1\nSTATUS=only this"]


def test_a_long_start_asks_for_more_time_until_ready_and_then_stops(
        notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    notifier = Notifier()
    notifier.starting("starting: migrating", every=0.05)
    notify_socket.wait_for(lambda msgs: len(msgs) >= 3, "three requests for more time")
    notifier.ready("up")
    notify_socket.wait_for(lambda msgs: "READY=1\nSTATUS=up" in msgs, "READY=1")
    time.sleep(0.3)  # several intervals: nothing more may come
    with contextlib.suppress(TimeoutError):
        while True:
            notify_socket.messages.append(notify_socket.sock.recv(4096).decode())
    ready = notify_socket.messages.index("READY=1\nSTATUS=up")
    assert set(notify_socket.messages[:ready]) == {
        f"EXTEND_TIMEOUT_USEC={EXTEND_BY_USEC}\nSTATUS=starting: migrating"}
    assert notify_socket.messages[ready + 1:] == []
    notifier.close()


def _notifying_server(workers: int, edge_home: Path, notify_socket: NotifySocket,
                      edge_server_factory: Callable[..., EdgeServer],
                      monkeypatch: pytest.MonkeyPatch) -> EdgeServer:
    """serve with `workers` processes, telling systemd's stand-in socket."""
    if workers > 1:
        path = edge_home / "pacs-edge.toml"
        doc = tomlkit.parse(path.read_text())
        doc["dicom"]["workers"] = workers  # type: ignore[index]
        path.write_text(tomlkit.dumps(doc))
    for key, value in notify_socket.env().items():
        monkeypatch.setenv(key, value)  # the fixture's server inherits the environment
    return edge_server_factory(edge_home)

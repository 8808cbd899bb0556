"""The box's wall clock steps by years (a dead RTC battery, then NTP; or a clock corrected
after months ahead) while the real processes run: nothing stops, spins, or waits for years.

The processes run under libfaketime (Debian's `faketime` package) reading their wall-clock
offset from a file that the test rewrites, so the clock steps mid-run. The monotonic clock
is left alone (FAKETIME_DONT_FAKE_MONOTONIC), as it is by a real NTP step.
"""

from __future__ import annotations

import os
import subprocess
import time
from datetime import datetime
from pathlib import Path

import dicomgen
from conftest import HOST, TEST_AE, EdgeServer, init_home, pacs_edge_command
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification
from syncagent import SyncAgent, index_rows

DEADLINE = 20.0


def _libfaketime() -> Path:
    found = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    assert found, "libfaketime missing: run scripts/setup-test-deps.sh (Debian's faketime)"
    return found[0]


def new_york_box_at(moment: datetime) -> dict[str, str]:
    """The environment of a process of a box in New York (a zone with daylight saving)
    whose wall clock reads `moment`, then runs on (libfaketime, an offset from now)."""
    return {"TZ": "America/New_York", "LD_PRELOAD": str(_libfaketime()),
            "FAKETIME": f"{int(moment.timestamp() - time.time()):+d}"}


class SteppedClock:
    """A wall clock for the processes started with `env`: `step("-5y")` moves it."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "faketime"
        self.path.write_text("+0")
        self.env = {"LD_PRELOAD": str(_libfaketime()), "FAKETIME_TIMESTAMP_FILE": str(self.path),
                    "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}

    def step(self, offset: str) -> None:
        self.path.write_text(offset)

    def run(self, *args: str) -> None:
        """`pacs-edge ARGS` on this clock, as every process of the box shares one clock."""
        subprocess.run([*pacs_edge_command(), *args], check=True, capture_output=True,
                       timeout=60, env={**os.environ, **self.env}, stdin=subprocess.DEVNULL)


def _replicated(home: Path) -> int:
    return len(index_rows(home, "SELECT 1 FROM studies WHERE tier_state = 'replicated'"))


def _wait_replicated(home: Path, count: int) -> bool:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if _replicated(home) >= count:
            return True
        time.sleep(0.2)
    return False


def test_sync_agent_replicates_on_after_the_wall_clock_steps_back_years(tmp_path: Path) -> None:
    home = init_home(tmp_path / "home")
    EdgeServer(home).configure(sync={"stable_after_seconds": 0, "replicate_interval_seconds": 2})
    clock = SteppedClock(tmp_path)
    first = dicomgen.make_study(tmp_path / "first", seed=1)
    second = dicomgen.make_study(tmp_path / "second", seed=2)
    agent = SyncAgent(home, clock.env).start()
    try:
        clock.run("import", "--home", str(home), *(str(i.path) for i in first))
        assert _wait_replicated(home, 1), agent.log()
        clock.step("-5y")
        time.sleep(3)  # the scheduler's next wake-up comes after the step
        clock.run("import", "--home", str(home), *(str(i.path) for i in second))
        assert _wait_replicated(home, 2), "agent stopped after the clock stepped back"
    finally:
        agent.stop()
    assert "wall clock stepped" in agent.log()


def _wait_logged(agent: SyncAgent, line: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while line not in agent.log():
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.1)


def _peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])


def test_sync_agent_neither_spins_nor_skips_runs_after_the_clock_steps_ahead(
        tmp_path: Path) -> None:
    home = init_home(tmp_path / "home")
    EdgeServer(home).configure(sync={"stable_after_seconds": 0, "replicate_interval_seconds": 2})
    clock = SteppedClock(tmp_path)
    study = dicomgen.make_study(tmp_path / "study", seed=3)
    agent = SyncAgent(home, clock.env).start()
    try:
        assert agent.proc is not None
        _wait_logged(agent, "audit log anchored")  # the first runs began before the step
        before = _peak_rss_kib(agent.proc.pid)
        clock.step("+60d")  # one datetime per missed 1 s recall poll: 5 million of them
        clock.run("import", "--home", str(home), *(str(i.path) for i in study))
        assert _wait_replicated(home, 1), agent.log()
        grown = _peak_rss_kib(agent.proc.pid) - before
    finally:
        agent.stop()
    assert grown < 50_000, f"agent grew by {grown} KiB after the step"
    assert "was missed by" not in agent.log()


def test_studies_received_before_the_clock_stepped_back_still_replicate(
        tmp_path: Path) -> None:
    home = init_home(tmp_path / "home")
    clock = SteppedClock(tmp_path)
    study = dicomgen.make_study(tmp_path / "study", seed=4)
    clock.run("import", "--home", str(home), *(str(i.path) for i in study))
    clock.step("-1y")  # the clock was a year ahead when the study came in
    clock.run("sync", "--once", "--stable-after", "0", "--home", str(home))
    assert _replicated(home) == 1


def test_status_names_a_silent_agent_whose_earlier_pass_ran_on_a_clock_ahead(
        tmp_path: Path) -> None:
    home = init_home(tmp_path / "home")
    clock = SteppedClock(tmp_path)
    clock.run("import", "--home", str(home),
              *(str(i.path) for i in dicomgen.make_study(tmp_path / "study", seed=5)))
    clock.step("+1y")
    clock.run("sync", "--once", "--home", str(home))  # a pass while the clock was ahead
    clock.step("+0")
    clock.run("sync", "--once", "--home", str(home))  # the clock put right
    clock.step("+1d")  # then the agent stops for a day
    status = subprocess.run([*pacs_edge_command(), "status", "--json", "--home", str(home)],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, **clock.env})
    assert '"code": "sync_agent_silent"' in status.stdout, status.stdout


def _serve_on(clock: SteppedClock, home: Path, **dicom: float) -> EdgeServer:
    server = EdgeServer(home)
    server.configure(dicom=dicom)
    return server.start(prefix=("env", *(f"{k}={v}" for k, v in clock.env.items())))


def _associate(server: EdgeServer) -> Association:
    ae = AE(ae_title=TEST_AE)
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, server.port, ae_title=server.ae_title)
    assert assoc.is_established
    return assoc


def test_an_open_association_outlives_a_step_of_the_wall_clock_ahead(tmp_path: Path) -> None:
    clock = SteppedClock(tmp_path)
    server = _serve_on(clock, init_home(tmp_path / "home"), network_timeout=30.0)
    try:
        assoc = _associate(server)
        clock.step("+1h")  # NTP sets the clock of a box that booted an hour behind
        time.sleep(1)  # the server's reactor looks at its timers every 0.25 s
        assert assoc.send_c_echo().Status == 0, server.log()[-2000:]
        assoc.release()
    finally:
        server.stop()
    assert "no PDU within network_timeout" not in server.log()


def test_a_silent_association_still_ends_after_the_wall_clock_steps_back(
        tmp_path: Path) -> None:
    clock = SteppedClock(tmp_path)
    server = _serve_on(clock, init_home(tmp_path / "home"), network_timeout=2.0)
    try:
        assoc = _associate(server)
        clock.step("-1y")  # a clock corrected after a year ahead
        deadline = time.monotonic() + DEADLINE
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not assoc.is_established, "the box kept a silent association open"
    finally:
        server.stop()
    assert "no PDU within network_timeout=2s" in server.log()

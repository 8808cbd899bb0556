"""Shared fixtures: a real `pacs-edge serve` subprocess, its data home, dcmtk peers.

Fixtures
- free_port: a function returning a free TCP port on 127.0.0.1.
- edge_home: an initialised data home (`pacs-edge init`) whose allowlist has the
  default test peer TESTSCU (127.0.0.1, allowed store,find,move,get).
- edge_server_factory: `make(home=None, *, start=True, peers=True, ae_title="EDGE")`
  returns an EdgeServer; every server it made is stopped at teardown.
- edge_server: one started EdgeServer on edge_home.
- storescp: a started dcmtk StoreSCP (AE STORESCP) writing to tmp_path/"storescp".
- small_study / syntax_set: session-wide generated data (read-only: do not modify).

EdgeServer runs `pacs-edge serve --home DIR` in its own process group, on
127.0.0.1 and a port the OS picks (the server logs it in its ready line); a
restart reuses that port. Readiness is the `ready to accept associations` log
line plus a C-ECHO from TESTSCU, polled with a deadline. Teardown sends SIGTERM,
then SIGKILL to the group after a deadline, and fails the test if any graceful
stop exited non-zero or had to be killed. `kill()` is the power cut: SIGKILL to
the whole group (not counted as unclean).

Importing this module gives the tests' pynetdicom clients the appliance's fix for
pynetdicom's requestor race (compat.close_requestor_reactor_race).

Modules next to this file import by plain name (`import dicomgen`, `import
dcmtk`): tests/ has no __init__.py, so pytest puts it on sys.path.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import dcmtk
import dicomgen
import pytest
import tomlkit
from azurite import azurite  # noqa: F401
from click.testing import CliRunner
from pynetdicom import _config as pynetdicom_config

from appliance.base import compat
from appliance.base.config import load_config
from appliance.cli.root import init
from appliance.services import peer_changes
from appliance.services.peers import Peer, parse_permissions

HOST = "127.0.0.1"
TEST_AE = dcmtk.TEST_AE
EDGE_AE = dcmtk.EDGE_AE
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
CLI_TIMEOUT = 120.0
# Command words that run a command as root without any capability: file modes then
# apply to it as to the service user (the units grant serve no capability either).
NO_CAPABILITIES = ("setpriv", "--bounding-set=-all", "--inh-caps=-all")
PRODUCT_SITE = Path(__file__).with_name("product_site")
_READY = re.compile(r"ready to accept associations\b.*?\bport=(\d+)")
_HTTPS_READY = re.compile(r"https server ready\b.*?\bport=(\d+)")

# The tests' pynetdicom clients get the fix the appliance's own SCUs have: without it
# pynetdicom 3.0.4's requestor reactor can, under load, take a response meant for
# send_c_store() and the test fails on a DIMSE timeout (compat.run_association_reactor).
compat.close_requestor_reactor_race()


def pacs_edge_command() -> list[str]:
    """The console script next to this interpreter, else `python -m appliance.cli`."""
    script = Path(sys.executable).with_name("pacs-edge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "appliance.cli"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PACS_EDGE_HOME"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_pacs_edge(*args: str, check: bool = True,
                  timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run `pacs-edge ARGS`; with `check`, a non-zero exit fails the test with the output."""
    proc = subprocess.run([*pacs_edge_command(), *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=_env())
    if check and proc.returncode != 0:
        pytest.fail(f"pacs-edge {' '.join(args)} exited {proc.returncode}:\n"
                    f"{proc.stdout}{proc.stderr}", pytrace=False)
    return proc


def init_home(home: Path, *, ae_title: str = EDGE_AE, default_peer: bool = True,
              evict_without_escrow: bool = True, http_port: int = 0,
              worklist_past_days: int | None = 0) -> Path:
    """`pacs-edge init` with port 0 (the OS picks one at serve), plus the TESTSCU peer.

    Test homes accept the no-escrow risk ([sync] evict_without_escrow) so that tests of
    other things can evict without a (slow, scrypt) `keys escrow`; the escrow gate's
    own tests pass evict_without_escrow=False. Test orders are scheduled on fixed dates
    (2024), so test homes put no bound on how far back a worklist query reaches
    ([workflow] worklist_past_days = 0); the bound's own tests pass None (the default).
    Web tests pass a free `http_port`."""
    # TLS, HL7, HTTPS and the metrics listener off unless a test turns them on: their
    # fixed ports (2762, 2575, 8443, 9464) would collide.
    # `pacs-edge init`'s own command, in this process (CliRunner): a command's start-up
    # (~0.5 s of CPU) in every test's home was a good part of the suite's time.
    made = CliRunner().invoke(init, ["--home", str(home), "--ae-title", ae_title,
                                     "--dicom-port", "0", "--tls-port", "0", "--hl7-port", "0",
                                     "--http-port", str(http_port), "--metrics-port", "0"])
    if made.exit_code != 0:
        pytest.fail(f"pacs-edge init exited {made.exit_code}:\n{made.output}", pytrace=False)
    if evict_without_escrow:
        EdgeServer(home).configure(sync={"evict_without_escrow": True})
    if worklist_past_days is not None:
        EdgeServer(home).configure(workflow={"worklist_past_days": worklist_past_days})
    if default_peer:
        # Port 1: nothing listens there; a C-MOVE destination needs its own peer. What
        # `pacs-edge peers add` runs, in this process, as init above.
        peer = Peer("testscu", TEST_AE, HOST, 1, parse_permissions("store,find,move,get"))
        peer_changes.add_peer(load_config(home), peer, process="cli")
    return home


class EdgeServer:
    """One `pacs-edge serve` subprocess on a data home."""

    def __init__(self, home: Path, *, ae_title: str = EDGE_AE) -> None:
        self.home = Path(home)
        self.host = HOST
        self.ae_title = ae_title
        self.port = 0  # known after the first start()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.home.parent / f"{self.home.name}-serve.log"
        self._log_offset = 0
        # Graceful stops (SIGTERM) that exited non-zero or needed SIGKILL; the
        # fixtures fail the test at teardown when there are any.
        self.unclean_stops: list[str] = []

    # -- lifecycle ------------------------------------------------------------------

    def start(self, *, timeout: float = READY_TIMEOUT, extra_args: tuple[str, ...] = (),
              prefix: Sequence[str] = ()) -> EdgeServer:
        """Start serving and wait until ready; the port of an earlier start is kept.
        `prefix`: command words to run serve under (setpriv, unshare)."""
        if self.running:
            raise RuntimeError("already running")
        args = [*prefix, *pacs_edge_command(), "serve", "--home", str(self.home),
                "--dicom-port", str(self.port), *extra_args]
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=_env(),
                                         start_new_session=True)
        self.port = self._wait_ready_line(timeout)
        if self._has_test_peer():
            self._wait_echo(timeout)
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM; SIGKILL to the process group after `timeout`. Returns the exit code
        (None if never started; negative for a signal, as subprocess reports it)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
                if proc.returncode != 0:
                    self.unclean_stops.append(
                        f"exited {proc.returncode} on SIGTERM:\n{self._log_since_start()[-4000:]}")
            except subprocess.TimeoutExpired:
                self._dump_stacks()
                self._killpg()
                proc.wait(timeout)
                self.unclean_stops.append(f"still running {timeout}s after SIGTERM: killed:\n"
                                          f"{self._log_since_start()[-12000:]}")
        self._reap_group()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the server and every process it started: a power cut, for the server."""
        if self.proc is None:
            return
        self._killpg()
        self.proc.wait(STOP_TIMEOUT)

    def restart(self, *, timeout: float = READY_TIMEOUT) -> EdgeServer:
        """Stop gracefully (if running) and start again on the same port."""
        self.stop()
        return self.start(timeout=timeout)

    @property
    def http_port(self) -> int:
        """The HTTPS port of the running server (init_home(..., http_port=N))."""
        match = _HTTPS_READY.search(self._log_since_start())
        if match is None:
            raise RuntimeError("this server has no HTTPS port (init_home(http_port=...))")
        return int(match.group(1))

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # -- helpers --------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True,
            timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """`pacs-edge ARGS --home HOME` (click takes options after arguments)."""
        return run_pacs_edge(*args, "--home", str(self.home), check=check, timeout=timeout)

    def add_peer(self, name: str, ae_title: str, port: int, *, host: str = HOST,
                 allow: str = "store,find,move,get") -> None:
        """What `pacs-edge peers add` runs, in this process (as init_home's peer)."""
        peer_changes.add_peer(load_config(self.home), Peer(name, ae_title, host, port,
                                                           parse_permissions(allow)),
                              process="cli")

    def configure(self, **sections: dict[str, Any]) -> None:
        """Edit pacs-edge.toml keeping its comments: configure(dicom={"max_pdu": 0}).
        Takes effect at the next start()."""
        path = self.home / "pacs-edge.toml"
        doc = tomlkit.parse(path.read_text(encoding="utf-8"))
        for section, values in sections.items():
            table = doc.setdefault(section, tomlkit.table())
            for key, value in values.items():
                table[key] = str(value) if isinstance(value, Path) else value
        path.write_text(tomlkit.dumps(doc), encoding="utf-8")

    def log(self) -> str:
        """Everything this server logged, across restarts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 15.0) -> str:
        """The log once it holds `text`. A refused peer can see the refusal before the
        server's thread has written the line saying why, so poll with a deadline."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.log()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert text in log, f"{text!r} not logged within {timeout:.0f}s:\n{log[-2000:]}"
        return log

    def echo(self, *, aet: str = TEST_AE) -> dcmtk.ToolResult:
        return dcmtk.echoscu(self.port, host=self.host, aet=aet, aec=self.ae_title)

    def _has_test_peer(self) -> bool:
        path = self.home / "peers.toml"
        if not path.exists():
            return False
        peers = tomllib.loads(path.read_text(encoding="utf-8")).get("peers", {})
        return any(peer.get("ae_title") == TEST_AE for peer in peers.values())

    def _wait_ready_line(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self._log_since_start()
            match = _READY.search(text)
            if match:
                return int(match.group(1))
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"pacs-edge serve exited {self.proc.returncode} before ready:\n"
                            f"{text}", pytrace=False)
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"pacs-edge serve not ready after {timeout}s:\n{self._log_since_start()}",
                    pytrace=False)

    def _wait_echo(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            result = self.echo()
            if result.ok:
                return
            if time.monotonic() > deadline or not self.running:
                pytest.fail(f"C-ECHO to pacs-edge failed:\n{result.output}\n"
                            f"{self._log_since_start()}", pytrace=False)
            time.sleep(0.1)

    def _log_since_start(self) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")

    def _dump_stacks(self) -> None:
        """Every thread's stack into the log, so a hang says where (stack_dump.py)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGUSR1)
        time.sleep(1.0)

    def _killpg(self) -> None:
        """SIGKILL the process group and wait until no live member is left."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _group_members(self.proc.pid):
            if time.monotonic() > deadline:
                pytest.fail(f"processes of pacs-edge serve survived SIGKILL: "
                            f"{_group_members(self.proc.pid)}", pytrace=False)
            time.sleep(0.02)

    def _reap_group(self) -> None:
        # Workers of a multi-process server live in the leader's process group;
        # after the leader is gone, nothing of the group may outlive the test.
        assert self.proc is not None
        if _group_members(self.proc.pid):
            self._killpg()


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group `pgid`, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command: state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


@pytest.fixture(scope="session", autouse=True)
def product_imports() -> Iterator[None]:
    """Subprocesses import as on a box, without the test extras (product_site/ says
    why). Set in the process that runs the tests, never before xdist starts its
    workers: they need numpy themselves."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(PRODUCT_SITE), *([before] if before else [])])
    yield
    if before is None:
        del os.environ["PYTHONPATH"]
    else:
        os.environ["PYTHONPATH"] = before


@pytest.fixture(scope="module", autouse=True)
def _collect_garbage_after_module() -> Iterator[None]:
    """Collect what a module left unreachable before the next module starts.

    An object a test leaked (a socket nobody closed, say) warns only when the
    garbage collector finds it; with warnings as errors, that failed whichever
    test of another module the collector happened to run in. Collected here,
    it fails the last test of the module that leaked it."""
    yield
    gc.collect()


@pytest.fixture
def free_port() -> Callable[[], int]:
    return dcmtk.free_port


@pytest.fixture
def raw_sender() -> Iterator[None]:
    """pynetdicom sends a file's dataset bytes as they are, without decoding them: a
    truncated, padded or non-DICOM payload (or a deflate bomb) reaches the server
    unchanged."""
    previous = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    yield
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = previous


@pytest.fixture
def edge_home(tmp_path: Path) -> Path:
    return init_home(tmp_path / "edge-home")


@pytest.fixture
def edge_server_factory(tmp_path: Path) -> Iterator[Callable[..., EdgeServer]]:
    servers: list[EdgeServer] = []

    def make(home: Path | None = None, *, start: bool = True, peers: bool = True,
             ae_title: str = EDGE_AE) -> EdgeServer:
        if home is None:
            home = init_home(tmp_path / f"edge-home-{len(servers)}", ae_title=ae_title,
                             default_peer=peers)
        server = EdgeServer(home, ae_title=ae_title)
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        server.stop()
    problems = [f"{s.home}: {problem}" for s in servers for problem in s.unclean_stops]
    if problems:
        pytest.fail("pacs-edge serve did not stop cleanly:\n" + "\n".join(problems),
                    pytrace=False)


@pytest.fixture
def edge_server(edge_home: Path, edge_server_factory: Callable[..., EdgeServer]) -> EdgeServer:
    return edge_server_factory(edge_home)


@contextlib.contextmanager
def serving(server: EdgeServer) -> Iterator[EdgeServer]:
    """`server` started for the block, then stopped: an unclean stop fails the test."""
    server.start()
    try:
        yield server
    finally:
        server.stop()
    assert not server.unclean_stops, server.unclean_stops


@pytest.fixture(scope="module")
def refusing_edge_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeServer]:
    """One started server for a module's tests of what it refuses: none of them may leave
    anything on it (they share it to spare a start each)."""
    with serving(EdgeServer(init_home(tmp_path_factory.mktemp("refusing") / "edge-home"))
                 ) as server:
        yield server


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[dcmtk.StoreSCP]:
    with dcmtk.StoreSCP(tmp_path / "storescp", ae_title="STORESCP") as scp:
        yield scp


@pytest.fixture(scope="session")
def small_study(tmp_path_factory: pytest.TempPathFactory) -> list[dicomgen.GeneratedInstance]:
    """One patient, one study: a CT and an MR series of 3 images each (read-only)."""
    return dicomgen.make_study(tmp_path_factory.mktemp("small-study"), seed=1)


@pytest.fixture(scope="session")
def syntax_set(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dicomgen.GeneratedInstance]:
    """One image per transfer syntax, keyed by TS UID (read-only)."""
    return dicomgen.make_syntax_set(tmp_path_factory.mktemp("syntax-set"))


# The modules that take longest in all (50 s and more summed over their tests in a loaded
# serial run's `--durations`), longest first. `make test` runs the suite on several
# workers (pytest-xdist, --dist loadfile --no-loadscope-reorder): each module goes whole to
# one worker, in collection order. Starting the long ones first keeps the run from ending
# with one worker busy on a long module while the others idle.
SLOW_MODULES_FIRST = (
    "test_ansible.py", "test_key_rotation.py", "test_scrub.py", "test_migrate.py",
    "test_sync_crash.py", "test_readers.py", "test_hl7_orders.py", "test_viewer_recall.py",
    "test_dimse_hardening.py", "test_dropfolder.py", "test_restore.py", "test_cli.py",
    "test_retrieve_move.py", "test_storage_commitment.py", "test_hl7_fuzz.py",
    "test_sync_index_rebuilt.py", "test_power_loss.py", "test_web_login.py",
    "test_sync_end_to_end.py", "test_launch_links.py", "test_damaged_index.py",
    "test_viewer_browser.py", "test_prefetch.py", "test_users.py", "test_escrow_gate.py",
    "test_dicom_tls.py", "test_study_leases.py", "test_audit.py", "test_tiering_random.py",
    "test_dicomweb_wado.py", "test_store_bad_input.py", "test_retrieve_get.py",
    "test_worklist.py", "test_workflow_day.py", "test_dicomweb_stow.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move the tests of SLOW_MODULES_FIRST ahead; each module's own order is kept."""
    rank = {name: n for n, name in enumerate(SLOW_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))

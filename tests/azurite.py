"""Azurite, Microsoft's Azure Storage emulator, as a real peer for the Azure tests.

Fixture
- azurite (session): starts Azurite's blob service once and yields its
  connection string. Tests that share it use a fresh container each (container
  names are cheap; Azurite starts in about five seconds, so once per session).

AzuriteServer is the server itself, for tests that must stop and restart it
(the retry tests): `with AzuriteServer(folder) as server: ... server.stop();
server.start()`; a restart keeps the port and the data. With `debug_log`,
Azurite writes every request it received (headers and the parameters it
parsed) to that file: how a test sees what the box asked for when Azurite's
answer cannot show it (a rehydration priority: Azurite rehydrates at once).

The blob service runs on 127.0.0.1 and a free port, with --disableTelemetry
(by default Azurite reports usage to an Internet endpoint), --loose and
--skipApiVersionCheck (the SDK may speak a newer API version than the pinned
Azurite knows). Readiness is an HTTP answer on the port, polled with a
deadline; stop is SIGTERM, then SIGKILL to its process group. Installed by
scripts/install-azurite.sh (`make test-deps`) under .cache/azurite.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dcmtk
import pytest

ROOT = Path(__file__).resolve().parent.parent
AZURITE_BLOB = ROOT / ".cache" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
HOST = "127.0.0.1"
ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public, in Microsoft's documentation).
ACCOUNT_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/"
               "K1SZFPTOtr/KBHBeksoGMGw==")
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


def connection_string(port: int) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint=http://{HOST}:{port}/{ACCOUNT};")


@contextlib.contextmanager
def unanswered_credentials(folder: Path) -> Iterator[Path]:
    """A connection-string file (0600) in `folder` whose endpoint on 127.0.0.1 refuses
    every connection: its port is bound, never listening, until the block ends."""
    closed = socket.socket()
    try:
        closed.bind((HOST, 0))
        credentials = folder / "azure.conn"
        credentials.write_text(connection_string(closed.getsockname()[1]))
        credentials.chmod(0o600)
        yield credentials
    finally:
        closed.close()


class AzuriteServer:
    """One azurite-blob process with its data in `location`."""

    def __init__(self, location: Path, *, port: int = 0, debug_log: Path | None = None) -> None:
        self.location = Path(location)
        self.debug_log = debug_log
        self.port = port or dcmtk.free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.location / "azurite.log"
        self.started_in = 0.0  # seconds from spawn to ready, of the last start

    @property
    def connection_string(self) -> str:
        return connection_string(self.port)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = READY_TIMEOUT) -> AzuriteServer:
        if not AZURITE_BLOB.exists():
            pytest.fail(f"Azurite is not installed ({AZURITE_BLOB} is missing): run "
                        "scripts/install-azurite.sh or `make test-deps`", pytrace=False)
        if self.running:
            raise RuntimeError("azurite already running")
        self.location.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AZURITE_")}
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(AZURITE_BLOB), "--blobHost", HOST, "--blobPort", str(self.port),
                 "--location", str(self.location), "--silent", "--skipApiVersionCheck",
                 "--loose", "--disableTelemetry",
                 *(["--debug", str(self.debug_log)] if self.debug_log else [])],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)
        deadline = began + timeout
        while not self._answers():
            if self.proc.poll() is not None:
                pytest.fail(f"azurite exited {self.proc.returncode} before ready:\n"
                            f"{self.log()}", pytrace=False)
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"azurite not ready after {timeout}s:\n{self.log()}",
                            pytrace=False)
            time.sleep(0.05)
        self.started_in = time.monotonic() - began
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM (Azurite saves its metadata), SIGKILL to the group after `timeout`."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            # Signal the whole group while its leader is alive: once the leader is
            # reaped, its pid (and so the group id) may belong to someone else.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        return proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def _answers(self) -> bool:
        """Any HTTP answer (403 without credentials) means the blob service is up."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=2)
        try:
            conn.request("GET", f"/{ACCOUNT}?comp=list")
            conn.getresponse().read()
            return True
        except OSError:
            return False
        finally:
            conn.close()

    def __enter__(self) -> AzuriteServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The connection string of a session-wide Azurite blob service."""
    with AzuriteServer(tmp_path_factory.mktemp("azurite")) as server:
        yield server.connection_string

"""dcmtk's dcmqrscp as a real remote archive (an older PACS) for the prefetch tests.

QrArchive writes a dcmqrscp configuration in its folder (one storage area
for its AE title, readable by any calling AE; the move destinations it may
send to in its HostTable), indexes DICOM files into that area with
dcmqridx, and runs dcmqrscp in its default forking mode (one child process
per association, as it runs in production) on a free port. Like storescp it
has no option to bind one address and listens on all interfaces; the tests
only talk to it over 127.0.0.1.
Readiness is a C-ECHO, polled with a deadline; stop is SIGTERM to its
process group (the children too), then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import dcmtk

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class QrArchive:
    def __init__(self, folder: Path, *, ae_title: str = "QRARCHIVE",
                 destinations: Mapping[str, int] | None = None) -> None:
        """`destinations`: AE title -> port on 127.0.0.1 of every allowed move destination."""
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.port = dcmtk.free_port()
        self.destinations = dict(destinations or {})
        self.storage = self.folder / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config_path = self.folder / "dcmqrscp.cfg"
        self.log_path = self.folder / "dcmqrscp.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.files: list[Path] = []

    def load(self, paths: Iterable[Path]) -> None:
        """Copy files into the storage area and index them (dcmqridx)."""
        copied = []
        for path in paths:
            target = self.storage / f"{len(self.files) + len(copied):05d}.dcm"
            shutil.copyfile(path, target)
            copied.append(target)
        if copied:
            dcmtk.run_tool("dcmqridx", str(self.storage), *map(str, copied)).check()
        self.files += copied

    def _write_config(self) -> None:
        hosts = "\n".join(f"dest{i} = ({ae}, 127.0.0.1, {port})"
                          for i, (ae, port) in enumerate(self.destinations.items()))
        self.config_path.write_text(
            f"NetworkTCPPort = {self.port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n\n"
            f"HostTable BEGIN\n{hosts}\nHostTable END\n\n"
            "VendorTable BEGIN\nVendorTable END\n\n"
            f"AETable BEGIN\n{self.ae_title} {self.storage} R (200, 1024mb) ANY\nAETable END\n")

    def start(self) -> QrArchive:
        self._write_config()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [dcmtk.dcmtk_tool("dcmqrscp"), "-c", str(self.config_path), "--fork",
                 "-dhl", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.folder)
        deadline = time.monotonic() + READY_TIMEOUT
        while not dcmtk.echoscu(self.port, aec=self.ae_title).ok:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"dcmqrscp not ready:\n{self.log()}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT)
        # Forked children of the last associations may outlive the parent briefly.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def __enter__(self) -> QrArchive:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""A private Orthanc for the benchmarks (Debian's `orthanc`, and `orthanc-dicomweb` for
bench/web.py): the reference the issue-16 and issue-17 figures put pacs-edge beside.

Each Orthanc gets its own folder (config JSON, storage area, SQLite index), free ports
for DICOM and HTTP, and runs in its own process group like every bench server
(common.Server). Configuration, kept close to Orthanc's defaults except where a
comparison needs it:

- loopback only: Orthanc 1.10 binds every address, so it refuses other hosts instead
  (HTTP: RemoteAccessAllowed false; DICOM: no DicomAlwaysAllow*, only the registered
  AEs from 127.0.0.1, DicomCheckModalityHost);
- durable like the box: SyncStorageArea (fsync of each stored file, the 1.10 default);
- the bench AEs registered in DicomModalities (BENCH with every service allowed, the
  C-MOVE destinations with their ports), so known-AE checks stay on;
- the largest PDU the dcmtk references get (MaximumPduLength 131072, storescp -pdu,
  dcmqrscp MaxPDUSize); 4 DICOM threads (the 1.10 default, one per association of
  the 4-association cases); synchronous C-MOVE (the default);
- no limits (LimitFindResults/Instances, MaximumStorageSize, MaximumPatientCount 0),
  no jobs saved, HTTP without authentication unless users are given (web.py's).
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
from common import (
    BENCH_AE,
    DATA,
    HOST,
    READY_TIMEOUT,
    BenchError,
    Server,
    console,
    free_port,
    fresh_dir,
)

ORTHANC_BIN = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
ORTHANC_AE = "ORTHANC"
MAX_PDU = 131072
UPLOAD_THREADS = 8


def missing(*, dicomweb: bool = False) -> str:
    """Why Orthanc cannot be measured here, or "" when it can."""
    needed = [ORTHANC_BIN, *([DICOMWEB_PLUGIN] if dicomweb else [])]
    absent = [p for p in needed if not Path(p).exists()]
    if absent:
        packages = "orthanc orthanc-dicomweb" if dicomweb else "orthanc"
        return f"Orthanc not measured: {', '.join(absent)} missing (apt-get install {packages})"
    return ""


@functools.cache
def version() -> str:
    """Orthanc's version ("1.10.1"), or "?" when it does not say."""
    try:
        out = subprocess.run([ORTHANC_BIN, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    words = out.split()  # "/usr/sbin/Orthanc 1.10.1" then the copyright
    return words[1] if len(words) > 1 and words[0].endswith("Orthanc") else "?"


class Orthanc(Server):
    """Orthanc on a folder (kept if it holds a storage area and index already)."""

    def __init__(self, folder: Path, *, destinations: dict[str, int] | None = None,
                 users: dict[str, str] | None = None, dicomweb: bool = False,
                 log_name: str = "orthanc.log") -> None:
        super().__init__("Orthanc", ORTHANC_AE, free_port(), folder.parent / log_name)
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.http_port = free_port()
        self.base = f"http://{HOST}:{self.http_port}"
        self.http = requests.Session()
        self.http.trust_env = False  # no proxies from the environment on loopback
        if users:
            self.http.auth = next(iter(users.items()))
        modalities: dict[str, Any] = {
            "bench": {"AET": BENCH_AE, "Host": HOST, "Port": 1, "AllowEcho": True,
                      "AllowFind": True, "AllowGet": True, "AllowMove": True,
                      "AllowStore": True}}
        for n, (ae, port) in enumerate((destinations or {}).items()):
            modalities[f"dest{n}"] = {"AET": ae, "Host": HOST, "Port": port}
        self.config: dict[str, Any] = {
            "Name": "bench", "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"), "StorageCompression": False,
            "SyncStorageArea": True, "MaximumStorageCacheSize": 0,
            "MaximumStorageSize": 0, "MaximumPatientCount": 0,
            "LimitFindResults": 0, "LimitFindInstances": 0,
            "Plugins": [DICOMWEB_PLUGIN] if dicomweb else [],
            "HttpServerEnabled": True, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users),
            "RegisteredUsers": users or {}, "SslEnabled": False, "KeepAlive": True,
            "TcpNoDelay": True, "OrthancExplorerEnabled": False,
            "DicomServerEnabled": True, "DicomAet": ORTHANC_AE, "DicomPort": self.port,
            "DicomCheckCalledAet": False, "DicomCheckModalityHost": True,
            "DicomAlwaysAllowEcho": False, "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowFind": False, "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False, "DicomModalities": modalities,
            "DicomThreadsCount": 4, "MaximumPduLength": MAX_PDU, "SynchronousCMove": True,
            "SaveJobs": False, "StableAge": 1,
        }
        if dicomweb:
            self.config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/",
                                       "EnableWado": False, "Host": f"{HOST}:{self.http_port}",
                                       "Ssl": False}

    def start(self) -> Orthanc:
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(self.config, indent=2))
        self.spawn([ORTHANC_BIN, str(cfg)], cwd=self.folder)
        try:
            self.wait_echo()
            self._wait_http()
        except BenchError:
            self.stop()
            raise
        return self

    def _wait_http(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                self.rest("GET", "/system")
                return
            except (requests.RequestException, BenchError) as exc:
                if time.monotonic() > deadline:
                    raise BenchError(f"Orthanc REST not answering: {exc}") from exc
            time.sleep(0.1)

    def rest(self, method: str, path: str, **kwargs: Any) -> Any:
        answer = self.http.request(method, self.base + path, timeout=300, **kwargs)
        if answer.status_code != 200:
            raise BenchError(f"Orthanc {method} {path}: {answer.status_code} {answer.text[:200]}")
        return answer.json() if answer.content else None

    def instances(self) -> int:
        return int(self.rest("GET", "/statistics")["CountInstances"])

    def upload(self, files: Sequence[Path], threads: int = UPLOAD_THREADS) -> None:
        """POST every file to /instances, `threads` at once (a session per thread)."""
        def one(chunk: Sequence[Path]) -> None:
            with requests.Session() as http:
                http.trust_env = False
                http.auth = self.http.auth
                for path in chunk:
                    answer = http.post(f"{self.base}/instances", data=path.read_bytes(),
                                       headers={"Content-Type": "application/dicom"},
                                       timeout=300)
                    if answer.status_code != 200:
                        raise BenchError(f"Orthanc upload of {path.name}: {answer.status_code}")

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, [files[n::threads] for n in range(threads)]))

    def stop(self) -> None:
        self.http.close()
        super().stop()


def filled(folder: Path, files: Sequence[Path], key: str, **kwargs: Any) -> Orthanc:
    """A started Orthanc on `folder` holding `files`. The filled storage area and index
    are cached in bench/out/data/orthanc-<key>-<version> (filled once over REST, in
    parallel); each run starts on a copy (stored files hard-linked: Orthanc does not
    rewrite them; the index copied)."""
    cache = DATA / f"orthanc-{key}-{version()}"
    if not (cache / "complete").exists():
        shutil.rmtree(cache, ignore_errors=True)
        fresh_dir(folder)
        orthanc = Orthanc(folder, **kwargs).start()
        try:
            start = time.monotonic()
            orthanc.upload(files)
            if orthanc.instances() != len(files):
                raise BenchError(f"Orthanc holds {orthanc.instances()} of {len(files)}")
            console.print(f"filled Orthanc with {len(files)} instances in "
                          f"{time.monotonic() - start:.0f} s (cached in {cache})")
        finally:
            orthanc.stop()
        cache.mkdir(parents=True)
        shutil.copytree(folder / "storage", cache / "storage")
        shutil.copytree(folder / "index", cache / "index")
        (cache / "complete").write_text(f"{len(files)}\n")
    fresh_dir(folder)
    shutil.copytree(cache / "storage", folder / "storage", copy_function=_link)
    shutil.copytree(cache / "index", folder / "index")
    return Orthanc(folder, **kwargs).start()


def _link(src: str, dst: str) -> None:
    try:
        Path(dst).hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)

"""Cloud sync: encrypted replicate and recall against Azurite, next to the plain SDK.

What one run measures, on a real Azurite (tests/azurite.py) started for the run:
- replicate: `pacs-edge sync --once --stable-after 0` on a fresh data home that
  holds the CT study (`pacs-edge import`ed, untimed) and whose `[cloud]` names a
  fresh `azure://` container and a 0600 credentials file; timed from process
  start to exit, so it covers encryption, upload and verification;
- its reference: a plain azure-storage-blob upload of the same bytes (the study's
  files concatenated, read into memory, then `BlobClient.upload_blob(data,
  max_concurrency=4)`, no encryption) into another fresh container, also as a
  whole process (interpreter start, imports and file reads included on both
  sides);
- recall: `pacs-edge evict` (untimed), then `pacs-edge recall` timed the same
  way; every recalled file must hash as it did before the eviction;
- its reference: `download_blob(max_concurrency=4).readinto()` of the plain blob
  into one file, fsync'd once;
- peak RSS of each pacs-edge process (`/usr/bin/time -v`, "Maximum resident set
  size"), next to an idle `sync --once` pass on the same home (nothing to do:
  interpreter, imports, SQLite); the target is < 300 MB whatever the study size,
  so the same is run once with a bigger study (--big-slices) as well;
- fixed cost: the idle pass's seconds next to a reference process that only
  imports the SDK and builds a client, since both sides are timed as processes;
- CPU (user + system) of each process, and of Azurite while it serves it: with
  Azurite on the same machine, CPU either side spends is CPU the other lacks.
Throughput is the study's bytes (the sum of its files' sizes) over seconds, on
both sides. Runs alternate which side goes first. Each figure is the median of
--repeats runs (default BENCH_REPEATS, else 3); the bigger study runs once.

Also run as a helper: `sync.py --plain upload|download|noop CONTAINER
CREDENTIALS LIST_OR_FILE` (the reference side, in its own process).
Run as bench/sync.py, this file is what `import sync` finds first: the project's
sync package is out of reach here (pacs-edge runs in its own processes anyway).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    MB,
    WORK,
    BenchError,
    Figure,
    console,
    ct_study,
    files_under,
    fresh_dir,
    group_cpu,
    pacs_edge,
    report,
    run,
    total_bytes,
)

TIME = "/usr/bin/time"
RSS_TARGET_MB = 300.0
THROUGHPUT_TARGET = 0.70
CONCURRENCY = 4
# Per process: two runs at once (make bench while someone tries a change) must not
# share data homes, Azurite folders or /usr/bin/time's output.
RUN = WORK / f"sync-{os.getpid()}"
_TIME_FIELDS = {
    "rss_kb": re.compile(r"Maximum resident set size \(kbytes\): (\d+)"),
    "user": re.compile(r"User time \(seconds\): ([\d.]+)"),
    "system": re.compile(r"System time \(seconds\): ([\d.]+)"),
}


@dataclass
class Measured:
    """One process run: wall-clock seconds, peak RSS and CPU of the process."""

    seconds: float
    rss_mb: float
    cpu_s: float
    azurite_cpu_s: float = 0.0


@dataclass
class Side:
    """Samples of one subject across runs."""

    seconds: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    azurite_cpu_s: list[float] = field(default_factory=list)

    def add(self, m: Measured) -> None:
        self.seconds.append(m.seconds)
        self.rss_mb.append(m.rss_mb)
        self.cpu_s.append(m.cpu_s)
        self.azurite_cpu_s.append(m.azurite_cpu_s)


SIDES = ("replicate", "upload", "recall", "download", "idle", "noop")


# --- processes ---------------------------------------------------------------------

def measured(argv: list[str], azurite_pid: int, *, expect: str = "") -> Measured:
    """Run `argv` under /usr/bin/time -v: wall clock, its peak RSS and CPU."""
    stats = RUN / "time.txt"
    before = group_cpu(azurite_pid)
    start = time.perf_counter()
    output = run([TIME, "-v", "-o", str(stats), *argv], timeout=1800)
    seconds = time.perf_counter() - start
    azurite = group_cpu(azurite_pid) - before
    if expect and expect not in output:
        raise BenchError(f"{' '.join(argv[:3])}: expected {expect!r} in:\n{output[-2000:]}")
    text = stats.read_text()
    found = {k: p.search(text) for k, p in _TIME_FIELDS.items()}
    if not all(found.values()):
        raise BenchError(f"unexpected /usr/bin/time output:\n{text}")
    values = {k: float(m.group(1)) for k, m in found.items() if m}
    return Measured(seconds, values["rss_kb"] / 1024, values["user"] + values["system"],
                    azurite)


def plain(op: str, container: str, credentials: Path, target: Path, pid: int) -> Measured:
    return measured([sys.executable, str(Path(__file__).resolve()), "--plain", op, container,
                     str(credentials), str(target)], pid)


# --- data homes --------------------------------------------------------------------

def write_secret(path: Path, text: str) -> Path:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path


def new_home(home: Path, study: Path, container: str, credentials: Path) -> None:
    """A fresh data home holding `study`, replicating to azure://`container`."""
    import tomlkit

    shutil.rmtree(home, ignore_errors=True)
    run([*pacs_edge(), "init", "--home", str(home), "--tls-port", "0", "--dicom-port", "0"])
    run([*pacs_edge(), "import", str(study), "--home", str(home)], timeout=1800)
    path = home / "pacs-edge.toml"
    doc = tomlkit.parse(path.read_text(encoding="utf-8"))
    if "cloud" not in doc:
        doc["cloud"] = tomlkit.table()
    doc["cloud"]["url"] = f"azure://{container}"  # type: ignore[index]
    doc["cloud"]["credentials_file"] = str(credentials)  # type: ignore[index]
    path.write_text(tomlkit.dumps(doc), encoding="utf-8")


def store_hashes(home: Path) -> dict[str, str]:
    """SHA-256 of every indexed instance file of a data home, by relative path."""
    from appliance.base.config import load_config

    root = load_config(home).store.path
    db = sqlite3.connect(f"file:{home / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        paths = [row[0] for row in db.execute("SELECT path FROM instances")]
    finally:
        db.close()
    return {p: hashlib.sha256((root / p).read_bytes()).hexdigest() for p in paths}


def pack_bytes(home: Path) -> int:
    db = sqlite3.connect(f"file:{home / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT SUM(pack_size) FROM packs WHERE state = 'verified'").fetchone()
    finally:
        db.close()
    return int(row[0] or 0)


def study_uid(study: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(files_under(study)[0], stop_before_pixels=True).StudyInstanceUID)


def drop_containers(connection: str, *names: str) -> None:
    from azure.core.exceptions import ResourceNotFoundError
    from azure.storage.blob import BlobServiceClient

    with BlobServiceClient.from_connection_string(connection) as service:
        for name in names:
            with contextlib.suppress(ResourceNotFoundError):
                service.delete_container(name)


# --- one run -----------------------------------------------------------------------

def one_run(tag: str, study: Path, uid: str, sides: dict[str, Side], azurite_pid: int,
            connection: str, credentials: Path, *, agent_first: bool) -> dict[str, int]:
    """Replicate + upload, then recall + download, of `study`; adds to `sides`."""
    work = fresh_dir(RUN / "run")
    home = work / "home"
    listing = work / "files.txt"
    files = files_under(study)
    listing.write_text("\n".join(map(str, files)) + "\n")
    enc, ref = f"enc-{tag}", f"plain-{tag}"
    new_home(home, study, enc, credentials)
    edge = [*pacs_edge()]
    try:
        def replicate() -> None:
            sides["replicate"].add(measured(
                [*edge, "sync", "--once", "--stable-after", "0", "--home", str(home)],
                azurite_pid, expect="replicated 1 study version(s)"))

        def upload() -> None:
            sides["upload"].add(plain("upload", ref, credentials, listing, azurite_pid))

        for step in ((replicate, upload) if agent_first else (upload, replicate)):
            step()
        # Nothing left to do: the baseline footprint of the same command.
        sides["idle"].add(measured(
            [*edge, "sync", "--once", "--stable-after", "0", "--home", str(home)],
            azurite_pid, expect="replicated 0 study version(s)"))
        sides["noop"].add(plain("noop", ref, credentials, listing, azurite_pid))
        before = store_hashes(home)
        extra = {"pack_bytes": pack_bytes(home)}
        run([*edge, "evict", uid, "--without-escrow", "--home", str(home)])

        def recall() -> None:
            sides["recall"].add(measured([*edge, "recall", uid, "--home", str(home)],
                                         azurite_pid, expect=f"recalled {len(files)} instance"))

        def download() -> None:
            sides["download"].add(plain("download", ref, credentials, work / "plain.bin",
                                        azurite_pid))
            (work / "plain.bin").unlink()

        for step in ((recall, download) if agent_first else (download, recall)):
            step()
        if store_hashes(home) != before:
            raise BenchError("recalled files differ from the files before eviction")
        return extra
    finally:
        drop_containers(connection, enc, ref)
        shutil.rmtree(work, ignore_errors=True)


# --- the reference side, in its own process ----------------------------------------

def plain_main(op: str, container: str, credentials: Path, target: Path) -> None:
    from azure.storage.blob import BlobServiceClient

    connection = credentials.read_text().strip()
    with BlobServiceClient.from_connection_string(connection) as service:
        blob = service.get_blob_client(container, "study")
        if op == "noop":  # the reference's fixed cost: interpreter, imports, client
            return
        if op == "upload":
            service.create_container(container)
            paths = target.read_text().split()
            data = b"".join(Path(p).read_bytes() for p in paths)
            blob.upload_blob(data, max_concurrency=CONCURRENCY)
        else:
            with open(target, "wb") as fh:
                blob.download_blob(max_concurrency=CONCURRENCY).readinto(fh)
                fh.flush()
                os.fsync(fh.fileno())


# --- figures -----------------------------------------------------------------------

def figures(size: int, sides: dict[str, Side], big_size: int,
            big: dict[str, Side] | None) -> list[Figure]:
    def rate(side: Side, n: int) -> list[float]:
        return [n / MB / s for s in side.seconds]

    put = Figure("replicate (upload + verify)", "azure-storage-blob upload_blob, plain",
                 "MB/s", rate(sides["upload"], size))
    get = Figure("recall (download)", "azure-storage-blob download_blob, plain", "MB/s",
                 rate(sides["download"], size))
    idle = Figure("peak RSS", "pacs-edge sync --once, nothing to do", "MB",
                  sides["idle"].rss_mb, higher_is_better=False)
    rss_rep = Figure("peak RSS, replicate", "pacs-edge sync --once", "MB",
                     sides["replicate"].rss_mb, idle, higher_is_better=False,
                     note=f"(target < {RSS_TARGET_MB:.0f} MB)")
    rss_rec = Figure("peak RSS, recall", "pacs-edge recall", "MB", sides["recall"].rss_mb,
                     idle, higher_is_better=False, note=f"(target < {RSS_TARGET_MB:.0f} MB)")
    noop = Figure("fixed cost: start, imports, no transfer", "azure-storage-blob, no request",
                  "s", sides["noop"].seconds, higher_is_better=False)
    cpu_put = Figure("process CPU, upload", "azure-storage-blob upload_blob, plain", "CPU-s",
                     sides["upload"].cpu_s, higher_is_better=False)
    cpu_get = Figure("process CPU, download", "azure-storage-blob download_blob, plain",
                     "CPU-s", sides["download"].cpu_s, higher_is_better=False)
    az_put = Figure("Azurite CPU, upload", "azurite serving the plain upload", "CPU-s",
                    sides["upload"].azurite_cpu_s, higher_is_better=False)
    az_get = Figure("Azurite CPU, download", "azurite serving the plain download", "CPU-s",
                    sides["download"].azurite_cpu_s, higher_is_better=False)
    out = [
        put,
        Figure(put.name, "pacs-edge sync --once, encrypted", "MB/s",
               rate(sides["replicate"], size), put,
               note=f"(target >= {THROUGHPUT_TARGET:.2f}x)"),
        get,
        Figure(get.name, "pacs-edge recall, encrypted", "MB/s", rate(sides["recall"], size),
               get, note=f"(target >= {THROUGHPUT_TARGET:.2f}x)"),
        idle, rss_rep, rss_rec,
        noop,
        Figure(noop.name, "pacs-edge sync --once, nothing to do", "s", sides["idle"].seconds,
               noop, higher_is_better=False),
        cpu_put,
        Figure(cpu_put.name, "pacs-edge sync --once", "CPU-s", sides["replicate"].cpu_s,
               cpu_put, higher_is_better=False),
        cpu_get,
        Figure(cpu_get.name, "pacs-edge recall", "CPU-s", sides["recall"].cpu_s, cpu_get,
               higher_is_better=False),
        az_put,
        Figure(az_put.name, "azurite serving pacs-edge replicate", "CPU-s",
               sides["replicate"].azurite_cpu_s, az_put, higher_is_better=False),
        az_get,
        Figure(az_get.name, "azurite serving pacs-edge recall", "CPU-s",
               sides["recall"].azurite_cpu_s, az_get, higher_is_better=False),
    ]
    if big:
        label = f"{big_size / MB:.0f} MB study"
        bput = Figure(f"replicate, {label}", "azure-storage-blob upload_blob, plain", "MB/s",
                      rate(big["upload"], big_size))
        bget = Figure(f"recall, {label}", "azure-storage-blob download_blob, plain", "MB/s",
                      rate(big["download"], big_size))
        out += [
            bput,
            Figure(bput.name, "pacs-edge sync --once, encrypted", "MB/s",
                   rate(big["replicate"], big_size), bput),
            bget,
            Figure(bget.name, "pacs-edge recall, encrypted", "MB/s",
                   rate(big["recall"], big_size), bget),
            # Reference: the smaller study's median; a ratio near 1 means no growth.
            Figure(f"peak RSS, replicate, {label}", "pacs-edge sync --once", "MB",
                   big["replicate"].rss_mb, rss_rep, higher_is_better=False,
                   note="(ref.: the smaller study)"),
            Figure(f"peak RSS, recall, {label}", "pacs-edge recall", "MB",
                   big["recall"].rss_mb, rss_rec, higher_is_better=False,
                   note="(ref.: the smaller study)"),
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int,
                        default=int(os.environ.get("BENCH_SLICES", "300")))
    parser.add_argument("--big-slices", type=int, default=600,
                        help="a bigger study, run once, for RSS growth (0: skip)")
    parser.add_argument("--repeats", type=int,
                        default=int(os.environ.get("BENCH_REPEATS", "3")))
    parser.add_argument("--plain", nargs=4, help=argparse.SUPPRESS,
                        metavar=("OP", "CONTAINER", "CREDENTIALS", "TARGET"))
    args = parser.parse_args()
    if args.plain:
        op, container, credentials, target = args.plain
        plain_main(op, container, Path(credentials), Path(target))
        return

    from azurite import AzuriteServer

    if not Path(TIME).exists():
        raise SystemExit(f"{TIME} is missing (GNU time: apt-get install time)")
    study = ct_study(args.slices)
    size = total_bytes(files_under(study))
    uid = study_uid(study)
    big_study = ct_study(args.big_slices) if args.big_slices else None
    big_size = total_bytes(files_under(big_study)) if big_study else 0
    fresh_dir(RUN)
    sides = {name: Side() for name in SIDES}
    big: dict[str, Side] | None = None
    extra: dict[str, int] = {}
    failures = 0
    try:
        with AzuriteServer(RUN / "azurite") as azurite:
            assert azurite.proc is not None
            pid = azurite.proc.pid
            credentials = write_secret(RUN / "azure.conn", azurite.connection_string)
            for rep in range(args.repeats):
                try:
                    extra = one_run(f"r{rep + 1}", study, uid, sides, pid,
                                    azurite.connection_string, credentials,
                                    agent_first=rep % 2 == 0)
                except BenchError as exc:
                    failures += 1
                    console.print(f"[red]run {rep + 1} failed:[/red] {str(exc)[-1500:]}")
                    continue
                _progress(f"run {rep + 1}/{args.repeats}", size, sides)
            if big_study:
                big = {name: Side() for name in SIDES}
                try:
                    one_run("big", big_study, study_uid(big_study), big, pid,
                            azurite.connection_string, credentials, agent_first=True)
                    _progress(f"{args.big_slices} slices", big_size, big)
                except BenchError as exc:
                    failures += 1
                    console.print(f"[red]bigger study failed:[/red] {str(exc)[-1500:]}")
                    big = None
            credentials.unlink(missing_ok=True)
    finally:
        shutil.rmtree(RUN, ignore_errors=True)
    figs = figures(size, sides, big_size, big)
    report(f"Cloud sync against Azurite: {args.slices}-slice CT study ({size / MB:.0f} MB), "
           f"medians of {args.repeats}", "sync", figs,
           {"repeats": args.repeats, "study_bytes": size, "slices": args.slices,
            "big_slices": args.big_slices if big else 0, "big_study_bytes": big_size,
            "concurrency": CONCURRENCY, "failures": failures,
            "plain_upload": "files concatenated in memory, one blob, upload_blob "
                            f"max_concurrency={CONCURRENCY}",
            "plain_download": f"download_blob max_concurrency={CONCURRENCY} readinto one "
                              "file, fsync",
            "plain_rss_mb": {"upload": sides["upload"].rss_mb,
                             "download": sides["download"].rss_mb},
            **extra})
    if failures:
        raise SystemExit(1)


def _progress(label: str, size: int, sides: dict[str, Side]) -> None:
    def last(side: str) -> str:
        s = sides[side]
        return f"{size / MB / s.seconds[-1]:.1f} MB/s ({s.rss_mb[-1]:.0f} MB RSS)"

    console.print(f"{label}: replicate {last('replicate')}, upload {last('upload')}, "
                  f"recall {last('recall')}, download {last('download')}")


if __name__ == "__main__":
    main()

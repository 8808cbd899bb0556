"""Storage: the CT study sent with dcmtk storescu, on 1 and 4 associations, to
pacs-edge (workers=1; and workers=2 on 4) and, in the same run, to dcmtk storescp
writing to disk (and Orthanc when it is installed; it is not installed here).

Each run gets a fresh server and a fresh data home / output folder; the time
is from starting the storescu process(es) to the last one exiting. Figures:
instances/s and MB/s (10^6 bytes of Part 10 files), each as a median of the
runs, and the ratio to storescp's median on the same number of associations.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sqlite3
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import (
    BENCH_AE,
    DATA,
    HOST,
    MB,
    WORK,
    BenchError,
    EdgeServer,
    Figure,
    Server,
    console,
    ct_study,
    dcmtk,
    files_under,
    free_port,
    fresh_dir,
    repeats,
    report,
    scu_profile,
    serving,
    timed_parallel,
    total_bytes,
)

STORESCP_AE = "STORESCP"


@dataclass(frozen=True)
class Case:
    server: str  # "storescp" or "edge"
    associations: int
    workers: int = 1

    @property
    def label(self) -> str:
        if self.server == "storescp":
            return "dcmtk storescp"
        return f"pacs-edge workers={self.workers}"


def split(folder: Path, parts: int) -> list[Path]:
    """The study's files in `parts` folders (hard links, round robin), cached."""
    if parts == 1:
        return [folder]
    files = files_under(folder)
    root = DATA / f"{folder.name}-split{parts}"
    dirs = [root / str(n) for n in range(parts)]
    if sum(len(files_under(d)) for d in dirs if d.exists()) != len(files):
        shutil.rmtree(root, ignore_errors=True)
        for d in dirs:
            d.mkdir(parents=True)
        for n, f in enumerate(files):
            target = dirs[n % parts] / f"{n:05d}.dcm"
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)
    return dirs


def storescu_argv(port: int, aec: str, folder: Path, profile: Path) -> list[str]:
    return [dcmtk("storescu"), "-aet", BENCH_AE, "-aec", aec, "-xf", str(profile), "Default",
            "-to", "10", "-ta", "30", "-td", "120", "+sd", "+r", HOST, str(port), str(folder)]


def storescp(out: Path) -> Server:
    """dcmtk storescp: one process per association (--fork), bit preserving, its
    largest receive PDU. It does not fsync (pacs-edge does, before every ack)."""
    server = Server("storescp", STORESCP_AE, free_port(), out.parent / f"{out.name}.log")
    server.spawn([dcmtk("storescp"), "--fork", "-aet", STORESCP_AE, "-pdu", "131072", "+B",
                  "-dhl", "-od", str(out), str(server.port)])
    server.wait_echo()
    return server


def run_case(case: Case, folders: list[Path], profile: Path,
             expected: int) -> tuple[float, float]:
    """Seconds to send the study once to a fresh server of `case`, and the server's CPU
    seconds meanwhile; checks that every instance was stored."""
    if case.server == "storescp":
        out = fresh_dir(WORK / "storescp")
        with serving(storescp(out)) as server:
            seconds, cpu = _send(server, folders, profile)
        received = len(files_under(out))
        shutil.rmtree(out, ignore_errors=True)
    else:
        home = WORK / "edge-home"
        shutil.rmtree(home, ignore_errors=True)
        edge = EdgeServer(home, workers=case.workers)
        with serving(edge.start()):
            seconds, cpu = _send(edge, folders, profile)
        received = edge.instances()
        shutil.rmtree(home, ignore_errors=True)
    if received != expected:
        raise BenchError(f"{case.label}: {received} of {expected} instances stored")
    return seconds, cpu


def _send(server: Server, folders: list[Path], profile: Path) -> tuple[float, float]:
    before = server.cpu_seconds()
    seconds = timed_parallel([storescu_argv(server.port, server.ae_title, f, profile)
                              for f in folders])
    time.sleep(0.2)  # let storescp's forked children exit and be reaped
    return seconds, server.cpu_seconds() - before


def sha256_seconds(files: list[Path]) -> float:
    """Seconds to hash the study's bytes (already in memory) on one core: pacs-edge
    hashes every dataset on its ingest path."""
    blobs = [f.read_bytes() for f in files]
    start = time.perf_counter()
    for blob in blobs:
        hashlib.sha256(blob).hexdigest()
    return time.perf_counter() - start


def durable_floor_seconds(instance_bytes: int, folder: Path, count: int = 30) -> float:
    """Median seconds of the durable part of one ingest done the plain way on this disk:
    write a file of `instance_bytes`, fsync, rename, fsync the folder, and commit one row
    in SQLite (WAL, synchronous=FULL). storescp does none of it; pacs-edge must before
    each acknowledgement, so on one association 1/this caps its instances/s."""
    folder = fresh_dir(folder)
    data = os.urandom(instance_bytes)
    db = sqlite3.connect(folder / "floor.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (n INTEGER)")
    dir_fd = os.open(folder, os.O_RDONLY)
    times = []
    try:
        for n in range(count):
            start = time.perf_counter()
            tmp = folder / f"{n}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.rename(folder / f"{n}.dcm")
            os.fsync(dir_fd)
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t VALUES (?)", (n,))
            db.execute("COMMIT")
            times.append(time.perf_counter() - start)
    finally:
        os.close(dir_fd)
        db.close()
        shutil.rmtree(folder, ignore_errors=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=int(os.environ.get("BENCH_SLICES", "300")))
    parser.add_argument("--repeats", type=int, default=repeats())
    args = parser.parse_args()

    study = ct_study(args.slices)
    files = files_under(study)
    size = total_bytes(files)
    WORK.mkdir(parents=True, exist_ok=True)
    profile = scu_profile(files[:1], WORK / "storescu.cfg")
    # workers=2 only on 4 associations: one association is served by one worker.
    cases = [Case("storescp", 1), Case("edge", 1),
             Case("storescp", 4), Case("edge", 4), Case("edge", 4, workers=2)]
    seconds: dict[Case, list[float]] = {c: [] for c in cases}
    cpu: dict[Case, list[float]] = {c: [] for c in cases}
    failures: dict[Case, int] = {}
    hashing: list[float] = []
    floor: list[float] = []
    for rep in range(args.repeats):  # round robin: noise lands on every case alike
        hashing.append(sha256_seconds(files))
        floor.append(durable_floor_seconds(size // len(files), WORK / "floor"))
        for case in cases:
            folders = split(study, case.associations)
            try:
                s, c = run_case(case, folders, profile, len(files))
            except BenchError as exc:  # recorded, and the other cases go on
                failures[case] = failures.get(case, 0) + 1
                console.print(f"[red]run {rep + 1} {case.label} x{case.associations} "
                              f"failed:[/red] {str(exc)[-1500:]}")
                continue
            seconds[case].append(s)
            cpu[case].append(c)
            console.print(f"run {rep + 1}/{args.repeats} {case.label} x{case.associations}: "
                          f"{s:.2f} s, {size / MB / s:.1f} MB/s, server CPU {c:.2f} s")

    figures: list[Figure] = []
    for assoc in (1, 4):
        ref = Case("storescp", assoc)
        per_s = _figures(ref, seconds[ref], assoc, len(files), size, None,
                         failures.get(ref, 0))
        ref_cpu = Figure(f"server CPU x{assoc} assoc", ref.label, "CPU-s", cpu[ref],
                         higher_is_better=False)
        ref_cpu.reference = ref_cpu
        figures += [*per_s, ref_cpu]
        for case in cases:
            if case.server == "edge" and case.associations == assoc:
                figures += _figures(case, seconds[case], assoc, len(files), size, per_s,
                                    failures.get(case, 0))
                figures.append(Figure(ref_cpu.name, case.label, "CPU-s", cpu[case], ref_cpu,
                                      higher_is_better=False))
    sha = Figure("SHA-256 of the study", "hashlib, one core", "MB/s",
                 [size / MB / s for s in hashing], figures[1],
                 note="(files in memory: a cap on one association)")
    durable = Figure("durable-write floor, serial", "write+fsync+rename+dir fsync+commit",
                     "inst/s", [1 / s for s in floor], figures[0],
                     note="(a cap on one association)")
    figures += [sha, durable, _orthanc_note()]
    report(f"C-STORE of {len(files)} CT slices ({size / MB:.0f} MB), dcmtk storescu",
           "store", figures, {"instances": len(files), "bytes": size,
                              "seconds": {f"{c.label} x{c.associations}": s
                                          for c, s in seconds.items()},
                              "server_cpu_seconds": {f"{c.label} x{c.associations}": s
                                                     for c, s in cpu.items()}})


def _figures(case: Case, secs: list[float], assoc: int, count: int, size: int,
             ref: list[Figure] | None, failed: int) -> list[Figure]:
    def make(unit: str, per: Callable[[float], float]) -> Figure:
        return Figure(f"store x{assoc} assoc", case.label, unit, [per(s) for s in secs],
                      note=f"({failed} failed)" if failed else "")

    inst, mbs = make("inst/s", lambda s: count / s), make("MB/s", lambda s: size / MB / s)
    if ref is None:
        inst.reference, mbs.reference = inst, mbs  # the reference row: ratio 1.00
        return [inst, mbs]
    inst.reference, mbs.reference = ref
    return [inst, mbs]


def _orthanc_note() -> Figure:
    found = shutil.which("Orthanc")
    note = "installed but not wired in" if found else "not installed: skipped"
    return Figure("store (Orthanc)", "Orthanc", "MB/s", [], None, note=note)


if __name__ == "__main__":
    start = time.monotonic()
    main()
    console.print(f"store bench took {time.monotonic() - start:.0f} s")

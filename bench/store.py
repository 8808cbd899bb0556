"""Storage: dcmtk storescu sending to pacs-edge (workers=1; and workers=2 on 4
associations), to dcmtk storescp writing to disk and to Orthanc (bench/orthanc.py:
fsync per file, like the box), in the same run, servers interleaved:

- the CT study (BENCH_SLICES, 300 slices) on 1 association and on 4 (its files
  split round robin into 4 folders, one storescu each, all started at once);
- many small studies: BENCH_SMALL_STUDIES (2000) one-instance studies over 4
  associations (0 skips it).

Each run gets a fresh server and a fresh data home / output folder (set aside
when the run ends and deleted when the bench ends: see common.set_aside); the time
is from starting the storescu process(es) to the last one exiting. Figures:
instances/s and MB/s (10^6 bytes of Part 10 files), each as a median of the
runs, and the ratio to storescp's median in the same case; the server's CPU
per instance (user+system of its process group from /proc, before and after)
and its peak RSS per process (VmHWM, sampled; per worker for pacs-edge); the
machine's CPU per instance (every process and the kernel: server, storescu
clients, flushing) and the cores left idle during the send, from /proc/stat.
Every run checks that every instance was stored.

Two caps measured on the same disk, without a server or a network: the serial
durable-write floor (one instance after another, as on one association) and the
file flushes alone of four writers at once (as on four associations).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sqlite3
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import orthanc
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
    machine_cpu,
    remove_spent,
    repeats,
    report,
    scu_profile,
    serving,
    set_aside,
    small_studies,
    timed_parallel,
    total_bytes,
)

STORESCP_AE = "STORESCP"
CT, SMALL = "CT", "small studies"


@dataclass(frozen=True)
class Case:
    server: str  # "storescp", "edge" or "orthanc"
    associations: int
    workers: int = 1
    data: str = CT

    @property
    def label(self) -> str:
        if self.server == "storescp":
            return "dcmtk storescp"
        if self.server == "orthanc":
            return f"Orthanc {orthanc.version()}"
        return f"pacs-edge workers={self.workers}"

    @property
    def measure(self) -> str:
        return f"store x{self.associations} assoc" if self.data == CT else \
            f"small studies x{self.associations} assoc"


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


@dataclass
class Sample:
    seconds: float
    cpu: float  # server CPU seconds during the send
    rss: float  # MB, the largest peak RSS of one server process
    machine: float  # CPU seconds of the whole machine during the send
    idle: float  # idle core-seconds of the machine during the send


def run_case(case: Case, folders: list[Path], profile: Path, expected: int) -> Sample:
    """Send the files once to a fresh server of `case`; checks that every instance was
    stored."""
    if case.server == "storescp":
        out = fresh_dir(WORK / "storescp")
        with serving(storescp(out)) as server:
            sample = _send(server, folders, profile)
        received = len(files_under(out))
        set_aside(out)
    elif case.server == "orthanc":
        folder = fresh_dir(WORK / "store-orthanc")
        with serving(orthanc.Orthanc(folder, log_name="store-orthanc.log").start()) as server:
            sample = _send(server, folders, profile)
            received = server.instances()
        set_aside(folder)
    else:
        home = WORK / "edge-home"
        shutil.rmtree(home, ignore_errors=True)
        edge = EdgeServer(home, workers=case.workers)
        with serving(edge.start()):
            sample = _send(edge, folders, profile)
        received = edge.instances()
        set_aside(home)
    if received != expected:
        raise BenchError(f"{case.label}: {received} of {expected} instances stored")
    return sample


def _send(server: Server, folders: list[Path], profile: Path) -> Sample:
    before = server.cpu_seconds()
    with server.peak_rss() as rss:
        busy, idle = machine_cpu()
        seconds = timed_parallel([storescu_argv(server.port, server.ae_title, f, profile)
                                  for f in folders])
        busy_after, idle_after = machine_cpu()
        time.sleep(0.2)  # let storescp's forked children exit and be reaped
    return Sample(seconds, server.cpu_seconds() - before, rss.mb, busy_after - busy,
                  idle_after - idle)


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
        set_aside(folder)
    return statistics.median(times)


def parallel_flushes_rate(instance_bytes: int, folder: Path, writers: int = 4,
                          count: int = 60) -> float:
    """Instances per second of `writers` threads each writing files of `instance_bytes`
    and fdatasyncing each, all at once: what the disk allows four associations when each
    instance's bytes must be durable before its answer, before any rename, folder fsync
    or index commit (which pacs-edge shares between concurrent associations)."""
    folder = fresh_dir(folder)
    data = os.urandom(instance_bytes)

    def write(writer: int) -> None:
        for n in range(count):
            fd = os.open(folder / f"{writer}-{n}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o644)
            try:
                os.write(fd, data)
                os.fdatasync(fd)
            finally:
                os.close(fd)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    set_aside(folder)
    return writers * count / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=int(os.environ.get("BENCH_SLICES", "300")))
    parser.add_argument("--small", type=int,
                        default=int(os.environ.get("BENCH_SMALL_STUDIES", "2000")))
    parser.add_argument("--repeats", type=int, default=repeats())
    args = parser.parse_args()

    study = ct_study(args.slices)
    files = files_under(study)
    size = total_bytes(files)
    WORK.mkdir(parents=True, exist_ok=True)
    remove_spent()  # an interrupted run's
    data: dict[str, tuple[Path, list[Path], Path]] = {
        CT: (study, files, scu_profile(files[:1], WORK / "storescu.cfg"))}
    if args.small:
        small = small_studies(args.small)
        data[SMALL] = (DATA / f"studies-{args.small}", small,
                       scu_profile(small, WORK / "storescu-small.cfg"))
    orthanc_note = orthanc.missing()
    servers = ["storescp", "edge"] + ([] if orthanc_note else ["orthanc"])
    cases = [Case(s, 1) for s in servers]
    cases += [Case(s, 4) for s in servers] + [Case("edge", 4, workers=2)]
    if args.small:
        cases += [Case(s, 4, data=SMALL) for s in servers]
    samples: dict[Case, list[Sample]] = {c: [] for c in cases}
    failures: dict[Case, int] = {}
    hashing: list[float] = []
    floor: list[float] = []
    flushes4: list[float] = []
    load = [round(x, 2) for x in os.getloadavg()]
    for rep in range(args.repeats):  # round robin: noise lands on every case alike
        hashing.append(sha256_seconds(files))
        floor.append(durable_floor_seconds(size // len(files), WORK / "floor"))
        flushes4.append(parallel_flushes_rate(size // len(files), WORK / "flushes4"))
        for case in cases:
            folder, sent, profile = data[case.data]
            try:
                sample = run_case(case, split(folder, case.associations), profile, len(sent))
            except BenchError as exc:  # recorded, and the other cases go on
                failures[case] = failures.get(case, 0) + 1
                console.print(f"[red]run {rep + 1} {case.label} {case.measure} "
                              f"failed:[/red] {str(exc)[-1500:]}")
                continue
            samples[case].append(sample)
            console.print(f"run {rep + 1}/{args.repeats} {case.label} {case.measure}: "
                          f"{sample.seconds:.2f} s, {len(sent) / sample.seconds:.0f} inst/s, "
                          f"server CPU {sample.cpu:.2f} s, peak RSS {sample.rss:.0f} MB")
    load_after = [round(x, 2) for x in os.getloadavg()]
    remove_spent()

    figures: list[Figure] = []
    for group in dict.fromkeys((c.data, c.associations) for c in cases):
        count, nbytes = len(data[group[0]][1]), total_bytes(data[group[0]][1])
        group_cases = [c for c in cases if (c.data, c.associations) == group]
        ref = group_cases[0]  # storescp
        ref_figs = _figures(ref, samples[ref], count, nbytes, None, failures.get(ref, 0))
        figures += ref_figs
        for case in group_cases[1:]:
            figures += _figures(case, samples[case], count, nbytes, ref_figs,
                                failures.get(case, 0))
    sha = Figure("SHA-256 of the study", "hashlib, one core", "MB/s",
                 [size / MB / s for s in hashing], figures[1],
                 note="(files in memory: a cap on one association)")
    durable = Figure("durable-write floor, serial", "write+fsync+rename+dir fsync+commit",
                     "inst/s", [1 / s for s in floor], figures[0],
                     note="(a cap on one association)")
    storescp4 = next(f for f in figures if f.name == "store x4 assoc"
                     and f.subject == "dcmtk storescp" and f.unit == "inst/s")
    flushes = Figure("file flushes alone, 4 writers", "write+fdatasync, 4 threads at once",
                     "inst/s", flushes4, storescp4, note="(the disk's cap on 4 associations)")
    figures += [sha, durable, flushes]
    if orthanc_note:
        console.print(f"[yellow]{orthanc_note}[/yellow]")
    report(f"C-STORE by dcmtk storescu: {len(files)} CT slices ({size / MB:.0f} MB) on 1 and "
           f"4 associations, {args.small} one-instance studies on 4; load {load[0]} -> "
           f"{load_after[0]}", "store", figures,
           {"instances": len(files), "bytes": size, "small_studies": args.small,
            "orthanc": orthanc_note or f"Orthanc {orthanc.version()}",
            "load_before": load, "load_after": load_after,
            "seconds": {f"{c.label} {c.measure}": [s.seconds for s in v]
                        for c, v in samples.items()},
            "server_cpu_seconds": {f"{c.label} {c.measure}": [s.cpu for s in v]
                                   for c, v in samples.items()}})


def _figures(case: Case, runs: list[Sample], count: int, size: int,
             ref: list[Figure] | None, failed: int) -> list[Figure]:
    """inst/s, MB/s, server CPU per instance, peak RSS, machine CPU per instance and idle
    cores of one case, each with its storescp reference (`ref`, in this order), or as the
    reference when `ref` is None."""
    note = f"({failed} failed)" if failed else ""
    suffix = case.measure.removeprefix("store ")
    made = [
        Figure(case.measure, case.label, "inst/s", [count / r.seconds for r in runs], note=note),
        Figure(case.measure, case.label, "MB/s", [size / MB / r.seconds for r in runs],
               note=note),
        Figure(f"server CPU per instance {suffix}", case.label, "CPU-ms",
               [1000 * r.cpu / count for r in runs], higher_is_better=False, note=note),
        Figure(f"peak RSS per process {suffix}", case.label, "MB", [r.rss for r in runs],
               higher_is_better=False, note=note),
        Figure(f"machine CPU per instance {suffix}", case.label, "CPU-ms",
               [1000 * r.machine / count for r in runs], higher_is_better=False,
               note=note or "(server, clients and kernel)"),
        Figure(f"idle cores during the send {suffix}", case.label, "cores",
               [r.idle / r.seconds for r in runs], higher_is_better=False, note=note)]
    for n, fig in enumerate(made):
        fig.reference = fig if ref is None else ref[n]
    return made


if __name__ == "__main__":
    start = time.monotonic()
    main()
    console.print(f"store bench took {time.monotonic() - start:.0f} s")

"""Retrieve: C-MOVE (dcmtk movescu, to a dcmtk storescp destination) and C-GET
(dcmtk getscu into a folder) of the CT study from pacs-edge, next to dcmtk
dcmqrscp and Orthanc (bench/orthanc.py) serving the same files, in the same run,
on 1 association and on 4 (4 clients started at once, each pulling the whole
study); then the time of one retrieve of a single instance (IMAGE level), what each
C-MOVE or C-GET costs once whatever its size (association, plan, sub-association,
final response, release), which a large study's MB/s hides on a fast CPU.

pacs-edge's data home is filled through its own ingest path (see
common.populate); dcmqrscp indexes the generated files in place (dcmqridx);
Orthanc gets them over its REST API. Each retrieve runs `repeats()` times per
server, interleaved; the figure is MB/s (10^6 bytes of the study's Part 10 files
times the clients, over the wall time from starting the movescu / getscu
processes to the last one exiting) and the ratio of medians to dcmqrscp's; and
the server's CPU per instance sent. Every run checks that every instance arrived
(the destination storescp writes unique file names: 4 C-MOVEs bring 4 copies).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import orthanc
import pydicom
from common import (
    BENCH_AE,
    HOST,
    MB,
    WORK,
    BenchError,
    EdgeServer,
    Figure,
    Server,
    console,
    ct_study,
    dcmqrscp,
    dcmtk,
    files_under,
    free_port,
    fresh_dir,
    populate,
    repeats,
    report,
    timed_parallel,
    total_bytes,
)

DEST_AE = "BENCHDST"
NET = ["-to", "10", "-ta", "30", "-td", "120"]


def destination(out: Path) -> Server:
    """The C-MOVE destination: dcmtk storescp as in store.py (fork, +B, 128 KiB PDU),
    with unique file names."""
    server = Server("storescp", DEST_AE, free_port(), out.parent / "retrieve-dest.log")
    server.spawn([dcmtk("storescp"), "--fork", "-aet", DEST_AE, "-pdu", "131072", "+B",
                  "+uf", "-dhl", "-od", str(out), str(server.port)])
    server.wait_echo()
    return server


# The single-instance retrieves of each server, per operation.
ONE_INSTANCE_RUNS = 10


def keys(study_uid: str) -> list[str]:
    return ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"]


def instance_keys(first: Path) -> list[str]:
    """The IMAGE-level identifier of the study's first file (study root)."""
    ds = pydicom.dcmread(first, stop_before_pixels=True)
    return ["-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
            "-k", f"SeriesInstanceUID={ds.SeriesInstanceUID}",
            "-k", f"SOPInstanceUID={ds.SOPInstanceUID}"]


def move(server: Server, identifier: list[str], out: Path, clients: int) -> tuple[float, int]:
    fresh_dir(out)
    argv = [dcmtk("movescu"), "-S", "-aet", BENCH_AE, "-aec", server.ae_title,
            "-aem", DEST_AE, *NET, *identifier, HOST, str(server.port)]
    seconds = timed_parallel([argv] * clients)
    time.sleep(0.2)  # the destination's forked children finish writing
    return seconds, len(files_under(out))


def get(server: Server, identifier: list[str], out: Path, clients: int) -> tuple[float, int]:
    fresh_dir(out)
    seconds = timed_parallel([
        [dcmtk("getscu"), "-S", "-aet", BENCH_AE, "-aec", server.ae_title, *NET,
         "-od", str(fresh_dir(out / str(n))), *identifier, HOST, str(server.port)]
        for n in range(clients)])
    return seconds, len(files_under(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=int(os.environ.get("BENCH_SLICES", "300")))
    parser.add_argument("--repeats", type=int, default=repeats())
    args = parser.parse_args()

    files = files_under(ct_study(args.slices))
    size = total_bytes(files)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    WORK.mkdir(parents=True, exist_ok=True)
    dest_dir, get_dir = WORK / "retrieve-dest", WORK / "retrieve-get"
    home = WORK / "retrieve-edge"
    shutil.rmtree(home, ignore_errors=True)
    servers: list[Server] = []
    seconds: dict[tuple[str, str], list[float]] = {}
    failures: dict[tuple[str, str], str] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    orthanc_note = orthanc.missing()
    load = [round(x, 2) for x in os.getloadavg()]
    try:
        dest = destination(fresh_dir(dest_dir))
        servers.append(dest)
        edge = EdgeServer(home)
        edge.add_peer("benchdst", DEST_AE, dest.port)
        populate(home, files)
        servers.append(edge.start())
        servers.append(dcmqrscp(WORK / "retrieve-dcmqrscp", files,
                                destinations={DEST_AE: dest.port}))
        if not orthanc_note:
            other = orthanc.Orthanc(fresh_dir(WORK / "retrieve-orthanc"),
                                    destinations={DEST_AE: dest.port},
                                    log_name="retrieve-orthanc.log")
            servers.append(other.start())
            other.upload(files)
            other.name = f"Orthanc {orthanc.version()}"
        study = keys(study_uid)
        ops = {f"{op} x{n} assoc": (do, n) for n in (1, 4)
               for op, do in (("C-MOVE", lambda s, n: move(s, study, dest_dir, n)),
                              ("C-GET", lambda s, n: get(s, study, get_dir, n)))}
        for rep in range(args.repeats):
            for op, (do, clients) in ops.items():
                for server in servers[1:]:
                    key = (op, server.name)
                    if key in failures:
                        continue
                    try:
                        before = server.cpu_seconds()
                        s, received = do(server, clients)
                        time.sleep(0.2)  # forked children exit and are reaped
                        used = server.cpu_seconds() - before
                        if received != clients * len(files):
                            raise BenchError(f"{received} of {clients * len(files)} "
                                             "instances arrived")
                    except BenchError as exc:
                        failures[key] = str(exc).strip().splitlines()[-1][:120]
                        console.print(f"[red]{op} from {server.name} failed:[/red] {exc}")
                        continue
                    seconds.setdefault(key, []).append(s)
                    cpu.setdefault(key, []).append(1000 * used / (clients * len(files)))
                    console.print(f"run {rep + 1}/{args.repeats} {op} {server.name}: "
                                  f"{s:.2f} s, {clients * size / MB / s:.1f} MB/s")
        one = one_instance_times(servers[1:], instance_keys(files[0]), dest_dir, get_dir,
                                 ONE_INSTANCE_RUNS * args.repeats)
    finally:
        for server in reversed(servers):
            server.stop()
        for folder in (dest_dir, get_dir, home, WORK / "retrieve-dcmqrscp",
                       WORK / "retrieve-orthanc"):
            shutil.rmtree(folder, ignore_errors=True)
    load_after = [round(x, 2) for x in os.getloadavg()]

    figures: list[Figure] = []
    names = [s.name for s in servers[1:]]  # pacs-edge, dcmqrscp, Orthanc
    for op, (_, clients) in ops.items():
        ref = _figure(op, "dcmqrscp", seconds, failures, clients * size)
        ref.reference = ref
        ref_cpu = Figure(f"{op} server CPU per instance", "dcmqrscp", "CPU-ms",
                         cpu.get((op, "dcmqrscp"), []), higher_is_better=False)
        ref_cpu.reference = ref_cpu
        figures += [ref, ref_cpu]
        for name in names:
            if name == "dcmqrscp":
                continue
            figures += [_figure(op, name, seconds, failures, clients * size, ref),
                        Figure(ref_cpu.name, name, "CPU-ms", cpu.get((op, name), []), ref_cpu,
                               higher_is_better=False)]
    for op in ("C-MOVE", "C-GET"):
        ref = Figure(f"{op} of one instance", "dcmqrscp", "ms", one.get((op, "dcmqrscp"), []),
                     higher_is_better=False)
        ref.reference = ref
        figures.append(ref)
        figures += [Figure(ref.name, name, "ms", one.get((op, name), []), ref,
                           higher_is_better=False) for name in names if name != "dcmqrscp"]
    if orthanc_note:
        console.print(f"[yellow]{orthanc_note}[/yellow]")
    report(f"Retrieve of {len(files)} CT slices ({size / MB:.0f} MB) by 1 and 4 clients at "
           f"once: movescu to storescp, getscu to a folder (target: >= 0.8x dcmqrscp); load "
           f"{load[0]} -> {load_after[0]}", "retrieve", figures,
           {"instances": len(files), "bytes": size, "load_before": load,
            "load_after": load_after, "orthanc": orthanc_note or names[-1],
            "failures": {f"{op} {name}": why for (op, name), why in failures.items()}})


def one_instance_times(servers: list[Server], identifier: list[str], dest_dir: Path,
                       get_dir: Path, runs: int) -> dict[tuple[str, str], list[float]]:
    """Milliseconds per C-MOVE and per C-GET of one instance, interleaved between the
    servers (movescu/getscu start to exit); a run whose instance did not arrive is left
    out and said."""
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(runs):
        for op, do in (("C-MOVE", move), ("C-GET", get)):
            for server in servers:
                try:
                    seconds, received = do(server, identifier,
                                           dest_dir if op == "C-MOVE" else get_dir, 1)
                except BenchError as exc:
                    console.print(f"[red]{op} of one instance from {server.name} failed:"
                                  f"[/red] {exc}")
                    continue
                if received == 1:
                    times.setdefault((op, server.name), []).append(1000 * seconds)
                else:
                    console.print(f"[red]{op} of one instance from {server.name}: "
                                  f"{received} instances arrived[/red]")
    for (op, name), samples in sorted(times.items()):
        console.print(f"{op} of one instance, {name}: median {statistics.median(samples):.1f} ms "
                      f"over {len(samples)} runs")
    return times


def _figure(op: str, name: str, seconds: dict[tuple[str, str], list[float]],
            failures: dict[tuple[str, str], str], size: int,
            ref: Figure | None = None) -> Figure:
    samples = [size / MB / s for s in seconds.get((op, name), [])]
    return Figure(op, name, "MB/s", samples, ref, note=failures.get((op, name), ""))


if __name__ == "__main__":
    start = time.monotonic()
    main()
    console.print(f"retrieve bench took {time.monotonic() - start:.0f} s")

"""Retrieve: C-MOVE (dcmtk movescu, to a dcmtk storescp destination) and C-GET
(dcmtk getscu into a folder) of the CT study from pacs-edge, next to dcmtk
dcmqrscp serving the same files, in the same run.

pacs-edge's data home is filled through its own ingest path (see
common.populate); dcmqrscp indexes the generated files in place (dcmqridx).
Each retrieve runs `repeats()` times per server, interleaved; the figure is
MB/s (10^6 bytes of the study's Part 10 files over the movescu / getscu wall
time) and the ratio of medians to dcmqrscp's. Every run checks that every
instance arrived.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

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
    timed,
    total_bytes,
)

DEST_AE = "BENCHDST"
NET = ["-to", "10", "-ta", "30", "-td", "120"]


def destination(out: Path) -> Server:
    """The C-MOVE destination: dcmtk storescp as in store.py (fork, +B, 128 KiB PDU)."""
    server = Server("storescp", DEST_AE, free_port(), out.parent / "retrieve-dest.log")
    server.spawn([dcmtk("storescp"), "--fork", "-aet", DEST_AE, "-pdu", "131072", "+B",
                  "-dhl", "-od", str(out), str(server.port)])
    server.wait_echo()
    return server


def keys(study_uid: str) -> list[str]:
    return ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"]


def move(server: Server, study_uid: str, out: Path) -> tuple[float, int]:
    fresh_dir(out)
    seconds = timed([dcmtk("movescu"), "-S", "-aet", BENCH_AE, "-aec", server.ae_title,
                     "-aem", DEST_AE, *NET, *keys(study_uid), HOST, str(server.port)])
    return seconds, len(files_under(out))


def get(server: Server, study_uid: str, out: Path) -> tuple[float, int]:
    fresh_dir(out)
    seconds = timed([dcmtk("getscu"), "-S", "-aet", BENCH_AE, "-aec", server.ae_title,
                     *NET, "-od", str(out), *keys(study_uid), HOST, str(server.port)])
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
    try:
        dest = destination(fresh_dir(dest_dir))
        servers.append(dest)
        edge = EdgeServer(home)
        edge.add_peer("benchdst", DEST_AE, dest.port)
        populate(home, files)
        servers.append(edge.start())
        servers.append(dcmqrscp(WORK / "retrieve-dcmqrscp", files,
                                destinations={DEST_AE: dest.port}))
        ops = {"C-MOVE": lambda s: move(s, study_uid, dest_dir),
               "C-GET": lambda s: get(s, study_uid, get_dir)}
        for rep in range(args.repeats):
            for op, do in ops.items():
                for server in servers[1:]:
                    key = (op, server.name)
                    if key in failures:
                        continue
                    try:
                        before = server.cpu_seconds()
                        s, received = do(server)
                        time.sleep(0.2)  # forked children exit and are reaped
                        used = server.cpu_seconds() - before
                        if received != len(files):
                            raise BenchError(f"{received} of {len(files)} instances arrived")
                    except BenchError as exc:
                        failures[key] = str(exc).strip().splitlines()[-1][:120]
                        console.print(f"[red]{op} from {server.name} failed:[/red] {exc}")
                        continue
                    seconds.setdefault(key, []).append(s)
                    cpu.setdefault(key, []).append(used)
                    console.print(f"run {rep + 1}/{args.repeats} {op} {server.name}: "
                                  f"{s:.2f} s, {size / MB / s:.1f} MB/s")
    finally:
        for server in reversed(servers):
            server.stop()
        for folder in (dest_dir, get_dir, home, WORK / "retrieve-dcmqrscp"):
            shutil.rmtree(folder, ignore_errors=True)

    figures: list[Figure] = []
    for op in ("C-MOVE", "C-GET"):
        ref = _figure(op, "dcmqrscp", seconds, failures, size)
        mine = _figure(op, "pacs-edge workers=1", seconds, failures, size)
        mine.reference = ref.reference = ref
        ref_cpu = Figure(f"{op} server CPU", "dcmqrscp", "CPU-s", cpu.get((op, "dcmqrscp"), []),
                         higher_is_better=False)
        mine_cpu = Figure(ref_cpu.name, mine.subject, "CPU-s", cpu.get((op, mine.subject), []),
                          ref_cpu, higher_is_better=False)
        ref_cpu.reference = ref_cpu
        figures += [ref, mine, ref_cpu, mine_cpu]
    report(f"Retrieve of {len(files)} CT slices ({size / MB:.0f} MB): movescu to storescp, "
           "getscu to a folder (target: >= 0.8x dcmqrscp)", "retrieve", figures,
           {"instances": len(files), "bytes": size, "failures": {
               f"{op} {name}": why for (op, name), why in failures.items()}})


def _figure(op: str, name: str, seconds: dict[tuple[str, str], list[float]],
            failures: dict[tuple[str, str], str], size: int) -> Figure:
    samples = [size / MB / s for s in seconds.get((op, name), [])]
    return Figure(op, name, "MB/s", samples, note=failures.get((op, name), ""))


if __name__ == "__main__":
    start = time.monotonic()
    main()
    console.print(f"retrieve bench took {time.monotonic() - start:.0f} s")

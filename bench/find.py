"""C-FIND latency at STUDY level: dcmtk findscu against pacs-edge with 10,000
studies in its index, next to dcmtk dcmqrscp (whose index holds at most 500
studies, so it gets the first 500, and pacs-edge gets the same 500 in a
second data home for a like-for-like pair).

Latency is the wall time of one findscu process (start, association, query,
responses, release). Each query runs BENCH_FIND_N times (default 20), the
servers interleaved; the figure is its median minus the median of as many
echoscu runs against the same server, i.e. what the query costs beyond a
C-ECHO (process start and association set-up cancel out).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import (
    BENCH_AE,
    HOST,
    WORK,
    EdgeServer,
    Figure,
    Server,
    console,
    dcmqrscp,
    dcmtk,
    echo_argv,
    populate,
    report,
    run,
    small_studies,
    timed,
)

DCMQRSCP_MAX_STUDIES = 500
RETURN_KEYS = ("PatientName", "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
               "StudyDescription", "StudyID")
QUERIES = {
    "PatientID": ["PatientID=PE07700007"],  # one patient: 10 studies
    "StudyDate range": ["PatientID", "StudyDate=20230301-20230303"],
}


def find_argv(server: Server, keys: list[str], out: Path | None = None) -> list[str]:
    args = [dcmtk("findscu"), "-S", "-aet", BENCH_AE, "-aec", server.ae_title,
            "-k", "QueryRetrieveLevel=STUDY"]
    asked = {key.split("=")[0] for key in keys}  # a later bare -k would empty a value
    for key in [*keys, *(k for k in RETURN_KEYS if k not in asked)]:
        args += ["-k", key]
    if out is not None:
        args += ["-X", "-od", str(out)]
    return [*args, HOST, str(server.port)]


def matches(server: Server, keys: list[str]) -> int:
    """How many studies the query returns (one run with response files, untimed)."""
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        run(find_argv(server, keys, Path(tmp)))
        return len(list(Path(tmp).glob("rsp*.dcm")))


def edge_with(files: list[Path], home: Path) -> EdgeServer:
    shutil.rmtree(home, ignore_errors=True)
    edge = EdgeServer(home)
    start = time.monotonic()
    populate(home, files)
    console.print(f"populated {home.name}: {len(files)} studies in "
                  f"{time.monotonic() - start:.0f} s")
    return edge.start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int,
                        default=int(os.environ.get("BENCH_STUDIES", "10000")))
    parser.add_argument("-n", type=int, default=int(os.environ.get("BENCH_FIND_N", "20")))
    args = parser.parse_args()

    WORK.mkdir(parents=True, exist_ok=True)
    files = small_studies(args.studies)
    few = files[:DCMQRSCP_MAX_STUDIES]
    servers: dict[str, Server] = {}
    try:
        servers[f"pacs-edge {args.studies}"] = edge_with(files, WORK / "find-edge-all")
        servers[f"pacs-edge {len(few)}"] = edge_with(few, WORK / "find-edge-few")
        servers[f"dcmqrscp {len(few)}"] = dcmqrscp(WORK / "find-dcmqrscp", few)
        counts = {(label, q): matches(s, keys) for label, s in servers.items()
                  for q, keys in QUERIES.items()}
        samples: dict[tuple[str, str], list[float]] = {
            (label, q): [] for label in servers for q in ["C-ECHO", *QUERIES]}
        for _ in range(args.n):  # interleaved: echo, then each query, on each server
            for label, server in servers.items():
                samples[(label, "C-ECHO")].append(1000 * timed(echo_argv(server.port,
                                                                         server.ae_title)))
                for q, keys in QUERIES.items():
                    samples[(label, q)].append(1000 * timed(find_argv(server, keys)))
    finally:
        for server in servers.values():
            server.stop()
    for home in ("find-edge-all", "find-edge-few", "find-dcmqrscp"):
        shutil.rmtree(WORK / home, ignore_errors=True)

    labels = list(servers)
    ref = labels[-1]  # dcmqrscp
    figures: list[Figure] = []
    echo = {label: Figure("C-ECHO", label, "ms", samples[(label, "C-ECHO")],
                          higher_is_better=False) for label in labels}
    for label in labels:
        echo[label].reference = echo[ref]
        figures.append(echo[label])
    for q in QUERIES:
        beyond = {}
        for label in labels:
            base = echo[label].median or 0.0
            beyond[label] = Figure(f"C-FIND {q} beyond C-ECHO", label, "ms",
                                   [s - base for s in samples[(label, q)]],
                                   higher_is_better=False,
                                   note=f"({counts[(label, q)]} matches)")
        for label in labels:
            beyond[label].reference = beyond[ref]
            figures.append(beyond[label])
    report(f"STUDY-level C-FIND latency, median of {args.n}, findscu (target: < 10 ms beyond "
           f"a C-ECHO at 10,000 studies)", "find", figures,
           {"studies": args.studies, "reference_studies": len(few), "n": args.n,
            "queries": QUERIES, "return_keys": RETURN_KEYS})


if __name__ == "__main__":
    start = time.monotonic()
    main()
    console.print(f"find bench took {time.monotonic() - start:.0f} s")

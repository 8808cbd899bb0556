"""C-FIND latency at STUDY level: dcmtk findscu against pacs-edge with 10,000
studies in its index, next to Orthanc (bench/orthanc.py) holding the same 10,000
studies and dcmtk dcmqrscp (whose index holds at most 500 studies, so it gets
the first 500, and pacs-edge gets the same 500 in a second data home for a
like-for-like pair). With BENCH_FIND_LARGE=1, a third pacs-edge holds 100,000
studies (BENCH_FIND_LARGE_STUDIES; large_studies): the goal is latency growing with the number
of matches, not with the index size.

Queries: an exact PatientID (10 studies), a name wildcard (DOE^J*) and a
three-day StudyDate range. Latency is the wall time of one findscu process
(start, association, query, responses, release). Each query runs BENCH_FIND_N
times (default 20), the servers interleaved; the figure is its median minus the
median of as many echoscu runs against the same server, i.e. what the query
costs beyond a C-ECHO (process start and association set-up cancel out). The
C-ECHO round trip itself (echoscu process start, association, echo, release) is
a figure too.

Filled indexes are cached in bench/out/data: Orthanc's (orthanc.filled) and the
100,000-study pacs-edge home (keyed by the index migrations; see edge_cached).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import orthanc
from common import (
    BENCH_AE,
    DATA,
    HOST,
    ROOT,
    WORK,
    BenchError,
    EdgeServer,
    Figure,
    Server,
    console,
    dcmqrscp,
    dcmtk,
    echo_argv,
    files_under,
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
    "PatientName wildcard": ["PatientName=DOE^J*"],  # 1 patient in 100, one of the 500
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
    # The first start after populate reconciles the store with the index (no clean stop
    # was recorded): ~1 min per 10,000 instances on this machine under load.
    return edge.start(ready_timeout=max(60.0, len(files) / 100))


def large_studies(count: int, base: list[Path]) -> list[Path]:
    """`count` one-instance studies made of `base` (the 10,000) and copies of it, cached in
    bench/out/data. Copy k (1, 2, ...) is each base file with its bytes rewritten at the
    same length: the generator's UID root ...10.1234. becomes ...10.<1234 + k>. (new
    study, series and instance UIDs) and the PatientID prefix PE077 becomes X<k:04>
    (new patients). Names, dates and modalities repeat, so a name wildcard or a date
    range matches `count / len(base)` times as many studies; an exact PatientID matches
    the same 10. pydicom would need ~20 min for 100,000 files; this takes seconds."""
    folder = DATA / f"studies-{count}"
    copies = -(-count // len(base))
    if not 1 <= copies <= 1000:
        raise BenchError(f"{count} studies: not 1-1000 copies of {len(base)}")
    files = files_under(folder)
    if len(files) != count:
        shutil.rmtree(folder, ignore_errors=True)
        console.print(f"making {count} studies from {copies} copies of {len(base)} in {folder}")
        root = DATA / f"studies-{len(base)}"
        for k in range(copies):
            for path in base[:count - k * len(base)]:
                target = folder / f"c{k:03d}" / path.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                data = path.read_bytes()
                if k:
                    data = data.replace(UID_ROOT, UID_ROOT[:-5] + f"{1234 + k}.".encode())
                    data = data.replace(b"PE077", f"X{k:04d}".encode())
                target.write_bytes(data)
        files = files_under(folder)
    return files


UID_ROOT = b"1.2.826.0.1.3680043.10.1234."  # tests/dicomgen.py's


def edge_cached(files: list[Path], home: Path) -> EdgeServer:
    """pacs-edge on a copy of a home filled once with `files` and kept in bench/out/data,
    keyed by the index migrations. A cache made before a new migration is upgraded by
    starting a copy (the migrations run, as on a box) and kept under the new key."""
    schema = hashlib.sha256()
    for path in sorted((ROOT / "appliance" / "store" / "migrations").glob("*.sql")):
        schema.update(path.name.encode() + path.read_bytes())
    cache = DATA / f"edge-home-{len(files)}-{schema.hexdigest()[:12]}"
    timeout = max(60.0, len(files) / 100)
    if not (cache / "complete").exists():
        shutil.rmtree(cache, ignore_errors=True)
        older = [p for p in DATA.glob(f"edge-home-{len(files)}-*") if (p / "complete").exists()]
        if older:
            _copy_home(older[0], home)
            EdgeServer(home, init=False).start(ready_timeout=timeout).stop()
        else:
            edge_with(files, home).stop()  # a clean stop: copies start without reconciling
        run(["cp", "-al", str(home), str(cache)])  # home is made again from it below
        (cache / "complete").write_text(f"{len(files)}\n")
        for path in older:
            shutil.rmtree(path, ignore_errors=True)
    _copy_home(cache, home)
    return EdgeServer(home, init=False).start(ready_timeout=timeout)


def _copy_home(cache: Path, home: Path) -> None:
    """`cache` copied to `home`: instance files hard-linked (C-FIND does not touch them),
    the index and everything else copied. cp -al is ~10x faster than shutil.copytree."""
    run(["rm", "-rf", str(home)])  # shutil.rmtree takes minutes for 100,000 files here
    run(["cp", "-al", str(cache), str(home)])
    (home / "complete").unlink(missing_ok=True)
    for path in home.rglob("*"):
        if path.is_file() and not path.name.endswith(".dcm"):
            path.unlink()
            shutil.copy2(cache / path.relative_to(home), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int,
                        default=int(os.environ.get("BENCH_STUDIES", "10000")))
    parser.add_argument("--large", type=int, default=int(
        os.environ.get("BENCH_FIND_LARGE_STUDIES", "100000"))
        if os.environ.get("BENCH_FIND_LARGE", "0") not in ("", "0") else 0,
                        help="studies of a third pacs-edge index (0: none)")
    parser.add_argument("-n", type=int, default=int(os.environ.get("BENCH_FIND_N", "20")))
    args = parser.parse_args()

    WORK.mkdir(parents=True, exist_ok=True)
    files = small_studies(args.studies)
    few = files[:DCMQRSCP_MAX_STUDIES]
    servers: dict[str, Server] = {}
    orthanc_note = orthanc.missing()
    load = [round(x, 2) for x in os.getloadavg()]
    try:
        servers[f"pacs-edge {args.studies}"] = edge_with(files, WORK / "find-edge-all")
        servers[f"pacs-edge {len(few)}"] = edge_with(few, WORK / "find-edge-few")
        if args.large:
            servers[f"pacs-edge {args.large}"] = edge_cached(
                large_studies(args.large, files), WORK / "find-edge-large")
        servers[f"dcmqrscp {len(few)}"] = dcmqrscp(WORK / "find-dcmqrscp", few)
        if not orthanc_note:
            servers[f"Orthanc {orthanc.version()} {args.studies}"] = orthanc.filled(
                WORK / "find-orthanc", files, f"studies-{args.studies}",
                log_name="find-orthanc.log")
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
    run(["rm", "-rf", *(str(WORK / home) for home in (
        "find-edge-all", "find-edge-few", "find-edge-large", "find-dcmqrscp", "find-orthanc"))])
    load_after = [round(x, 2) for x in os.getloadavg()]

    labels = list(servers)
    ref = f"dcmqrscp {len(few)}"
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
    if orthanc_note:
        console.print(f"[yellow]{orthanc_note}[/yellow]")
    report(f"STUDY-level C-FIND latency, median of {args.n}, findscu (targets at 10,000 "
           f"studies: < 10 ms beyond a C-ECHO for an ID, < 20 ms for a wildcard or a date "
           f"range); load {load[0]} -> {load_after[0]}", "find", figures,
           {"studies": args.studies, "large_studies": args.large,
            "reference_studies": len(few), "n": args.n, "queries": QUERIES,
            "return_keys": RETURN_KEYS, "orthanc": orthanc_note or "measured",
            "load_before": load, "load_after": load_after})


if __name__ == "__main__":
    start = time.monotonic()
    main()
    console.print(f"find bench took {time.monotonic() - start:.0f} s")

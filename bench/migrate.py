"""Migration throughput: `pacs-edge migrate` from dcmqrscp, against storescu sending the
same files straight into the box (issue 18: goal >= 0.5x).

Data: BENCH_MIGRATE_STUDIES (100) CT studies of 2 series x 5 slices (64x64, explicit VR
little endian) over 5 days, held by dcmtk dcmqrscp (tests/legacypacs.py: one process
per association, each SOP class sent in its stored syntax). Each run starts from an
empty data home and times the whole command, process start and C-FIND walk included:
- reference: storescu, all files on 1 association into `pacs-edge serve`;
- `migrate start --via move` with [migrate] associations = 4 (the default): dcmqrscp
  sends each study to the running `pacs-edge serve`;
- `migrate start --via get --associations 4`: the migrate process receives and ingests.
The cases run round robin (BENCH_REPEATS runs each); medians, ratios to the reference.
Every run checks that the box holds every instance.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from common import (
    DATA,
    MB,
    WORK,
    BenchError,
    EdgeServer,
    Figure,
    console,
    dcmtk,
    files_under,
    pacs_edge,
    repeats,
    report,
    scu_profile,
    serving,
    timed,
    total_bytes,
)
from pydicom.uid import ExplicitVRLittleEndian

if TYPE_CHECKING:
    from legacypacs import LegacyPacs

DAYS = ("20240304", "20240305", "20240306", "20240307", "20240308")


def make_archive(studies: int) -> list[Path]:
    import dicomgen  # tests/ is on the path once common is imported

    folder = DATA / f"migrate-{studies}"
    done = DATA / f"migrate-{studies}.complete"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        for n in range(studies):
            for inst in dicomgen.make_study(folder / f"s{n:05d}", seed=80_000 + n,
                                            series_per_study=2, instances_per_series=5,
                                            modalities=("CT",), size=64):
                ds = pydicom.dcmread(inst.path)
                ds.StudyDate = DAYS[n % len(DAYS)]
                ds.StudyTime = f"{8 + n % 10:02d}{n % 60:02d}00"
                ds.save_as(inst.path, enforce_file_format=True)
        done.touch()
    return [p for p in files_under(folder) if p.suffix == ".dcm"]


def storescu_case(files: list[Path], folder: Path, profile: Path) -> float:
    home = WORK / "migrate-home"
    shutil.rmtree(home, ignore_errors=True)
    edge = EdgeServer(home)
    with serving(edge.start()):
        seconds = timed([dcmtk("storescu"), "-aet", "BENCH", "-aec", edge.ae_title, "-xf",
                         str(profile), "Default", "-to", "10", "-ta", "30", "-td", "120",
                         "+sd", "+r", "127.0.0.1", str(edge.port), str(folder)])
    _check(edge, len(files))
    return seconds


def migrate_case(legacy: LegacyPacs, via: str, files: list[Path]) -> float:
    home = WORK / "migrate-home"
    shutil.rmtree(home, ignore_errors=True)
    edge = EdgeServer(home)
    edge.add_peer("legacy", legacy.ae_title, legacy.port,
                  allow="find,move,store" if via == "move" else "find,get")
    argv = [*pacs_edge(), "migrate", "start", "--home", str(home), "--from", "legacy",
            "--via", via, "--since", DAYS[0], "--until", DAYS[-1], "--associations", "4"]
    if via == "get":
        seconds = timed(argv)
    else:
        with serving(edge.start()):
            legacy.know(edge.ae_title, edge.port)
            legacy.start()
            try:
                seconds = timed(argv)
            finally:
                legacy.stop()
    _check(edge, len(files))
    return seconds


def _check(edge: EdgeServer, expected: int) -> None:
    held = edge.instances()
    if held != expected:
        raise BenchError(f"the box holds {held} of {expected} instances")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int,
                        default=int(os.environ.get("BENCH_MIGRATE_STUDIES", "100")))
    parser.add_argument("--repeats", type=int, default=repeats())
    args = parser.parse_args()
    import dicomgen
    from legacypacs import LegacyPacs

    WORK.mkdir(parents=True, exist_ok=True)
    files = make_archive(args.studies)
    folder = files[0].parents[4]
    size = total_bytes(files)
    profile = scu_profile(files[:1], WORK / "storescu-migrate.cfg")
    legacy = LegacyPacs(WORK / "migrate-legacy", {dicomgen.SOP_CLASSES["CT"]:
                                                  str(ExplicitVRLittleEndian)})
    shutil.rmtree(legacy.folder, ignore_errors=True)
    legacy.load(files)
    get_legacy = LegacyPacs(legacy.folder, legacy.syntax_by_class)
    cases: dict[str, Callable[[], float]] = {
        "storescu x1 assoc": lambda: storescu_case(files, folder, profile),
        "migrate via C-MOVE x4": lambda: migrate_case(legacy, "move", files),
        "migrate via C-GET x4": lambda: _get(get_legacy, files),
    }
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    load = [round(x, 2) for x in os.getloadavg()]
    for rep in range(args.repeats):
        for name, case in cases.items():
            try:
                took = case()
            except BenchError as exc:
                console.print(f"[red]run {rep + 1} {name} failed:[/red] {str(exc)[-1500:]}")
                continue
            seconds[name].append(took)
            console.print(f"run {rep + 1}/{args.repeats} {name}: {took:.2f} s,"
                          f" {args.studies / took * 3600:.0f} studies/h")
    load_after = [round(x, 2) for x in os.getloadavg()]
    ref = Figure("store the archive's files", "storescu x1 assoc", "MB/s",
                 [size / MB / s for s in seconds["storescu x1 assoc"]])
    ref.reference = ref
    figures = [ref]
    for name in ("migrate via C-MOVE x4", "migrate via C-GET x4"):
        figures.append(Figure(name, f"pacs-edge {name.removeprefix('migrate ')}", "MB/s",
                              [size / MB / s for s in seconds[name]], ref))
        figures.append(Figure(f"{name}, studies per hour", f"pacs-edge {name}", "studies/h",
                              [args.studies / s * 3600 for s in seconds[name]]))
    report(f"Migration of {args.studies} studies ({len(files)} instances, {size / MB:.0f} MB)"
           f" from dcmqrscp against storescu into the box; load {load[0]} -> {load_after[0]}",
           "migrate", figures,
           {"studies": 0, "migrated_studies": args.studies, "instances": len(files),
            "bytes": size, "load_before": load, "load_after": load_after, "seconds": seconds})


def _get(legacy: LegacyPacs, files: list[Path]) -> float:
    legacy.start()
    try:
        return migrate_case(legacy, "get", files)
    finally:
        legacy.stop()


if __name__ == "__main__":
    start = time.monotonic()
    main()
    console.print(f"migrate bench took {time.monotonic() - start:.0f} s")

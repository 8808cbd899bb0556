"""Metrics overhead: the store benchmark's CT study sent to pacs-edge with metrics on
([metrics] enabled, the default: DIMSE events counted in the multiprocess files) and
off, alternating run by run in one process so the machine's noise lands on both.

Figures: instances/s on 1 association and server CPU per instance, each a median,
with "metrics off" as the reference. Goal (issue 19): at most 2% slower with metrics
on. Wall time on this shared machine varies by more than that between runs; server CPU
per instance is the steadier of the two.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from common import (
    WORK,
    BenchError,
    EdgeServer,
    Figure,
    console,
    ct_study,
    files_under,
    repeats,
    report,
    scu_profile,
    serving,
)
from store import _send

CASES = {"metrics on": True, "metrics off": False}


def run_once(enabled: bool, study_files: int, profile: Path, study: Path
             ) -> tuple[float, float]:
    """Seconds and server CPU seconds of one send to a fresh box."""
    home = WORK / "metrics-home"
    shutil.rmtree(home, ignore_errors=True)
    edge = EdgeServer(home)
    edge.configure("metrics", "enabled", enabled)
    with serving(edge.start()):
        seconds, cpu = _send(edge, [study], profile)
    stored = edge.instances()
    shutil.rmtree(home, ignore_errors=True)
    if stored != study_files:
        raise BenchError(f"{stored} of {study_files} instances stored")
    return seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=int(os.environ.get("BENCH_SLICES", "300")))
    parser.add_argument("--repeats", type=int, default=repeats())
    args = parser.parse_args()
    study = ct_study(args.slices)
    files = files_under(study)
    WORK.mkdir(parents=True, exist_ok=True)
    profile = scu_profile(files[:1], WORK / "storescu.cfg")
    rates: dict[str, list[float]] = {name: [] for name in CASES}
    cpu_ms: dict[str, list[float]] = {name: [] for name in CASES}
    for rep in range(args.repeats):
        for name, enabled in CASES.items():
            seconds, cpu = run_once(enabled, len(files), profile, study)
            rates[name].append(len(files) / seconds)
            cpu_ms[name].append(1000 * cpu / len(files))
            console.print(f"run {rep + 1}/{args.repeats} {name}: {seconds:.2f} s,"
                          f" server CPU {1000 * cpu / len(files):.2f} ms/instance")
    off_rate = Figure("C-STORE x1 assoc", "metrics off", "inst/s", rates["metrics off"])
    off_rate.reference = off_rate
    off_cpu = Figure("server CPU per instance", "metrics off", "ms", cpu_ms["metrics off"],
                     higher_is_better=False)
    off_cpu.reference = off_cpu
    figures = [off_rate, Figure(off_rate.name, "metrics on", "inst/s", rates["metrics on"],
                                off_rate, note="(goal >= 0.98x)"),
               off_cpu, Figure(off_cpu.name, "metrics on", "ms", cpu_ms["metrics on"], off_cpu,
                               higher_is_better=False, note="(goal >= 0.98x)")]
    report(f"Metrics overhead: C-STORE of {len(files)} CT slices, 1 association", "metrics",
           figures, {"instances": len(files)})


if __name__ == "__main__":
    main()

"""Benchmark: ingest rate of a 300-file CT study dropped into the drop folder at once,
next to `pacs-edge import` of the same folder, in the same run.

    python bench/dropfolder.py [--runs 3] [--slices 300] [--stable-seconds 0.5]

Each run uses a fresh data home on the same file system as the study.

- import: wall time of `pacs-edge import --home H STUDY` (the command as an
  operator runs it, process start-up included).
- drop folder: a running `pacs-edge serve` (ready before the clock starts);
  the study is copied next to the watched folder and renamed into it, so it
  appears at once; the clock stops when the index holds every instance and the
  watched folder is empty. This includes the `stable_seconds` quiet period
  every file must show before it is read: it is latency, not throughput, so
  the table also shows the rate with that wait taken out.

Prints medians of the runs and the drop-folder/import ratio of the rates.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import dicomgen  # noqa: E402  (tests/ is not a package)

READY = re.compile(r"ready to accept associations\b.*?\bport=(\d+)")
TIMEOUT = 600.0


def pacs_edge() -> list[str]:
    script = Path(sys.executable).with_name("pacs-edge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "appliance.cli"]


def init_home(home: Path, stable_seconds: float) -> None:
    subprocess.run([*pacs_edge(), "init", "--home", str(home), "--dicom-port", "0",
                    "--hl7-port", "0"],
                   check=True, capture_output=True)
    config = home / "pacs-edge.toml"
    text = config.read_text()
    text = re.sub(r"(?m)^stable_seconds = .*$", f"stable_seconds = {stable_seconds}", text)
    config.write_text(text)


def time_import(work: Path, study: Path) -> float:
    home = work / "import-home"
    init_home(home, 0.0)
    start = time.perf_counter()
    subprocess.run([*pacs_edge(), "import", "--home", str(home), str(study)],
                   check=True, capture_output=True, timeout=TIMEOUT)
    elapsed = time.perf_counter() - start
    assert count_instances(home) == count_files(study)
    shutil.rmtree(home)
    return elapsed


def time_drop(work: Path, study: Path, stable_seconds: float) -> float:
    home = work / "drop-home"
    init_home(home, stable_seconds)
    log_path = work / "serve.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen([*pacs_edge(), "serve", "--home", str(home)],
                                  stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait(lambda: READY.search(log_path.read_text(errors="replace")) is not None,
             "server ready", server)
        staging = home / "staging"
        shutil.copytree(study, staging)
        expected = count_files(staging)
        incoming = home / "incoming"
        start = time.perf_counter()
        os.rename(staging, incoming / "study")
        wait(lambda: count_instances(home) == expected and count_files(incoming) == 0,
             "every instance ingested", server, interval=0.02)
        elapsed = time.perf_counter() - start
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    if server.returncode != 0:
        raise SystemExit(f"serve exited {server.returncode}:\n{log_path.read_text()[-3000:]}")
    shutil.rmtree(home)
    return elapsed


def wait(check: Callable[[], bool], what: str, server: subprocess.Popen[bytes], *,
         interval: float = 0.05) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if server.poll() is not None:
            raise SystemExit(f"serve exited {server.returncode} before {what}")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(interval)


def count_instances(home: Path) -> int:
    path = home / "index.sqlite3"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])
    except sqlite3.OperationalError:  # not migrated yet
        return 0


def count_files(folder: Path) -> int:
    return sum(len(files) for _d, _s, files in os.walk(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512, help="rows = columns per slice")
    parser.add_argument("--stable-seconds", type=float, default=0.5)
    args = parser.parse_args()

    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix="dropfolder-") as tmp:
        work = Path(tmp)
        study = work / "study"
        generated = dicomgen.make_ct_study(study, args.slices, args.size)
        megabytes = sum(g.path.stat().st_size for g in generated) / 1e6
        imports, drops = [], []
        for run in range(args.runs):
            imports.append(time_import(work, study))
            drops.append(time_drop(work, study, args.stable_seconds))
            print(f"run {run + 1}: import {imports[-1]:.2f} s, drop folder {drops[-1]:.2f} s",
                  flush=True)
    files = len(generated)
    imp, drop = statistics.median(imports), statistics.median(drops)
    net = max(drop - args.stable_seconds, 1e-9)
    print(f"\n{files} files, {megabytes:.0f} MB; median of {args.runs} runs;"
          f" stable_seconds = {args.stable_seconds}")
    print(f"{'method':<34}{'seconds':>9}{'files/s':>10}{'MB/s':>9}")
    rows = [("pacs-edge import", imp), ("drop folder", drop),
            ("drop folder, less stable_seconds", net)]
    for name, seconds in rows:
        print(f"{name:<34}{seconds:>9.2f}{files / seconds:>10.1f}{megabytes / seconds:>9.1f}")
    print(f"ratio drop folder / import (rate): {imp / drop:.2f}"
          f" ({imp / net:.2f} without the stability wait)")


if __name__ == "__main__":
    main()

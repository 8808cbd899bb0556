"""Where pacs-edge spends its CPU while receiving the CT study, or `--small N` one-instance
studies (not part of `make bench`).

Starts `pacs-edge serve` (workers=1) on a fresh data home, attaches py-spy
(`.venv/bin/pip install py-spy`; it is not a project dependency) in --gil
mode, so only the thread holding the GIL is sampled, sends the study once
with storescu, and prints the functions with the most samples (inclusive
and own). Writes bench/out/store-profile.txt (collapsed stacks, for
flamegraph.pl or speedscope). Numbers are shares of GIL-holding samples.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import (
    OUT,
    WORK,
    EdgeServer,
    console,
    ct_study,
    files_under,
    run,
    scu_profile,
    serving,
    small_studies,
)
from store import storescu_argv


def summarize(raw: Path, top: int) -> None:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
                  + ")" for f in stack.split(";")[1:]]
        n = int(count)
        total += n
        for frame in set(frames):
            inclusive[frame] += n
        if frames:
            own[frames[-1]] += n
    console.print(f"{total} samples with the GIL held")
    for title, counter in (("inclusive", inclusive), ("own", own)):
        console.print(f"[bold]top {top} by {title} share[/bold]")
        for frame, n in counter.most_common(top):
            console.print(f"  {100 * n / total:5.1f}%  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--small", type=int, default=0,
                        help="send this many one-instance studies instead of the CT study")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--wall", action="store_true",
                        help="sample every thread, waiting ones too (--idle), per thread")
    args = parser.parse_args()
    mode = ["--idle", "--threads"] if args.wall else ["--gil"]
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        sys.exit("py-spy is not installed: .venv/bin/pip install py-spy")
    files = small_studies(args.small) if args.small else files_under(ct_study(args.slices))
    WORK.mkdir(parents=True, exist_ok=True)
    profile = scu_profile(files[:1], WORK / "storescu.cfg")
    home = WORK / "profile-edge"
    shutil.rmtree(home, ignore_errors=True)
    raw = OUT / "store-profile.txt"
    edge = EdgeServer(home)
    with serving(edge.start()):
        assert edge.proc is not None
        spy = subprocess.Popen([pyspy, "record", "--pid", str(edge.proc.pid), *mode,
                                "--rate", str(args.rate), "--format", "raw", "-o", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attaches
        start = time.perf_counter()
        source = Path(os.path.commonpath(files)) if args.small else ct_study(args.slices)
        run(storescu_argv(edge.port, edge.ae_title, source, profile))
        console.print(f"sent in {time.perf_counter() - start:.2f} s under py-spy")
        spy.send_signal(signal.SIGINT)
        spy.wait(30)
    shutil.rmtree(home, ignore_errors=True)
    summarize(raw, args.top)


if __name__ == "__main__":
    main()

"""Where pacs-edge spends its CPU while receiving the CT study, or `--small N` one-instance
studies (not part of `make bench`).

Starts `pacs-edge serve` (workers=1) on a fresh data home, attaches py-spy
(`.venv/bin/pip install py-spy`; it is not a project dependency) in --gil
mode, so only the thread holding the GIL is sampled, sends the study once
with storescu, and prints the functions with the most samples (inclusive
and own). Writes bench/out/store-profile.txt (collapsed stacks, for
flamegraph.pl or speedscope). Numbers are shares of GIL-holding samples.

`--kernel` records with perf instead (Debian's `linux-perf`; `-e cpu-clock`, which
works without hardware counters, as in this VM) and prints the symbols with the
most samples, kernel and user, inclusive and own: what py-spy cannot see, the
system calls' share (creating, writing and syncing the spool file).

`--flushes` attaches strace (Debian's `strace`) instead and prints what the
device flushes cost: per flushing system call (fdatasync, fsync), the calls
per instance and their median and total time, against the wall time per
instance. On one association every flush is on the path from one instance to
the next, so their sum per instance is a floor no CPU saving removes.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import statistics
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
    remove_spent,
    run,
    scu_profile,
    serving,
    set_aside,
    small_studies,
    timed_parallel,
)
from store import split, storescu_argv

# "1234  fdatasync(12) = 0 <0.000451>", or for a call another thread's interrupted
# "1234  <... fsync resumed>) = 0 <0.000169>", as strace -f -T writes them
_STRACE_CALL = re.compile(r"(?:\b(?P<call>fdatasync|fsync)\(|<\.\.\. (?P<resumed>fdatasync|fsync)"
                          r" resumed>).*= 0 <(?P<seconds>[0-9.]+)>")


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


def summarize_flushes(raw: Path, instances: int, seconds: float) -> None:
    """Per flushing system call in strace's output: calls and time per instance."""
    durations: dict[str, list[float]] = collections.defaultdict(list)
    for line in raw.read_text().splitlines():
        match = _STRACE_CALL.search(line)
        if match:
            durations[match["call"] or match["resumed"]].append(float(match["seconds"]))
    wall = 1000 * seconds / instances
    console.print(f"{instances} instances in {seconds:.2f} s untraced:"
                  f" {wall:.2f} ms per instance")
    flushing = 0.0
    for call, times in sorted(durations.items()):
        total = 1000 * sum(times) / instances
        flushing += total
        console.print(f"  {call:<10} {len(times) / instances:5.2f} per instance,"
                      f" median {1000 * statistics.median(times):.3f} ms,"
                      f" {total:.3f} ms per instance")
    console.print(f"  flushes: {flushing:.2f} ms per instance, {flushing / wall:.0%} of the"
                  " untraced wall time (tracing slows the rest, not the device)")


def summarize_perf(perf: str, data: Path, top: int) -> None:
    """perf's top symbols by inclusive share (a system call's whole cost) and own."""
    for title, flag in (("inclusive", "--children"), ("own", "--no-children")):
        lines = run([perf, "report", "-i", str(data), flag, "--sort", "dso,sym", "-g", "none",
                     "--stdio"], stdout_only=True).splitlines()
        rows = [line.rstrip() for line in lines  # [unknown]: JIT-less frames perf cannot name
                if line.strip() and not line.startswith("#") and "[unknown]" not in line]
        console.print(f"[bold]top {top} by {title} share of the server's CPU samples[/bold]")
        for row in rows[:top]:
            console.print(f"  {row}", markup=False, highlight=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--small", type=int, default=0,
                        help="send this many one-instance studies instead of the CT study")
    parser.add_argument("--associations", type=int, default=1,
                        help="send over this many associations at once (storescu each)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--wall", action="store_true",
                        help="sample every thread, waiting ones too (--idle), per thread")
    parser.add_argument("--flushes", action="store_true",
                        help="time the fdatasync and fsync calls with strace instead")
    parser.add_argument("--kernel", action="store_true",
                        help="sample kernel and user stacks with perf instead")
    args = parser.parse_args()
    os.environ.setdefault("TCP_NODELAY", "1")  # as bench/run.sh: dcmtk leaves Nagle on
    mode = ["--idle", "--threads"] if args.wall else ["--gil"]
    if args.flushes or args.kernel:
        tool, package = ("strace", "strace") if args.flushes else ("perf", "linux-perf")
        tracer = shutil.which(tool)
        if tracer is None:
            sys.exit(f"{tool} is not installed: apt-get install {package}")
    else:
        tracer = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(tracer).exists():
            sys.exit("py-spy is not installed: .venv/bin/pip install py-spy")
    files = small_studies(args.small) if args.small else files_under(ct_study(args.slices))
    WORK.mkdir(parents=True, exist_ok=True)
    profile = scu_profile(files[:1], WORK / "storescu.cfg")
    source = Path(os.path.commonpath(files)) if args.small else ct_study(args.slices)
    sources = split(source, args.associations)
    raw = OUT / "store-profile.txt"
    remove_spent()
    try:
        profile_send(args, tracer, mode, sources, profile, raw, len(files))
    finally:
        remove_spent()


def profile_send(args: argparse.Namespace, tracer: str, mode: list[str], sources: list[Path],
                 profile: Path, raw: Path, instances: int) -> None:
    if args.flushes:
        # strace stops the server at every system call, so the wall time comes from
        # an untraced send first.
        seconds = send(sources, profile, None)
        send(sources, profile, [tracer, "-f", "-T", "-e", "trace=fdatasync,fsync",
                               "-o", str(raw), "-p"])
        summarize_flushes(raw, instances, seconds)
    elif args.kernel:
        data = OUT / "store-perf.data"
        send(sources, profile, [tracer, "record", "-e", "cpu-clock", "-F", "1000", "-g",
                               "-o", str(data), "-p"])
        summarize_perf(tracer, data, args.top)
    else:
        send(sources, profile, [tracer, "record", *mode, "--rate", str(args.rate),
                               "--format", "raw", "-o", str(raw), "--pid"])
        summarize(raw, args.top)


def send(sources: list[Path], profile: Path, tracer: list[str] | None) -> float:
    """Send `sources` once to a fresh server, one storescu (association) per folder,
    traced by `tracer` (its arguments, the server's PID appended) if given; the seconds
    it took."""
    home = WORK / "profile-edge"
    shutil.rmtree(home, ignore_errors=True)
    edge = EdgeServer(home)
    with serving(edge.start()):
        assert edge.proc is not None
        spy = None
        if tracer is not None:
            spy = subprocess.Popen([*tracer, str(edge.proc.pid)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # the tracer attaches
        seconds = timed_parallel([storescu_argv(edge.port, edge.ae_title, source, profile)
                                  for source in sources])
        console.print(f"sent in {seconds:.2f} s"
                      + (f" under {Path(tracer[0]).name}" if tracer else ""))
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
    set_aside(home)  # deleted when main ends: see common.set_aside
    return seconds

if __name__ == "__main__":
    main()

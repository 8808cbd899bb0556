"""Bench plumbing: dcmtk tools, servers under test, data, timing, medians, output.

Rules every bench script keeps (see docs/benchmarks.md):
- each figure is the median of `repeats()` runs (BENCH_REPEATS, default 5), and
  is printed next to a reference measured in the same run, as a ratio;
- runs of the compared servers are interleaved (round robin), so a burst of
  load from another tenant hits both sides, not one;
- every dcmtk process runs with TCP_NODELAY=1: dcmtk leaves Nagle's algorithm
  on otherwise, and storescu -> storescp then takes ~14 s instead of ~0.5 s;
- servers listen on 127.0.0.1, on free ports, in their own process group, and
  are stopped with SIGTERM, then SIGKILL to the group after a deadline.

The venv's bin/ (first on PATH under `make bench`) holds pynetdicom's apps with
dcmtk's names (storescu, findscu, ...): dcmtk() resolves the real dcmtk binary.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
DATA = OUT / "data"  # generated inputs, kept between runs (deterministic)
WORK = OUT / "work"  # data homes and received files, removed after each run
HOST = "127.0.0.1"
BENCH_AE = "BENCH"
EDGE_AE = "EDGE"
MB = 1_000_000
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
_READY = re.compile(r"ready to accept associations\b.*?\bport=(\d+)")

sys.path.insert(0, str(ROOT / "tests"))  # dicomgen: the project's deterministic generator
# Wide enough for the tables when the output is a file or a pipe (make bench | tee).
console = Console(width=None if sys.stdout.isatty() else 132)


class BenchError(RuntimeError):
    """A run failed (tool exit, missing instances, server not ready): no figure."""


def repeats() -> int:
    return int(os.environ.get("BENCH_REPEATS", "5"))


# --- tools ---------------------------------------------------------------------------

def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system, reaped children too) of a process group so far."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # fields[2]: process group
            ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """CPU seconds of the whole machine so far, all cores: (busy, idle). Busy is user,
    nice, system, irq and softirq of every process (a server, its clients, the kernel's
    own threads); idle includes waiting for I/O."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, idle, iowait, irq, softirq = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, (idle + iowait) / tick


def group_peak_rss(pgid: int) -> float:
    """The largest peak resident set (VmHWM, MB) of any process of a group alive now:
    one server process, or one worker of a server with several."""
    peak = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue
        hwm = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        if hwm:
            peak = max(peak, int(hwm.group(1)))
    return peak * 1024 / MB


class PeakRss:
    """Polls group_peak_rss in a thread while in use (every 50 ms: short-lived forked
    children such as storescp's are caught too); `.mb` is the largest seen."""

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.mb = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while True:
            self.mb = max(self.mb, group_peak_rss(self.pgid))
            if self._done.wait(0.05):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.mb = max(self.mb, group_peak_rss(self.pgid))


def dcmtk(tool: str) -> str:
    """Path of dcmtk's `tool`, skipping same-named pynetdicom apps in the venv."""
    venv_bin = Path(sys.prefix) / "bin"
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if folder and Path(folder).resolve() != venv_bin.resolve():
            candidate = Path(folder) / tool
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    raise BenchError(f"dcmtk's {tool} not found (make test-deps installs dcmtk)")


def pacs_edge() -> list[str]:
    script = Path(sys.executable).with_name("pacs-edge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "appliance.cli"]


def tool_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PACS_EDGE_HOME"}
    env["TCP_NODELAY"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(argv: Sequence[str], *, timeout: float = 600.0, cwd: Path | None = None,
        stdout_only: bool = False) -> str:
    """Run to completion; BenchError with the output on a non-zero exit. The output is
    stdout and stderr (dcmtk reports on stderr), or stdout alone when it is data."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, env=tool_env(), cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{' '.join(argv)} still running after {timeout}s") from exc
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}:\n"
                         f"{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def timed(argv: Sequence[str], **kwargs: Any) -> float:
    """Wall-clock seconds of one tool run (process start to exit)."""
    start = time.perf_counter()
    run(argv, **kwargs)
    return time.perf_counter() - start


def timed_parallel(argvs: Sequence[Sequence[str]], *, timeout: float = 600.0) -> float:
    """Start every command at once; seconds until the last one exits. All must succeed."""
    start = time.perf_counter()
    procs = [subprocess.Popen(list(a), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=tool_env()) for a in argvs]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    elapsed = time.perf_counter() - start
    for argv, proc, output in zip(argvs, procs, outputs, strict=True):
        if proc.returncode != 0:
            raise BenchError(f"{' '.join(argv)} exited {proc.returncode}:\n"
                             f"{output.decode(errors='replace')[-3000:]}")
    return elapsed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def echo_argv(port: int, aec: str, aet: str = BENCH_AE) -> list[str]:
    return [dcmtk("echoscu"), "-aet", aet, "-aec", aec, "-to", "5", "-ta", "10", HOST, str(port)]


# --- servers -------------------------------------------------------------------------

class Server:
    """A server subprocess in its own process group, logging to `log_path`."""

    def __init__(self, name: str, ae_title: str, port: int, log_path: Path) -> None:
        self.name = name
        self.ae_title = ae_title
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: Sequence[str], cwd: Path | None = None) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=tool_env(), cwd=cwd,
                                         start_new_session=True)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def wait_echo(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited {self.proc.returncode}:\n"
                                 f"{self.log()[-3000:]}")
            with contextlib.suppress(BenchError):
                run(echo_argv(self.port, self.ae_title), timeout=15)
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} not answering C-ECHO:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def cpu_seconds(self) -> float:
        """CPU time of the server's process group so far: forked children and worker
        processes belong to it (see group_cpu)."""
        return 0.0 if self.proc is None else group_cpu(self.proc.pid)

    def peak_rss(self) -> PeakRss:
        """A sampler of the group's peak RSS per process (use it as a context manager)."""
        assert self.proc is not None
        return PeakRss(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM; SIGKILL to the whole group if it is still there after a deadline."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                console.print(f"[yellow]{self.name} ignored SIGTERM: killed[/yellow]")
        # Forked children (storescp --fork, dcmqrscp, edge workers) share the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT)
        self.proc = None


class EdgeServer(Server):
    """`pacs-edge serve` on a fresh data home, with BENCH as an allowed peer (or on a home
    made so earlier: init=False)."""

    def __init__(self, home: Path, *, workers: int = 1, hl7_port: int = 0, http_port: int = 0,
                 allow: str = "store,find,move,get", init: bool = True) -> None:
        # Port 0: the server binds a port the OS picks and logs it in its ready line
        # (a port picked here could be taken by another process while we populate).
        super().__init__(f"pacs-edge workers={workers}", EDGE_AE, 0,
                         home.parent / f"{home.name}-serve.log")
        self.home = home
        # HL7, HTTPS and the metrics listener off unless a (free) port is given: their
        # fixed default ports (2575, 8443, 9464) would clash like TLS's (below).
        self.http_port = http_port
        if not init:  # a home made earlier (by this class), e.g. a cached copy
            return
        run([*pacs_edge(), "init", "--home", str(home), "--ae-title", EDGE_AE,
             "--dicom-port", "0", "--hl7-port", str(hl7_port), "--http-port", str(http_port),
             "--metrics-port", "0"])
        self.add_peer("bench", BENCH_AE, 1, allow=allow)
        # Plain DICOM only: the TLS listener's fixed default port (2762) would clash
        # between the servers a benchmark runs side by side.
        self.configure("dicom", "tls_port", 0, only_if_present=True)
        if workers != 1:
            self.configure("dicom", "workers", workers)

    def add_peer(self, name: str, ae_title: str, port: int, *,
                 allow: str = "store,find,move,get") -> None:
        run([*pacs_edge(), "peers", "add", name, "--home", str(self.home), "--ae-title",
             ae_title, "--host", HOST, "--port", str(port), "--allow", allow])

    def configure(self, section: str, key: str, value: object, *,
                  only_if_present: bool = False) -> None:
        import tomlkit

        path = self.home / "pacs-edge.toml"
        doc = tomlkit.parse(path.read_text(encoding="utf-8"))
        if only_if_present and key not in doc.get(section, {}):
            return
        doc[section][key] = value  # type: ignore[index]
        path.write_text(tomlkit.dumps(doc), encoding="utf-8")

    def start(self, ready_timeout: float = READY_TIMEOUT) -> EdgeServer:
        """Serve; `ready_timeout` for the ready line (longer for a first start after
        common.populate on a large home: it reconciles the store with the index)."""
        self.spawn([*pacs_edge(), "serve", "--home", str(self.home)])
        deadline = time.monotonic() + ready_timeout
        while not (ready := _READY.search(self.log())):
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"pacs-edge serve not ready:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        self.port = int(ready.group(1))
        self.wait_echo()
        return self

    def instances(self) -> int:
        status = json.loads(run([*pacs_edge(), "status", "--home", str(self.home), "--json"],
                                stdout_only=True))
        return int(status["instances"])


def dcmqrscp(folder: Path, files: Sequence[Path], *, ae_title: str = "QRSCP",
             destinations: dict[str, int] | None = None) -> Server:
    """dcmtk dcmqrscp serving `files` (indexed in place with dcmqridx) from a fresh
    storage area in `folder`; `destinations` maps C-MOVE destination AEs to ports.
    Its index holds at most 500 studies per storage area (DB_UpperMaxStudies)."""
    area = fresh_dir(folder / "area")
    for start in range(0, len(files), 200):  # one call per file is quadratic
        run([dcmtk("dcmqridx"), "-q", str(area), *map(str, files[start:start + 200])])
    port = free_port()
    hosts = [f"dest{n} = ({ae}, {HOST}, {p})"
             for n, (ae, p) in enumerate((destinations or {}).items())]
    # No UserName/GroupName: dcmqrscp would switch to that user when run as root.
    config = "\n".join([
        f"NetworkTCPPort = {port}", "MaxPDUSize = 131072", "MaxAssociations = 16",
        "HostTable BEGIN", *hosts, "HostTable END", "VendorTable BEGIN", "VendorTable END",
        "AETable BEGIN", f"{ae_title} {area} RW (500, 1024mb) ANY", "AETable END", ""])
    cfg = folder / "dcmqrscp.cfg"
    cfg.write_text(config)
    server = Server("dcmqrscp", ae_title, port, folder / "dcmqrscp.log")
    server.spawn([dcmtk("dcmqrscp"), "-c", str(cfg), str(port)])
    server.wait_echo()
    return server


def populate(home: Path, files: Sequence[Path], *, concurrency: int = 32) -> None:
    """Ingest `files` into a (stopped) data home through the project's own durable
    ingest path (spool, fsync, rename, group-committed index row), many at once:
    `pacs-edge import` does one at a time and needs ~3 min for 10,000 files."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from appliance.base.config import load_config
    from appliance.services.ingest import IngestService
    from appliance.store.files import FileStore
    from appliance.store.index import Index

    config = load_config(home)

    async def main() -> None:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(concurrency))
        store = FileStore(config.store.path)
        store.prepare()
        gate = asyncio.Semaphore(concurrency)
        async with Index(config.index.path) as index:
            ingest = IngestService(store, index)

            async def one(path: Path) -> None:
                async with gate:
                    await ingest.ingest_file(path, source_ae="bench")

            await asyncio.gather(*(one(p) for p in files))

    asyncio.run(main())


@contextlib.contextmanager
def serving(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()


# --- data ----------------------------------------------------------------------------

def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def ct_study(slices: int) -> Path:
    """The benchmark CT series (slices x 512x512 16-bit), generated once and cached."""
    import dicomgen

    folder = DATA / f"ct-{slices}"
    if len(files_under(folder)) != slices:
        shutil.rmtree(folder, ignore_errors=True)
        console.print(f"generating the CT study ({slices} slices) in {folder}")
        dicomgen.make_ct_study(folder, n_slices=slices, size=512)
    return folder


def small_studies(count: int) -> list[Path]:
    """`count` studies of one 8x8 instance each (10 studies per patient, seed 77),
    generated once and cached; pydicom writes ~90 files/s, so 10,000 take ~2 min."""
    import dicomgen

    folder = DATA / f"studies-{count}"
    files = files_under(folder)
    if len(files) != count:
        shutil.rmtree(folder, ignore_errors=True)
        console.print(f"generating {count} one-instance studies in {folder} (once)")
        dicomgen.make_studies(folder, seed=77, patients=count // 10, studies_per_patient=10,
                              series_per_study=1, instances_per_series=1, modalities=("CT",),
                              size=8)
        files = files_under(folder)
    return files


def total_bytes(files: Sequence[Path]) -> int:
    return sum(p.stat().st_size for p in files)


def scu_profile(files: Sequence[Path], path: Path) -> Path:
    """A storescu association profile proposing each file's own (SOP class, TS), so
    storescu sends the files' bytes as they are (see tests/dcmtk.py)."""
    import pydicom

    pairs: dict[tuple[str, str], None] = {}
    for f in files:
        meta = pydicom.filereader.read_file_meta_info(f)
        pairs[(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))] = None
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for n, ts in enumerate(syntaxes):
        lines += [f"[TS{n}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Files]"]
    lines += [f"PresentationContext{n} = {sop}\\TS{syntaxes.index(ts)}"
              for n, (sop, ts) in enumerate(pairs, 1)]
    lines += ["[[Profiles]]", "[Default]", "PresentationContexts = Files", ""]
    path.write_text("\n".join(lines))
    return path


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


SPENT = WORK / "spent"  # finished runs' folders, removed by remove_spent when a bench ends


def set_aside(path: Path) -> None:
    """Move a finished run's folder aside (a rename); `remove_spent` deletes them all.

    Deleting a run's thousands of files before the next run would charge the next
    server's file creations: on a file system without a journal (ext4 as this
    machine's root is mounted) the inode allocator skips every inode freed in the
    last minutes, reading the inode table for each, so a create in the folder a
    bench has just emptied costs 100-400 us of CPU instead of ~16 us
    (docs/benchmarks.md, "What the bench's own deletions cost").
    """
    if path.exists():
        SPENT.mkdir(parents=True, exist_ok=True)
        path.rename(SPENT / f"{path.name}-{time.monotonic_ns()}")


def remove_spent() -> None:
    shutil.rmtree(SPENT, ignore_errors=True)


# --- figures -------------------------------------------------------------------------

@dataclass
class Figure:
    """One measured quantity: its samples, and the reference it is compared with."""

    name: str
    subject: str
    unit: str
    samples: list[float] = field(default_factory=list)
    reference: Figure | None = None
    higher_is_better: bool = True
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def ratio(self) -> float | None:
        """This median over the reference's (higher is better) or the inverse."""
        ref = self.reference.median if self.reference else None
        mine = self.median
        if ref is None or mine is None or ref <= 0 or mine <= 0:
            return None
        return mine / ref if self.higher_is_better else ref / mine

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "subject": self.subject, "unit": self.unit,
                "median": self.median, "samples": self.samples,
                "reference": self.reference.subject if self.reference else None,
                "reference_median": self.reference.median if self.reference else None,
                "ratio": self.ratio, "note": self.note}


def report(title: str, name: str, figures: Sequence[Figure], meta: dict[str, Any]) -> None:
    """Print a table and write bench/out/<name>.json."""
    table = Table(title=title)
    for col in ("measure", "server", "median", "reference", "ref. median", "ratio", "runs"):
        table.add_column(col, justify="right" if col in ("median", "ref. median", "ratio",
                                                         "runs") else "left")
    for f in figures:
        ref = f.reference
        table.add_row(f.name, f.subject, _fmt(f.median, f.unit), ref.subject if ref else "-",
                      _fmt(ref.median if ref else None, f.unit),
                      f"{f.ratio:.2f}x" if f.ratio is not None else "-",
                      str(len(f.samples)) + (f" {f.note}" if f.note else ""))
    console.print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    payload = {"title": title, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "repeats": repeats(), "cpus": os.cpu_count(), **meta,
               "figures": [f.as_json() for f in figures]}
    (OUT / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} {unit}" if abs(value) >= 10 else f"{value:.2f} {unit}"

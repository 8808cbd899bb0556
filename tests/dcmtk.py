"""Run dcmtk's network tools as real DICOM peers, always with timeouts.

Every call returns a ToolResult (arguments, return code, stdout, stderr); none
raises on a DICOM failure, so a test can assert on a refusal. `.check()`
raises ToolError with the full output when a test expects success.

- echoscu, storescu, findscu, movescu, getscu: SCU wrappers. Each passes dcmtk
  its own connect/ACSE/DIMSE timeouts and a subprocess deadline on top.
- storescu proposes, by default, exactly the transfer syntax of each file (an
  association profile written on the fly), so what goes over the wire is the
  file's bytes: dcmtk's default would convert implicit to explicit VR and
  fail on compressed files.
- findscu runs with `-X`, reads the response files (rsp0001.dcm, ...) back and
  returns them as pydicom datasets in FindResult.responses.
- StoreSCP: dcmtk storescp on a free port writing what it receives, bit
  preserving (+B), accepting 127 storage SOP classes in every transfer syntax
  dcmtk can carry. Start it as a context manager; readiness is polled with C-ECHO.

dcmtk 3.6.7 quirks worth knowing:
- it cannot send or receive HTJ2K (1.2.840.10008.1.2.4.201-203): storescu fails
  with "Unsupported transfer syntax" after the association is accepted. Use
  pynetdicom for HTJ2K. StoreSCP does not accept HTJ2K contexts, so a C-MOVE of
  an HTJ2K instance to it finds no acceptable presentation context.
- `storescu -nh` exits 0 even when stores failed: count store_responses().
- storescp has no option to bind one address: it listens on all interfaces.
  Tests use it on 127.0.0.1 only.
- an association profile holds at most 128 presentation contexts.

pynetdicom installs its own apps under dcmtk's names (echoscu, storescp, ...)
in the venv's bin/: `dcmtk_tool` resolves dcmtk's binary past them, so the
suite runs the same with the venv activated or not.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import ALL_TRANSFER_SYNTAXES
from pynetdicom.presentation import AllStoragePresentationContexts

HOST = "127.0.0.1"
TEST_AE = "TESTSCU"
EDGE_AE = "EDGE"
DEFAULT_TIMEOUT = 60.0
# Passed to every SCU: connect (-to), association (-ta) and DIMSE (-td) timeouts.
NET_TIMEOUTS = ("-to", "10", "-ta", "30", "-td", "60")
STORAGE_SOP_CLASSES = tuple(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
HTJ2K_SYNTAXES = ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203")
DCMTK_SYNTAXES = tuple(str(ts) for ts in ALL_TRANSFER_SYNTAXES if ts not in HTJ2K_SYNTAXES)

Keys = Mapping[str, str | None] | Sequence[str]


class ToolError(AssertionError):
    """A dcmtk tool failed where the test expected success; carries its output."""


@dataclass(frozen=True)
class ToolResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def check(self) -> ToolResult:
        if not self.ok:
            raise ToolError(f"{' '.join(self.args)} exited {self.returncode}:\n{self.output}")
        return self

    def store_responses(self) -> list[str]:
        """storescu/movescu/getscu verbose (-v) lines `Received Store Response (...)`, in
        order, e.g. "Success" or "Error: CannotUnderstand". Not printed with -d."""
        return re.findall(r"Received Store Response \(([^)]*)\)", self.output)

    def dimse_statuses(self) -> list[int]:
        """The status of every DIMSE response in a debug (-d) run, in order: the exact
        code (0xA700, 0xC000, ...) that -v's names leave out."""
        return [int(code, 16) for code in
                re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", self.output)]


@dataclass(frozen=True)
class FindResult(ToolResult):
    responses: list[Dataset] = field(default_factory=list)
    # pydicom warnings raised while reading the responses (kept, not raised).
    read_warnings: list[str] = field(default_factory=list)

    def values(self, keyword: str) -> list[str]:
        """`keyword` of every response as DICOM text: multiple values joined with a
        backslash ("CT\\MR"), "" when absent or empty."""
        out = []
        for ds in self.responses:
            value = ds.get(keyword, "")
            if isinstance(value, MultiValue | list | tuple):
                out.append("\\".join(str(v) for v in value))
            else:
                out.append("" if value is None else str(value))
        return out


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago, for a server a test starts next.

    A port the OS hands out (bind to 0) comes from the ephemeral range, which every
    outgoing connection draws its source port from too: between this call and the
    server's bind, a client in another xdist worker could take it, and the server
    would fail with "Address already in use". So ports come from below that range,
    each pytest-xdist worker from its own slice, in turn; a port still bound (or in
    TIME_WAIT) is skipped."""
    for _ in range(_PORTS.stop - _PORTS.start):
        port = next(_port_cycle)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORTS.start}-{_PORTS.stop - 1}")


def _worker_ports() -> range:
    """This xdist worker's slice of the ports below the ephemeral range (the whole of
    it when the suite runs in one process)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
        ephemeral_start = int(fh.read().split()[0])
    ports = range(min(_LOWEST_PORT, ephemeral_start // 2), ephemeral_start)
    worker = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker is None or workers <= 1:
        return ports
    size = len(ports) // workers
    start = ports.start + int(worker.group(1)) % workers * size
    return range(start, start + size)


def _cycle_from_random_start(ports: range) -> Iterator[int]:
    """`ports` round and round, from a random one: two runs of the suite on one
    machine rarely walk the same ports at the same time."""
    offset = random.randrange(len(ports))
    while True:
        for index in range(len(ports)):
            yield ports[(offset + index) % len(ports)]


_LOWEST_PORT = 16384
_PORTS = _worker_ports()
_port_cycle = _cycle_from_random_start(_PORTS)


def run_tool(tool: str, *args: str, timeout: float = DEFAULT_TIMEOUT,
             cwd: Path | None = None) -> ToolResult:
    """Run dcmtk's `tool args...` with no stdin; raise ToolError if it outlives `timeout`."""
    argv = [dcmtk_tool(tool), *args]
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, cwd=cwd,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        raise ToolError(f"{' '.join(argv)} still running after {timeout}s (killed):\n"
                        f"{out.decode(errors='replace')}") from exc
    except FileNotFoundError as exc:
        raise ToolError(f"{tool} not found: install dcmtk (make test does)") from exc
    return ToolResult(argv, proc.returncode, proc.stdout.decode(errors="replace"),
                      proc.stderr.decode(errors="replace"), time.monotonic() - start)


def dcmtk_tool(tool: str) -> str:
    """dcmtk's `tool` on PATH, skipping the venv's same-named pynetdicom apps."""
    venv_bin = (Path(sys.prefix) / "bin").resolve()
    folders = [f for f in os.environ.get("PATH", "").split(os.pathsep)
               if f and Path(f).resolve() != venv_bin]
    return shutil.which(tool, path=os.pathsep.join(folders)) or tool


def _net(aet: str, aec: str, args: Iterable[str]) -> list[str]:
    return ["-aet", aet, "-aec", aec, *NET_TIMEOUTS, *args]


def echoscu(port: int, *, host: str = HOST, aet: str = TEST_AE, aec: str = EDGE_AE,
            args: Sequence[str] = (), timeout: float = 30.0) -> ToolResult:
    return run_tool("echoscu", *_net(aet, aec, args), host, str(port), timeout=timeout)


def storescu(port: int, paths: Iterable[Path | str], *, host: str = HOST, aet: str = TEST_AE,
             aec: str = EDGE_AE, args: Sequence[str] = ("-v",),
             propose_file_syntax: bool = True, timeout: float = 300.0) -> ToolResult:
    """C-STORE files (folders are scanned recursively) on one association.

    `-v` (default) logs one `Received Store Response (...)` line per file, see
    ToolResult.store_responses. storescu stops at the first failure and exits
    non-zero; add "-nh" to go on (it then exits 0 whatever happened).
    With propose_file_syntax (default) each file travels in its own transfer syntax.
    """
    paths = [Path(p) for p in paths]
    extra = ["+sd", "+r"] if any(p.is_dir() for p in paths) else []
    with tempfile.TemporaryDirectory(prefix="storescu-") as tmp:
        profile = _scu_profile(_files(paths)) if propose_file_syntax else None
        if profile is not None:
            cfg = Path(tmp) / "storescu.cfg"
            cfg.write_text(profile)
            extra += ["-xf", str(cfg), "Default"]
        return run_tool("storescu", *_net(aet, aec, [*args, *extra]), host, str(port),
                        *map(str, paths), timeout=timeout)


def findscu(port: int, keys: Keys, *, level: str = "STUDY", model: str = "study",
            host: str = HOST, aet: str = TEST_AE, aec: str = EDGE_AE,
            args: Sequence[str] = (), timeout: float = 60.0) -> FindResult:
    """C-FIND; `keys` maps a dcmtk key (keyword or gggg,eeee) to a value, or to None /
    "" for a return key; a sequence of "Key=value" / "Key" strings works too.
    `model`: "study" (-S), "patient" (-P) or "worklist" (-W, no QueryRetrieveLevel)."""
    flag = {"study": "-S", "patient": "-P", "worklist": "-W"}[model]
    key_args = _key_args(keys, None if model == "worklist" else level)
    with tempfile.TemporaryDirectory(prefix="findscu-") as tmp:
        result = run_tool("findscu", flag, *_net(aet, aec, args), "-X", "-od", tmp,
                          *key_args, host, str(port), timeout=timeout)
        responses, caught = [], []
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for path in sorted(Path(tmp).glob("rsp*.dcm")):
                responses.append(pydicom.dcmread(path, force=True))
            caught = [str(w.message) for w in seen]
    return FindResult(result.args, result.returncode, result.stdout, result.stderr,
                      result.seconds, responses, caught)


def movescu(port: int, keys: Keys, destination: str, *, level: str = "STUDY",
            model: str = "study", host: str = HOST, aet: str = TEST_AE, aec: str = EDGE_AE,
            args: Sequence[str] = ("-v",), timeout: float = 300.0) -> ToolResult:
    """C-MOVE to the AE `destination` (which the server must know)."""
    flag = {"study": "-S", "patient": "-P"}[model]
    return run_tool("movescu", flag, *_net(aet, aec, args), "-aem", destination,
                    *_key_args(keys, level), host, str(port), timeout=timeout)


def getscu(port: int, keys: Keys, output_dir: Path, *, level: str = "STUDY",
           model: str = "study", host: str = HOST, aet: str = TEST_AE, aec: str = EDGE_AE,
           args: Sequence[str] = ("-v",), timeout: float = 300.0) -> ToolResult:
    """C-GET into `output_dir`. getscu accepts uncompressed syntaxes by default;
    pass e.g. args=("-v", "+xs") to take JPEG lossless, "+xv" JPEG 2000, ..."""
    flag = {"study": "-S", "patient": "-P"}[model]
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return run_tool("getscu", flag, *_net(aet, aec, args), "-od", str(output_dir),
                    *_key_args(keys, level), host, str(port), timeout=timeout)


def _key_args(keys: Keys, level: str | None) -> list[str]:
    if isinstance(keys, Mapping):
        items = [k if v is None or v == "" else f"{k}={v}" for k, v in keys.items()]
    else:
        items = list(keys)
    if level is not None and not any(i.split("=")[0] == "QueryRetrieveLevel" for i in items):
        items.insert(0, f"QueryRetrieveLevel={level}")
    return [arg for item in items for arg in ("-k", item)]


def _files(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        out.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return out


def _scu_profile(files: Iterable[Path]) -> str | None:
    """A dcmtk association profile with one presentation context per (SOP class, TS)
    of the files; None when no file has a readable File Meta header."""
    pairs: list[tuple[str, str]] = []
    with pydicom_config.disable_value_validation():
        for f in files:
            try:
                meta = pydicom.filereader.read_file_meta_info(f)
                pair = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
            except Exception:  # not DICOM: storescu itself will say so
                continue
            if pair not in pairs:
                pairs.append(pair)
    if not pairs:
        return None
    if len(pairs) > 128:
        raise ValueError(f"{len(pairs)} (SOP class, transfer syntax) pairs: at most 128 "
                         "presentation contexts fit in one association; split the files")
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for n, ts in enumerate(syntaxes):
        lines += [f"[TS{n}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Files]"]
    lines += [f"PresentationContext{n} = {sop}\\TS{syntaxes.index(ts)}"
              for n, (sop, ts) in enumerate(pairs, 1)]
    lines += ["[[Profiles]]", "[Default]", "PresentationContexts = Files", ""]
    return "\n".join(lines)


def default_scp_sop_classes() -> list[str]:
    """127 storage SOP classes for StoreSCP: dcmtk caps a profile at 128 presentation
    contexts (Verification is one). The image classes dicomgen writes come first."""
    from dicomgen import SOP_CLASSES

    chosen = list(dict.fromkeys([*SOP_CLASSES.values(), *STORAGE_SOP_CLASSES]))
    return chosen[:127]


def _scp_profile(sop_classes: Sequence[str]) -> str:
    """Accept Verification and `sop_classes` in every transfer syntax dcmtk can carry
    (uncompressed first: that is the order of preference)."""
    if len(sop_classes) > 127:
        raise ValueError("dcmtk accepts at most 128 presentation contexts in a profile")
    lines = ["[[TransferSyntaxes]]", "[All]"]
    lines += [f"TransferSyntax{n} = {ts}" for n, ts in enumerate(DCMTK_SYNTAXES, 1)]
    lines += ["[[PresentationContexts]]", "[Storage]",
              "PresentationContext1 = 1.2.840.10008.1.1\\All"]
    lines += [f"PresentationContext{n} = {sop}\\All"
              for n, sop in enumerate(sop_classes, 2)]
    lines += ["[[Profiles]]", "[Default]", "PresentationContexts = Storage", ""]
    return "\n".join(lines)


class StoreSCP:
    """dcmtk storescp on 127.0.0.1:`port` (a free one by default) writing to `folder`.

    Use as a context manager, or call start() / stop(). Files keep dcmtk's names
    (`<modality>.<SOP Instance UID>`); `files()` lists them. It accepts
    `sop_classes` (default: default_scp_sop_classes()) in every transfer syntax.
    """

    def __init__(self, folder: Path, *, ae_title: str = "STORESCP", port: int | None = None,
                 sop_classes: Sequence[str] | None = None, args: Sequence[str] = (),
                 ready_timeout: float = 20.0) -> None:
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.port = port or free_port()
        self.host = HOST
        self.sop_classes = list(sop_classes or default_scp_sop_classes())
        self.args = list(args)
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.folder.parent / f"storescp-{self.port}.log"

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = self.folder.parent / f"storescp-{self.port}.cfg"
        cfg.write_text(_scp_profile(self.sop_classes))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [dcmtk_tool("storescp"), "-v", "-aet", self.ae_title, "-xf", str(cfg),
                 "Default", "+B", "-dhl", "-od", str(self.folder), *self.args, str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise ToolError(f"storescp exited {self.proc.returncode}:\n{self.log()}")
            probe = echoscu(self.port, aec=self.ae_title, timeout=10.0)
            if probe.ok:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise ToolError(f"storescp not answering C-ECHO on {self.port} after "
                                f"{self.ready_timeout}s:\n{probe.output}\n{self.log()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it is still there after `timeout` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""


def dcmdump(path: Path, *args: str, timeout: float = 30.0) -> ToolResult:
    return run_tool("dcmdump", *args, os.fspath(path), timeout=timeout)

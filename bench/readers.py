"""Remote readers and restore against Azurite, next to the plain SDK.

What one run measures, on a real Azurite (tests/azurite.py) started for the run:
- reader pull: the CT study (BENCH_SLICES, default 300 = 158 MB) is imported
  into a data home and replicated to a fresh `azure://` container once
  (untimed); a reader made with `pacs-edge reader init` is added with
  `pacs-edge readers add NAME KEY` (scope all). Each run times
  `pacs-edge reader pull STUDY_UID --to DIR` into an empty folder as a whole
  process (listing and unwrapping its key objects, opening the manifest, one
  range read per instance, decryption, SHA-256 verification, a fsync'd file
  per instance). Every run checks the pulled files: each hashes as the edge's
  stored file, and its dataset (after the File Meta group) as the generated
  original's;
- its reference: bench/sync.py's plain download of the same bytes (the study's
  files concatenated into one blob, uploaded once, untimed, into another
  container): `download_blob(max_concurrency=4).readinto()` into one file,
  fsync'd once, in its own process (sync.py --plain download);
- restore: --studies (default 1000) one-instance studies (common.small_studies)
  imported into another data home and replicated once (untimed), its keys
  escrowed (`pacs-edge keys escrow`). Each run makes a fresh home (`keys
  recover`, `init`, untimed) and times `pacs-edge restore --home DIR --cloud
  azure://...` as a process; afterwards the index must hold every study,
  evicted, one instance each;
- its references, plain azure-storage-blob processes reading the same
  container with restore's concurrency (PLAIN_CONCURRENCY requests at once, as
  sync.restore.READ_CONCURRENCY): (a) list `studies/` and download every
  manifest blob; (b) the same requests restore makes: one listing, then per
  manifest the manifest and its `keys/site` object;
- CPU (user + system) of each process, Azurite's CPU while it serves it, and
  the reader's peak RSS next to the plain download's.
Runs alternate which side goes first; each figure is the median of --repeats
runs (default BENCH_REPEATS, else 3). MB/s is the study's bytes (the sum of the
generated files' sizes) over seconds, on both sides.

Also run as a helper: `readers.py --plain manifests|requests CONTAINER
CREDENTIALS` (the restore references, in their own process). The /usr/bin/time
plumbing, data homes and the plain download come from bench/sync.py; importing
it as `sync` hides the project's sync package here, which this script never
needs (pacs-edge runs in its own processes).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shutil
import sqlite3
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import (
    DATA,
    MB,
    WORK,
    BenchError,
    Figure,
    console,
    ct_study,
    files_under,
    fresh_dir,
    pacs_edge,
    report,
    run,
    small_studies,
    total_bytes,
)

import sync as cloud_sync
from sync import Side, drop_containers, measured, new_home, store_hashes, study_uid, write_secret

RUN = WORK / f"readers-{os.getpid()}"
cloud_sync.RUN = RUN  # measured() writes /usr/bin/time's output there
PASSPHRASE = "bench passphrase, not a secret"
PLAIN_CONCURRENCY = 8  # sync.restore.READ_CONCURRENCY
SIDES = ("pull", "download", "restore", "manifests", "requests")


def run_long(argv: list[str], *, expect: str) -> str:
    output = run(argv, timeout=3600)
    if expect not in output:
        raise BenchError(f"{' '.join(argv[:3])}: expected {expect!r} in:\n{output[-2000:]}")
    return output


def dataset_hash(path: Path) -> str:
    import dicomgen

    return hashlib.sha256(dicomgen.dataset_bytes(path)).hexdigest()


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def index_counts(home: Path) -> tuple[int, int, int]:
    """(studies, evicted studies, instances) in a data home's index."""
    db = sqlite3.connect(f"file:{home / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        studies, evicted = db.execute(
            "SELECT COUNT(*), SUM(tier_state = 'evicted') FROM studies").fetchone()
        (instances,) = db.execute("SELECT COUNT(*) FROM instances").fetchone()
    finally:
        db.close()
    return int(studies), int(evicted or 0), int(instances)


# --- reader pull -------------------------------------------------------------------

class PullBench:
    """The CT study replicated and granted once; pulls and plain downloads per run."""

    def __init__(self, study: Path, pid: int, credentials: Path) -> None:
        self.study, self.pid, self.credentials = study, pid, credentials
        self.files = files_under(study)
        self.uid = study_uid(study)
        self.work = fresh_dir(RUN / "pull")
        self.enc, self.ref = "pull-enc", "pull-plain"
        home, reader = self.work / "home", self.work / "reader"
        new_home(home, study, self.enc, credentials)
        run_long([*pacs_edge(), "sync", "--once", "--stable-after", "0", "--home", str(home)],
                 expect="replicated 1 study version(s)")
        public = run([*pacs_edge(), "reader", "init", "--home", str(reader), "--cloud",
                      f"azure://{self.enc}", "--credentials-file", str(credentials)])
        keys = [line for line in public.splitlines() if line.startswith("pacs-edge-reader-")]
        if len(keys) != 1:
            raise BenchError(f"no public key in `reader init` output:\n{public[-2000:]}")
        run_long([*pacs_edge(), "readers", "add", "bench", keys[0], "--home", str(home)],
                 expect="granted 1 pack version(s)")
        listing = self.work / "files.txt"
        listing.write_text("\n".join(map(str, self.files)) + "\n")
        cloud_sync.plain("upload", self.ref, credentials, listing, pid)
        self.reader = reader
        self.pulled_bytes = 0  # the pulled files' sizes (their File Meta is the edge's)
        # What the pulled files must hash as: the edge's stored files (the bytes it
        # packed) and, after the File Meta group, the files the generator wrote.
        self.stored = sorted(store_hashes(home).values())
        self.pack_bytes = cloud_sync.pack_bytes(home)
        self.datasets = sorted(dataset_hash(p) for p in self.files)

    def pull(self, side: Side) -> None:
        target = self.work / "pulled"
        shutil.rmtree(target, ignore_errors=True)
        n = len(self.files)
        sample = measured([*pacs_edge(), "reader", "pull", self.uid, "--home",
                           str(self.reader), "--to", str(target)], self.pid,
                          expect=f"{n} downloaded and verified, 0 already there")
        pulled = files_under(target)
        if sorted(map(file_hash, pulled)) != self.stored:
            raise BenchError("pulled files differ from the edge's stored files")
        if sorted(map(dataset_hash, pulled)) != self.datasets:
            raise BenchError("pulled datasets differ from the generated originals")
        self.pulled_bytes = total_bytes(pulled)
        shutil.rmtree(target)
        side.add(sample)

    def download(self, side: Side) -> None:
        target = self.work / "plain.bin"
        side.add(cloud_sync.plain("download", self.ref, self.credentials, target, self.pid))
        target.unlink()


# --- restore -----------------------------------------------------------------------

class RestoreBench:
    """`count` studies replicated and escrowed once; a restore into a fresh home per run."""

    def __init__(self, count: int, pid: int, credentials: Path) -> None:
        self.count, self.pid, self.credentials = count, pid, credentials
        small_studies(count)
        self.work = fresh_dir(RUN / "restore")
        self.container = "restore-enc"
        home = self.work / "old-home"
        new_home(home, DATA / f"studies-{count}", self.container, credentials)
        run_long([*pacs_edge(), "sync", "--once", "--stable-after", "0", "--home", str(home)],
                 expect=f"replicated {count} study version(s)")
        self.passphrase = self.work / "passphrase"
        self.passphrase.write_text(PASSPHRASE + "\n")
        self.passphrase.chmod(0o600)  # keys escrow refuses a file others can read
        self.escrow = self.work / "site.escrow"
        run([*pacs_edge(), "keys", "escrow", "--home", str(home), "--out", str(self.escrow),
             "--passphrase-file", str(self.passphrase)])
        shutil.rmtree(home)  # the lost box: the cloud and the escrow file remain

    def restore(self, side: Side) -> None:
        import tomlkit

        home = self.work / "new-home"
        shutil.rmtree(home, ignore_errors=True)
        run([*pacs_edge(), "keys", "recover", "--home", str(home), "--from", str(self.escrow),
             "--passphrase-file", str(self.passphrase)])
        run([*pacs_edge(), "init", "--home", str(home), "--tls-port", "0", "--dicom-port", "0"])
        path = home / "pacs-edge.toml"
        doc = tomlkit.parse(path.read_text(encoding="utf-8"))
        doc["cloud"]["credentials_file"] = str(self.credentials)  # type: ignore[index]
        path.write_text(tomlkit.dumps(doc), encoding="utf-8")
        n = self.count
        sample = measured([*pacs_edge(), "restore", "--home", str(home), "--cloud",
                           f"azure://{self.container}"], self.pid,
                          expect=f"restored {n} pack version(s) of {n} study(ies), {n} "
                                 "instance(s); 0 already in the index; 0 failed")
        counts = index_counts(home)
        if counts != (n, n, n):
            raise BenchError(f"restored index holds (studies, evicted, instances) = {counts}, "
                             f"expected {(n, n, n)}")
        side.add(sample)

    def plain(self, op: str, side: Side) -> None:
        n = self.count
        side.add(measured([sys.executable, str(Path(__file__).resolve()), "--plain", op,
                           self.container, str(self.credentials)], self.pid,
                          expect=f"read {n} manifest(s)"))


def plain_main(op: str, container: str, credentials: Path) -> None:
    """List `studies/`, then per manifest: GET it (manifests), or GET it and its
    `keys/site` object (requests: what restore asks for), PLAIN_CONCURRENCY at once."""
    from azure.storage.blob import ContainerClient

    client = ContainerClient.from_connection_string(credentials.read_text().strip(), container)

    def fetch(name: str) -> int:
        size = len(client.download_blob(name).readall())
        if op == "requests":
            stem = name.removesuffix(".manifest")
            size += len(client.download_blob(f"{stem}.keys/site").readall())
        return size

    with client, ThreadPoolExecutor(PLAIN_CONCURRENCY) as pool:
        names = [b.name for b in client.list_blobs(name_starts_with="studies/")
                 if b.name.endswith(".manifest")]
        total = sum(pool.map(fetch, names))
    print(f"read {len(names)} manifest(s), {total} bytes")


# --- figures -----------------------------------------------------------------------

def figures(size: int, studies: int, sides: dict[str, Side]) -> list[Figure]:
    def rate(side: Side) -> list[float]:
        return [size / MB / s for s in side.seconds]

    get = Figure("reader pull (download)", "azure-storage-blob download_blob, plain", "MB/s",
                 rate(sides["download"]))
    cpu_get = Figure("process CPU, reader pull", "azure-storage-blob download_blob, plain",
                     "CPU-s", sides["download"].cpu_s, higher_is_better=False)
    az_get = Figure("Azurite CPU, reader pull", "azurite serving the plain download", "CPU-s",
                    sides["download"].azurite_cpu_s, higher_is_better=False)
    rss_get = Figure("peak RSS, reader pull", "azure-storage-blob download_blob, plain", "MB",
                     sides["download"].rss_mb, higher_is_better=False)
    label = f"restore, {studies} studies"
    man = Figure(label,
                 f"azure-storage-blob: list + GET every manifest, {PLAIN_CONCURRENCY} at once", "s",
                 sides["manifests"].seconds, higher_is_better=False)
    req = Figure(f"{label}, same requests",
                 f"azure-storage-blob: list + GET manifest, GET key, {PLAIN_CONCURRENCY} at once",
                 "s",
                 sides["requests"].seconds, higher_is_better=False)
    cpu_req = Figure(f"process CPU, {label}", req.subject, "CPU-s", sides["requests"].cpu_s,
                     higher_is_better=False)
    az_req = Figure(f"Azurite CPU, {label}", "azurite serving the same requests, plain",
                    "CPU-s", sides["requests"].azurite_cpu_s, higher_is_better=False)
    restore = sides["restore"]
    return [
        get,
        Figure(get.name, "pacs-edge reader pull, decrypt + verify", "MB/s",
               rate(sides["pull"]), get),
        cpu_get,
        Figure(cpu_get.name, "pacs-edge reader pull", "CPU-s", sides["pull"].cpu_s, cpu_get,
               higher_is_better=False),
        az_get,
        Figure(az_get.name, "azurite serving pacs-edge reader pull", "CPU-s",
               sides["pull"].azurite_cpu_s, az_get, higher_is_better=False),
        rss_get,
        Figure(rss_get.name, "pacs-edge reader pull", "MB", sides["pull"].rss_mb, rss_get,
               higher_is_better=False),
        man,
        Figure(man.name, "pacs-edge restore", "s", restore.seconds, man,
               higher_is_better=False),
        req,
        Figure(req.name, "pacs-edge restore", "s", restore.seconds, req,
               higher_is_better=False),
        cpu_req,
        Figure(cpu_req.name, "pacs-edge restore", "CPU-s", restore.cpu_s, cpu_req,
               higher_is_better=False),
        az_req,
        Figure(az_req.name, "azurite serving pacs-edge restore", "CPU-s",
               restore.azurite_cpu_s, az_req, higher_is_better=False),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int,
                        default=int(os.environ.get("BENCH_SLICES", "300")))
    parser.add_argument("--studies", type=int, default=1000,
                        help="one-instance studies to restore (a multiple of 10)")
    parser.add_argument("--repeats", type=int,
                        default=int(os.environ.get("BENCH_REPEATS", "3")))
    parser.add_argument("--plain", nargs=3, help=argparse.SUPPRESS,
                        metavar=("OP", "CONTAINER", "CREDENTIALS"))
    args = parser.parse_args()
    if args.plain:
        op, container, credentials = args.plain
        plain_main(op, container, Path(credentials))
        return

    from azurite import AzuriteServer

    if not Path(cloud_sync.TIME).exists():
        raise SystemExit(f"{cloud_sync.TIME} is missing (GNU time: apt-get install time)")
    study = ct_study(args.slices)
    size = total_bytes(files_under(study))
    fresh_dir(RUN)
    sides = {name: Side() for name in SIDES}
    failures = 0
    pull_meta: dict[str, int] = {}
    try:
        with AzuriteServer(RUN / "azurite") as azurite:
            assert azurite.proc is not None
            pid = azurite.proc.pid
            credentials = write_secret(RUN / "azure.conn", azurite.connection_string)
            console.print("setting up: CT study replicated and granted, "
                          f"{args.studies} studies replicated and escrowed (untimed)")
            pull = PullBench(study, pid, credentials)
            restore = RestoreBench(args.studies, pid, credentials)
            for rep in range(args.repeats):
                first = rep % 2 == 0
                pulls = [("pull", pull.pull), ("download", pull.download)]
                restores = [("restore", restore.restore),
                            ("manifests", functools.partial(restore.plain, "manifests")),
                            ("requests", functools.partial(restore.plain, "requests"))]
                try:
                    for name, step in (pulls + restores if first
                                       else pulls[::-1] + restores[::-1]):
                        step(sides[name])
                except BenchError as exc:
                    failures += 1
                    console.print(f"[red]run {rep + 1} failed:[/red] {str(exc)[-1500:]}")
                    continue
                _progress(f"run {rep + 1}/{args.repeats}", size, sides)
            pull_meta = {"pulled_bytes": pull.pulled_bytes, "pack_bytes": pull.pack_bytes}
            drop_containers(azurite.connection_string, pull.enc, pull.ref, restore.container)
            credentials.unlink(missing_ok=True)
    finally:
        shutil.rmtree(RUN, ignore_errors=True)
    report(f"Remote readers and restore against Azurite: {args.slices}-slice CT study "
           f"({size / MB:.0f} MB), {args.studies} studies, medians of {args.repeats}",
           "readers", figures(size, args.studies, sides),
           {"repeats": args.repeats, "study_bytes": size, "slices": args.slices,
            **pull_meta, "studies": args.studies,
            "failures": failures,
            "plain_download": f"download_blob max_concurrency={cloud_sync.CONCURRENCY} "
                              "readinto one file, fsync",
            "plain_manifests": "list studies/, download_blob(manifest).readall(), "
                               f"{PLAIN_CONCURRENCY} threads",
            "plain_requests": "list studies/, per manifest: GET manifest, GET keys/site, "
                              f"{PLAIN_CONCURRENCY} threads"})
    if failures:
        raise SystemExit(1)


def _progress(label: str, size: int, sides: dict[str, Side]) -> None:
    def mbs(side: str) -> str:
        return f"{size / MB / sides[side].seconds[-1]:.1f} MB/s"

    def sec(side: str) -> str:
        return f"{sides[side].seconds[-1]:.1f} s"

    console.print(f"{label}: reader pull {mbs('pull')}, download {mbs('download')}; "
                  f"restore {sec('restore')}, manifests {sec('manifests')}, "
                  f"requests {sec('requests')}")


if __name__ == "__main__":
    main()

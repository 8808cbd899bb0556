"""Web (issue 16): DICOMweb from pacs-edge's HTTPS server, next to DIMSE from the
same box and to Orthanc's DICOMweb plugin (when Debian's packages are installed),
in the same run.

One pacs-edge data home holds the CT study (BENCH_SLICES, 300 slices) and
BENCH_STUDIES (10,000) one-instance studies, filled through the durable ingest
path (common.populate). The client is requests (keep-alive Session, HTTP Basic
for a radiologist made with `pacs-edge users add --password-file`, TLS verified
against the home's site CA, the server called `localhost`). Three parts:

- retrieve: WADO-RS of the whole study (`multipart/related;
  type="application/dicom"; transfer-syntax=*`, streamed into one file) and
  dcmtk getscu C-GET of the same study from the same box (into a folder),
  interleaved, `repeats()` runs each; MB/s of the Part 10 files and the server's
  CPU per retrieve. Goal: WADO >= 0.8x C-GET.
- metadata: series metadata of the CT series, cold (the box's metadata cache
  emptied just before: every header read again; the files are in the page cache,
  as they are right after the series arrived; the very first run is the true
  first request) and cached (CACHED_REQUESTS more of the same request), each
  run preceded by a QIDO that matches nothing (the reference: authentication,
  routing, one index look-up). Goals: < 0.5 s cold, < 50 ms cached.
- qido: STUDY-level QIDO-RS at BENCH_STUDIES studies (PatientID exact, a name
  wildcard, a three-day StudyDate range), BENCH_FIND_N requests each, rounds of
  all queries interleaved with the QIDO that matches nothing; the figure is the
  median query minus the median nothing-matching QIDO. The same queries by
  dcmtk findscu, beyond echoscu, as bench/find.py measures them.

Orthanc (`apt-get install orthanc orthanc-dicomweb`, done by bench/run.sh,
not here; started by bench/orthanc.py) gets the same files over its REST API and
the same requests, interleaved
with pacs-edge's, over plain HTTP (see orthanc_target); if its binary or plugin
is missing or it does not start, the output says so and its rows are absent.
Server CPU is the process group's, from /proc (common.group_cpu).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import orthanc
import pydicom
import requests
from common import (
    BENCH_AE,
    HOST,
    MB,
    READY_TIMEOUT,
    WORK,
    BenchError,
    EdgeServer,
    Figure,
    Server,
    console,
    ct_study,
    dcmtk,
    echo_argv,
    files_under,
    free_port,
    fresh_dir,
    pacs_edge,
    populate,
    repeats,
    report,
    run,
    small_studies,
    timed,
    total_bytes,
)
from find import find_argv

USER = "bench"
PASSWORD = "bench web password"  # a throwaway account in a throwaway home
CALLED_NAME = "localhost"  # a name the node certificate carries
STUDY_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
NOTHING = {"StudyInstanceUID": "1.2.826.0.1.3680043.10.543.999999"}
QIDO_QUERIES = {
    "PatientID": {"PatientID": "PE07700007"},  # one patient: 10 studies
    "PatientName wildcard": {"PatientName": "TANAKA^YU*"},
    "StudyDate range": {"StudyDate": "20230301-20230303"},
}
FIND_KEYS = {
    "PatientID": ["PatientID=PE07700007"],
    "PatientName wildcard": ["PatientName=TANAKA^YU*"],
    "StudyDate range": ["PatientID", "StudyDate=20230301-20230303"],
}
NET = ["-to", "10", "-ta", "30", "-td", "120"]
CHUNK = 1 << 20
# Cached metadata: requests per run after the cold one. CPU is read from /proc in clock
# ticks (10 ms), so a single request's CPU is 0 or 10 ms: it is averaged over these.
CACHED_REQUESTS = 5
_HTTPS_READY = "https server ready"


class WebTarget:
    """One DICOMweb server under test: its base URL, HTTP session, DIMSE side, CPU."""

    def __init__(self, label: str, server: Server, base: str, ca: Path | None,
                 metadata_cache: Path | None) -> None:
        self.label = label
        self.server = server
        self.base = base
        self.metadata_cache = metadata_cache
        self.http = requests.Session()
        # Not the environment's CA bundle or proxies: REQUESTS_CA_BUNDLE would override verify.
        self.http.trust_env = False
        self.http.verify = str(ca) if ca else True
        self.http.auth = (USER, PASSWORD)

    def get(self, path: str, **kwargs: object) -> requests.Response:
        answer = self.http.get(self.base + path, timeout=300, **kwargs)  # type: ignore[arg-type]
        if answer.status_code != 200:
            raise BenchError(f"{self.label} GET {path.split('?')[0]}: {answer.status_code}")
        return answer

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                self.get("/dicom-web/studies", params=NOTHING)
                return
            except (requests.RequestException, BenchError) as exc:
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.label} DICOMweb not answering: {exc}") from exc
            time.sleep(0.2)


# --- servers -------------------------------------------------------------------------

def edge_target(home: Path, files: list[Path]) -> WebTarget:
    shutil.rmtree(home, ignore_errors=True)
    edge = EdgeServer(home, http_port=free_port())
    start = time.monotonic()
    populate(home, files)
    console.print(f"populated pacs-edge: {len(files)} instances in "
                  f"{time.monotonic() - start:.0f} s")
    edge.start()
    secret = home.parent / f"{home.name}-{USER}.password"
    secret.write_text(PASSWORD + "\n", encoding="utf-8")
    os.chmod(secret, 0o600)
    run([*pacs_edge(), "users", "add", USER, "--home", str(home), "--role", "radiologist",
         "--password-file", str(secret)])
    target = WebTarget("pacs-edge", edge, f"https://{CALLED_NAME}:{edge.http_port}",
                       home / "tls" / "ca.pem", home / "cache" / "metadata")
    target.wait_ready()
    return target


def orthanc_target(folder: Path, files: list[Path]) -> WebTarget:
    """Orthanc with its DICOMweb plugin (bench/orthanc.py), HTTP Basic, filled over its
    REST API.

    Plain HTTP on loopback, not HTTPS: Debian's Orthanc 1.10.1 resets every TLS
    connection here (SslEnabled with an EC or an RSA certificate alike), so Orthanc is
    spared the TLS work pacs-edge does; the comparison leans in Orthanc's favour."""
    server = orthanc.Orthanc(fresh_dir(folder), users={USER: PASSWORD}, dicomweb=True,
                             log_name="web-orthanc.log").start()
    target = WebTarget("Orthanc", server, server.base, None, None)
    try:
        start = time.monotonic()
        server.upload(files)
        console.print(f"populated Orthanc: {len(files)} instances in "
                      f"{time.monotonic() - start:.0f} s")
        target.wait_ready()
    except (BenchError, requests.RequestException):
        server.stop()
        raise
    return target


# --- measurements --------------------------------------------------------------------

def wado_study(target: WebTarget, study_uid: str, out: Path) -> tuple[float, int, int]:
    """Seconds, bytes of the body, parts: the whole study streamed into one file."""
    start = time.perf_counter()
    answer = target.http.get(f"{target.base}/dicom-web/studies/{study_uid}", stream=True,
                             headers={"Accept": STUDY_ACCEPT}, timeout=300)
    if answer.status_code != 200:
        raise BenchError(f"{target.label} WADO-RS study: {answer.status_code}")
    size = 0
    with out.open("wb") as fh:
        for chunk in answer.iter_content(CHUNK):
            fh.write(chunk)
            size += len(chunk)
    seconds = time.perf_counter() - start
    return seconds, size, _count_parts(answer.headers.get("Content-Type", ""), out)


def _count_parts(content_type: str, body: Path) -> int:
    params = dict(p.strip().split("=", 1) for p in content_type.split(";")[1:] if "=" in p)
    boundary = params.get("boundary", "").strip('"').encode()
    if not boundary:
        raise BenchError(f"no multipart boundary in {content_type!r}")
    return body.read_bytes().count(b"--" + boundary) - 1  # the closing delimiter


def c_get(target: WebTarget, study_uid: str, out: Path) -> tuple[float, int]:
    fresh_dir(out)
    server = target.server
    seconds = timed([dcmtk("getscu"), "-S", "-aet", BENCH_AE, "-aec", server.ae_title, *NET,
                     "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                     "-k", f"StudyInstanceUID={study_uid}", HOST, str(server.port)])
    return seconds, len(files_under(out))


def timed_get(target: WebTarget, path: str, **kwargs: object) -> tuple[float, requests.Response]:
    start = time.perf_counter()
    answer = target.get(path, **kwargs)
    return time.perf_counter() - start, answer


class Samples:
    """Samples per (measure, target label); failures per the same key (first only)."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], list[float]] = {}
        self.failures: dict[tuple[str, str], str] = {}

    def add(self, measure: str, label: str, value: float) -> None:
        self.values.setdefault((measure, label), []).append(value)

    def attempt(self, measure: str, label: str, do: Callable[[], None]) -> None:
        if (measure, label) in self.failures:
            return
        try:
            do()
        except (BenchError, requests.RequestException) as exc:
            self.failures[(measure, label)] = str(exc).strip().splitlines()[-1][:120]
            console.print(f"[red]{measure} from {label} failed:[/red] {exc}")

    def get(self, measure: str, label: str) -> list[float]:
        return self.values.get((measure, label), [])


def bench_retrieve(targets: list[WebTarget], study_uid: str, count: int, size: int,
                   samples: Samples, rep: int) -> None:
    body, folder = WORK / "web-wado.bin", WORK / "web-get"
    for target in targets:
        cpu = target.server.cpu_seconds

        def wado(target: WebTarget = target, cpu: Callable[[], float] = cpu) -> None:
            before = cpu()
            seconds, _, found = wado_study(target, study_uid, body)
            used = cpu() - before
            if found != count:
                raise BenchError(f"{found} of {count} instances in the WADO-RS answer")
            samples.add("WADO-RS", target.label, size / MB / seconds)
            samples.add("WADO-RS CPU", target.label, used)
            console.print(f"run {rep} WADO-RS {target.label}: {seconds:.2f} s, "
                          f"{size / MB / seconds:.1f} MB/s, {used:.2f} CPU-s")

        def get(target: WebTarget = target, cpu: Callable[[], float] = cpu) -> None:
            before = cpu()
            seconds, found = c_get(target, study_uid, folder)
            time.sleep(0.2)  # forked children exit and are reaped
            used = cpu() - before
            if found != count:
                raise BenchError(f"{found} of {count} instances arrived by C-GET")
            samples.add("C-GET", target.label, size / MB / seconds)
            samples.add("C-GET CPU", target.label, used)
            console.print(f"run {rep} C-GET {target.label}: {seconds:.2f} s, "
                          f"{size / MB / seconds:.1f} MB/s, {used:.2f} CPU-s")

        samples.attempt("WADO-RS", target.label, wado)
        samples.attempt("C-GET", target.label, get)
    body.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def bench_metadata(targets: list[WebTarget], study_uid: str, series_uid: str, count: int,
                   samples: Samples, rep: int) -> None:
    path = f"/dicom-web/studies/{study_uid}/series/{series_uid}/metadata"
    for target in targets:
        def one(target: WebTarget = target) -> None:
            nothing, _ = timed_get(target, "/dicom-web/studies", params=NOTHING)
            if target.metadata_cache is not None:
                shutil.rmtree(target.metadata_cache, ignore_errors=True)
            cpu = target.server.cpu_seconds
            before = cpu()
            cold, answer = timed_get(target, path)
            cold_cpu = cpu() - before
            before = cpu()
            cached = []
            for _ in range(CACHED_REQUESTS):
                seconds, again = timed_get(target, path)
                cached.append(seconds)
            cached_cpu = (cpu() - before) / CACHED_REQUESTS
            for body in (answer, again):
                if len(body.json()) != count:
                    raise BenchError(f"series metadata holds {len(body.json())} of {count}")
            samples.add("QIDO, nothing matches", target.label, 1000 * nothing)
            samples.add("series metadata, cold", target.label, 1000 * cold)
            for seconds in cached:
                samples.add("series metadata, cached", target.label, 1000 * seconds)
            samples.add("series metadata, cold CPU", target.label, 1000 * cold_cpu)
            samples.add("series metadata, cached CPU", target.label, 1000 * cached_cpu)
            console.print(f"run {rep} metadata {target.label}: cold {1000 * cold:.0f} ms, "
                          f"cached {1000 * cached[0]:.1f} ms then "
                          f"{', '.join(f'{1000 * c:.1f}' for c in cached[1:])} "
                          f"(nothing-QIDO {1000 * nothing:.1f})")

        samples.attempt("series metadata", target.label, one)


def bench_qido(targets: list[WebTarget], per_round: int, samples: Samples,
               matches: dict[tuple[str, str], int]) -> None:
    """One round: for each target, each query (and the nothing-matching one) `per_round`
    times back to back; latency per request, server CPU per request over the round."""
    for target in targets:
        for q, params in {"nothing": NOTHING, **QIDO_QUERIES}.items():
            def one(target: WebTarget = target, q: str = q,
                    params: dict[str, str] = params) -> None:
                before = target.server.cpu_seconds()
                for _ in range(per_round):
                    seconds, answer = timed_get(target, "/dicom-web/studies", params=params)
                    found = len(answer.json()) if answer.content else 0
                    if matches.setdefault((target.label, q), found) != found:
                        raise BenchError(f"QIDO {q} answered {found} studies, then another")
                    samples.add(f"QIDO {q}", target.label, 1000 * seconds)
                used = target.server.cpu_seconds() - before
                samples.add(f"QIDO {q} CPU", target.label, 1000 * used / per_round)

            samples.attempt(f"QIDO {q}", target.label, one)


def bench_find(targets: list[WebTarget], samples: Samples,
               matches: dict[tuple[str, str], int]) -> None:
    """One round of findscu: echoscu, then each query, against each target."""
    for target in targets:
        server = target.server
        for q, keys in {"C-ECHO": [], **FIND_KEYS}.items():
            def one(q: str = q, keys: list[str] = keys, server: Server = server,
                    label: str = target.label) -> None:
                argv = echo_argv(server.port, server.ae_title) if q == "C-ECHO" else \
                    find_argv(server, keys)
                samples.add(f"findscu {q}", label, 1000 * timed(argv))
                if q != "C-ECHO" and (label, f"find {q}") not in matches:
                    matches[(label, f"find {q}")] = _find_matches(server, keys)

            samples.attempt(f"findscu {q}", target.label, one)


def _find_matches(server: Server, keys: list[str]) -> int:
    import tempfile

    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        run(find_argv(server, keys, Path(tmp)))
        return len(list(Path(tmp).glob("rsp*.dcm")))


# --- figures -------------------------------------------------------------------------

WADO_FIGURE = "WADO-RS study (transfer-syntax=*)"
COLD_FIGURE = "series metadata, cold"
CACHED_FIGURE = "series metadata, cached"


def figures_for(labels: list[str], samples: Samples, matches: dict[tuple[str, str], int],
                count: int) -> list[Figure]:
    """Per server: its figures, each with its same-box reference; then pacs-edge's main
    figures again with Orthanc's as the reference (when Orthanc was measured).
    References are named after the client and the server ("getscu from pacs-edge"),
    so that the summary, which lists subjects starting with "pacs-edge", skips them."""

    def fig(measure: str, subject: str, label: str, unit: str, name: str, *,
            values: list[float] | None = None, higher: bool = False, note: str = "",
            reference: Figure | None = None) -> Figure:
        data = samples.get(measure, label) if values is None else values
        return Figure(name, subject, unit, data, reference, higher_is_better=higher,
                      note=samples.failures.get((measure, label), "") or note)

    def beyond(measure: str, label: str, base: str) -> list[float]:
        floor = Figure("", label, "ms", samples.get(base, label)).median or 0.0
        return [s - floor for s in samples.get(measure, label)]

    figures: list[Figure] = []
    main: dict[tuple[str, str], Figure] = {}  # (figure name, label) -> figure
    for label in labels:
        get, nothing = f"getscu from {label}", f"nothing-QIDO to {label}"
        ref = fig("C-GET", get, label, "MB/s", "C-GET (getscu)", higher=True)
        ref_cpu = fig("C-GET CPU", get, label, "CPU-s", "C-GET server CPU")
        nothing_ms = fig("QIDO nothing", nothing, label, "ms", "QIDO matching nothing")
        nothing_cpu = fig("QIDO nothing CPU", nothing, label, "CPU-ms",
                          "QIDO matching nothing, server CPU")
        echo = fig("findscu C-ECHO", f"echoscu to {label}", label, "ms", "C-ECHO (echoscu)")
        figures += [
            fig("WADO-RS", label, label, "MB/s", WADO_FIGURE, higher=True, reference=ref,
                note=f"({count} instances)"), ref,
            fig("WADO-RS CPU", label, label, "CPU-s", "WADO-RS study server CPU",
                reference=ref_cpu), ref_cpu]
        before_meta = fig("QIDO, nothing matches", nothing, label, "ms",
                          "QIDO matching nothing, before metadata")
        for name, measure in ((COLD_FIGURE, "series metadata, cold"),
                              (CACHED_FIGURE, "series metadata, cached")):
            figures += [
                fig(measure, label, label, "ms", name, reference=before_meta,
                    note=f"({count} instances)"),
                fig(f"{measure} CPU", label, label, "CPU-ms", f"{name}, server CPU",
                    reference=nothing_cpu)]
        figures.append(before_meta)
        for q in QIDO_QUERIES:
            find = fig(f"findscu {q}", f"findscu to {label}", label, "ms",
                       f"C-FIND {q} beyond C-ECHO", values=beyond(f"findscu {q}", label,
                                                                 "findscu C-ECHO"),
                       note=f"({matches.get((label, f'find {q}'), '?')} matches)")
            figures += [
                fig(f"QIDO {q}", label, label, "ms", f"QIDO {q} beyond nothing-QIDO",
                    values=beyond(f"QIDO {q}", label, "QIDO nothing"), reference=find,
                    note=f"({matches.get((label, q), '?')} matches)"), find,
                fig(f"QIDO {q} CPU", label, label, "CPU-ms", f"QIDO {q}, server CPU",
                    reference=nothing_cpu)]
        figures += [nothing_ms, nothing_cpu, echo]
        for f in figures:
            if f.subject == label:
                main[(f.name, label)] = f
    if len(labels) > 1:  # only like for like: the same instances or the same matches
        edge, other = labels
        for (name, label), mine in list(main.items()):
            theirs = main.get((name, other))
            if (label == edge and theirs is not None and not name.endswith("CPU")
                    and theirs.note == mine.note):
                figures.append(Figure(f"{name} vs {other}", edge, mine.unit, mine.samples,
                                      theirs, higher_is_better=mine.higher_is_better,
                                      note=f"(ratio to {other}'s)"))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=int(os.environ.get("BENCH_SLICES", "300")))
    parser.add_argument("--studies", type=int,
                        default=int(os.environ.get("BENCH_STUDIES", "10000")))
    parser.add_argument("-n", type=int, default=int(os.environ.get("BENCH_FIND_N", "20")))
    parser.add_argument("--no-orthanc", action="store_true", help="pacs-edge alone")
    args = parser.parse_args()

    ct = files_under(ct_study(args.slices))
    size = total_bytes(ct)
    head = pydicom.dcmread(ct[0], stop_before_pixels=True)
    study_uid, series_uid = str(head.StudyInstanceUID), str(head.SeriesInstanceUID)
    files = [*ct, *small_studies(args.studies)]
    WORK.mkdir(parents=True, exist_ok=True)
    load = [round(x, 2) for x in os.getloadavg()]
    orthanc_note = ("Orthanc not measured: --no-orthanc" if args.no_orthanc
                    else orthanc.missing(dicomweb=True))
    targets: list[WebTarget] = []
    samples = Samples()
    matches: dict[tuple[str, str], int] = {}
    rounds = repeats()
    per_round = max(1, -(-args.n // rounds))
    try:
        targets.append(edge_target(WORK / "web-edge", files))
        if not orthanc_note:
            try:
                targets.append(orthanc_target(WORK / "web-orthanc", files))
            except (BenchError, requests.RequestException) as exc:
                orthanc_note = f"Orthanc not measured: {str(exc).strip().splitlines()[-1]}"
                console.print(f"[red]{orthanc_note}[/red]\n{exc}")
        if orthanc_note:
            console.print(f"[yellow]{orthanc_note}[/yellow]")
        # The first metadata request of each server is the true "first after arrival".
        for rep in range(1, rounds + 1):
            bench_metadata(targets, study_uid, series_uid, len(ct), samples, rep)
            bench_retrieve(targets, study_uid, len(ct), size, samples, rep)
            bench_qido(targets, per_round, samples, matches)
            for _ in range(per_round):
                bench_find(targets, samples, matches)
    finally:
        for target in reversed(targets):
            with contextlib.suppress(Exception):
                target.http.close()
            target.server.stop()
        for folder in ("web-edge", "web-orthanc", "web-get"):
            shutil.rmtree(WORK / folder, ignore_errors=True)
        (WORK / "web-wado.bin").unlink(missing_ok=True)
        (WORK / f"web-edge-{USER}.password").unlink(missing_ok=True)

    figures = figures_for([t.label for t in targets], samples, matches, len(ct))
    load_after = [round(x, 2) for x in os.getloadavg()]
    report(f"Web: WADO-RS of {len(ct)} CT slices ({size / MB:.0f} MB) vs C-GET (goal >= 0.8x), "
           f"series metadata (goals < 500 ms cold, < 50 ms cached), QIDO at {args.studies} "
           f"studies; load {load[0]} -> {load_after[0]}", "web", figures,
           {"instances": len(ct), "bytes": size, "studies": args.studies, "n": args.n,
            "orthanc": orthanc_note or "measured", "load_before": load,
            "load_after": load_after, "matches": {f"{k[0]} {k[1]}": v
                                                  for k, v in matches.items()},
            "failures": {f"{k[0]} {k[1]}": v for k, v in samples.failures.items()}})
    if orthanc_note:
        console.print(f"[yellow]{orthanc_note}[/yellow]")


if __name__ == "__main__":
    start = time.monotonic()
    main()
    console.print(f"web bench took {time.monotonic() - start:.0f} s")

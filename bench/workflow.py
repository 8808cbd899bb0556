"""The order workflow (issue 15): HL7 orders over MLLP, worklist C-FIND, Storage Commitment.

Three figures, each next to a reference measured in the same run:

- orders: BENCH_ORDERS (500) ORM^O01 new orders sent over ONE MLLP connection
  with python-hl7's MLLPClient, each waiting for its ACK (HL7 original mode);
  seconds from the first send until the last AA. References, interleaved with
  pacs-edge run by run: bench/mllp_ack.py, python-hl7's MLLP server answering
  AA with nothing kept (round trip and parsing), and the same with one SQLite
  row committed (WAL, synchronous=FULL) before each AA (the durable floor).
  Goal: 500 orders in under 5 s.
- worklist: BENCH_WORKLIST_ITEMS (5,000) SCHEDULED orders in the index
  (written through the orders store, untimed), 10 stations x 50 days; dcmtk
  `findscu -W` asks for one station on one day (10 items), BENCH_FIND_N (20)
  times, interleaved with as many `echoscu` runs; the figure is the median
  query minus the median C-ECHO (process start and association cancel out,
  as in bench/find.py). Goal: under 50 ms beyond the C-ECHO.
- commitment: the CT study (BENCH_SLICES, 300 instances) stored in the home
  through the durable ingest path (untimed); a pynetdicom Storage Commitment
  SCU sends the N-ACTION for all of them and waits for the N-EVENT-REPORT on
  the same association; milliseconds from the N-ACTION sent until the report
  arrived (every instance committed, none failed). Reference: a C-ECHO round
  trip on the same association, just before. Goal: under 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import queue
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import (
    BENCH_AE,
    EDGE_AE,
    HOST,
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
    pacs_edge,
    populate,
    repeats,
    report,
    run,
    timed,
)

ORDERS_FIGURE = "orders over 1 MLLP connection"
WORKLIST_FIGURE = "worklist C-FIND beyond C-ECHO"
COMMIT_FIGURE = "commitment N-ACTION to report"
PARTS = ["orders", "worklist", "commitment"]
STATIONS = 10
DAYS = 50
FIRST_DAY = "20250101"
SPS = "ScheduledProcedureStepSequence[0]."
WORKLIST_QUERY = {f"{SPS}ScheduledStationAETitle": "ST03",
                  f"{SPS}ScheduledProcedureStepStartDate": "20250110"}
WORKLIST_RETURN_KEYS = ("PatientName", "PatientID", "AccessionNumber", "RequestedProcedureID",
                        "StudyInstanceUID", f"{SPS}Modality",
                        f"{SPS}ScheduledProcedureStepStartTime", f"{SPS}ScheduledProcedureStepID")
_ACK_READY = re.compile(r"mllp ack server ready port=(\d+)")
EB_CR = b"\x1c\r"


# --- orders ------------------------------------------------------------------------

def ack_server(folder: Path, *, durable: bool) -> Server:
    """bench/mllp_ack.py in its own process group (a port the OS picks)."""
    name = "mllp-ack-durable" if durable else "mllp-ack"
    server = Server(name, "", 0, folder / f"{name}.log")
    argv = [sys.executable, str(Path(__file__).with_name("mllp_ack.py"))]
    server.spawn([*argv, "--durable", str(folder / f"{name}.sqlite3")] if durable else argv)
    deadline = time.monotonic() + READY_TIMEOUT
    while not (ready := _ACK_READY.search(server.log())):
        assert server.proc is not None
        if server.proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise BenchError(f"{name} not ready:\n{server.log()[-3000:]}")
        time.sleep(0.05)
    server.port = int(ready.group(1))
    return server


def orders(label: str, count: int) -> list[str]:
    """`count` new orders, unique per `label` (one run against one server)."""
    import hl7peer  # tests/ is on the path once common is imported

    return [hl7peer.orm(f"{label}-{n}", accession=f"{label}A{n:04d}",
                        patient_id=f"BP{n % 100:03d}", station=f"ST{n % STATIONS:02d}",
                        start=f"202501{1 + n % 28:02d}{8 + n % 10:02d}00")
            for n in range(count)]


def send_orders(port: int, messages: list[str]) -> float:
    """Seconds from the first send until the last AA, one connection, one at a time."""
    import hl7peer
    from hl7.client import MLLPClient

    with MLLPClient(HOST, port) as client:
        client.socket.settimeout(hl7peer.TIMEOUT)
        start = time.perf_counter()
        for message in messages:
            data = client.send_message(message)
            while not data.endswith(EB_CR):
                chunk = client.socket.recv(4096)
                if not chunk:
                    raise BenchError("MLLP connection closed before the ACK")
                data += chunk
            ack = hl7peer.parse_ack(data)
            if ack.code != "AA":
                raise BenchError(f"order answered {ack.code}: {ack.text}")
        return time.perf_counter() - start


def scheduled_orders(edge: EdgeServer) -> int:
    return len(json.loads(run([*pacs_edge(), "worklist", "list", "--json", "--home",
                               str(edge.home)], stdout_only=True)))


def bench_orders(count: int) -> list[Figure]:
    folder = WORK / "wf-orders"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    hl7_port = free_port()
    edge = EdgeServer(folder / "home", hl7_port=hl7_port)
    edge.add_peer("ris", "RIS", 0, allow="hl7")
    servers: dict[str, Server] = {}
    samples: dict[str, list[float]] = {}
    try:
        servers["pacs-edge"] = edge.start()
        servers["python-hl7 ACK, durable commit"] = ack_server(folder, durable=True)
        servers["python-hl7 ACK, nothing kept"] = ack_server(folder, durable=False)
        for label in servers:
            samples[label] = []
        for n in range(repeats()):  # interleaved; the first side changes every run
            labels = list(servers)[n % len(servers):] + list(servers)[:n % len(servers)]
            for label in labels:
                port = hl7_port if label == "pacs-edge" else servers[label].port
                samples[label].append(send_orders(port, orders(f"R{n}{label[:2]}", count)))
        kept = scheduled_orders(edge)
        if kept != count * repeats():
            raise BenchError(f"pacs-edge holds {kept} orders, {count * repeats()} were sent")
    finally:
        for server in servers.values():
            server.stop()
    shutil.rmtree(folder, ignore_errors=True)
    labels = list(samples)
    figures = [Figure(ORDERS_FIGURE, label, "s", samples[label], higher_is_better=False,
                      note=f"({count} orders)") for label in labels]
    edge_fig, durable, plain = figures
    edge_fig.reference = durable
    durable.reference = plain
    plain_copy = Figure(ORDERS_FIGURE, "pacs-edge", "s", edge_fig.samples, reference=plain,
                        higher_is_better=False, note=f"({count} orders)")
    return [edge_fig, plain_copy, durable, plain]


# --- worklist ----------------------------------------------------------------------

def schedule(home: Path, count: int) -> None:
    """`count` SCHEDULED orders through the orders store, in one transaction:
    STATIONS stations x DAYS days, the rest spread over the day's hours."""
    from datetime import date, timedelta

    from pydicom.uid import generate_uid

    from appliance.base.config import load_config
    from appliance.store.index import Index
    from appliance.store.order_rows import Demographics, OrderDetails, PatientKey, insert_order

    first = date(int(FIRST_DAY[:4]), int(FIRST_DAY[4:6]), int(FIRST_DAY[6:]))
    config = load_config(home)

    def insert_all(conn: object) -> None:
        now = time.time()
        for n in range(count):
            day = (first + timedelta(days=(n // STATIONS) % DAYS)).strftime("%Y%m%d")
            details = OrderDetails(requested_procedure_id=f"RP{n:05d}",
                                   requested_procedure_desc="Exam", sps_id=f"SPS{n:05d}",
                                   sps_description="Step", modality="CT",
                                   station_ae_title=f"ST{n % STATIONS:02d}",
                                   sps_start_date=day,
                                   sps_start_time=f"{8 + (n // (STATIONS * DAYS)) % 10:02d}0000")
            insert_order(conn, accession_number=f"WL{n:05d}",  # type: ignore[arg-type]
                         placer_order_number=f"PL{n:05d}", filler_order_number="",
                         study_uid=str(generate_uid()), details=details,
                         patient=PatientKey(f"WP{n:05d}"),
                         demographics=Demographics(f"Bench^Patient{n}", "19700101", "O"),
                         at=now)

    async def main() -> None:
        async with Index(config.index.path) as index:
            assert index.writer is not None
            await index.writer.submit_sync(insert_all)

    asyncio.run(main())


def worklist_argv(edge: EdgeServer, out: Path | None = None) -> list[str]:
    args = [dcmtk("findscu"), "-W", "-aet", BENCH_AE, "-aec", EDGE_AE]
    for key, value in WORKLIST_QUERY.items():
        args += ["-k", f"{key}={value}"]
    for key in WORKLIST_RETURN_KEYS:
        args += ["-k", key]
    if out is not None:
        args += ["-X", "-od", str(out)]
    return [*args, HOST, str(edge.port)]


def bench_worklist(items: int, n: int) -> list[Figure]:
    home = WORK / "wf-worklist"
    shutil.rmtree(home, ignore_errors=True)
    edge = EdgeServer(home, hl7_port=free_port(), allow="worklist")
    start = time.monotonic()
    schedule(home, items)
    console.print(f"scheduled {items} worklist items in {time.monotonic() - start:.0f} s")
    echo, find = [], []
    try:
        edge.start()
        with tempfile.TemporaryDirectory(dir=WORK) as tmp:
            run(worklist_argv(edge, Path(tmp)))
            matches = len(list(Path(tmp).glob("rsp*.dcm")))
        if matches != items // (STATIONS * DAYS):
            raise BenchError(f"worklist query returned {matches} items")
        for _ in range(n):
            echo.append(1000 * timed(echo_argv(edge.port, EDGE_AE)))
            find.append(1000 * timed(worklist_argv(edge)))
    finally:
        edge.stop()
    shutil.rmtree(home, ignore_errors=True)
    echo_fig = Figure("C-ECHO (echoscu)", "echoscu, same server", "ms", echo,
                      higher_is_better=False)
    find_fig = Figure("worklist C-FIND (findscu -W)", "pacs-edge", "ms", find,
                      reference=echo_fig, higher_is_better=False,
                      note=f"({matches} of {items} items)")
    base = echo_fig.median or 0.0
    beyond = Figure(WORKLIST_FIGURE, "pacs-edge", "ms", [s - base for s in find],
                    higher_is_better=False, note=f"({matches} of {items} items)")
    return [beyond, find_fig, echo_fig]


# --- storage commitment ------------------------------------------------------------

def bench_commitment(slices: int) -> list[Figure]:
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StorageCommitmentPushModel,
        Verification,
    )

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    files = files_under(ct_study(slices))
    items = []
    for path in files:
        meta = pydicom.filereader.read_file_meta_info(path)
        item = Dataset()
        item.ReferencedSOPClassUID = meta.MediaStorageSOPClassUID
        item.ReferencedSOPInstanceUID = meta.MediaStorageSOPInstanceUID
        items.append(item)
    home = WORK / "wf-commit"
    shutil.rmtree(home, ignore_errors=True)
    edge = EdgeServer(home, hl7_port=free_port(), allow="store,commit")
    populate(home, files)
    reports: queue.Queue[tuple[float, Dataset]] = queue.Queue()

    def on_report(event: evt.Event) -> tuple[int, None]:
        reports.put((time.perf_counter(), event.event_information))
        return 0x0000, None

    ae = AE(BENCH_AE)
    ae.add_requested_context(Verification)
    ae.add_requested_context(StorageCommitmentPushModel)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    echo, commit = [], []
    try:
        edge.start()
        for _ in range(repeats()):
            assoc = ae.associate(HOST, edge.port, ae_title=EDGE_AE,
                                 evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
            if not assoc.is_established:
                raise BenchError("association for Storage Commitment refused")
            try:
                start = time.perf_counter()
                status = assoc.send_c_echo()
                echo.append(1000 * (time.perf_counter() - start))
                if int(status.Status) != 0:
                    raise BenchError(f"C-ECHO status 0x{int(status.Status):04X}")
                info = Dataset()
                info.TransactionUID = generate_uid()
                info.ReferencedSOPSequence = items
                start = time.perf_counter()
                status, _ = assoc.send_n_action(info, 1, StorageCommitmentPushModel,
                                                "1.2.840.10008.1.20.1.1")
                if int(status.Status) != 0:
                    raise BenchError(f"N-ACTION status 0x{int(status.Status):04X}")
                try:
                    arrived, answer = reports.get(timeout=60)
                except queue.Empty:
                    raise BenchError("no N-EVENT-REPORT within 60 s") from None
                commit.append(1000 * (arrived - start))
                committed = len(answer.get("ReferencedSOPSequence", []))
                failed = len(answer.get("FailedSOPSequence", []))
                if committed != len(items) or failed:
                    raise BenchError(f"report: {committed} committed, {failed} failed")
            finally:
                assoc.release()
    finally:
        ae.shutdown()
        edge.stop()
    shutil.rmtree(home, ignore_errors=True)
    echo_fig = Figure("C-ECHO round trip", "same association", "ms", echo,
                      higher_is_better=False)
    return [Figure(COMMIT_FIGURE, "pacs-edge", "ms", commit, reference=echo_fig,
                   higher_is_better=False, note=f"({len(items)} instances)"), echo_fig]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--orders", type=int, default=int(os.environ.get("BENCH_ORDERS", "500")))
    parser.add_argument("--items", type=int,
                        default=int(os.environ.get("BENCH_WORKLIST_ITEMS", "5000")))
    parser.add_argument("--slices", type=int, default=int(os.environ.get("BENCH_SLICES", "300")))
    parser.add_argument("-n", type=int, default=int(os.environ.get("BENCH_FIND_N", "20")))
    # No `choices`: Python 3.11's argparse checks an empty nargs="*" list against them
    # as a whole and refuses it. None given means every part.
    parser.add_argument("parts", nargs="*", help=f"any of {', '.join(PARTS)} (default: all)")
    args = parser.parse_args()
    parts = args.parts or PARTS
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}: use {', '.join(PARTS)}")
    WORK.mkdir(parents=True, exist_ok=True)
    load = [round(x, 2) for x in os.getloadavg()]
    figures: list[Figure] = []
    if "orders" in parts:
        figures += bench_orders(args.orders)
    if "worklist" in parts:
        figures += bench_worklist(args.items, args.n)
    if "commitment" in parts:
        figures += bench_commitment(args.slices)
    report(f"Order workflow, medians (goals: {args.orders} orders < 5 s, worklist < 50 ms "
           f"beyond a C-ECHO, commitment of {args.slices} < 2 s)", "workflow", figures,
           {"orders": args.orders, "worklist_items": args.items, "slices": args.slices,
            "n": args.n, "load_before": load, "load_after": [round(x, 2)
                                                             for x in os.getloadavg()]})


if __name__ == "__main__":
    start = time.monotonic()
    main()
    console.print(f"workflow bench took {time.monotonic() - start:.0f} s")

"""A worklist answer makes each item's response identifier as it is sent, not all first.

A universal query may match up to MAX_ITEMS (10,000) orders. Made all at once, the
pydicom Datasets of the responses took ~5.8 KB per item with the 22 keys asked here,
on top of the ~1.5 KB rows (2000 orders: 14.6 MB at the peak); made in turn, the
answer holds the rows and one identifier (3.0 MB). Measured with tracemalloc on a
real index, through the service, iterating as the SCP does.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import tracemalloc
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from appliance.services.peers import Allowlist
from appliance.services.worklist import WorklistService
from appliance.store.index import Index
from appliance.store.order_rows import Demographics, OrderDetails, PatientKey, insert_order

ORDERS = 2000
MODALITY = "CT1"
TOP_KEYS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
            "AccessionNumber", "RequestedProcedureID", "RequestedProcedureDescription",
            "RequestedProcedurePriority", "StudyInstanceUID", "ReferringPhysicianName",
            "RequestingPhysician")
STEP_KEYS = ("ScheduledStationAETitle", "ScheduledStationName",
             "ScheduledProcedureStepLocation", "ScheduledProcedureStepStartDate",
             "ScheduledProcedureStepStartTime", "Modality", "ScheduledPerformingPhysicianName",
             "ScheduledProcedureStepDescription", "ScheduledProcedureStepID",
             "ScheduledProcedureStepStatus")


def _schedule(conn: sqlite3.Connection) -> None:
    for n in range(ORDERS):
        details = OrderDetails(
            requested_procedure_id=f"RP{n}", requested_procedure_desc="CT head",
            sps_id=f"SPS{n}", sps_description="CT head", modality="CT",
            station_ae_title=MODALITY, sps_start_date="20240105", sps_start_time="0800")
        insert_order(conn, accession_number=f"ACC{n:06d}", placer_order_number=f"PL{n}",
                     filler_order_number="", study_uid=str(generate_uid()), details=details,
                     patient=PatientKey(f"P{n:05d}", "HOSP"),
                     demographics=Demographics(f"DOE^JANE{n}", "19700101", "F"),
                     at=time.time())


def _universal_query() -> Dataset:
    step = Dataset()
    for keyword in STEP_KEYS:
        setattr(step, keyword, "")
    identifier = Dataset()
    for keyword in TOP_KEYS:
        setattr(identifier, keyword, "")
    identifier.ScheduledProcedureStepSequence = [step]
    return identifier


def test_worklist_answer_holds_one_response_identifier_at_a_time(tmp_path: Path) -> None:
    (tmp_path / "peers.toml").write_text(
        f'[peers.ct1]\nae_title = "{MODALITY}"\nhost = "127.0.0.1"\nport = 1\n'
        'allow = ["worklist"]\n', encoding="utf-8")
    allowlist = Allowlist(tmp_path / "peers.toml")

    async def run() -> tuple[int, int]:
        async with Index(tmp_path / "index.sqlite3") as index:
            assert index.writer is not None
            await index.writer.submit_sync(_schedule)
            service = WorklistService(index, allowlist, past_days=0)
            tracemalloc.start()
            try:
                answer = await service.find(MODALITY, _universal_query())
                _, after_find = tracemalloc.get_traced_memory()
                sent = 0
                for response in answer:  # as the SCP sends them: one, then the next
                    assert response.ScheduledProcedureStepSequence[0].Modality == "CT"
                    sent += 1
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert sent == ORDERS
            return after_find, peak

    after_find, peak = asyncio.run(run())
    per_item = peak / ORDERS
    assert per_item < 2500, f"{per_item:.0f} bytes per item at the peak ({after_find} after find)"

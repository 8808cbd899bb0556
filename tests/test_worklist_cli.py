"""`pacs-edge worklist list|show`: what an operator sees of the orders.

Orders are written by the real order service on the home's index (as the
HL7 listener would), then read by the CLI in its own process."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import init_home, run_pacs_edge

from appliance.audit import operators
from appliance.base.config import load_config
from appliance.services.orders import (
    MessageHeader,
    OrderControl,
    OrderRequest,
    OrderService,
)
from appliance.store.index import Index
from appliance.store.order_rows import Demographics, OrderDetails, PatientKey
from appliance.store.prefetch_rows import RequestTrigger, insert_request


def _header(control_id: str) -> MessageHeader:
    return MessageHeader("RIS", "HOSP", "PACS-EDGE", "IMAGING", control_id, "ORM", "O01",
                         "P", "2.5", control_id * 4)


def _order(accession: str, control: OrderControl = OrderControl.NEW,
           start: str = "20240102", time: str = "0930") -> OrderRequest:
    return OrderRequest(control, accession, f"PL{accession}", "", "",
                        OrderDetails(modality="CT", station_ae_title="CT1",
                                     sps_start_date=start, sps_start_time=time,
                                     requested_procedure_desc="CT head"),
                        PatientKey("PAT1", "HOSP"), Demographics("DOE^JANE", "19700101", "F"))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = init_home(tmp_path / "home", default_peer=False)

    async def orders() -> None:
        async with Index(load_config(home).index.path) as index:
            service = OrderService(index)
            await service.apply(_header("M1"), (_order("ACC2", start="20240105"),))
            await service.apply(_header("M2"), (_order("ACC1"),))
            await service.apply(_header("M3"), (_order("ACC2", OrderControl.CANCEL),))

    asyncio.run(orders())
    return home


def test_worklist_list_shows_orders_by_scheduled_start(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: rich wraps cells at 80
    listed = json.loads(run_pacs_edge("worklist", "list", "--json", "--home", str(home)).stdout)
    assert [(o["accession_number"], o["status"]) for o in listed] == [
        ("ACC1", "SCHEDULED"), ("ACC2", "DISCONTINUED")]
    table = run_pacs_edge("worklist", "list", "--home", str(home)).stdout
    assert "ACC1" in table and "DOE^JANE" in table and "2024-01-02 09:30" in table


def test_worklist_list_shows_the_hour_of_a_start_sent_to_the_hour(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HL7 `2024010308` schedules SPS Start Time `08` (a TM may be HH): the list showed
    the day alone, as for an order without a time."""
    monkeypatch.setenv("COLUMNS", "200")

    async def order() -> None:
        async with Index(load_config(home).index.path) as index:
            await OrderService(index).apply(_header("M4"), (
                _order("ACC3", start="20240103", time="08"),))

    asyncio.run(order())
    table = run_pacs_edge("worklist", "list", "--home", str(home)).stdout
    assert "2024-01-03 08:00" in table


def test_worklist_list_filters_by_status(home: Path) -> None:
    listed = json.loads(run_pacs_edge("worklist", "list", "--json", "--status",
                                      "discontinued", "--home", str(home)).stdout)
    assert [o["accession_number"] for o in listed] == ["ACC2"]


def test_worklist_show_has_every_field_and_the_history(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    shown = run_pacs_edge("worklist", "show", "ACC2", "--home", str(home)).stdout
    assert "DISCONTINUED" in shown and "cancel" in shown and "CT head" in shown
    order = json.loads(run_pacs_edge("worklist", "show", "ACC2", "--json",
                                     "--home", str(home)).stdout)
    assert [h["to_state"] for h in order["history"]] == ["DISCONTINUED"]


def test_worklist_show_of_an_unknown_accession_is_one_line_and_a_hint(home: Path) -> None:
    proc = run_pacs_edge("worklist", "show", "NOPE", "--home", str(home), check=False)
    assert proc.returncode == 2
    assert "no order with accession number 'NOPE'" in proc.stderr
    assert "hint: see `pacs-edge worklist list`" in proc.stderr
    assert "Traceback" not in proc.stderr


def _queries(home: Path) -> list[dict[str, Any]]:
    path = home / "audit" / "audit.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in (json.loads(line)["record"] for line in lines)
            if r["EventIdentification"]["EventID"]["csd-code"] == "110112"]


def test_commands_that_show_patient_data_are_query_records_naming_the_operator(
        home: Path) -> None:
    """`worklist list`, `worklist show` and `prefetch status` put patient data on the
    operator's screen: each is a Query record naming the operator as every other
    operator command's record does (the person logged in, when known, and the
    account), the command, and the patients shown."""
    async def prefetch_request() -> None:
        async with Index(load_config(home).index.path) as index:
            assert index.writer is not None
            await index.writer.submit_sync(lambda c: insert_request(
                c, PatientKey("PREPAT9", "HOSP"), RequestTrigger.MANUAL, hold_until=0.0))

    asyncio.run(prefetch_request())
    run_pacs_edge("worklist", "list", "--home", str(home))
    run_pacs_edge("worklist", "show", "ACC1", "--json", "--home", str(home))
    run_pacs_edge("prefetch", "status", "--home", str(home))
    operator = {p.user_id for p in operators.operators() if p.requestor}
    records = _queries(home)
    assert [r["EventIdentification"]["EventOutcomeDescription"] for r in records] == [
        "pacs-edge worklist list", "pacs-edge worklist show ACC1", "pacs-edge prefetch status"]
    for record, patient in zip(records, ("PAT1", "PAT1", "PREPAT9"), strict=True):
        requestors = {p["UserID"] for p in record["ActiveParticipant"] if p["UserIsRequestor"]}
        assert requestors == operator
        assert patient in {o["ParticipantObjectID"]
                           for o in record["ParticipantObjectIdentification"]}
    matches = [{d["type"]: d["value"] for d in r["ParticipantObjectIdentification"][0][
        "ParticipantObjectDetail"]}["Matches"] for r in records]
    assert matches == ["2", "1", "1"]

"""`pacs-edge worklist`: the orders the RIS sent, their status and linked images.

Read-only: orders change through HL7 (and MPPS), never from here. The
output holds patient data (it is the operator's own screen), like the
worklist a modality shows; nothing of it is logged, and each command is a
Query record in the audit trail naming the operator and the patients shown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from appliance.base.config import Config
from appliance.base.errors import PacsEdgeError
from appliance.cli.common import audit_shown, err, expected_errors, home_option, load, out
from appliance.store import database
from appliance.store import order_rows as order_store
from appliance.store.index import Index
from appliance.store.order_rows import Order, OrderStatus, OrderTransition

_STATUSES = [s.value for s in OrderStatus]


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


def _order_json(order: Order) -> dict[str, Any]:
    return {
        "accession_number": order.accession_number, "status": order.status.value,
        "study_uid": order.study_uid, "placer_order_number": order.placer_order_number,
        "filler_order_number": order.filler_order_number,
        **dataclasses.asdict(order.details), **dataclasses.asdict(order.patient),
        **dataclasses.asdict(order.demographics), "images_received": order.images_received,
        "created_at": _when(order.created_at), "updated_at": _when(order.updated_at),
        "status_changed_at": _when(order.status_changed_at),
    }


def _start(order: Order) -> str:
    """The scheduled start as `YYYY-MM-DD HH:MM`; a start time of hours only (a TM may
    be HH: HL7 `2024010308`) is that hour's :00, not the day alone."""
    d, t = order.details.sps_start_date, order.details.sps_start_time
    day = f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 else d
    return f"{day} {t[:2]}:{t[2:4] or '00'}".strip() if len(t) >= 2 else day


async def _read(config: Config, fn: Any, *args: Any) -> Any:
    async with Index(config.index.path) as index:
        return await database.run_sync(index.reader, fn, *args)


def _audit(config: Config, command: str, orders: list[Order]) -> None:
    audit_shown(config, command, matches=len(orders),
                patients=[(o.patient.patient_id, o.demographics.patient_name) for o in orders],
                study_uids=[o.study_uid for o in orders])


@click.group()
def worklist() -> None:
    """Orders received over HL7 and their status (the Modality Worklist's items)."""


@worklist.command("list")
@home_option
@click.option("--status", type=click.Choice(_STATUSES, case_sensitive=False), default=None,
              help="Only orders in this status.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@expected_errors
def worklist_list(home: Path | None, status: str | None, as_json: bool) -> None:
    """Orders by scheduled start."""
    wanted = OrderStatus(status.upper()) if status else None
    config = load(home)
    orders: list[Order] = asyncio.run(_read(config, order_store.list_orders, wanted))
    _audit(config, "pacs-edge worklist list" + (f" --status {wanted.value}" if wanted else ""),
           orders)
    if as_json:
        out.print_json(json.dumps([_order_json(o) for o in orders]))
        return
    if not orders:
        err.print("no orders" + (f" in status {wanted.value}" if wanted else ""),
                  highlight=False)
        return
    table = Table("Accession", "Status", "Scheduled", "Modality", "Station", "Patient ID",
                  "Patient name", "Procedure", "Images")
    for o in orders:
        table.add_row(o.accession_number, o.status.value, _start(o), o.details.modality,
                      o.details.station_ae_title, o.patient.patient_id,
                      o.demographics.patient_name, o.details.requested_procedure_desc,
                      str(o.images_received))
    out.print(table)


@worklist.command("show")
@home_option
@click.argument("accession")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@expected_errors
def worklist_show(home: Path | None, accession: str, as_json: bool) -> None:
    """One order: every field, its images and its status history."""

    config = load(home)

    async def read() -> tuple[Order | None, list[OrderTransition]]:
        async with Index(config.index.path) as index:
            order = await database.run_sync(index.reader, order_store.find_order, accession)
            steps = ([] if order is None else await database.run_sync(
                index.reader, order_store.transitions, order.id))
            return order, steps

    order, steps = asyncio.run(read())
    _audit(config, f"pacs-edge worklist show {accession}", [order] if order else [])
    if order is None:
        raise PacsEdgeError(f"no order with accession number {accession!r}",
                            hint="see `pacs-edge worklist list`")
    if as_json:
        out.print_json(json.dumps({**_order_json(order), "history": [
            {**dataclasses.asdict(s), "at": _when(s.at)} for s in steps]}))
        return
    table = Table("Field", "Value", show_header=False)
    for key, value in _order_json(order).items():
        table.add_row(key.replace("_", " "), str(value))
    out.print(table)
    history = Table("When", "From", "To", "Trigger", "Source", title="Status history")
    for s in steps:
        history.add_row(_when(s.at), s.from_state, s.to_state, s.trigger, s.source)
    out.print(history)
